"""Speech-like audio for the out-of-domain study (`lmaczs eval --contaminate speech`) when no
speech corpus is at hand: espeak-ng's synthetic speech if it is installed, else phrases of the
demo world's formant-synthesised "speech-like voice" with pauses between them."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from ..audio import CLIP_SAMPLES, SAMPLE_RATE, is_audio_name
from .events import render_event

PHRASE_SECONDS = (1.5, 3.0)   # s, range of one phrase's length
PAUSE_SECONDS = (0.2, 0.6)    # s, range of the pause after a phrase
SENTENCES = ("the quick brown fox jumps over the lazy dog",
             "she sells sea shells by the sea shore every morning",
             "please call me back when you have a moment to talk",
             "the meeting has been moved to half past three on friday")


def formant_speech(seed: int) -> np.ndarray:
    """10 s of phrases of the demo world's "speech-like voice" (`events.render_event`: a
    glottal pulse train through vowel formant resonators, about 4 syllables a second), each
    PHRASE_SECONDS long with a PAUSE_SECONDS pause after it, every phrase its own speaker
    pitch. float32 (480000,) at 48 kHz, peak 0.3; a pure function of seed."""
    rng = np.random.default_rng(seed)
    out = np.zeros(CLIP_SAMPLES)
    at = int(rng.uniform(*PAUSE_SECONDS) * SAMPLE_RATE)
    while (left := (CLIP_SAMPLES - at) / SAMPLE_RATE) >= PHRASE_SECONDS[0] / 2:
        seconds = min(rng.uniform(*PHRASE_SECONDS), left)
        phrase = render_event("speech-like voice", seconds, int(rng.integers(2 ** 63)))
        out[at: at + phrase.size] = phrase
        at += phrase.size + int(rng.uniform(*PAUSE_SECONDS) * SAMPLE_RATE)
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


class SpeechFolderError(ValueError):
    """The folder given for speech already holds audio; nothing was written."""


def write_speech_folder(folder: Path, n: int = 4) -> str:
    """Write n speech clips into folder (created; it must hold no audio yet, so a user's corpus
    is never added to or overwritten); return how they were made: "espeak-ng" when that program
    is on PATH and runs (its 22.05 kHz wavs, sentences cycled, each repeat 20 words/min faster),
    else "formant" (48 kHz flac). Each file is written atomically."""
    from ..files import atomic_path

    if n < 1:
        raise SpeechFolderError(f"asked for {n} speech clips; give at least 1")
    folder = Path(folder)
    if folder.is_dir() and any(is_audio_name(p.name) for p in folder.iterdir()):
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
