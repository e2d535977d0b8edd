"""Build the bundled demo model from scratch: a small LAION-CLAP trained contrastively on the
demo world, then an LMAC-ZS decoder trained with `lmaczs train` on a world manifest.

    python -m lmaczs_cli.demo.build --out lmaczs_cli/demo/model

Steps (all seeded; ~25 min on 2 CPU cores, see README):
  1. render a pool of world scenes (1-3 events each, captions) and single-event clips, and
     their log-mels, once;
  2. train laion's CLAP classes at a small size (HTSAT 32 wide, one block per stage, and a
     2-layer CLIP-style text tower with the CLIP BPE tokenizer of the laion-clap wheel) with
     the symmetric contrastive loss (multi-positive targets where captions repeat);
  3. round the weights to fp16 (that is what ships) and measure zero-shot accuracy on held-out
     single-event clips with the prompts ``world.prompt_for(name)``;
  4. write a world manifest and train the decoder with ``lmaczs_cli.train.train``;
  5. write a few example sounds for the README's first command.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from .. import spectral
from ..audio import N_FRAMES, N_MELS, SAMPLE_RATE
from ..clap import ClapConfig, ClapModel, ClipBpeTokenizer, build_laion_clap, save_clap
from . import world

DEMO_CLAP = ClapConfig(
    "HTSAT-custom", "transformer", joint_dim=128, htsat_embed_dim=32, htsat_depths=(1, 1, 1, 1),
    htsat_heads=(2, 4, 8, 8), text_width=64, text_layers=2, text_heads=2,
)
EXAMPLES = 3  # example sounds shipped for the README's first command


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def _log_mels(waves: list[np.ndarray], batch: int = 16) -> torch.Tensor:
    out = []
    for k in range(0, len(waves), batch):
        w = torch.from_numpy(np.stack(waves[k : k + batch]))
        out.append(spectral.log_mel(w).half())
    return torch.cat(out)


def _event_bits(scene: world.Scene) -> np.ndarray:
    """int16 (N_FRAMES, N_MELS): bit e set where event kind EVENTS[e] owns the mel cell."""
    bits = np.zeros((N_FRAMES, N_MELS), dtype=np.int16)
    for name, mask in scene.mel_masks.items():
        bits |= mask.astype(np.int16) << world.EVENTS.index(name)
    return bits


def render_pool(n_scenes: int, n_single: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Scenes and single-event clips -> (log-mels (N, 1001, 64) fp16, captions,
    presence (N, len(EVENTS)) float: 1 where the clip holds that event kind,
    event bits (N, 1001, 64) int16: which kinds own each mel cell (see `_event_bits`))."""
    mels, waves, captions, presence, bits = [], [], [], [], []
    singles = [world.EVENTS[k % len(world.EVENTS)] for k in range(n_single)]
    makers = [lambda k=k: world.render_scene(seed * 1_000_003 + k) for k in range(n_scenes)]
    makers += [lambda k=k, n=n: world.single_event_scene(n, seed * 1_000_003 + 500_000 + k)
               for k, n in enumerate(singles)]
    for make in makers:          # one scene at a time: a Scene with its sources is ~10 MB
        s = make()
        waves.append(s.wave)
        if len(waves) == 16:     # log-mels as we go: 3400 waves would hold ~6.5 GB
            mels.append(_log_mels(waves))
            waves = []
        captions.append(s.caption)
        presence.append([float(any(e.name == n for e in s.events)) for n in world.EVENTS])
        bits.append(torch.from_numpy(_event_bits(s)))
    if waves:
        mels.append(_log_mels(waves))
    return torch.cat(mels), captions, torch.tensor(presence), torch.stack(bits)


