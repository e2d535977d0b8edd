"""Build the bundled demo model from scratch: a small LAION-CLAP trained contrastively on the
demo world, then an LMAC-ZS decoder trained with `lmaczs train` on a world manifest.

    python -m lmaczs_cli.demo.build --out lmaczs_cli/demo/model

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

from .. import spectral
from ..audio import N_FRAMES, N_MELS, SAMPLE_RATE
from ..clap import ClapConfig, ClapModel, ClipBpeTokenizer, build_laion_clap, save_clap
from ..loss import similarity_term, sparsity_term
from ..train import LR_SCHEDULES
from . import world
from .scores import oracle_report

DEMO_CLAP = ClapConfig(
    "HTSAT-custom", "transformer", joint_dim=128, htsat_embed_dim=32, htsat_depths=(1, 1, 1, 1),
    htsat_heads=(2, 4, 8, 8), text_width=64, text_layers=2, text_heads=2,
)
EXAMPLES = 3  # example sounds shipped for the README's first command
PRESENT_COS, ABSENT_COS = 0.6, 0.1  # presence-loss targets: cosine to a present / absent event's prompt


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


def attenuate(logmel: torch.Tensor, removed: torch.Tensor, generator: torch.Generator,
              soft_db: float | None = None) -> torch.Tensor:
    """Take the `removed` cells of logmel (B, T, F) dB away: down to the floor a zero mask gives
    (`spectral.SILENCE_DB`), or, with `soft_db`, down by an attenuation drawn per clip from
    U(soft_db, 100) dB (never below the floor) — what a sigmoid mask, which is never exactly 0,
    does to the cells it leaves out. A CLAP taught only hard floors reads a cell 30 dB down as
    still there, and LMAC-ZS's objective then cannot tell an isolating mask from one that keeps
    everything."""
    if soft_db is None:
        return logmel.masked_fill(removed, spectral.SILENCE_DB)
    drop = torch.empty(len(logmel), 1, 1).uniform_(soft_db, 100.0, generator=generator)
    return torch.where(removed, (logmel - drop).clamp(min=spectral.SILENCE_DB), logmel)


SPECKLE_BLOCKS = (1, 2, 4, 8)   # side of the square cell blocks `speckle` drops, drawn per clip


def speckle(logmel: torch.Tensor, generator: torch.Generator, max_share: float,
            soft_db: float | None = None) -> torch.Tensor:
    """Drop a random share U(0, max_share) of each clip's cells, in square blocks of 1, 2, 4 or 8
    cells (one size per clip), as `attenuate` does; the clip's presence is left as it was.

    A decoder mask that is not yet sure of a cell (and, under `lmaczs train --mask-noise`, every
    training mask) keeps a speckle of cells rather than whole regions. A CLAP taught only
    region-shaped removals may read a speckled scene as silence (the shipped CLAP, r6 and r8 lose
    most of a spread-out event's similarity with 44 % of the cells dropped at random), so
    LMAC-ZS's similarity and masked-out terms can be met by patterns that have nothing to do
    with where the events are. Teaching that a speckled event is still there leaves only the
    event's own cells to decide whether it is present. With 8-cell blocks, a short or narrow event
    can lose all its cells and still count as present: label noise, rare at shares below 0.6."""
    removed = torch.zeros(logmel.shape, dtype=torch.bool)
    n_frames, n_bands = logmel.shape[1:]
    for b in range(len(logmel)):
        size = SPECKLE_BLOCKS[int(torch.randint(len(SPECKLE_BLOCKS), (1,), generator=generator))]
        share = float(torch.rand((), generator=generator)) * max_share
        coarse = torch.rand(-(-n_frames // size), -(-n_bands // size), generator=generator) < share
        removed[b] = coarse.repeat_interleave(size, 0).repeat_interleave(size, 1)[:n_frames, :n_bands]
    return attenuate(logmel, removed, generator, soft_db)


def drop_events(logmel: torch.Tensor, presence: torch.Tensor, bits: torch.Tensor,
                generator: torch.Generator, p_drop: float = 0.5,
                p_background: float = 0.0, soft_db: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask augmentation for the presence loss: remove each present event with probability
    `p_drop` by setting the mel cells it owns to the floor a zero LMAC-ZS mask gives
    (`spectral.SILENCE_DB`; with `soft_db`, some way towards it: see `attenuate`), and clear its
    presence; with probability `p_background` per clip also remove every cell no event owns
    (the background). logmel (B, 1001, 64) dB,
    presence (B, E), bits (B, 1001, 64) int16 -> (masked log-mel, presence after removal).

    This teaches the demo CLAP what masked inputs mean: a scene with an event masked away no
    longer holds it, a scene masked down to one event (background gone too) still holds that
    one, and a clip masked to nothing holds none — the behaviour LMAC-ZS's objective relies on
    to prefer a mask that isolates the prompted event."""
    drop = (torch.rand(presence.shape, generator=generator) < p_drop) & (presence > 0)
    weights = torch.tensor([1 << e for e in range(presence.shape[1])], dtype=torch.int32)
    drop_bits = (drop.int() * weights).sum(1)                                 # (B,)
    removed = (bits.int() & drop_bits[:, None, None]) != 0
    no_background = torch.rand(len(bits), generator=generator) < p_background
    removed |= no_background[:, None, None] & (bits == 0)
    return attenuate(logmel, removed, generator, soft_db), presence * (~drop).float()


def contrastive_loss(audio: torch.Tensor, text: torch.Tensor, captions: list[str], scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets (identical captions are all positives)."""
    logits = scale * audio @ text.T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=audio.device)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def presence_loss(audio: torch.Tensor, prompts: torch.Tensor, presence: torch.Tensor,
                  present: float = PRESENT_COS, absent: float = ABSENT_COS) -> torch.Tensor:
    """Regress every clip's cosine to every event prompt onto `present` where the clip holds
    that event and `absent` where it does not (squared error, present and absent entries
    averaged separately). audio (B, D), prompts (E, D),
    presence (B, E) in {0, 1}, with at least one present and one absent entry.

    Why a fixed target: LMAC-ZS's similarity term asks the masked clip to keep the *original*
    similarity. If a two-event scene scores lower on one event's prompt than that event alone
    (a contrastive CLAP puts the scene between its events' prompts: ~0.6 against ~0.9 with a
    sigmoid loss, ~0.2 against ~0.8 with InfoNCE alone), the objective prefers a mask that keeps
    every event over one that isolates the prompted event. With a similarity that depends only
    on whether the event is there, both masks keep the similarity and the sparsity term picks
    the smaller one — the event's own cells."""
    target = absent + (present - absent) * presence
    err = (audio @ prompts.T - target).square()
    # present and absent entries weigh half each: most (clip, prompt) pairs are absent ones
    on = presence > 0
    return 0.5 * (err[on].mean() + err[~on].mean())


def isolation_loss(clean_audio: torch.Tensor, views: torch.Tensor, view_clip: torch.Tensor, view_event: torch.Tensor,
                   nothing: torch.Tensor, prompts: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """The "isolate" plan of `plan_objective` as a CLAP loss: the similarity and diversity errors
    LMAC-ZS's objective finds in masks that keep exactly the prompted event's cells and nothing for
    absent prompts (weighted here as below, not by the decoder's lambdas; no sparsity, which the
    CLAP cannot change).
    clean_audio (B, D) the clips; views (V, D) clips masked down to one event (clip `view_clip`,
    event `view_event`, both (V,)); nothing (D,) the all-floor clip; prompts (E, D); presence (B, E).

      similarity  | t_e . view - t_e . clip |  and, per absent prompt a, | t_a . nothing - t_a . clip |
      diversity   | t_e . t_j - view_e . view_j | for another present event j of the same clip,
                  | t_e . t_a - view_e . nothing | for absent a
    (means of each). Zero where the CLAP scores an isolated event as it scores the scene and an
    empty clip as the scene for absent prompts, the CLAP under which isolating masks are optimal."""
    if len(views) == 0 or bool((presence > 0.5).all()):
        raise ValueError("isolation_loss needs at least one view and one absent (clip, prompt) entry")
    t_e = prompts[view_event]                                               # (V, D)
    sim_present = ((t_e * views).sum(-1) - (t_e * clean_audio[view_clip]).sum(-1)).abs().mean()
    absent = presence < 0.5
    sim_absent = ((prompts @ nothing)[None, :] - clean_audio @ prompts.T).abs()[absent].mean()
    div_absent = ((t_e @ prompts.T) - (views @ nothing)[:, None]).abs()[absent[view_clip]].mean()
    same_clip = (view_clip[:, None] == view_clip[None, :]) & (view_event[:, None] != view_event[None, :])
    div_present = ((t_e @ t_e.T) - (views @ views.T)).abs()[same_clip]
    div = div_absent if div_present.numel() == 0 else 0.5 * (div_absent + div_present.mean())
    return sim_present + sim_absent + div


def contrast_loss(clean_audio: torch.Tensor, masked_audio: torch.Tensor, nothing: torch.Tensor,
                  prompts: torch.Tensor, presence: torch.Tensor, masked_presence: torch.Tensor,
                  margin: float) -> torch.Tensor:
    """Hinge on how far an event's prompt falls when the event goes: for every (clip, event) the
    clip holds, ``t_e . clip - t_e . masked`` where `drop_events` took the event away, and
    ``t_e . clip - t_e . nothing``, should each be at least `margin` (mean of the shortfalls).
    clean_audio, masked_audio (B, D) a clip and its masked copy; nothing (D,) the all-floor clip;
    prompts (E, D); presence, masked_presence (B, E) in {0, 1} before / after the removal.

    Why: LMAC-ZS's similarity term and the masked-out term only pay a mask for covering an event
    as much as the prompt's similarity falls without it. `presence_loss` regresses every pair
    towards a target, and leaves short or narrow events (a steady tone, a chirp, clicks) in a
    busy scene at nearly the same cosine whether they are there or not (~0.05 apart, the empty
    clip a little lower still), so a near-empty mask anywhere keeps the similarity. This term asks
    for the fall itself, pair by pair.

    In `train_clap` a clip and its masked copy get independent level offsets (±6 dB each), and
    half the masked copies lose their background too, so the fall measured here is not only the
    event's; the rounds of docs/demo-model.md were trained so."""
    s_clean = clean_audio @ prompts.T                                         # (B, E)
    dropped = (presence > 0.5) & (masked_presence < 0.5)
    gone = F.relu(margin - (s_clean - masked_audio @ prompts.T))[dropped]
    empty = F.relu(margin - (s_clean - (prompts @ nothing)[None, :]))[presence > 0.5]
    return torch.cat([gone, empty]).mean()


def pair_loss(with_event: torch.Tensor, without_event: torch.Tensor, prompts: torch.Tensor,
              event: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge on two copies of one masked clip that differ only in one event's cells: the event's
    prompt must score at least `margin` higher on the copy that keeps the event.
    with_event, without_event (P, D): the pairs; prompts (E, D); event (P,) the event removed.

    Why, beside `contrast_loss`: there the event's fall is measured from the clean clip to its
    masked copy, which also lost a speckle of cells, its background (half the time) and its level
    (an independent offset). A CLAP can meet that hinge by scoring any masked-looking clip lower,
    without hearing the event, and c1/c2 of docs/demo-model.md still score a steady tone or a click
    train in a busy scene the same whether it is there or not. Here both copies share the speckle,
    the background, the level and the other events, so only the event's own cells tell them apart
    (and whatever of an overlapping event lies in them; their attenuation is drawn afresh)."""
    t = prompts[event]
    return F.relu(margin - ((t * with_event).sum(-1) - (t * without_event).sum(-1))).mean()


LABEL_SCALE = 20.0   # logit scale of label_loss: cosines 0.05 apart are ~2.7x apart in probability


def label_loss(audio: torch.Tensor, prompts: torch.Tensor, presence: torch.Tensor,
               scale: float = LABEL_SCALE) -> torch.Tensor:
    """Cross-entropy of the clips that hold exactly one event over the event prompts, logits
    `scale` x cosine: zero-shot classification as a loss. audio (B, D), prompts (E, D),
    presence (B, E); zero when no clip holds exactly one event.

    Why, beside `presence_loss`: the squared error there spreads its gradient over every
    (clip, prompt) pair, and the CLAP can sit with a rising chirp's clips at the same cosine
    (~0.47) to the rising and the falling chirp's prompts, or a steady tone's near the warble's,
    at little cost. The zero-shot accuracy the build reports is decided by exactly those near ties;
    this term puts the gradient on them."""
    one = presence.sum(1) == 1
    if not bool(one.any()):
        return audio.new_zeros(())
    return F.cross_entropy(scale * audio[one] @ prompts.T, presence[one].argmax(1))


def _off_diagonal(square: torch.Tensor) -> torch.Tensor:
    """The entries of an (N, N) matrix off its diagonal, flattened."""
    return square[~torch.eye(len(square), dtype=torch.bool, device=square.device)]


def prompt_overlap(prompts: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between different event prompts; prompts (E, D) L2-normalised.

    Why: LMAC-ZS's diversity term asks the masked clips for two prompts to be as similar as
    the two prompts' text embeddings. A text tower that puts every event prompt at cosine
    ~0.5-0.7 to the others (what the presence loss alone leaves) makes the decoder draw the
    same mask whatever the prompt; near-orthogonal prompts ask for different masks."""
    return _off_diagonal(prompts @ prompts.T).square().mean()


def geometry_loss(audio: torch.Tensor, prompts: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Mean squared gap between audio-audio and text-text cosines over pairs of clips that each
    hold exactly one event, of different kinds: (a_p·a_q - t_kp·t_kq)². audio (B, D),
    prompts (E, D), presence (B, E). Zero when fewer than two such clips.

    Why: LMAC-ZS's diversity term asks the masked clips for two prompts to be as similar as the
    two prompts' text embeddings. Where isolated events of two kinds embed as close to each
    other as their prompts do, the masks that isolate each prompted event satisfy it and one
    mask for every prompt does not."""
    single = presence.sum(1) == 1
    a, kind = audio[single], presence[single].argmax(1)
    t = prompts[kind]
    differ = kind[:, None] != kind[None, :]
    if not bool(differ.any()):
        return audio.new_zeros(())
    return (a @ a.T - t @ t.T)[differ].square().mean()


def load_pool(n_scenes: int, n_single: int, seed: int, cache: Path | None = None):
    """`render_pool`, kept in `cache/pool-<seed>-<scenes>-<singles>.pt` when a folder is given
    (rendering 3400 clips takes ~4 min on 2 cores; the file is ~0.9 GB)."""
    path = None if cache is None else cache / f"pool-{seed}-{n_scenes}-{n_single}.pt"
    if path is not None and path.exists():
        log(f"reusing the rendered pool {path}")
        return torch.load(path)
    log(f"rendering {n_scenes} scenes + {n_single} single-event clips")
    pool = render_pool(n_scenes, n_single, seed)
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
    return float(_off_diagonal(t @ t.T).max())


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
               text_warmup: int = 0) -> ClapModel:
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
    exactly one event. With `text_warmup`, `separate_prompts` runs that many steps first. With
    `speckle_share`, the masked clips also lose a random
    speckle of cells (`speckle`), their presence unchanged."""
    torch.manual_seed(seed)
    if init is not None:
        from ..clap import load_clap_dir

        model = load_clap_dir(init)
        log(f"starting from the CLAP in {init}")
    else:
        model = ClapModel(build_laion_clap(DEMO_CLAP), DEMO_CLAP, ClipBpeTokenizer(DEMO_CLAP.context_length),
                          source="demo")
    clap = model.clap
    if text_warmup > 0:
        log(f"text tower alone, {text_warmup} steps on prompt_overlap: largest prompt-prompt cosine "
            f"{separate_prompts(model, text_warmup):.3f}")
    mels, captions, presence, bits = load_pool(n_scenes, n_single, seed, cache)
    event_prompts = [world.prompt_for(n) for n in world.EVENTS]
    clap.requires_grad_(True)
    clap.train()
    params = [p for p in clap.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
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
        loss = (caption_weight * cap_loss + presence_weight * pres_loss + text_weight * text_loss
                + geometry_weight * geo_loss + isolation_weight * iso_loss + contrast_weight * con_loss
                + pair_weight * pr_loss + label_weight * lab_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"clap step {step}/{steps} loss {loss.item():.3f} caption {cap_loss.item():.3f} "
                f"presence {pres_loss.item():.4f} prompts {text_loss.item():.4f} geometry {geo_loss.item():.4f} "
                f"isolation {iso_loss.item():.4f} contrast {con_loss.item():.4f} pairs {pr_loss.item():.4f} "
                f"labels {lab_loss.item():.4f} "
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
    out["prompt_cos"] = float(_off_diagonal(text @ text.T).mean())
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
                             keep nothing (what issue C's localization bounds ask for);
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
               "labels": args.label_weight}
    given = ", ".join(f"{k} {v:g}" for k, v in weights.items() if v)
    removal = f", soft removal {args.soft_db:g}-100 dB" if args.soft_db is not None else ""
    removal += f", speckle up to {args.speckle:g}" if args.speckle else ""
    removal += f", contrast margin {args.contrast_margin:g}" if args.contrast_weight else ""
    removal += f", pair margin {args.pair_margin:g}" if args.pair_weight else ""
    removal += f", {args.text_warmup} text warm-up steps first" if args.text_warmup else ""
    return (f"{args.clap_steps} steps {start}, batch {args.clap_batch}, lr {args.clap_lr:g}, seed {args.seed}; "
            f"loss weights {given}{removal}")


# Options that only shape a CLAP round (train_clap); with --skip-clap they would be ignored.
CLAP_ROUND_OPTIONS = ("clap_steps", "clap_batch", "clap_lr", "clap_init", "scenes", "singles", "presence_weight",
                      "caption_weight", "present_cos", "absent_cos", "text_weight", "geometry_weight",
                      "isolation_weight", "soft_db", "speckle", "contrast_weight", "contrast_margin",
                      "pair_weight", "pair_margin", "label_weight", "text_warmup")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
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
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--singles", type=int, default=1400)
    ap.add_argument("--decoder-scenes", type=int, default=400)
    ap.add_argument("--decoder-texts", choices=world.WORLD_TEXTS, default="events",
                    help="decoder training texts: scene captions, per-event prompts, or both")
    ap.add_argument("--decoder-events", type=int, default=None, choices=range(1, world.MAX_EVENTS + 1),
                    help="every decoder training scene holds this many events (default: 1..3 at random)")
    ap.add_argument("--decoder-epochs", type=int, default=3)
    ap.add_argument("--decoder-batch", type=int, default=4)
    ap.add_argument("--decoder-lr", type=float, default=1e-3)
    ap.add_argument("--decoder-text-readout", action="store_true", help="lmaczs train --text-readout")
    ap.add_argument("--decoder-group-by-audio", action="store_true", help="lmaczs train --group-by-audio")
    ap.add_argument("--decoder-no-logmel-skip", action="store_true", help="lmaczs train --no-logmel-skip")
    ap.add_argument("--decoder-levels", type=int, default=4, choices=(2, 3, 4), help="lmaczs train --levels")
    ap.add_argument("--decoder-skip-gate", action="store_true", help="lmaczs train --skip-gate")
    ap.add_argument("--decoder-mask-noise", type=float, default=0.0, help="lmaczs train --mask-noise")
    ap.add_argument("--decoder-hard-mask", action="store_true", help="lmaczs train --hard-mask")
    ap.add_argument("--decoder-logit-bound", type=float, default=0.0, help="lmaczs train --logit-bound")
    ap.add_argument("--decoder-init", type=Path, default=None,
                    help="lmaczs train --init: start the decoder from one saved in this folder (same CLAP, same "
                         "architecture flags)")
    ap.add_argument("--decoder-init-any-clap", action="store_true", help="lmaczs train --init-any-clap")
    ap.add_argument("--decoder-lr-schedule", choices=LR_SCHEDULES, default="constant",
                    help="lmaczs train --lr-schedule")
    ap.add_argument("--lambda-sparsity", type=float, default=0.1)
    ap.add_argument("--lambda-diversity", type=float, default=0.5)
    ap.add_argument("--lambda-out", type=float, default=0.0, help="lmaczs train --lambda-out")
    ap.add_argument("--lambda-overlap", type=float, default=0.0, help="lmaczs train --lambda-overlap")
    ap.add_argument("--report-scenes", type=int, default=12,
                    help="held-out scenes the decoder is scored on (localization figures, build.json)")
    ap.add_argument("--skip-clap", action="store_true", help="reuse the CLAP already in --out")
    ap.add_argument("--clap-only", action="store_true",
                    help="stop after the CLAP and its reports (one fine-tuning round; the next goes on with "
                         "--clap-init)")
    ap.add_argument("--clap-init", type=Path, default=None,
                    help="fine-tune the CLAP saved in this folder instead of training from scratch")
    args = ap.parse_args(argv)
    if args.decoder_init_any_clap and args.decoder_init is None:
        ap.error("--decoder-init-any-clap needs --decoder-init DIR (the decoder to start from)")
    if args.text_warmup < 0:
        ap.error(f"--text-warmup is a number of steps, 0 or more (got {args.text_warmup})")
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
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.time()
    out, work = args.out, args.work
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"seed": args.seed}

    from ..clap import load_clap_dir
    from ..explain import Explainer
    from ..train import TrainConfig, train
    from .scores import by_event, localization_report, prompt_rows, randomization_report

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
                           text_warmup=args.text_warmup)
        save_clap(model, out, dtype=torch.float16)
        model = load_clap_dir(out)
    zs = zero_shot_accuracy(model, per_class=20, seed=args.seed)
    log(f"zero-shot accuracy on held-out single-event clips: {zs['accuracy']:.3f}")
    report["zero_shot"] = zs
    report["presence"] = presence_report(model)
    log("cosine to an event's prompt: " + ", ".join(f"{k} {v:.2f}" for k, v in report["presence"].items()))
    report["oracle"] = oracle_report(model, n_scenes=args.report_scenes)
    log("ground-truth masks (the perfect explanation) on held-out scenes, similarity gap: "
        + ", ".join(f"{k} {v:.3f}" for k, v in report["oracle"].items()))
    report["plans"] = plan_objective(model, lambda_sparsity=args.lambda_sparsity,
                                     lambda_diversity=args.lambda_diversity)
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
    cfg = TrainConfig(manifest=str(manifest), out=str(run), clap=str(out), epochs=args.decoder_epochs,
                      batch_size=args.decoder_batch, lr=args.decoder_lr, lambda_sparsity=args.lambda_sparsity,
                      lambda_diversity=args.lambda_diversity, val_fraction=0.1, workers=0, device="cpu",
                      log_every=10, save_every=10_000, seed=args.seed, text_readout=args.decoder_text_readout,
                      mask_noise=args.decoder_mask_noise, hard_mask=args.decoder_hard_mask,
                      logit_bound=args.decoder_logit_bound, lambda_out=args.lambda_out,
                      lambda_overlap=args.lambda_overlap,
                      logmel_skip=not args.decoder_no_logmel_skip,
                      levels=args.decoder_levels, skip_gate=args.decoder_skip_gate,
                      lr_schedule=args.decoder_lr_schedule,
                      init=str(args.decoder_init) if args.decoder_init else None,
                      init_any_clap=args.decoder_init_any_clap,
                      group_by_audio=args.decoder_group_by_audio)
    t_dec = time.time()
    summary = train(cfg, clap=model, on_event=lambda e: log(
        f"decoder step {e['step']} sim {e.get('similarity', 0):.4f} spa {e.get('sparsity', 0):.3f} "
        f"div {e.get('diversity', 0):.4f} out {e.get('removal', 0):.4f} ov {e.get('overlap', 0):.4f}")
        if e["event"] == "step" and e["step"] % 25 == 0 else None)
    settings = cfg.to_json()
    report["decoder"] = {"texts": args.decoder_texts, "events": args.decoder_events, **{k: settings[k] for k in (
        "epochs", "batch_size", "lr", "lr_schedule", "lambda_sparsity", "lambda_diversity", "lambda_out",
        "lambda_overlap", "text_readout", "group_by_audio", "mask_noise", "hard_mask", "logit_bound", "logmel_skip",
        "levels", "skip_gate", "init", "init_any_clap")}}
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
