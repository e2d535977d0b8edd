"""Rebuild the bundled demo model's recipe from scratch in one command: every round of its chain, in order.

    python -m recipes.demo.chain --work demo-chain --out my-demo-model          (from the repository root)

The bundled model is not one `python -m recipes.demo.build` run but a chain of them: a CLAP
trained from scratch, then CLAP rounds that each start from the one before, then decoder rounds
that each start from the decoder before (see demo-model.md beside this file, "The bundled model
and how it was built"). `ROUNDS` is that chain as data; this module runs it. A CLAP round is a
list of build options; a decoder round is a `lmaczs train` recipe (TrainConfig fields, written
to ``decoder-recipe.toml`` in the round's folder and passed as ``--decoder-recipe``) plus the
build options that shape its world manifest. Each round writes its own folder under --work and
is done once its `round.json` is there, so a stopped chain picks up at the round it stopped in
(run the same command again). At the end the last round's model files are copied to --out,
which must be a new or empty folder.

The chain ends at CLAP g7a and decoder n5. The bundled model goes on from there, and the chain does
not run those steps yet: two CLAP rounds over training backgrounds (g8a, g9a: build `--clap-noisy
0.5`) and decoders distilled from n5 by `recipes/demo/distill.py` (P, E-g8a, Q, then H with
`--heard-only`); demo-model.md's last sections give their commands.

About 4.6 h at one thread per round (`--list` prints the rounds with their times). Its first
round is a CLAP from scratch with today's build, where the bundled CLAP's first rounds used
losses the build no longer has, and builds reproduce only at one thread count: the chain rebuilds
the recipe, not the same weights. No decoder round used a training option that no longer exists
(the straight-through of every ``hard_mask`` round took its gradient at the mask, today's only
way; build.json of the bundled model records it as ``hard_grad "mask"``, ``hard_floor_db 0``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

MODEL_FILES = ("clap.safetensors", "clap.json", "decoder.safetensors", "config.json", "build.json")
DONE = "round.json"          # a finished round: its argv, recipe and time
STARTED = "round.started"    # a round this chain began (the only folders it ever deletes)
RECIPE = "decoder-recipe.toml"   # a decoder round's `lmaczs train` recipe, in its folder


@dataclass(frozen=True)
class Round:
    """One `build` run. kind "clap": a CLAP round (`--clap-only`), from scratch or from the CLAP
    round `start`; kind "decoder": a decoder round (`--skip-clap`) in a copy of the CLAP round
    `clap`, from scratch or from the decoder round `start`, trained with the settings `train`
    (TrainConfig fields: what a `lmaczs train --config` recipe holds). `args` are build options;
    `minutes` what the round took at one thread, two rounds side by side on 2 cores."""

    name: str
    kind: str
    args: tuple[str, ...]
    minutes: float
    start: str | None = None
    clap: str | None = None
    any_clap: bool = field(default=False)
    train: Mapping[str, Any] = field(default_factory=dict)

    def argv(self, work: Path) -> list[str]:
        """CLAP rounds share one scratch folder (the rendered scene pool is cached there); each
        decoder round has its own (its world manifest and run)."""
        out = ["--out", str(work / self.name)]
        if self.kind == "clap":
            start = ["--clap-init", str(work / self.start)] if self.start else []
            return [*out, "--work", str(work / "w-clap"), "--clap-only", *start, *self.args]
        return [*out, "--work", str(work / f"w-{self.name}"), "--skip-clap",
                "--decoder-recipe", str(work / self.name / RECIPE), *self.args]

    def recipe(self, work: Path) -> dict[str, Any]:
        """A decoder round's training settings, with the decoder it starts from (TrainConfig fields)."""
        start = {"init": str(work / self.start)} if self.start else {}
        return {**self.train, **start, **({"init_any_clap": True} if self.any_clap else {})}


# CLAP rounds after the first: the losses of "One round from the shipped CLAP" (demo-model.md)
_CLAP = ("--clap-batch", "16", "--text-weight", "1", "--soft-db", "20", "--speckle", "0.6", "--caption-weight", "1",
         "--contrast-weight", "20", "--pair-weight", "20", "--pair-margin", "0.2", "--label-weight", "5",
         "--text-warmup", "150")
_LATE = ("--clap-steps", "250", "--clap-lr", "5e-4", "--presence-weight", "60")
_SILENT = ("--absent-cos", "0.0", "--silence-weight", "100")
# decoder rounds: the training settings of "Decoders on g3" and after (on top of build.DECODER_DEFAULTS)
_DEC = {"text_readout": True, "group_by_audio": True, "lr_schedule": "cosine", "skip_gate": True,
        "logit_bound": 8.0, "lambda_diversity": 0.5}
