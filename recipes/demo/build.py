"""Build the bundled demo model from scratch: a small LAION-CLAP trained contrastively on the
demo world, then an LMAC-ZS decoder trained with `lmaczs train` on a world manifest.

    python -m recipes.demo.build --out my-demo-model          (from the repository root)

--out is required: the build never writes into the installed package unless told to (``--out
lmaczs_cli/demo/model`` replaces the bundled model, with the examples beside it). The decoder's
training settings are a `lmaczs train` recipe file (``--decoder-recipe FILE``, TOML, sections
[data] [decoder] [optimiser] [loss] ...) on top of `DECODER_DEFAULTS`; the build itself sets
the manifest, the output folder and the CLAP.

Steps (all seeded; ~45 min on 2 CPU cores, see README):
  1. render a pool of world scenes (1-3 events each, captions) and single-event clips, and
     their log-mels, once;
  2. train laion's CLAP classes at a small size (HTSAT 32 wide, one block per stage, and a
     2-layer CLIP-style text tower with the CLIP BPE tokenizer of the laion-clap wheel) with
     a per-event presence regression (`presence_loss`: cosine to each event prompt -> 0.6 if
     the clip holds the event, 0.1 if not, on clips, on clips with events and background
     masked away by `drop_events`, and on an empty clip) beside a small caption InfoNCE;
     `presence_report` prints how masked scenes score, `scores.oracle_report` the similarity
     gap of the ground-truth masks (the perfect explanation), and `plan_objective` what the
     LMAC-ZS objective makes of hand-made masks (isolating the prompted event vs keeping every
     event);
  3. round the weights to fp16 (that is what ships) and measure zero-shot accuracy on held-out
     single-event clips with the prompts ``world.prompt_for(name)``;
  4. write a world manifest and train the decoder with ``lmaczs_cli.train.train``, then score
     it on held-out scenes (`scores.localization_report`, `scores.randomization_report`);
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

from lmaczs_cli import spectral
from lmaczs_cli.audio import N_FRAMES, N_MELS, SAMPLE_RATE
from lmaczs_cli.clap import ClapConfig, ClapModel, ClipBpeTokenizer, build_laion_clap, save_clap
from lmaczs_cli.demo import world
from lmaczs_cli.demo.scores import oracle_by_event, oracle_report, oracle_rows
from lmaczs_cli.errors import LmaczsError
from lmaczs_cli.loss import similarity_term, sparsity_term

from .clap_losses import (
    ABSENT_COS, PRESENT_COS, attenuate, contrast_loss, contrastive_loss, drop_events, geometry_loss, isolation_loss,
    label_loss, off_diagonal, pair_loss, presence_loss, prompt_overlap, silence_gap_loss, speckle,
)

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


def render_pool(n_scenes: int, n_single: int, seed: int, noisy_share: float = 0.0,
                snr_range: tuple[float, float] = (0.0, 20.0)) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Scenes and single-event clips -> (log-mels (N, 1001, 64) fp16, captions,
    presence (N, len(EVENTS)) float: 1 where the clip holds that event kind,
    event bits (N, 1001, 64) int16: which kinds own each mel cell (see `_event_bits`)).

    With `noisy_share` > 0, that share of the scenes and of the single-event clips (every
    1/share-th, spread evenly) lies over one of `world.TRAIN_BACKGROUNDS` at an SNR drawn in
    `snr_range` (dB) instead of the quiet pink-ish floor; the unseen kinds
    (`world.UNSEEN_BACKGROUNDS`) never enter. Its event bits are then the cells where an event
    outweighs that background."""
    mels, waves, captions, presence, bits = [], [], [], [], []
    singles = [world.EVENTS[k % len(world.EVENTS)] for k in range(n_single)]

    def noisy(k: int) -> bool:
        return noisy_share > 0 and math.floor((k + 1) * noisy_share) > math.floor(k * noisy_share)

    def scene(k: int) -> world.Scene:
        if noisy(k):
            return world.render_scene(seed * 1_000_003 + k, backgrounds=world.TRAIN_BACKGROUNDS, snr_range=snr_range)
        return world.render_scene(seed * 1_000_003 + k)

    def single(k: int, name: str) -> world.Scene:
        if noisy(k):
            g = np.random.default_rng([seed, k, 0xB6])
            return world.event_over_background(name, seed * 1_000_003 + 500_000 + k,
                                               str(g.choice(world.TRAIN_BACKGROUNDS)), float(g.uniform(*snr_range)))
        return world.single_event_scene(name, seed * 1_000_003 + 500_000 + k)

    makers = [lambda k=k: scene(k) for k in range(n_scenes)]
    makers += [lambda k=k, n=n: single(k, n) for k, n in enumerate(singles)]
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



