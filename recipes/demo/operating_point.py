"""Choose a trained decoder's operating point on the selection split, and write it.

    python -m recipes.demo.decoder_study RUN --random-scenes 24 --logit-bias 0 -1 -2 -3 -4 \\
        --json SWEEP.json [--clap CLAP_DIR]
    python -m recipes.demo.operating_point SWEEP.json --out DIR

The operating point is `DecoderConfig.logit_bias`, a constant added to the decoder's logits
before the sigmoid: the weights stay as trained. A negative one scales a mask's soft tails by
about exp(bias) and keeps its saturated cells, so absent prompts' small masks shrink more than a
present prompt's mask, whose core is saturated; the price is a larger gap between the clip's
similarity and the masked clip's (the decoder was trained to keep it small at bias 0).

The rule, over the points of SWEEP.json (selection split only; written before any frozen figure
of a chosen point was read):
- eligible: after the projection and stage 4 are re-initialised, the mask's mass on the event is
  at most ``CASCADE_LIMIT`` x chance (24 scenes); the localization gap (|similarity - masked
  similarity| for present prompts) is at most ``GAP_LIMIT``; and at most ``EMPTY_LIMIT`` of the
  present prompts get an empty mask (`scores.localization_report`'s ``empty``: under 0.1 % of
  the grid kept), so that the bias does not trade explanations of present events for nothing;
- chosen: the eligible point with the largest smallest margin to the four targets of the
  localization and the unseen backgrounds (mass >= 0.6, absent / matched <= 0.3; mass >= 0.5,
  absent / matched <= 0.4).
The two limits were set after the bundled decoder's sweep on the selection split had been read
(recipes/demo/demo-model.md, "An operating point for H"): the gap limit is half the demo's gap
target (0.1), the empty limit one present event in ten.

DIR gets RUN's files (decoder.safetensors byte for byte) except its training checkpoint
(train_state/: DIR is no run to --resume), and a config.json whose decoder carries the chosen
logit_bias and whose ``operating_point`` records the rule and every point's figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

CASCADE_LIMIT = 1.33
GAP_LIMIT = 0.05
EMPTY_LIMIT = 0.10
TARGETS = {"mass": (0.6, +1), "ratio": (0.3, -1), "unseen_mass": (0.5, +1), "unseen_ratio": (0.4, -1)}


def point(res: dict[str, Any]) -> dict[str, float]:
    """The figures the rule reads off one `decoder_study` result."""
    loc, st4, unseen = res["localization"], res["randomization"]["stage 4"], res["generalisation"]["all"]
    return {"logit_bias": float(res["logit_bias"]), "mass": loc["mass"], "ratio": loc["ratio"], "gap": loc["gap"],
            "empty": loc["empty"],
            "unseen_mass": unseen["mass"], "unseen_ratio": unseen["ratio"],
            "stage4_chance_times": st4["mass"] / st4["chance"], "mask_mean": res["randomization"]["intact"]["mask_mean"]}


def margin(p: dict[str, float]) -> float:
    """The smallest margin to the four targets (negative: the most missed one's shortfall)."""
    return min(sign * (p[k] - target) for k, (target, sign) in TARGETS.items())


def eligible(p: dict[str, float]) -> bool:
    return p["stage4_chance_times"] <= CASCADE_LIMIT and p["gap"] <= GAP_LIMIT and p["empty"] <= EMPTY_LIMIT


def choose(points: list[dict[str, float]]) -> dict[str, float]:
    ok = [p for p in points if eligible(p)]
    if not ok:
        raise SystemExit("no operating point is eligible (stage-4 mass, gap or empty share over its limit at every one)")
    return max(ok, key=margin)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="decoder_study --json output: one run at several --logit-bias points")
    ap.add_argument("--out", required=True, help="a new folder for the decoder at the chosen point")
    args = ap.parse_args(argv)
    results = json.loads(Path(args.sweep).read_text())
    runs = {r["run"] for r in results}
    if len(runs) != 1:
        raise SystemExit(f"{args.sweep}: one run's sweep expected, found {sorted(runs)}")
    points = [point(r) for r in results]
    best = choose(points)
    for p in points:
        flag = "chosen" if p is best else ("eligible" if eligible(p) else "not eligible")
        print(f"bias {p['logit_bias']:+g}: mass {p['mass']:.3f} ratio {p['ratio']:.3f} gap {p['gap']:.3f} "
              f"empty {p['empty']:.2f} "
              f"unseen {p['unseen_mass']:.3f} / {p['unseen_ratio']:.3f} stage 4 {p['stage4_chance_times']:.2f}x "
              f"mask mean {p['mask_mean']:.4f}; smallest margin {margin(p):+.3f} ({flag})")
    out, run = Path(args.out), Path(runs.pop())
    if out.exists():
        raise SystemExit(f"{out} exists; give a new folder")
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("train_state"))   # not a run to --resume
    config = json.loads((run / "config.json").read_text())
    config["decoder"]["logit_bias"] = best["logit_bias"]
    if not best["logit_bias"]:                     # as save_decoder writes a decoder at 0
        del config["decoder"]["logit_bias"]
    config["operating_point"] = {
        "rule": f"eligible: stage-4 mass <= {CASCADE_LIMIT} x chance, gap <= {GAP_LIMIT}, empty <= {EMPTY_LIMIT}; "
                f"chosen: the largest "
                f"smallest margin to {', '.join(f'{k} {t}' for k, (t, _) in TARGETS.items())} (selection split)",
        "command": f"python -m recipes.demo.operating_point {args.sweep} --out {args.out}",
        "points": points}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out} at logit bias {best['logit_bias']:+g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
