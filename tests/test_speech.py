"""Speech for `lmaczs eval --contaminate speech` (lmaczs_cli.demo.speech): the shipped
espeak-ng clips (out of the demo world's domain), how they are remade (a stand-in espeak-ng
here), the in-domain formant synthesiser, and a user's folder never added to."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lmaczs_cli.demo.speech import (SPOKEN, SPOKEN_DIR, SpeechFolderError, formant_speech, main,
                                    synthesise_speech, write_speech_folder)


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


def test_the_shipped_speech_is_espeak_ng_english_under_a_megabyte() -> None:
    sources = json.loads((SPOKEN_DIR / "sources.json").read_text())
    assert sources["program"].startswith("eSpeak NG") and "Data at" not in sources["program"]
    assert [(c["voice"], c["words_per_min"], c["text"]) for c in sources["clips"]] == list(SPOKEN)
    files = sorted(SPOKEN_DIR.glob("*.flac"))
    assert [f.name for f in files] == [f"spoken_{i}.flac" for i in range(len(SPOKEN))]
    assert sum(f.stat().st_size for f in files) <= 2**20
    for f, clip in zip(files, sources["clips"]):
        wave, sr = sf.read(f, dtype="float32")
        assert sr == 22_050 and wave.size / sr == pytest.approx(clip["seconds"], abs=0.01) and wave.size / sr > 3
        frames = np.sqrt(np.mean(wave[: wave.size // 2205 * 2205].reshape(-1, 2205).astype(np.float64) ** 2, axis=1))
        assert (frames > 0.2 * frames.max()).mean() > 0.3                      # 100 ms frames: mostly voiced


def test_the_folder_gets_the_shipped_clips_with_or_without_espeak(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    assert write_speech_folder(tmp_path / "speech", n=2).startswith("espeak-ng, shipped")
    files = sorted((tmp_path / "speech").iterdir())
    assert [f.name for f in files] == ["spoken_0.flac", "spoken_1.flac"]
    assert all(f.read_bytes() == (SPOKEN_DIR / f.name).read_bytes() for f in files)
    with pytest.raises(SpeechFolderError, match=f"give 1 to {len(SPOKEN)}"):
        write_speech_folder(tmp_path / "more", n=len(SPOKEN) + 1)


def _fake_espeak(bin_dir: Path) -> Path:
    """A stand-in espeak-ng: `--version` prints a version line with a local data path; `-v VOICE
    -s WPM -w FILE TEXT` writes a 22.05 kHz wav whose length is the text's, and logs its arguments."""
    bin_dir.mkdir()
    script = bin_dir / "espeak-ng"
    script.write_text(f"""#!{sys.executable}
import sys, numpy as np, soundfile as sf
args = sys.argv[1:]
if args == ["--version"]:
    print("eSpeak NG text-to-speech: 9.99  Data at: /somewhere/espeak-ng-data")
    sys.exit(0)
open({str(bin_dir / 'calls')!r}, "a").write(" ".join(args[:5]) + "\\n")
n = 220 * len(args[-1])
sf.write(args[args.index("-w") + 1], np.sin(np.arange(n) * 0.05).astype("float32") * 0.3, 22050, format="WAV")
""")
    script.chmod(0o755)
    return bin_dir


def test_synthesise_speaks_every_clip_with_espeak_ng_and_records_how(tmp_path: Path, monkeypatch) -> None:
    bin_dir = _fake_espeak(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert synthesise_speech(tmp_path / "spoken") == "eSpeak NG text-to-speech: 9.99"
    calls = (bin_dir / "calls").read_text().splitlines()
    assert calls[0] == f"-v {SPOKEN[0][0]} -s {SPOKEN[0][1]} -w" and len(calls) == len(SPOKEN)
    sources = json.loads((tmp_path / "spoken" / "sources.json").read_text())
    assert sources["program"] == "eSpeak NG text-to-speech: 9.99"
    first = sources["clips"][0]
    assert first["file"] == "spoken_0.flac" and first["seconds"] == round(220 * len(SPOKEN[0][2]) / 22050, 2)
    info = sf.info(tmp_path / "spoken" / "spoken_0.flac")
    assert info.samplerate == 22_050 and info.subtype == "PCM_16"


def test_synthesise_without_espeak_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    with pytest.raises(SpeechFolderError, match="apt-get install espeak-ng"):
        synthesise_speech(tmp_path / "spoken")
    assert not (tmp_path / "spoken").exists()


def test_a_folder_that_holds_audio_is_never_added_to(tmp_path: Path, capsys) -> None:
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
    with pytest.raises(SpeechFolderError, match="give 1 to"):
        write_speech_folder(tmp_path / "new", n=0)
    main([str(tmp_path / "new"), "-n", "1"])
    assert "wrote 1 speech clips (espeak-ng, shipped" in capsys.readouterr().out
