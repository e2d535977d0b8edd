"""Speech for the out-of-domain study (`lmaczs eval --contaminate speech --speech DIR`) when no
speech corpus is at hand.

Out of domain: `SPOKEN_DIR` ships four clips of English sentences spoken by eSpeak NG, a
rule-based synthesiser of English phonemes written independently of the demo world's generators
(`SPOKEN` lists voice, rate and text; ``sources.json`` beside the clips records the program and
version). It is synthetic speech, not a recording: further from the world than the world's own
voice, nearer to it than a read-speech corpus such as the paper's LJ-Speech.
`write_speech_folder` copies them, so every machine contaminates with the same bytes whether or
not espeak-ng is installed; `synthesise_speech` made them (``python -m lmaczs_cli.demo.speech
--synthesise DIR`` writes them anew into an empty DIR; needs espeak-ng on PATH, Debian's package
``espeak-ng`` 1.51 made the shipped ones byte for byte). The clips were written by this
project with espeak-ng, whose licence (GPL-3.0-or-later) covers the program, not the audio it
speaks; they ship under the project's licence.

In domain: `formant_speech`, phrases of the demo world's own formant "speech-like voice", an event
kind the demo CLAP was trained on. `lmaczs eval --contaminate speech-in-domain` uses it, labelled
as such; it is not out-of-domain speech.
"""
from __future__ import annotations

import json
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
SPOKEN_DIR = Path(__file__).parent / "spoken"   # the shipped clips: spoken_<i>.flac + sources.json
SPOKEN = (   # (espeak-ng voice, words per minute, text) of clip i
    ("en-us", 160, "the quick brown fox jumps over the lazy dog. please call me back when you have a moment."),
    ("en-gb+f3", 150, "she sells sea shells by the sea shore every morning. the meeting has moved to friday."),
    ("en-gb-scotland+m3", 175, "turn left at the second light, then keep going until you reach the old bridge."),
    ("en-us+f2", 185, "we will need three more chairs, a bigger table and some coffee before the guests arrive."),
)


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
    """The folder given for speech cannot be written as asked; nothing was written."""


def _fresh_folder(folder: Path) -> Path:
    """``folder`` created, refused when it already holds audio (a user's corpus is never added to)."""
    folder = Path(folder)
    if folder.is_dir() and any(is_audio_name(p.name) for p in folder.iterdir()):
        raise SpeechFolderError(f"{folder} already holds audio; give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_speech_folder(folder: Path, n: int = len(SPOKEN)) -> str:
    """Copy the first n shipped speech clips (`SPOKEN_DIR`, 22.05 kHz FLAC) into folder (created;
    it must hold no audio yet); return where they came from. Each file is written atomically."""
    from ..files import atomic_path

    if not 1 <= n <= len(SPOKEN):
        raise SpeechFolderError(f"asked for {n} speech clips; give 1 to {len(SPOKEN)} (the clips that ship)")
    folder = _fresh_folder(folder)
    for i in range(n):
        with atomic_path(folder / f"spoken_{i}.flac") as tmp:
            shutil.copyfile(SPOKEN_DIR / f"spoken_{i}.flac", tmp)
    return f"espeak-ng, shipped in {SPOKEN_DIR.name}/ ({_sources()['program']})"


def _sources() -> dict:
    return json.loads((SPOKEN_DIR / "sources.json").read_text(encoding="utf-8"))


def synthesise_speech(folder: Path) -> str:
    """Speak `SPOKEN` with espeak-ng into folder (created; it must hold no audio yet): spoken_<i>.flac
    (16-bit, espeak-ng's 22.05 kHz) and sources.json (program, version, clips). Returns the version
    line. How the shipped clips were made; needs espeak-ng on PATH."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SpeechFolderError("espeak-ng is not on PATH; install it (Debian: apt-get install espeak-ng)")
    version = subprocess.run([espeak, "--version"], check=True, capture_output=True, text=True).stdout
    version = version.split("Data at")[0].strip()          # "eSpeak NG text-to-speech: 1.51", no local paths
    folder = _fresh_folder(folder)
    clips = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, (voice, words_per_min, text) in enumerate(SPOKEN):
            wav = f"{scratch}/{i}.wav"
            subprocess.run([espeak, "-v", voice, "-s", str(words_per_min), "-w", wav, text],
                           check=True, capture_output=True, timeout=60)
            audio, sr = sf.read(wav, dtype="int16")
            sf.write(folder / f"spoken_{i}.flac", audio, sr, format="FLAC", subtype="PCM_16")
            clips.append({"file": f"spoken_{i}.flac", "voice": voice, "words_per_min": words_per_min,
                          "text": text, "seconds": round(len(audio) / sr, 2)})
    (folder / "sources.json").write_text(json.dumps(
        {"program": version, "command": "espeak-ng -v VOICE -s WORDS_PER_MIN -w OUT.wav TEXT, then 16-bit FLAC",
         "licence": "audio made by this project with espeak-ng (GPL-3.0-or-later covers the program, not "
                    "its output); shipped under the project's licence",
         "clips": clips}, indent=2) + "\n", encoding="utf-8")
    return version


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lmaczs_cli.demo.speech",
                                 description="Write speech clips for `lmaczs eval --contaminate speech --speech DIR`.")
    ap.add_argument("folder", type=Path, help="where to write them (created)")
    ap.add_argument("-n", type=int, default=len(SPOKEN), help=f"how many clips (default {len(SPOKEN)})")
    ap.add_argument("--synthesise", action="store_true",
                    help="speak them anew with espeak-ng (how the shipped clips were made) instead of copying")
    args = ap.parse_args(argv)
    try:
        if args.synthesise:
            print(f"wrote {len(SPOKEN)} speech clips ({synthesise_speech(args.folder)}) to {args.folder}")
            return
        how = write_speech_folder(args.folder, args.n)
    except SpeechFolderError as e:
        ap.error(str(e))
    print(f"wrote {args.n} speech clips ({how}) to {args.folder}")


if __name__ == "__main__":
    main()
