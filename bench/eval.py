"""The method x metric table of `lmaczs eval` on the demo world, clean and contaminated, with
the cost side: seconds per clip per method (LMAC-ZS: one decoder pass; IG and SmoothGrad:
many encoder passes).

    python bench/eval.py --n 16 --out /tmp/eval-bench
    python bench/eval.py --n 32 --variants clean,white-noise,mix,speech --ig-steps 32 --smoothgrad-samples 25

Variants: clean (with the randomisation and prompt-sensitivity studies), white-noise, mix
(another scene of the set) and speech (espeak-ng if installed, else formant-synthesised vowels;
`lmaczs_cli.demo.speech`), each at --snr dB. Each variant is its own `lmaczs eval` run under
OUT/<variant> (resumable); all tables are printed together at the end, plus one JSON line
per variant with seconds per clip per method.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lmaczs_cli.baselines import BaselineSettings
from lmaczs_cli.demo.speech import write_speech_folder
from lmaczs_cli.evaluate import METHODS, EvalConfig, run_eval


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
    kept = speech_dir.is_dir() and any(speech_dir.iterdir())        # an earlier run's, reused as is
    made = "kept from an earlier run" if kept else write_speech_folder(speech_dir)
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
                      "ig_steps": args.ig_steps, "smoothgrad_samples": args.smoothgrad_samples,
                      "speech": f"{speech_dir} ({made})"}))
    for c in costs:
        print(json.dumps(c))


if __name__ == "__main__":
    main()