def load_pool(n_scenes: int, n_single: int, seed: int, cache: Path | None = None, noisy_share: float = 0.0,
              snr_range: tuple[float, float] = (0.0, 20.0)):
    """`render_pool`, kept in `cache/pool-<seed>-<scenes>-<singles>[-noisy<share>-<lo>-<hi>].pt`
    when a folder is given (rendering 3400 clips takes ~4 min on 2 cores; the file is ~0.9 GB)."""
    name = f"pool-{seed}-{n_scenes}-{n_single}"
    if noisy_share > 0:
        name += f"-noisy{noisy_share:g}-{snr_range[0]:g}-{snr_range[1]:g}"
    path = None if cache is None else cache / f"{name}.pt"
    if path is not None and path.exists():
        log(f"reusing the rendered pool {path}")
        return torch.load(path)
    log(f"rendering {n_scenes} scenes + {n_single} single-event clips"
        + (f", {noisy_share:g} of them over training backgrounds at {snr_range[0]:g}-{snr_range[1]:g} dB"
           if noisy_share > 0 else ""))
    pool = render_pool(n_scenes, n_single, seed, noisy_share, snr_range)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(pool, tmp)
        tmp.replace(path)
    return pool


TEXT_TOWER = ("text_branch.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection.",
              "text_transform.")   # laion's names for the text side of a CLAP with a CLIP-style text transformer