_SOFT = {**_DEC, "mask_noise": 2.0, "lambda_sparsity": 0.1, "lambda_overlap": 1.0}
_HARD = {**_DEC, "mask_noise": 2.0, "lambda_out": 3.0, "lambda_overlap": 1.0, "epochs": 2, "hard_mask": True,
         "lambda_sparsity": 0.3}
_SINGLE = {**_HARD, "mask_noise": 3.0, "lambda_reach": 0.03}
_ONE_EVENT = ("--decoder-events", "1")

ROUNDS: tuple[Round, ...] = (
    Round("base", "clap", (), 25.0),
    Round("g1", "clap", (*_CLAP, "--clap-steps", "450", "--clap-lr", "1e-3", "--presence-weight", "30",
                         "--isolation-weight", "10", "--present-cos", "0.45"), 30.0, start="base"),
    Round("g3", "clap", (*_CLAP, *_LATE, "--isolation-weight", "10", "--present-cos", "0.45"), 17.0, start="g1"),
    Round("g4", "clap", (*_CLAP, *_LATE, "--isolation-weight", "10", "--present-cos", "0.45", "--absent-cos", "0.0"),
          17.0, start="g3"),
    Round("g5", "clap", (*_CLAP, *_LATE, *_SILENT, "--isolation-weight", "10", "--present-cos", "0.45"), 17.0,
          start="g4"),
    Round("g6a", "clap", (*_CLAP, *_LATE, *_SILENT, "--isolation-weight", "30", "--present-cos", "0.3"), 17.0,
          start="g5"),
    Round("g7a", "clap", (*_CLAP, *_LATE, *_SILENT, "--isolation-weight", "60", "--present-cos", "0.25"), 18.0,
          start="g6a"),
    Round("p1", "decoder", (), 13.0, clap="g4", train={**_SOFT, "lambda_out": 1.0}),
    Round("q2", "decoder", (), 13.0, clap="g5", start="p1", any_clap=True, train={**_SOFT, "lambda_out": 1.0}),
    Round("q4", "decoder", (), 13.0, clap="g5", start="q2", train={**_SOFT, "lambda_out": 3.0}),
    Round("q7", "decoder", (), 13.0, clap="g5", start="q4", train={**_SOFT, "lambda_out": 3.0}),
    Round("t2", "decoder", (), 13.0, clap="g5", start="q7", train=_HARD),
    Round("u1", "decoder", (), 14.0, clap="g6a", start="t2", any_clap=True, train=_HARD),
    Round("v1", "decoder", (), 14.0, clap="g7a", start="u1", any_clap=True, train=_HARD),
    Round("b1", "decoder", _ONE_EVENT, 6.5, clap="g7a", start="v1", any_clap=True,
          train={**_HARD, "lambda_reach": 0.01}),
    Round("c2", "decoder", _ONE_EVENT, 6.5, clap="g7a", start="b1", any_clap=True, train=_SINGLE),
    Round("d1", "decoder", _ONE_EVENT, 6.5, clap="g7a", start="c2", any_clap=True, train=_SINGLE),
    Round("n2", "decoder", _ONE_EVENT, 7.0, clap="g7a", start="d1", any_clap=True,
          train={**_SINGLE, "lambda_absent": 3.0}),
    Round("n4", "decoder", _ONE_EVENT, 7.0, clap="g7a", start="n2", any_clap=True,
          train={**_SINGLE, "lambda_absent": 3.0}),
    Round("n5", "decoder", _ONE_EVENT, 7.0, clap="g7a", start="n4", any_clap=True,
          train={**_SINGLE, "lambda_absent": 3.0}),
)


class ChainError(RuntimeError):
    pass


def check(rounds: Sequence[Round]) -> None:
    """Every round names a distinct folder and starts only from rounds before it, of the right kind."""
    kinds: dict[str, str] = {}
    clap_of: dict[str, str | None] = {}
    for r in rounds:
        if r.name in kinds:
            raise ChainError(f"round {r.name!r} is listed twice")
        if r.kind not in ("clap", "decoder"):
            raise ChainError(f"round {r.name!r}: unknown kind {r.kind!r}")
        if r.kind == "decoder" and kinds.get(r.clap or "") != "clap":
            raise ChainError(f"decoder round {r.name!r} needs an earlier CLAP round, not {r.clap!r}")
        if r.start is not None and kinds.get(r.start) != r.kind:
            raise ChainError(f"round {r.name!r} starts from {r.start!r}, not an earlier {r.kind} round")
        if r.kind == "decoder" and r.start is not None and clap_of[r.start] != r.clap and not r.any_clap:
            raise ChainError(f"decoder round {r.name!r} starts from {r.start!r}, trained on CLAP "
                             f"{clap_of[r.start]!r}, not {r.clap!r}: set any_clap")
        kinds[r.name] = r.kind
        clap_of[r.name] = r.clap


