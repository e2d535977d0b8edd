"""The method x metric table of `lmaczs eval` on the demo world, clean and contaminated, with
the cost side: seconds per clip per method (LMAC-ZS: one decoder pass; IG and SmoothGrad:
many encoder passes).

    python bench/eval.py --n 16 --out /tmp/eval-bench
    python bench/eval.py --n 32 --variants clean,white-noise,mix,speech --ig-steps 32 --smoothgrad-samples 25

Variants: clean (with the randomisation and prompt-sensitivity studies), white-noise, mix
(another scene of the set) and speech (formant-synthesised vowels, since no speech corpus or
TTS is assumed here), each at --snr dB. Each variant is its own `lmaczs eval` run under
OUT/<variant> (resumable); all tables are printed together at the end, plus one JSON line
per variant with seconds per clip per method.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf
import torch

from lmaczs_cli.audio import CLIP_SAMPLES, SAMPLE_RATE
from lmaczs_cli.baselines import BaselineSettings
from lmaczs_cli.evaluate import METHODS, EvalConfig, run_eval

VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (570, 840, 2410), (530, 1840, 2480), (300, 870, 2240)]


def formant_speech(seed: int) -> np.ndarray:
    """10 s of vowel-like syllables (~4 per s) from a glottal pulse train through three
    resonators per vowel, f0 100-220 Hz with slow drift. float32 (480000,)."""
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t))
    phase = np.cumsum(f0) / SAMPLE_RATE
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)      # one pulse per period
    out = np.zeros(CLIP_SAMPLES)
    edges = np.cumsum(rng.uniform(0.15, 0.35, 64) * SAMPLE_RATE).astype(int)
    for a, b in zip(np.r_[0, edges[:-1]], edges):
        if a >= CLIP_SAMPLES:
            break
        b = min(b, CLIP_SAMPLES)
        seg = source[a:b]
        for f in VOWELS[rng.integers(len(VOWELS))]:
            r = np.exp(-np.pi * 100 / SAMPLE_RATE)
            seg = scipy.signal.lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / SAMPLE_RATE), r * r], seg)
        out[a:b] = seg * np.hanning(b - a) * (rng.uniform() > 0.2)               # some pauses
    return (0.3 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="demo scenes per variant")
    ap.add_argument("--out", default="/tmp/lmaczs-eval-bench")
    ap.add_argument("--variants", default="clean,white-noise,mix,speech")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--snr", type=float, default=3.0)
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--smoothgrad-samples", type=int, default=25)
    ap.add_argument("--study-clips", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out)
    speech_dir = out / "speech"
    speech_dir.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        sf.write(speech_dir / f"speech_{i}.wav", formant_speech(i), SAMPLE_RATE)
    settings = BaselineSettings(ig_steps=args.ig_steps, smoothgrad_samples=args.smoothgrad_samples)
    tables, costs = [], []
    for variant in args.variants.split(","):
        clean = variant == "clean"
        cfg = EvalConfig(data="demo", out=str(out / variant), methods=tuple(args.methods.split(",")),
                         limit=args.n, device=args.device, contaminate=None if clean else variant,
                         snr=args.snr, speech=str(speech_dir) if variant == "speech" else None,
                         randomization=clean, prompt_sensitivity=clean, study_clips=args.study_clips,
                         baselines=settings)
        t0 = time.perf_counter()
        summary = run_eval(cfg)
        tables.append(f"### {variant}\n\n" + (out / variant / "metrics.md").read_text())
        costs.append({"variant": variant, "wall_s": round(time.perf_counter() - t0, 1), "clips": args.n,
                      "accuracy": summary["accuracy"],
                      "seconds_per_clip": {m: round(r["time_per_clip_s"], 3) for m, r in summary["methods"].items()},
                      **({"randomization_ssim": summary["studies"]["randomization"]["ssim"],
                          "prompt_sensitivity": summary["studies"]["prompt_sensitivity"]} if clean else {})})
    print("\n".join(tables))
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "ig_steps": args.ig_steps, "smoothgrad_samples": args.smoothgrad_samples}))
    for c in costs:
        print(json.dumps(c))


if __name__ == "__main__":
    main()
