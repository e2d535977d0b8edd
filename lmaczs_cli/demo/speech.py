"""Speech-like audio for the out-of-domain study (`lmaczs eval --contaminate speech`) when no
speech corpus is at hand: espeak-ng's synthetic speech if it is installed, else vowel-like
syllables synthesised from a glottal pulse train through formant resonators."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

from ..audio import CLIP_SAMPLES, SAMPLE_RATE

# (F1, F2, F3) in Hz of /ɑ/, /i/, /ɔ/, /ɛ/, /u/: adult male averages (Peterson & Barney, 1952)
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (570, 840, 2410), (530, 1840, 2480), (300, 870, 2240))
FORMANT_BANDWIDTH_HZ = 100.0
SENTENCES = ("the quick brown fox jumps over the lazy dog",
             "she sells sea shells by the sea shore every morning",
             "please call me back when you have a moment to talk",
             "the meeting has been moved to half past three on friday")


def formant_speech(seed: int) -> np.ndarray:
    """10 s of vowel-like syllables (about 4 per second, some paused), f0 100-220 Hz with a slow
    drift. float32 (480000,) at 48 kHz, peak 0.3."""
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t))
    phase = np.cumsum(f0) / SAMPLE_RATE
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)     # one pulse per period
    r = np.exp(-np.pi * FORMANT_BANDWIDTH_HZ / SAMPLE_RATE)                  # resonator pole radius
    out = np.zeros(CLIP_SAMPLES)
    edges = np.cumsum(rng.uniform(0.15, 0.35, 64) * SAMPLE_RATE).astype(int)
    for a, b in zip(np.r_[0, edges[:-1]], edges):
        if a >= CLIP_SAMPLES:
            break
        b = min(b, CLIP_SAMPLES)
        seg = source[a:b]
        for f in VOWELS[rng.integers(len(VOWELS))]:
            seg = scipy.signal.lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / SAMPLE_RATE), r * r], seg)
        out[a:b] = seg * np.hanning(b - a) * (rng.uniform() > 0.2)
    return (0.3 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


class SpeechFolderError(ValueError):
    """The folder given for speech already holds audio; nothing was written."""


def write_speech_folder(folder: Path, n: int = 4) -> str:
    """Write n speech clips into folder (created; it must hold no audio yet, so a user's corpus
    is never added to or overwritten); return how they were made: "espeak-ng" when that program
    is on PATH and runs (its 22.05 kHz wavs, sentences cycled, each repeat 20 words/min faster),
    else "formant" (48 kHz flac). Each file is written atomically."""
    from ..data import AUDIO_EXTENSIONS
    from ..files import atomic_path

    if n < 1:
        raise SpeechFolderError(f"asked for {n} speech clips; give at least 1")
    folder = Path(folder)
    if folder.is_dir() and any(p.suffix[1:].lower() in AUDIO_EXTENSIONS for p in folder.iterdir()):
        raise SpeechFolderError(f"{folder} already holds audio; give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    espeak = shutil.which("espeak-ng")
    if espeak:
        with tempfile.TemporaryDirectory() as scratch:
            try:
                for i in range(n):
                    words_per_min = str(160 + 20 * (i // len(SENTENCES)))
                    sentence = SENTENCES[i % len(SENTENCES)]
                    subprocess.run([espeak, "-s", words_per_min, "-w", f"{scratch}/{i}.wav", sentence],
                                   check=True, capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                pass                                        # a broken install: synthesise instead
            else:
                for i in range(n):
                    with atomic_path(folder / f"speech_{i}.wav") as tmp:
                        shutil.copyfile(f"{scratch}/{i}.wav", tmp)
                return "espeak-ng"
    for i in range(n):
        with atomic_path(folder / f"speech_{i}.flac") as tmp:
            sf.write(tmp, formant_speech(i), SAMPLE_RATE, format="FLAC")
    return "formant"


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lmaczs_cli.demo.speech",
                                 description="Write speech clips for `lmaczs eval --contaminate speech --speech DIR`.")
    ap.add_argument("folder", type=Path, help="where to write them (created)")
    ap.add_argument("-n", type=int, default=4, help="how many clips (default 4)")
    args = ap.parse_args(argv)
    try:
        how = write_speech_folder(args.folder, args.n)
    except SpeechFolderError as e:
        ap.error(str(e))
    print(f"wrote {args.n} speech clips ({how}) to {args.folder}")


if __name__ == "__main__":
    main()
