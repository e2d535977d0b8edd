"""Training throughput of the LMAC-ZS decoder on a frozen CLAP (CPU or GPU).

    python bench/train.py --clap random:HTSAT-tiny --batch-sizes 2 8 --steps 3

Times micro_batch_loss + backward + Adam step on synthetic 10-s clips and prints clips/s and
masked encoder passes/s, for every pair (B² passes) and for 1 mismatched caption per clip.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmaczs_cli.audio import CLIP_SAMPLES
from lmaczs_cli.clap import load_clap
from lmaczs_cli.decoder import DecoderConfig, MaskDecoder, parameter_count
from lmaczs_cli.model import ExplainerModule
from lmaczs_cli.train import TextCache, TrainConfig, micro_batch_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clap", default="random:HTSAT-tiny")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--domain", default="mel")
    args = ap.parse_args()
    clap = load_clap(args.clap)
    torch.manual_seed(0)
    decoder = MaskDecoder(DecoderConfig.for_clap(clap, domain=args.domain))
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-4)
    texts = TextCache(clap)
    module = ExplainerModule(clap, decoder, args.domain)
    result = {"clap": args.clap, "domain": args.domain, "threads": torch.get_num_threads(),
              "decoder_parameters": parameter_count(decoder), "runs": []}
    for b in args.batch_sizes:
        for mismatched in (None, 1):
            cfg = TrainConfig(manifest="-", out="-", domain=args.domain, mismatched=mismatched)
            waves = 0.1 * torch.randn(b, CLIP_SAMPLES, generator=torch.Generator().manual_seed(b))
            captions = [f"caption {i}" for i in range(b)]
            times, passes = [], 0
            for step in range(args.steps + 1):
                t0 = time.perf_counter()
                terms, passes = micro_batch_loss(module, texts, waves, captions, cfg,
                                                 torch.Generator().manual_seed(step))
                terms.total.backward()
                opt.step()
                opt.zero_grad()
                if step:  # the first step warms up
                    times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            result["runs"].append({"batch_size": b, "pairs": "all" if mismatched is None else "matched+1",
                                   "masked_passes_per_step": passes, "s_per_step": t,
                                   "clips_per_s": b / t, "masked_passes_per_s": passes / t})
            print(json.dumps(result["runs"][-1]), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