def separate_prompts(model: ClapModel, steps: int, lr: float = 1e-3) -> float:
    """Train the text tower alone for `steps` Adam steps on `prompt_overlap` of the event prompts;
    the largest cosine between two different prompts after it.

    Why: the CLAP's text tower can come to ignore the word before "chirp" ("rising" and "falling"
    prompts at cosine 0.999, "green chirp" too): the attention that would read it is saturated,
    the gradient of that cosine is ~1 % of a typical one, and the joint loss pushes it up more
    than `prompt_overlap` pushes it down. On its own, Adam's step normalisation moves the tower out
    of that corner in ~100 steps; the round that follows then starts with prompts the audio tower
    can be taught to tell apart. Trained: laion's text transformer (`text_branch`), the token and
    position embeddings, the final norm, the text projection and `text_transform`."""
    clap = model.clap
    tokens = model.tokenize([world.prompt_for(n) for n in world.EVENTS])
    params = [p for n, p in clap.named_parameters() if n.startswith(TEXT_TOWER)]
    if not any(n.startswith("token_embedding.") for n, _ in clap.named_parameters()):
        raise ValueError("separate_prompts: this CLAP has no CLIP-style text transformer (token_embedding, "
                         "text_branch, ...)")
    frozen = {n: p.requires_grad for n, p in clap.named_parameters()}
    clap.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for _ in range(steps):
            loss = prompt_overlap(F.normalize(clap.encode_text(tokens, device="cpu"), dim=-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for n, p in clap.named_parameters():
            p.requires_grad_(frozen[n])
            p.grad = None
    with torch.no_grad():
        t = F.normalize(clap.encode_text(tokens, device="cpu"), dim=-1)
    return float(off_diagonal(t @ t.T).max())


def _isolation_views(presence: torch.Tensor, generator: torch.Generator,
                      per_clip: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `per_clip` present events of each clip, drawn at random: (clip index, event index), each (V,)."""
    clips, events = [], []
    for b in range(len(presence)):
        held = presence[b].nonzero().flatten()
        for e in held[torch.randperm(len(held), generator=generator)[:per_clip]].tolist():
            clips.append(b)
            events.append(e)
    return torch.tensor(clips, dtype=torch.long), torch.tensor(events, dtype=torch.long)


def train_clap(steps: int, batch: int, lr: float, seed: int, n_scenes: int, n_single: int,
               presence_weight: float = 10.0, caption_weight: float = 0.1, init: Path | None = None,
               cache: Path | None = None, present_cos: float = PRESENT_COS,
               absent_cos: float = ABSENT_COS, text_weight: float = 0.0,
               geometry_weight: float = 0.0, isolation_weight: float = 0.0,
               soft_db: float | None = None, speckle_share: float = 0.0,
               contrast_weight: float = 0.0, contrast_margin: float = 0.2,
               pair_weight: float = 0.0, pair_margin: float = 0.2, label_weight: float = 0.0,
               text_warmup: int = 0, silence_weight: float = 0.0, noisy_share: float = 0.0,
               snr_range: tuple[float, float] = (0.0, 20.0)) -> ClapModel:
    """Train the demo CLAP from scratch, or go on from the CLAP saved in `init`.

    Loss per step: `caption_weight` x InfoNCE of clips against their captions, plus
    `presence_weight` x `presence_loss` of the clips, of as many clips again with events (and,
    for half of them, the background) masked away by `drop_events`, and of one clip masked to
    nothing, against the 14 event prompts, with `present_cos` / `absent_cos` as targets; plus
    `text_weight` x `prompt_overlap` of the event prompts and `geometry_weight` x
    `geometry_loss` of the batch's single-event clips; plus `isolation_weight` x `isolation_loss`
    on views of the batch's clips masked down to one or two of their events; plus
    `contrast_weight` x `contrast_loss` (margin `contrast_margin`) of the clips against their
    masked copies and the empty clip; plus `pair_weight` x `pair_loss` (margin `pair_margin`) of
    each masked copy that still holds an event against the same copy with one of those events
    removed as well; plus `label_weight` x `label_loss` of the clean and masked clips that hold
    exactly one event; plus `silence_weight` x `silence_gap_loss` of the clean and masked clips against
    the empty clip. With `noisy_share`, that share of the pool's clips lies over training
    backgrounds (`render_pool`). With `text_warmup`, `separate_prompts` runs that many steps first. With
    `speckle_share`, the masked clips also lose a random
    speckle of cells (`speckle`), their presence unchanged."""
    torch.manual_seed(seed)
    if init is not None:
        from lmaczs_cli.clap import load_clap_dir

        model = load_clap_dir(init)
        log(f"starting from the CLAP in {init}")
    else:
        model = ClapModel(build_laion_clap(DEMO_CLAP), DEMO_CLAP, ClipBpeTokenizer(DEMO_CLAP.context_length),
                          source="demo")
    clap = model.clap
    if text_warmup > 0:
        log(f"text tower alone, {text_warmup} steps on prompt_overlap: largest prompt-prompt cosine "
            f"{separate_prompts(model, text_warmup):.3f}")
    mels, captions, presence, bits = load_pool(n_scenes, n_single, seed, cache, noisy_share, snr_range)
    event_prompts = [world.prompt_for(n) for n in world.EVENTS]
    clap.requires_grad_(True)
    clap.train()
    params = [p for p in clap.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    # 10 % warm-up; OneCycleLR divides by zero when the warm-up is exactly one step (10 steps)
    warm_up = 0.1 if steps != 10 else 0.15
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warm_up)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randperm(len(captions), generator=g)[:batch]
        caps = [captions[i] for i in idx.tolist()]
        level = torch.empty(2 * len(idx), 1, 1).uniform_(-6, 6, generator=g)   # level augmentation
        clean = mels[idx].float()
        masked, masked_presence = drop_events(clean, presence[idx], bits[idx], g, p_drop=0.5, p_background=0.5,
                                              soft_db=soft_db)
        if speckle_share > 0:  # no draws from g otherwise: earlier rounds rebuild as they were
            masked = speckle(masked, g, speckle_share, soft_db)
        nothing = torch.full((1, *clean.shape[1:]), spectral.SILENCE_DB)
        inputs = [torch.cat([clean, masked]) + level, nothing]
        if isolation_weight > 0:  # clips masked down to one of their events (no draws from g otherwise)
            view_clip, view_event = _isolation_views(presence[idx], g)
            one = (bits[idx][view_clip].int() & (1 << view_event).int()[:, None, None]) != 0
            inputs.append(attenuate(clean[view_clip], ~one, g, soft_db) + level[view_clip])
        n_views = len(inputs[-1]) if isolation_weight > 0 else 0
        if pair_weight > 0:  # masked copies with one more of their events removed (no draws from g otherwise)
            pair_clip, pair_event = _isolation_views(masked_presence, g, per_clip=1)
            gone = (bits[idx][pair_clip].int() & (1 << pair_event).int()[:, None, None]) != 0
            inputs.append(attenuate(masked[pair_clip], gone, g, soft_db) + level[len(idx) + pair_clip])
        a, _ = model.encode(torch.cat(inputs))
        a, a_views, a_pairs = a[: 2 * len(idx) + 1], a[2 * len(idx) + 1: 2 * len(idx) + 1 + n_views], \
            a[2 * len(idx) + 1 + n_views:]
        tokens = model.tokenize(caps + event_prompts)
        t = F.normalize(clap.encode_text(tokens, device="cpu"), dim=-1)
        t_caps, t_events = t[: len(caps)], t[len(caps):]
        cap_loss = contrastive_loss(a[: len(idx)], t_caps, caps, clap.logit_scale_a.exp().clamp(max=100))
        targets = torch.cat([presence[idx], masked_presence, torch.zeros(1, presence.shape[1])])
        pres_loss = presence_loss(a, t_events, targets, present=present_cos, absent=absent_cos)
        text_loss = prompt_overlap(t_events)
        geo_loss = geometry_loss(a, t_events, targets)
        iso_loss = (isolation_loss(a[: len(idx)], a_views, view_clip, view_event, a[-1], t_events, presence[idx])
                    if isolation_weight > 0 else a.new_zeros(()))
        con_loss = (contrast_loss(a[: len(idx)], a[len(idx): 2 * len(idx)], a[2 * len(idx)], t_events,
                                  presence[idx], masked_presence, contrast_margin)
                    if contrast_weight > 0 else a.new_zeros(()))
        pr_loss = (pair_loss(a[len(idx) + pair_clip], a_pairs, t_events, pair_event, pair_margin)
                   if pair_weight > 0 and len(pair_clip) else a.new_zeros(()))
        lab_loss = label_loss(a[: 2 * len(idx)], t_events, targets[: 2 * len(idx)]) if label_weight > 0 \
            else a.new_zeros(())
        gap_loss = silence_gap_loss(a[: 2 * len(idx)], a[2 * len(idx)], t_events, targets[: 2 * len(idx)]) \
            if silence_weight > 0 else a.new_zeros(())
        loss = (caption_weight * cap_loss + presence_weight * pres_loss + text_weight * text_loss
                + geometry_weight * geo_loss + isolation_weight * iso_loss + contrast_weight * con_loss
                + pair_weight * pr_loss + label_weight * lab_loss
                + silence_weight * gap_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"clap step {step}/{steps} loss {loss.item():.3f} caption {cap_loss.item():.3f} "
                f"presence {pres_loss.item():.4f} prompts {text_loss.item():.4f} geometry {geo_loss.item():.4f} "
                f"isolation {iso_loss.item():.4f} contrast {con_loss.item():.4f} pairs {pr_loss.item():.4f} "
                f"labels {lab_loss.item():.4f} silence gap {gap_loss.item():.4f} "
                f"({(time.time() - t0) / (step + 1):.2f} s/step)")
    clap.eval()
    clap.requires_grad_(False)
    with torch.no_grad():  # what ships is fp16: make the in-memory model exactly that
        for p in clap.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.half().float())
    model._identity = None
    return model


@torch.no_grad()
def presence_report(model: ClapModel, n_scenes: int = 24, seed: int = 0) -> dict[str, float]:
    """How the CLAP scores masked versions of held-out scenes with two or three events, mean
    cosine to an event's prompt for: the scene ("scene"), the event alone with everything else
    at the floor ("alone"), the scene with that event floored ("others"), the scene against
    prompts of events it lacks ("absent"), and a clip floored everywhere ("nothing").
    LMAC-ZS can isolate the event only where "alone" ~ "scene" and "others" ~ "absent".
    "prompt_cos" is the mean cosine between different event prompts (see `prompt_overlap`)."""
    text = model.encode_text([world.prompt_for(n) for n in world.EVENTS])
    floor = spectral.SILENCE_DB
    rows: dict[str, list[float]] = {k: [] for k in ("scene", "alone", "others", "absent")}
    for i in range(n_scenes):
        s = world.render_scene(world.scene_seed(seed, "test", i), n_events=2 + i % 2)
        logmel = spectral.log_mel(torch.from_numpy(s.wave)[None])[0]
        names = sorted(s.mel_masks)
        variants = [logmel]
        for n in names:
            m = torch.from_numpy(s.mel_masks[n])
            variants += [logmel.masked_fill(~m, floor), logmel.masked_fill(m, floor)]
        a, _ = model.encode(torch.stack(variants))
        cos = a @ text.T                                                    # (1 + 2n, E)
        for k, n in enumerate(names):
            e = world.EVENTS.index(n)
            rows["scene"].append(float(cos[0, e]))
            rows["alone"].append(float(cos[1 + 2 * k, e]))
            rows["others"].append(float(cos[2 + 2 * k, e]))
        rows["absent"] += [float(cos[0, e]) for e, n in enumerate(world.EVENTS) if n not in names]
    nothing, _ = model.encode(torch.full((1, N_FRAMES, N_MELS), floor))
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out["nothing"] = float((nothing @ text.T).mean())
    out["prompt_cos"] = float(off_diagonal(text @ text.T).mean())
    return out


PLANS = ("isolate", "isolate, -30 dB", "all events", "isolate, absent all")
SOFT_PLAN_DB = 30.0   # "isolate, -30 dB": what a sigmoid mask of ~0.03 leaves of the cells it drops


def clip_objective(text: torch.Tensor, audio: torch.Tensor, masked: torch.Tensor, masks: torch.Tensor,
                   matched: torch.Tensor, lambda_sparsity: float, lambda_diversity: float) -> dict[str, float]:
    """The LMAC-ZS objective (`lmaczs_cli.loss`) of one clip explained for E prompts: text (E, D),
    audio (D,) the clip's embedding, masked (E, D) the embeddings of the clip under each prompt's
    mask, masks (E, T, F), matched (E,) bool: the prompts the clip holds. Similarity and
    sparsity as in the loss; diversity is Eq. 7 with each matched prompt i in the role of the
    clip's own text: | t_i . t_j - a_i . a_j | over i matched, j != i."""
    sim = similarity_term(text @ audio, (text * masked).sum(-1))
    spa = sparsity_term(masks)
    rows = ~torch.eye(len(text), dtype=torch.bool) & matched[:, None]
    div = ((text @ text.T)[rows] - (masked @ masked.T)[rows]).abs().mean() if rows.any() else text.new_zeros(())
    total = sim + lambda_sparsity * spa + lambda_diversity * div
    return {"total": float(total), "similarity": float(sim), "sparsity": float(spa), "diversity": float(div)}


@torch.no_grad()
def plan_objective(model: ClapModel, n_scenes: int = 24, seed: int = 0, lambda_sparsity: float = 0.1,
                   lambda_diversity: float = 0.5) -> dict[str, dict[str, float]]:
    """The LMAC-ZS objective, under this CLAP, of hand-made mask plans on held-out scenes
    with two or three events, explained for every event prompt (mean over scenes):

      "isolate"              each present event's prompt keeps that event's cells, absent prompts
                             keep nothing (what the demo's localization bounds ask for);
      "isolate, -30 dB"      the same, with the dropped cells 30 dB down instead of at the floor
                             (mask 10^(-30/20) there): a sigmoid mask never reaches 0;
      "all events"           every prompt keeps the cells of every event;
      "isolate, absent all"  present prompts isolated, absent prompts keep every event.

    A decoder trained on this CLAP with these weights can only be expected to isolate events
    where the isolating plans have the lowest totals: the plans measure the CLAP, not a decoder."""
    text = model.encode_text([world.prompt_for(n) for n in world.EVENTS])
    floor = spectral.SILENCE_DB
    rows: dict[str, list[dict[str, float]]] = {p: [] for p in PLANS}
    for i in range(n_scenes):
        s = world.render_scene(world.scene_seed(seed, "valid", i), n_events=2 + i % 2)
        logmel = spectral.log_mel(torch.from_numpy(s.wave)[None])[0]
        own = [torch.from_numpy(s.mel_masks[n]) if n in s.mel_masks else None for n in world.EVENTS]
        union = torch.stack([m for m in own if m is not None]).any(0)
        nothing = torch.zeros_like(union)
        present = torch.tensor([m is not None for m in own])
        isolate = [m if m is not None else nothing for m in own]
        hard = math.inf                                  # dropped cells at the floor of a zero mask
        plans = {"isolate": (isolate, hard), "isolate, -30 dB": (isolate, SOFT_PLAN_DB),
                 "all events": ([union] * len(own), hard),
                 "isolate, absent all": ([m if m is not None else union for m in own], hard)}
        audio, _ = model.encode(logmel[None])
        for name, (masks, drop_db) in plans.items():
            m = torch.stack(masks)                                              # (E, T, F) bool
            clip = logmel.expand(len(m), -1, -1)
            masked, _ = model.encode(torch.where(m, clip, (clip - drop_db).clamp(min=floor)))
            values = m + 10.0 ** (-drop_db / 20.0) * ~m                         # the mask those inputs mean
            rows[name].append(clip_objective(text, audio[0], masked, values, present, lambda_sparsity,
                                             lambda_diversity))
    return {p: {k: float(np.mean([r[k] for r in v])) for k in v[0]} for p, v in rows.items()}


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


def clap_history(folder: Path) -> list[str]:
    """The CLAP rounds recorded in a model folder's build.json (empty if there is none)."""
    path = Path(folder) / "build.json"
    return list(json.loads(path.read_text()).get("clap_history", [])) if path.is_file() else []


def clap_round(args: argparse.Namespace) -> str:
    """One line for build.json's history: how this build trained its CLAP."""
    start = f"from {args.clap_init}" if args.clap_init else "from scratch"
    weights = {"presence": args.presence_weight, "caption": args.caption_weight, "text": args.text_weight,
               "geometry": args.geometry_weight, "isolation": args.isolation_weight,
               "contrast": args.contrast_weight, "pairs": args.pair_weight,
               "labels": args.label_weight, "silence gap": args.silence_weight}
    given = ", ".join(f"{k} {v:g}" for k, v in weights.items() if v)
    removal = f", soft removal {args.soft_db:g}-100 dB" if args.soft_db is not None else ""
    removal += f", speckle up to {args.speckle:g}" if args.speckle else ""
    removal += f", contrast margin {args.contrast_margin:g}" if args.contrast_weight else ""
    removal += f", pair margin {args.pair_margin:g}" if args.pair_weight else ""
    removal += f", {args.text_warmup} text warm-up steps first" if args.text_warmup else ""
    removal += (f", {args.clap_noisy:g} of the clips over training backgrounds at {args.clap_snr[0]:g}-"
                f"{args.clap_snr[1]:g} dB" if args.clap_noisy else "")
    return (f"{args.clap_steps} steps {start}, batch {args.clap_batch}, lr {args.clap_lr:g}, seed {args.seed}; "
            f"loss weights {given}{removal}")


# Options that only shape a CLAP round (train_clap); with --skip-clap they would be ignored.
CLAP_ROUND_OPTIONS = ("clap_steps", "clap_batch", "clap_lr", "clap_init", "scenes", "singles", "presence_weight",
                      "caption_weight", "present_cos", "absent_cos", "text_weight", "geometry_weight",
                      "isolation_weight", "soft_db", "speckle", "contrast_weight", "contrast_margin",
                      "pair_weight", "pair_margin", "label_weight", "text_warmup", "silence_weight",
                      "clap_noisy", "clap_snr")


# The decoder's training settings unless --decoder-recipe says otherwise (TrainConfig fields).
DECODER_DEFAULTS: dict[str, Any] = {
    "epochs": 3, "batch_size": 4, "lr": 1e-3, "lambda_sparsity": 0.1, "lambda_diversity": 0.5, "val_fraction": 0.1,
    "workers": 0, "device": "cpu", "log_every": 10, "save_every": 10_000,
}
BUILD_SETS = ("manifest", "out", "clap", "tokenizer")   # TrainConfig fields the build fills in itself


def decoder_settings(path: Path) -> dict[str, Any]:
    """The TrainConfig fields of the recipe file ``path``, refusing those the build sets itself."""
    from lmaczs_cli.recipe import SECTION_OF, load_recipe

    settings = load_recipe(path)
    taken = [f"[{SECTION_OF[k]}] {k}" for k in BUILD_SETS if k in settings]
    if taken:
        raise LmaczsError(f"--decoder-recipe {path}: the build sets {', '.join(taken)} itself; leave them out")
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The build's options, checked (argparse exits with a message on a bad combination)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True,
                    help="model folder to write (lmaczs_cli/demo/model replaces the bundled model; the examples "
                         "go beside it, in ../examples)")
    ap.add_argument("--work", type=Path, default=Path("demo-build"), help="scratch folder (world manifest, runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clap-steps", type=int, default=600)
    ap.add_argument("--clap-batch", type=int, default=32)
    ap.add_argument("--clap-lr", type=float, default=2e-3)
    ap.add_argument("--presence-weight", type=float, default=10.0,
                    help="weight of the per-event presence regression (see presence_loss)")
    ap.add_argument("--caption-weight", type=float, default=0.1,
                    help="weight of the caption contrastive loss")
    ap.add_argument("--present-cos", type=float, default=PRESENT_COS,
                    help="presence-loss target cosine for a present event")
    ap.add_argument("--absent-cos", type=float, default=ABSENT_COS,
                    help="presence-loss target cosine for an absent event")
    ap.add_argument("--text-weight", type=float, default=0.0,
                    help="weight of prompt_overlap: pushes the event prompts' text embeddings apart")
    ap.add_argument("--geometry-weight", type=float, default=0.0,
                    help="weight of geometry_loss: audio-audio cosines of single events -> their prompts' cosines")
    ap.add_argument("--isolation-weight", type=float, default=0.0,
                    help="weight of isolation_loss: the LMAC-ZS objective of event-isolating masks, on the CLAP")
    ap.add_argument("--soft-db", type=float, default=None,
                    help="take masked-away cells down by U(SOFT_DB, 100) dB instead of to the floor (see attenuate)")
    ap.add_argument("--speckle", type=float, default=0.0,
                    help="masked clips also lose a random share U(0, SPECKLE) of their cells, presence unchanged "
                         "(see speckle)")
    ap.add_argument("--contrast-weight", type=float, default=0.0,
                    help="weight of contrast_loss: a present event's prompt must fall by at least --contrast-margin "
                         "when the event is masked away, and score the empty clip at least that much below the clip")
    ap.add_argument("--contrast-margin", type=float, default=0.2, help="margin of contrast_loss (cosine)")
    ap.add_argument("--pair-weight", type=float, default=0.0,
                    help="weight of pair_loss: an event's prompt must score at least --pair-margin higher on a "
                         "masked clip than on the same clip with that event removed as well")
    ap.add_argument("--pair-margin", type=float, default=0.2, help="margin of pair_loss (cosine)")
    ap.add_argument("--text-warmup", type=int, default=0,
                    help="steps of the text tower alone on prompt_overlap before the round (separate_prompts)")
    ap.add_argument("--label-weight", type=float, default=0.0,
                    help="weight of label_loss: cross-entropy of single-event clips over the event prompts")
    ap.add_argument("--silence-weight", type=float, default=0.0,
                    help="weight of silence_gap_loss: an absent event's prompt must score a clip no higher than "
                         "the empty clip")
    ap.add_argument("--clap-noisy", type=float, default=0.0,
                    help="share of the CLAP's training clips over a training background (world.TRAIN_BACKGROUNDS)")
    ap.add_argument("--clap-snr", type=float, nargs=2, default=[0.0, 20.0], metavar=("LO", "HI"),
                    help="SNR range (dB) of those backgrounds")
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--singles", type=int, default=1400)
    ap.add_argument("--decoder-scenes", type=int, default=400)
    ap.add_argument("--decoder-texts", choices=world.WORLD_TEXTS, default="events",
                    help="decoder training texts: scene captions, per-event prompts, or both")
    ap.add_argument("--decoder-events", type=int, default=None, choices=range(1, world.MAX_EVENTS + 1),
                    help="every decoder training scene holds this many events (default: 1..3 at random)")
    ap.add_argument("--decoder-recipe", type=Path, default=None,
                    help="`lmaczs train` recipe file (TOML) with the decoder's training settings, on top of "
                         "DECODER_DEFAULTS ([decoder] init = DIR fine-tunes a saved decoder)")
    ap.add_argument("--report-scenes", type=int, default=12,
                    help="held-out scenes the decoder is scored on (localization figures, build.json)")
    ap.add_argument("--skip-clap", action="store_true", help="reuse the CLAP already in --out")
    ap.add_argument("--clap-only", action="store_true",
                    help="stop after the CLAP and its reports (one fine-tuning round; the next goes on with "
                         "--clap-init)")
    ap.add_argument("--clap-init", type=Path, default=None,
                    help="fine-tune the CLAP saved in this folder instead of training from scratch")
    args = ap.parse_args(argv)
    args.decoder_settings = {}
    if args.decoder_recipe is not None:
        try:
            args.decoder_settings = decoder_settings(args.decoder_recipe)
        except LmaczsError as e:
            ap.error(str(e))
    if args.clap_only and args.decoder_recipe is not None:
        ap.error("--clap-only trains no decoder, so --decoder-recipe would do nothing")
    if args.text_warmup < 0:
        ap.error(f"--text-warmup is a number of steps, 0 or more (got {args.text_warmup})")
    if not 0.0 <= args.clap_noisy <= 1.0:
        ap.error(f"--clap-noisy is a share of clips, between 0 and 1 (got {args.clap_noisy:g})")
    if args.clap_snr[0] > args.clap_snr[1]:
        ap.error(f"--clap-snr LO HI needs LO <= HI (got {args.clap_snr[0]:g} {args.clap_snr[1]:g})")
    if not 0.0 <= args.speckle <= 1.0:
        ap.error(f"--speckle is a share of cells, between 0 and 1 (got {args.speckle:g})")
    if args.skip_clap:
        unused = [f"--{name.replace('_', '-')}" for name in CLAP_ROUND_OPTIONS
                  if getattr(args, name) != ap.get_default(name)]
        if unused:
            ap.error(f"--skip-clap reuses the CLAP in --out, so these CLAP-round options would do nothing: "
                     f"{', '.join(unused)}")
        if args.clap_only:
            ap.error("--skip-clap and --clap-only together train nothing: pick one")
    return args


# the decoder settings build.json records (TrainConfig fields)
DECODER_REPORTED = ("epochs", "batch_size", "lr", "lr_schedule", "lambda_sparsity", "lambda_diversity", "lambda_out",
                    "lambda_overlap", "lambda_reach", "lambda_absent", "text_readout", "group_by_audio", "mask_noise",
                    "hard_mask", "logit_bound", "logmel_skip", "levels", "skip_gate", "init", "init_any_clap")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.time()
    out, work = args.out, args.work
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"seed": args.seed}

    from lmaczs_cli.clap import load_clap_dir
    from lmaczs_cli.demo.scores import by_event, localization_report, prompt_rows, randomization_report
    from lmaczs_cli.explain import Explainer
    from lmaczs_cli.recipe import resolve_config
    from lmaczs_cli.train import train

    settings = {**DECODER_DEFAULTS, "seed": args.seed, **args.decoder_settings}

    if args.skip_clap:
        model = load_clap_dir(out)
        report["clap_history"] = clap_history(out)
    else:
        report["clap_history"] = (clap_history(args.clap_init) if args.clap_init else []) + [clap_round(args)]
        model = train_clap(args.clap_steps, args.clap_batch, args.clap_lr, args.seed, args.scenes, args.singles,
                           args.presence_weight, args.caption_weight, args.clap_init, cache=work,
                           present_cos=args.present_cos, absent_cos=args.absent_cos,
                           text_weight=args.text_weight, geometry_weight=args.geometry_weight,
                           isolation_weight=args.isolation_weight, soft_db=args.soft_db,
                           speckle_share=args.speckle, contrast_weight=args.contrast_weight,
                           contrast_margin=args.contrast_margin, pair_weight=args.pair_weight,
                           pair_margin=args.pair_margin, label_weight=args.label_weight,
                           text_warmup=args.text_warmup, silence_weight=args.silence_weight,
                           noisy_share=args.clap_noisy, snr_range=tuple(args.clap_snr))
        save_clap(model, out, dtype=torch.float16)
        model = load_clap_dir(out)
    zs = zero_shot_accuracy(model, per_class=20, seed=args.seed)
    log(f"zero-shot accuracy on held-out single-event clips: {zs['accuracy']:.3f}")
    report["zero_shot"] = zs
    report["presence"] = presence_report(model)
    log("cosine to an event's prompt: " + ", ".join(f"{k} {v:.2f}" for k, v in report["presence"].items()))
    perfect = oracle_rows(model, n_scenes=args.report_scenes)
    report["oracle"] = oracle_report(model, rows=perfect)
    log("ground-truth masks (the perfect explanation) on held-out scenes, similarity gap: "
        + ", ".join(f"{k} {v:.3f}" for k, v in report["oracle"].items()))
    report["oracle_by_event"] = oracle_by_event(perfect)
    log("  overshoot (alone - scene) per event: " + ", ".join(
        f"{name} {v['overshoot']:+.3f}" for name, v in report["oracle_by_event"].items()))
    report["plans"] = plan_objective(model, lambda_sparsity=settings["lambda_sparsity"],
                                     lambda_diversity=settings["lambda_diversity"])
    for name, terms in report["plans"].items():
        log(f"LMAC-ZS objective of the plan '{name}': " + ", ".join(f"{k} {v:.3f}" for k, v in terms.items()))

    def finish(what: str) -> None:
        report["build_s"] = time.time() - t_start
        (out / "build.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"demo {what} written to {out} in {report['build_s'] / 60:.1f} min")

    if args.clap_only:
        finish("CLAP")
        return

    folder = work / ("world" if args.decoder_events is None else f"world-{args.decoder_events}")
    manifest = world.write_world(folder, args.decoder_scenes, seed=args.seed, split="train",
                                 texts=args.decoder_texts, n_events=args.decoder_events)
    run = work / "decoder"
    if run.exists():
        shutil.rmtree(run)
    cfg = resolve_config({**settings, "manifest": str(manifest), "out": str(run), "clap": str(out)})
    t_dec = time.time()
    summary = train(cfg, clap=model, on_event=lambda e: log(
        f"decoder step {e['step']} sim {e.get('similarity', 0):.4f} spa {e.get('sparsity', 0):.3f} "
        f"div {e.get('diversity', 0):.4f} out {e.get('removal', 0):.4f} ov {e.get('overlap', 0):.4f} "
        f"ab {e.get('absent', 0):.4f}")
        if e["event"] == "step" and e["step"] % 25 == 0 else None)
    resolved = cfg.to_json()
    report["decoder"] = {"texts": args.decoder_texts, "events": args.decoder_events,
                         **{k: resolved[k] for k in DECODER_REPORTED}}
    report["decoder_train_s"] = time.time() - t_dec
    report["decoder_steps"] = summary["steps"]
    for name in ("decoder.safetensors", "config.json"):
        shutil.copy(run / name, out / name)
    explainer = Explainer.load(clap=str(out), decoder=out, device="cpu")
    rows = prompt_rows(explainer, n_scenes=args.report_scenes)
    report["localization"] = localization_report(explainer, rows=rows)
    log("held-out scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in report["localization"].items()))
    report["localization_by_event"] = by_event(rows)
    for name, v in report["localization_by_event"].items():
        log(f"  {name}: " + ", ".join(f"{k} {x:.3f}" if k != "n" else f"n {x:.0f}" for k, x in v.items()))
    report["randomization"] = randomization_report(explainer)
    log("SSIM of the masks as CLAP is re-initialised from the top: "
        + ", ".join(f"{k} {v:.3f}" for k, v in report["randomization"].items()))
    report["examples"] = write_examples(out.parent / "examples", args.seed)
    finish("model")


if __name__ == "__main__":
    main()