def done(work: Path, r: Round) -> bool:
    return (work / r.name / DONE).is_file()


def run_chain(work: Path, out: Path | None = None, rounds: Sequence[Round] = ROUNDS, until: str | None = None,
              build: Callable[[list[str]], None] | None = None, log: Callable[[str], None] = print,
              threads: int | None = None) -> Path:
    """Run every round not yet done, in order (up to `until`), then copy the last round's model to
    `out` (None: leave it in `work`). Returns the last round's folder. `build` runs one round's
    argv (default: `build.main`); `threads` is recorded with each round.

    A round done before is kept only if it ran with the same argv and training settings; a round
    folder this chain did not start is never deleted (ChainError), nor is anything in `out`."""
    check(rounds)
    if until is not None:
        names = [r.name for r in rounds]
        if until not in names:
            raise ChainError(f"no round {until!r}; the rounds are {', '.join(names)}")
        rounds = rounds[:names.index(until) + 1]
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ChainError(f"{out} exists and is not an empty folder: give a new one (the chain never overwrites)")
    for r in rounds:
        folder = work / r.name
        if folder.exists() and not done(work, r) and not (folder / STARTED).is_file():
            raise ChainError(f"{folder} exists and is not a round of this chain: give another --work or move it")
        if done(work, r) and _record(folder) != (r.argv(work), _recipe_of(r, work)):
            raise ChainError(f"round {r.name} in {folder} was done with other options than the recipe's now: "
                             "give another --work, or delete that folder and the rounds after it")
    if build is None:
        from .build import main as build
    work.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rounds, 1):
        folder = work / r.name
        if done(work, r):
            log(f"[{i}/{len(rounds)}] {r.name}: done before, kept")
            continue
        if folder.exists():
            shutil.rmtree(folder)                       # this chain's round that stopped part-way starts over
        if r.kind == "decoder":
            shutil.copytree(work / r.clap, folder, ignore=shutil.ignore_patterns(
                DONE, STARTED, RECIPE, "decoder.safetensors", "config.json"))
        else:
            folder.mkdir(parents=True)
        (folder / STARTED).write_text("")
        if r.kind == "decoder":
            from lmaczs_cli.recipe import recipe_text

            (folder / RECIPE).write_text(recipe_text(r.recipe(work), f"demo chain round {r.name}: the decoder's "
                                                                     "training settings (lmaczs train recipe)"))
        argv = r.argv(work)
        log(f"[{i}/{len(rounds)}] {r.name} (about {r.minutes:g} min): build {' '.join(argv)}")
        t0 = time.time()
        build(argv)
        record = {"round": r.name, "argv": argv, "recipe": _recipe_of(r, work), "threads": threads,
                  "minutes": round((time.time() - t0) / 60, 1)}
        (folder / DONE).write_text(json.dumps(record, indent=1) + "\n")
        (folder / STARTED).unlink()
    last = work / rounds[-1].name
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        for name in MODEL_FILES:
            if (last / name).is_file():
                shutil.copy2(last / name, staging / name)
        if out.exists():
            out.rmdir()                                 # empty, checked above
        os.replace(staging, out)
        log(f"model of round {rounds[-1].name} written to {out}")
    return last


def _recipe_of(r: Round, work: Path) -> dict[str, Any] | None:
    return r.recipe(work) if r.kind == "decoder" else None


def _record(folder: Path) -> tuple[list[str], dict[str, Any] | None]:
    record = json.loads((folder / DONE).read_text())
    return record["argv"], record.get("recipe")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("demo-chain"), help="one folder per round (kept; resumable)")
    ap.add_argument("--out", type=Path, default=None, help="new folder for the last round's model files")
    ap.add_argument("--until", default=None, help="stop after this round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per round (the recipe's: 1)")
    ap.add_argument("--list", action="store_true", help="print the rounds and their times, run nothing")
    args = ap.parse_args(argv)
    if args.list:
        for r in ROUNDS:
            where = f"from {r.start}" if r.start else "from scratch"
            on = f" on CLAP {r.clap}" if r.kind == "decoder" else ""
            settings = " ".join([*r.args, *(f"{k}={v}" for k, v in (_recipe_of(r, Path("WORK")) or {}).items())])
            print(f"{r.name:5s} {r.kind:7s} {r.minutes:5.1f} min  {where}{on}: {settings}")
        print(f"total about {sum(r.minutes for r in ROUNDS) / 60:.1f} h at one thread")
        return
    import torch

    torch.set_num_threads(args.threads)
    try:
        run_chain(args.work, args.out, until=args.until, threads=args.threads)
    except ChainError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