def drop_events(logmel: torch.Tensor, presence: torch.Tensor, bits: torch.Tensor,
                generator: torch.Generator, p_drop: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask augmentation for the presence loss: remove each present event with probability
    `p_drop` by setting the mel cells it owns to the floor a zero LMAC-ZS mask gives
    (`spectral.to_db(0)`), and clear its presence. logmel (B, 1001, 64) dB, presence (B, E),
    bits (B, 1001, 64) int16 -> (masked log-mel, presence after removal).

    This teaches the demo CLAP what masked inputs mean: a scene with an event masked away no
    longer holds it, a scene masked down to one event still holds that one, and a clip masked
    to nothing holds none — the behaviour LMAC-ZS's objective relies on to prefer a mask that
    isolates the prompted event."""
    drop = (torch.rand(presence.shape, generator=generator) < p_drop) & (presence > 0)
    weights = torch.tensor([1 << e for e in range(presence.shape[1])], dtype=torch.int32)
    drop_bits = (drop.int() * weights).sum(1)                                 # (B,)
    removed = (bits.int() & drop_bits[:, None, None]) != 0
    floor = float(spectral.to_db(torch.zeros(())))
    return logmel.masked_fill(removed, floor), presence * (~drop).float()


def contrastive_loss(audio: torch.Tensor, text: torch.Tensor, captions: list[str], scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets (identical captions are all positives)."""
    logits = scale * audio @ text.T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=audio.device)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def presence_loss(audio: torch.Tensor, prompts: torch.Tensor, presence: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid loss of every clip against every event prompt (SigLIP-style): a scene
    is a positive for *each* event it holds, so its similarity to one event's prompt stays
    high beside other events. audio (B, D), prompts (E, D), presence (B, E) in {0, 1}.

    Without it a two-event scene sits between its events' prompts (cosine ~0.2 to each while
    the isolated event scores ~0.8), and LMAC-ZS's similarity-preservation term then prefers
    a mask keeping every event over one that isolates the prompted event."""
    logits = scale * audio @ prompts.T + bias
    return F.binary_cross_entropy_with_logits(logits, presence)


def train_clap(steps: int, batch: int, lr: float, seed: int, n_scenes: int, n_single: int,
               presence_weight: float = 1.0, init: Path | None = None) -> ClapModel:
    """Train the demo CLAP from scratch, or go on from the CLAP saved in `init`."""
    torch.manual_seed(seed)
    if init is not None:
        from ..clap import load_clap_dir

        model = load_clap_dir(init)
        log(f"starting from the CLAP in {init}")
    else:
        model = ClapModel(build_laion_clap(DEMO_CLAP), DEMO_CLAP, ClipBpeTokenizer(DEMO_CLAP.context_length),
                          source="demo")
    clap = model.clap
    log(f"rendering {n_scenes} scenes + {n_single} single-event clips")
    mels, captions, presence, bits = render_pool(n_scenes, n_single, seed)
    event_prompts = [world.prompt_for(n) for n in world.EVENTS]
    clap.requires_grad_(True)
    clap.train()
    # temperature and bias of the presence loss (SigLIP's initial values); not shipped
    sig_scale, sig_bias = torch.nn.Parameter(torch.tensor(math.log(10.0))), torch.nn.Parameter(torch.tensor(-10.0))
    params = [p for p in clap.parameters() if p.requires_grad] + [sig_scale, sig_bias]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randperm(len(captions), generator=g)[:batch]
        caps = [captions[i] for i in idx.tolist()]
        logmel = mels[idx].float()
        logmel = logmel + torch.empty(len(idx), 1, 1).uniform_(-6, 6, generator=g)  # level augmentation
        a, _ = model.encode(logmel)
        tokens = model.tokenize(caps + event_prompts)
        t = F.normalize(clap.encode_text(tokens, device="cpu"), dim=-1)
        t_caps, t_events = t[: len(caps)], t[len(caps):]
        loss = contrastive_loss(a, t_caps, caps, clap.logit_scale_a.exp().clamp(max=100))
        aug = torch.randperm(len(captions), generator=g)[: batch // 2]
        aug_mel = mels[aug].float() + torch.empty(len(aug), 1, 1).uniform_(-6, 6, generator=g)
        aug_mel, aug_presence = drop_events(aug_mel, presence[aug], bits[aug], g)
        a_aug, _ = model.encode(aug_mel)
        loss = loss + presence_weight * presence_loss(torch.cat([a, a_aug]), t_events,
                                                      torch.cat([presence[idx], aug_presence]),
                                                      sig_scale.exp(), sig_bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"clap step {step}/{steps} loss {loss.item():.3f} ({(time.time() - t0) / (step + 1):.2f} s/step)")
    clap.eval()
    clap.requires_grad_(False)
    with torch.no_grad():  # what ships is fp16: make the in-memory model exactly that
        for p in clap.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.half().float())
    model._identity = None
    return model


@torch.no_grad()
def zero_shot_accuracy(model: ClapModel, per_class: int, seed: int) -> dict[str, Any]:
    prompts = [world.prompt_for(n) for n in world.EVENTS]
    text = model.encode_text(prompts)
    confusion = np.zeros((len(world.EVENTS), len(world.EVENTS)), dtype=int)
    for c, name in enumerate(world.EVENTS):
        waves = [world.single_event_scene(name, 9_000_000 + seed * 1000 + k).wave for k in range(per_class)]
        emb = model.embed_audio(torch.from_numpy(np.stack(waves)))
        pred = (emb @ text.T).argmax(1)
        for p in pred.tolist():
            confusion[c, p] += 1
    acc = float(np.trace(confusion) / confusion.sum())
    per = {n: float(confusion[i, i] / confusion[i].sum()) for i, n in enumerate(world.EVENTS)}
    return {"accuracy": acc, "per_class": per, "clips": int(confusion.sum())}


def write_examples(folder: Path, seed: int) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(EXAMPLES):
        s = world.render_scene(77_000 + seed * 100 + k, n_events=2)
        name = f"example{k + 1}.flac"
        sf.write(folder / name, s.wave, SAMPLE_RATE, subtype="PCM_16")
        out.append({"file": name, "caption": s.caption, "events": [e.name for e in s.events]})
    (folder / "examples.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    ap.add_argument("--work", type=Path, default=Path("demo-build"), help="scratch folder (world manifest, runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clap-steps", type=int, default=600)
    ap.add_argument("--clap-batch", type=int, default=32)
    ap.add_argument("--clap-lr", type=float, default=2e-3)
    ap.add_argument("--presence-weight", type=float, default=1.0,
                    help="weight of the per-event sigmoid loss beside the caption contrastive loss")
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--singles", type=int, default=1400)
    ap.add_argument("--decoder-scenes", type=int, default=400)
    ap.add_argument("--decoder-texts", choices=world.WORLD_TEXTS, default="both",
                    help="decoder training texts: scene captions, per-event prompts, or both")
    ap.add_argument("--decoder-epochs", type=int, default=4)
    ap.add_argument("--decoder-batch", type=int, default=4)
    ap.add_argument("--decoder-lr", type=float, default=1e-3)
    ap.add_argument("--lambda-sparsity", type=float, default=0.05)
    ap.add_argument("--lambda-diversity", type=float, default=1.0)
    ap.add_argument("--skip-clap", action="store_true", help="reuse the CLAP already in --out")
    ap.add_argument("--clap-init", type=Path, default=None,
                    help="fine-tune the CLAP saved in this folder instead of training from scratch")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.time()
    out, work = args.out, args.work
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"seed": args.seed}

    from ..clap import load_clap_dir
    from ..train import TrainConfig, train

    if args.skip_clap:
        model = load_clap_dir(out)
    else:
        model = train_clap(args.clap_steps, args.clap_batch, args.clap_lr, args.seed, args.scenes, args.singles,
                           args.presence_weight, args.clap_init)
        save_clap(model, out, dtype=torch.float16)
        model = load_clap_dir(out)
    zs = zero_shot_accuracy(model, per_class=20, seed=args.seed)
    log(f"zero-shot accuracy on held-out single-event clips: {zs['accuracy']:.3f}")
    report["zero_shot"] = zs

    manifest = world.write_world(work / "world", args.decoder_scenes, seed=args.seed, split="train",
                                 texts=args.decoder_texts)
    run = work / "decoder"
    if run.exists():
        shutil.rmtree(run)
    cfg = TrainConfig(manifest=str(manifest), out=str(run), clap=str(out), epochs=args.decoder_epochs,
                      batch_size=args.decoder_batch, lr=args.decoder_lr, lambda_sparsity=args.lambda_sparsity,
                      lambda_diversity=args.lambda_diversity, val_fraction=0.1, workers=0, device="cpu",
                      log_every=10, save_every=10_000, seed=args.seed)
    t_dec = time.time()
    summary = train(cfg, clap=model, on_event=lambda e: log(
        f"decoder step {e['step']} sim {e.get('similarity', 0):.4f} spa {e.get('sparsity', 0):.3f} "
        f"div {e.get('diversity', 0):.4f}") if e["event"] == "step" and e["step"] % 25 == 0 else None)
    report["decoder_train_s"] = time.time() - t_dec
    report["decoder_steps"] = summary["steps"]
    for name in ("decoder.safetensors", "config.json"):
        shutil.copy(run / name, out / name)
    report["examples"] = write_examples(out.parent / "examples", args.seed)
    report["build_s"] = time.time() - t_start
    (out / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"demo model written to {out} in {report['build_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
