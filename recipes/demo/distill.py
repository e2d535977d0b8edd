"""Warm-start a decoder of CLAP's deep stages from an LMAC-ZS teacher, over noise.

    python -m recipes.demo.distill --teacher N5 --out RUN [--first-level 3] [--decision]
        [--scenes 300] [--steps 600] [--batch 8] [--lr 1e-3] [--absent 1] [--seed 0] [--init STUDENT]
        [--clap CLAP_DIR] [--teacher-clap CLAP_DIR] [--heard-only]

A decoder that reads only h3 and h4 (no log-mel) trained from scratch with the LMAC-ZS objective
settles on one uniform mask within two epochs on the demo world (a quiet copy of the clip keeps
its similarities, so the objective is content with it; demo-model.md, "Decoders that read the deep
stages"). This gives it a start: the *student* learns to reproduce the masks the *teacher* (an
LMAC-ZS decoder of the same CLAP: n5, bundled before the students) gives on the clean scene, from CLAP's deep
states of the same scene with a training background added (`world.TRAIN_BACKGROUNDS`, SNR 0-40
dB, or none), for the prompt of a present event or of an absent one. Loss: per-cell binary cross
entropy to the teacher's mask plus a soft Dice term on present prompts. The student is then
fine-tuned with `lmaczs train --init RUN` and the LMAC-ZS objective, so its final masks answer to
the CLAP and not to the teacher. Scenes are the world's train split (seed 0), as `lmaczs train`'s.

With `--clap`, the student reads another CLAP than the teacher's (`--teacher-clap`, the one the
teacher was trained on): the teacher's masks come from its own CLAP, on the clean scene, so the
student learns where the events are, not what the new CLAP makes of them.

With `--heard-only`, every target follows the student's CLAP on the noisy clip the student reads:
a prompt's target is the teacher's mask only where that CLAP ranks the prompt among the clip's top
n of the 14 event prompts (n the scene's number of events), and empty elsewhere. For a present
event that empties the target where CLAP does not hear it; for an absent prompt (whose teacher
mask is small but not empty) it keeps the teacher's mask only where CLAP confuses the prompt into
its top n. The student then learns to keep a mask only for what CLAP itself decides is there, so
that where CLAP cannot tell the event from the noise, no prompt gets a large mask.

`--decision` gives the student CLAP's per-token audio-text cosine map (`DecoderConfig.decision`:
stage-4 tokens through CLAP's own audio projection); `--init` may then name a student without it:
the weights both have are taken (a decoder otherwise alike: same stages, width and tokens), the
decision map's start as `DecisionMap` sets them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmaczs_cli import __version__, spectral
from lmaczs_cli.clap import load_clap
from lmaczs_cli.decoder import DecoderConfig, MaskDecoder, load_decoder, save_decoder
from lmaczs_cli.demo import world
from lmaczs_cli.model import token_embeddings

CLEAN_SHARE = 0.25     # share of student inputs with no added background


def noisy(scene: world.Scene, rng: np.random.Generator, snr_range: tuple[float, float]) -> np.ndarray:
    """The scene's wave with a training background `snr_db` under its events' mean level (or as it is)."""
    if rng.random() < CLEAN_SHARE:
        return scene.wave
    kind = str(rng.choice(world.TRAIN_BACKGROUNDS))
    level = np.mean([e.level_db for e in scene.events]) - rng.uniform(*snr_range)
    x = scene.wave + world.background_noise(kind, rng) * np.float32(10 ** (level / 20))
    return (x * min(1.0, world.PEAK / float(np.abs(x).max()))).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="an LMAC-ZS decoder folder of the demo CLAP (the bundled "
                    "students' teacher is n5: demo-model.md says how to check it out)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--first-level", type=int, default=3)
    ap.add_argument("--decision", action="store_true", help="read CLAP's per-token decision map")
    ap.add_argument("--decision-contrast", action="store_true", help="... and its standardised copy")
    ap.add_argument("--projected", action="store_true", help="read h4's tokens through CLAP's audio projection")
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dice", type=float, default=1.0)
    ap.add_argument("--snr", type=float, nargs=2, default=(0.0, 40.0))
    ap.add_argument("--absent", type=int, default=1, help="absent prompts a scene adds to the pool")
    ap.add_argument("--heard-only", action="store_true", help="a prompt's target (present or absent) is the "
                    "teacher's mask only where the student's CLAP ranks it among the noisy clip's top n (n events), "
                    "else empty")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init", default=None, help="continue from this student (a --out folder; it may have read "
                    "another CLAP: its weights are carried over to this one)")
    ap.add_argument("--clap", default="demo", help="the CLAP the student reads (a folder with clap.json; default "
                    "the bundled one)")
    ap.add_argument("--teacher-clap", default="demo", help="the CLAP the teacher was trained on (default the "
                    "bundled one; n5 was trained on g7a, bundled before g9a: a folder with the clap.json and "
                    "clap.safetensors of `git show 56cdf21:lmaczs_cli/demo/model/FILE`)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    teacher_clap = load_clap(args.teacher_clap)
    teacher, _ = load_decoder(args.teacher, teacher_clap)
    clap = teacher_clap if args.clap == args.teacher_clap else load_clap(args.clap)
    cfg = DecoderConfig.for_clap(clap, text_readout=True, logmel_skip=False, first_level=args.first_level,
                                 decision=args.decision or args.decision_contrast,
                                 decision_contrast=args.decision_contrast, projected=args.projected)
    student = MaskDecoder(cfg).train()
    if args.init:
        start = load_decoder(args.init, clap, force=True)[0]
        ignored = {"decision": None, "decision_contrast": None, "projected": None, "logit_bias": None}
        mine = {**cfg.to_json(), **ignored}               # an operating point: distilled from bias 0
        theirs = {**start.cfg.to_json(), **ignored}
        if mine != theirs:
            differ = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise SystemExit(f"--init {args.init}: its decoder differs from this one in {', '.join(differ)} "
                             "(only the decision map and the projected input may be added)")
        own = student.state_dict()
        taken = {k: v for k, v in start.state_dict().items() if k in own and own[k].shape == v.shape}
        for k, v in start.state_dict().items():      # a map read with more channels: the old ones kept
            if k in own and k not in taken and v.dim() > 1 and own[k].shape[0] == v.shape[0] \
                    and own[k].shape[2:] == v.shape[2:] and own[k].shape[1] > v.shape[1]:
                grown = own[k].clone()
                grown[:, : v.shape[1]] = v
                taken[k] = grown
        student.load_state_dict(taken, strict=False)
        print(f"--init: {len(taken)} of {len(own)} tensors from {args.init}", flush=True)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    texts = [world.prompt_for(n) for n in world.EVENTS]
    prompts = clap.encode_text(texts).detach()                    # (14, D), the student's
    teacher_prompts = prompts if clap is teacher_clap else teacher_clap.encode_text(texts).detach()

    t0 = time.time()
    pool = []   # (scene, event index, teacher mask (1001, 64)), present events and --absent absent ones a scene
    with torch.no_grad():
        for i in range(args.scenes):
            scene = world.render_scene(world.scene_seed(0, "train", i))
            present = [world.EVENTS.index(e.name) for e in scene.events]
            absent = [int(k) for k in rng.choice([k for k in range(len(world.EVENTS)) if k not in present],
                                                 args.absent, replace=False)]
            logmel = spectral.log_mel(torch.from_numpy(scene.wave)[None])
            _, hidden = teacher_clap.encode(logmel)
            ks = present + absent
            masks = teacher([h.expand(len(ks), *h.shape[1:]) for h in hidden], teacher_prompts[ks],
                            logmel.expand(len(ks), -1, -1))
            pool += [(scene, k, m, k in present) for k, m in zip(ks, masks)]
    print(f"{len(pool)} teacher masks from {args.scenes} scenes in {time.time() - t0:.0f} s", flush=True)

    log = []
    for step in range(args.steps):
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [pool[j] for j in rng.integers(0, len(pool), args.batch)]
        waves = torch.from_numpy(np.stack([noisy(s, rng, tuple(args.snr)) for s, *_ in batch]))
        with torch.no_grad():
            emb, hidden = clap.encode(spectral.log_mel(waves))
            tokens = token_embeddings(clap, hidden) if cfg.decision or cfg.projected else None
        target = torch.stack([m for _, _, m, _ in batch])
        on = torch.tensor([p for *_, p in batch], dtype=torch.float32)
        if args.heard_only:
            rank = (emb @ prompts.T).argsort(dim=-1, descending=True)      # (B, 14) best first
            heard = torch.tensor([k in rank[i, : len(s.events)].tolist() for i, (s, k, _, _) in enumerate(batch)],
                                 dtype=torch.float32)
            target = target * heard[:, None, None]
            on = on * heard
        pred = student(hidden, prompts[[k for _, k, _, _ in batch]], tokens=tokens)
        bce = F.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target)
        inter = (pred * target).sum((1, 2))
        dice = 1 - (2 * inter + 1) / (pred.sum((1, 2)) + target.sum((1, 2)) + 1)
        loss = bce + args.dice * (dice * on).sum() / on.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            rec = {"step": step, "loss": float(loss), "bce": float(bce),
                   "dice": float((dice * on).sum() / on.sum().clamp_min(1)),
                   "mean": float(pred.mean()), "target_mean": float(target.mean()), "s": time.time() - t0,
                   **({"heard": float(on.sum())} if args.heard_only else {})}   # present items CLAP ranks in
            log.append(rec)
            print(json.dumps(rec), flush=True)
            if step % 100 == 0:
                _save(student, clap, args, step)
    _save(student, clap, args, args.steps)
    return 0


def _save(student: MaskDecoder, clap, args: argparse.Namespace, step: int) -> None:
    meta = {"lmaczs": __version__,
            "clap": {"spec": args.clap, "source": clap.source, "identity": clap.identity(), "config": clap.cfg.to_json()},
            "domain": "mel", "mel_to_linear": "linear",
            "distill": {"teacher": str(args.teacher), "teacher_clap": args.teacher_clap, "init": args.init, "steps": step, "scenes": args.scenes,
                        "batch": args.batch,
                        "lr": args.lr, "dice": args.dice, "absent": args.absent, "snr": list(args.snr), "seed": args.seed,
                        "heard_only": args.heard_only,
                        "backgrounds": list(world.TRAIN_BACKGROUNDS), "clean_share": CLEAN_SHARE}}
    save_decoder(student, Path(args.out), meta)


if __name__ == "__main__":
    sys.exit(main())
