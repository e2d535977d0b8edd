"""Score a demo decoder on what the model-randomisation check and the unseen backgrounds ask,
on the selection scenes (`scores.held_out_scenes`): every choice of decoder is made on these
figures; the frozen test scenes are left for the final report.

    python -m recipes.demo.decoder_study RUN [RUN ...] [--scenes 48] [--random-scenes 8]
        [--noisy-seeds 2] [--json OUT.json] [--clap CLAP_DIR] [--logit-bias B [B ...]]

With --logit-bias, each RUN is scored at each operating point B (`DecoderConfig.logit_bias`: a
constant added to its logits before the sigmoid; the weights are the same);
`recipes.demo.operating_point` writes the one chosen.

For each decoder folder RUN (a `lmaczs train --out`, or lmaczs_cli/demo/model):
- ``localization``: `scores.localization_report` (mass, chance, absent / matched, gap, empty);
- ``randomization``: cascading re-initialisation of the demo CLAP's audio encoder from the top
  (`evaluate.encoder_stages`), per stage the mean SSIM of each scene's first-event mask to the
  intact model's, and the masks' mass on that event beside its chance;
- ``generalisation``: single events over `world.UNSEEN_BACKGROUNDS` (never in a training recipe)
  at SNRs 0-20 dB (`scores.background_rows`), per background and SNR the mass on the event,
  its chance, and absent / matched (the prompt of another event kind, drawn per scene); beside
  them, the share of compositions CLAP itself ranks the event's prompt first on ("hears") and
  the same figures over those only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from lmaczs_cli import Explainer, metrics
from lmaczs_cli.demo import scores, world



def randomization_rows(explainer: Any, n_scenes: int = 8, seed: int = 0,
                       split: str = "selection") -> dict[str, dict[str, float]]:
    """{stage: {"ssim", "mass", "chance", "mask_mean"}} under cascading re-initialisation, each of
    the first `n_scenes` selection scenes explained for its first event's prompt; "intact" first."""
    import copy

    from lmaczs_cli.baselines import BaselineSettings
    from lmaczs_cli.evaluate import MaskMethods, encoder_stages, reinitialise_, ssim

    clap = explainer.clap
    decoder = explainer.decoder
    domain = explainer.domain
    scenes = scores.held_out_scenes(n_scenes, split)
    text = clap.encode_text([world.prompt_for(s.events[0].name) for s in scenes])
    waves = torch.from_numpy(np.stack([s.wave for s in scenes]))
    target = torch.arange(n_scenes)
    regions = [metrics.dilate(s.mel_masks[s.events[0].name]) for s in scenes]

    def summary(masks: np.ndarray, original: np.ndarray) -> dict[str, float]:
        return {"ssim": float(np.mean([ssim(a, b) for a, b in zip(original, masks)])),
                "mass": float(np.mean([metrics.mass_in_region(m, r) for m, r in zip(masks, regions)])),
                "chance": float(np.mean([r.mean() for r in regions])),
                "mask_mean": float(masks.mean())}

    original = MaskMethods(clap, decoder, domain, text, BaselineSettings())("lmaczs", waves, target)
    out = {"intact": summary(original, original)}
    broken = type(clap)(copy.deepcopy(clap.clap), clap.cfg, clap.tokenizer, f"{clap.source} (randomised)")
    for s, (name, modules) in enumerate(encoder_stages(broken)):
        reinitialise_(modules, seed + s)
        masks = MaskMethods(broken, decoder, domain, text, BaselineSettings())("lmaczs", waves, target)
        out[name] = summary(masks, original)
    return out


def study(run: str, n_scenes: int, random_scenes: int, noisy_seeds: int, clap: str = "demo",
          logit_bias: float | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    explainer = Explainer.load(clap=clap, decoder=run, device="cpu", force=True)
    if logit_bias is not None:          # the same weights at another operating point
        explainer.decoder.cfg = dataclasses.replace(explainer.decoder.cfg, logit_bias=logit_bias)
    t0 = time.time()
    out: dict[str, Any] = {"run": run, "clap": clap, "logit_bias": explainer.decoder.cfg.logit_bias}
    out["localization"] = scores.localization_report(explainer, n_scenes)
    out["randomization"] = randomization_rows(explainer, random_scenes)
    grid = scores.background_rows(explainer, n_seeds=noisy_seeds)        # the averages: SNRS only
    white3 = scores.background_rows(explainer, ("white",), (3.0,), n_seeds=noisy_seeds)
    out["generalisation"] = {**scores.background_summary(grid),
                             **{k: v for k, v in scores.background_summary(white3).items() if "@" in k}}
    out["seconds"] = time.time() - t0
    return out


def table(res: dict[str, Any]) -> str:
    loc, rnd, gen = res["localization"], res["randomization"], res["generalisation"]
    lines = [f"## {res['run']}" + (f" on the CLAP {res['clap']}" if res.get("clap", "demo") != "demo" else "")
             + (f", logit bias {res['logit_bias']:g}" if res.get("logit_bias") else ""),
             f"selection ({loc['scenes']:.0f} scenes): mass {loc['mass']:.3f} (chance {loc['chance']:.3f}), "
             f"absent/matched {loc['ratio']:.3f} ({loc['absent']:.4f}/{loc['matched']:.4f}), gap {loc['gap']:.3f}, "
             f"empty {loc['empty']:.2f}",
             "randomization: " + "; ".join(f"{k} ssim {v['ssim']:.2f} mass {v['mass']:.3f}/{v['chance']:.3f} "
                                           f"mean {v['mask_mean']:.3f}" for k, v in rnd.items())]
    for key in sorted(gen):
        v = gen[key]
        h = v.get("when_heard")
        lines.append(f"  {key:24s} n {v['n']:3d} mass {v['mass']:.3f} (chance {v['chance']:.3f}) "
                     f"ratio {v['ratio']:.3f}; CLAP hears {v['heard']:.2f}"
                     + (f": mass {h['mass']:.3f} ratio {h['ratio']:.3f}" if h else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--scenes", type=int, default=48)
    ap.add_argument("--random-scenes", type=int, default=8)
    ap.add_argument("--noisy-seeds", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--clap", default="demo", help="the CLAP the decoders explain (a folder with clap.json; "
                    "default the bundled one)")
    ap.add_argument("--logit-bias", type=float, nargs="+", default=[None],
                    help="score each run at these operating points (default: each run's own)")
    args = ap.parse_args(argv)
    results = []
    for run in args.runs:
        for bias in args.logit_bias:
            res = study(run, args.scenes, args.random_scenes, args.noisy_seeds, args.clap, bias)
            print(table(res), flush=True)
            results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
