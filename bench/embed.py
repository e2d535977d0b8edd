"""CLAP audio-embedding throughput: the anchor for every later speed ratio.

    python bench/embed.py --clap random:HTSAT-tiny --batch-size 8 --batches 5

Prints clips/s (10-s clips) for our split path (front end + encode) and for laion's own
``CLAP.get_audio_embedding`` on the same model, median over ``--repeats`` timed runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lmaczs_cli.audio import CLIP_SAMPLES
from lmaczs_cli.clap import load_clap


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clap", default="random:HTSAT-tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_clap(args.clap)
    waves = 0.1 * torch.randn(args.batch_size, CLIP_SAMPLES, generator=torch.Generator().manual_seed(0))

    def ours():
        with torch.inference_mode():
            model.embed_audio(waves)

    def laion():
        with torch.inference_mode():
            model.clap.get_audio_embedding([{"waveform": w} for w in waves])

    result = {"clap": args.clap, "batch_size": args.batch_size, "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    for name, fn in (("lmaczs_split", ours), ("laion_get_audio_embedding", laion)):
        times = _time(fn, args.repeats)
        rates = sorted(args.batch_size / t for t in times)
        result[name] = {"clips_per_s_median": statistics.median(rates), "min": rates[0], "max": rates[-1]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
