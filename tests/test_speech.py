"""Speech for `lmaczs eval --contaminate speech` (lmaczs_cli.demo.speech): the formant
synthesiser, espeak-ng when it is on PATH (a stand-in program here), and a user's folder
never added to."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lmaczs_cli.demo.speech import SpeechFolderError, formant_speech, main, write_speech_folder


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_formant_speech_is_voiced_band_limited_and_paused(seed: int) -> None:
    a = formant_speech(seed)
    assert a.dtype == np.float32 and a.shape == (480_000,) and np.array_equal(a, formant_speech(seed))
    assert not np.array_equal(a, formant_speech(seed + 10)) and np.abs(a).max() == pytest.approx(0.3, rel=1e-4)
    power = np.abs(np.fft.rfft(a.astype(np.float64))) ** 2
    hz = np.fft.rfftfreq(a.size, 1 / 48_000)
    assert power[(hz > 80) & (hz < 4000)].sum() > 0.9 * power.sum()           # where voices live
    frames = np.sqrt(np.mean(a.reshape(-1, 4800).astype(np.float64) ** 2, axis=1))   # 100 ms RMS
    assert (frames < 0.05 * frames.max()).mean() > 0.05                          # pauses
    assert (frames > 0.2 * frames.max()).mean() > 0.25                           # and syllables


def test_without_espeak_the_folder_gets_formant_flacs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    assert write_speech_folder(tmp_path / "speech", n=2) == "formant"
    files = sorted((tmp_path / "speech").iterdir())
    assert [f.name for f in files] == ["speech_0.flac", "speech_1.flac"]
    wave, sr = sf.read(files[1], dtype="float32")
    assert sr == 48_000 and np.allclose(wave, formant_speech(1), atol=1e-4)


def _fake_espeak(bin_dir: Path, fail: bool = False) -> Path:
    """A stand-in espeak-ng: `-s WPM -w FILE TEXT` writes a 22.05 kHz wav whose length is the
    text's, and logs its arguments."""
    bin_dir.mkdir()
    script = bin_dir / "espeak-ng"
    script.write_text(f"""#!{sys.executable}
import sys, numpy as np, soundfile as sf
args = sys.argv[1:]
open({str(bin_dir / 'calls')!r}, "a").write(" ".join(args[:3]) + "\\n")
{"sys.exit('espeak-ng: no voice data')" if fail else ""}
n = 220 * len(args[-1])
sf.write(args[args.index("-w") + 1], np.sin(np.arange(n) * 0.05).astype("float32") * 0.3, 22050, format="WAV")
""")
    script.chmod(0o755)
    return bin_dir


def test_espeak_ng_makes_the_speech_when_it_is_installed(tmp_path: Path, monkeypatch) -> None:
    bin_dir = _fake_espeak(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert write_speech_folder(tmp_path / "speech", n=5) == "espeak-ng"
    files = sorted((tmp_path / "speech").iterdir())
    assert [f.name for f in files] == [f"speech_{i}.wav" for i in range(5)]
    assert sf.info(files[0]).samplerate == 22_050 and sf.info(files[0]).frames > 0
    calls = (bin_dir / "calls").read_text().split("\n")[:5]
    assert calls[0] == "-s 160 -w" and calls[4] == "-s 180 -w"      # the 5th: sentence 1 again, faster


def test_a_broken_espeak_falls_back_to_formant_speech(tmp_path: Path, monkeypatch) -> None:
    bin_dir = _fake_espeak(tmp_path / "bin", fail=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert write_speech_folder(tmp_path / "speech", n=2) == "formant"
    assert sorted(f.name for f in (tmp_path / "speech").iterdir()) == ["speech_0.flac", "speech_1.flac"]


def test_a_folder_that_holds_audio_is_never_added_to(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sf.write(corpus / "speech_0.flac", np.zeros(4800, np.float32), 48_000)
    before = (corpus / "speech_0.flac").read_bytes()
    with pytest.raises(SpeechFolderError, match="already holds audio"):
        write_speech_folder(corpus)
    assert [p.name for p in corpus.iterdir()] == ["speech_0.flac"] and (corpus / "speech_0.flac").read_bytes() == before
    with pytest.raises(SystemExit) as e:
        main([str(corpus)])
    assert e.value.code == 2 and "already holds audio" in capsys.readouterr().err
    with pytest.raises(SpeechFolderError, match="at least 1"):
        write_speech_folder(tmp_path / "new", n=0)
    main([str(tmp_path / "new"), "-n", "1"])
    assert "wrote 1 speech clips (formant)" in capsys.readouterr().out
