"""The demo CLAP's training losses and the masked views they are computed on.

`build.train_clap` mixes these terms; each is a plain function of embeddings (or of log-mels, for
the views) so it can be checked on hand-made inputs. The views imitate what an LMAC-ZS mask does
to a clip: `drop_events` and `speckle` take cells away, `attenuate` says by how much.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmaczs_cli import spectral

PRESENT_COS, ABSENT_COS = 0.6, 0.1  # presence-loss targets: cosine to a present / absent event's prompt


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
    event's; the rounds of demo-model.md were trained so."""
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
    without hearing the event, and c1/c2 of demo-model.md still score a steady tone or a click
    train in a busy scene the same whether it is there or not. Here both copies share the speckle,
    the background, the level and the other events, so only the event's own cells tell them apart
    (and whatever of an overlapping event lies in them; their attenuation is drawn afresh)."""
    t = prompts[event]
    return F.relu(margin - ((t * with_event).sum(-1) - (t * without_event).sum(-1))).mean()


def silence_gap_loss(audio: torch.Tensor, nothing: torch.Tensor, prompts: torch.Tensor,
                     presence: torch.Tensor) -> torch.Tensor:
    """Mean squared excess of an absent event's prompt on a clip over the same prompt on the
    empty clip: ``relu(t_a . clip - t_a . nothing)²`` over every (clip, prompt a) the clip lacks.
    audio (B, D); nothing (D,) the all-floor clip, held fixed (no gradient through it);
    prompts (E, D); presence (B, E) in {0, 1}. Zero when no entry is absent.

    Why, beside `presence_loss`: there absent pairs and the empty clip are regressed onto the same
    target, but not onto each other, and every CLAP of demo-model.md scores an absent prompt
    on a scene ~0.08-0.09 higher than on silence (g3: 0.19 against 0.11; g4, target 0.0: 0.13
    against 0.04). LMAC-ZS's similarity term then asks an absent prompt's mask to keep part of the
    scene, since an empty mask would score lower than the clip. Here the gap itself is the loss;
    the empty clip is held fixed so that the clip's score comes down to silence's rather than
    silence's going up."""
    absent = presence < 0.5
    if not bool(absent.any()):
        return audio.new_zeros(())
    excess = F.relu(audio @ prompts.T - (prompts @ nothing.detach())[None, :])
    return excess[absent].square().mean()


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


def off_diagonal(square: torch.Tensor) -> torch.Tensor:
    """The entries of an (N, N) matrix off its diagonal, flattened."""
    return square[~torch.eye(len(square), dtype=torch.bool, device=square.device)]


def prompt_overlap(prompts: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between different event prompts; prompts (E, D) L2-normalised.

    Why: LMAC-ZS's diversity term asks the masked clips for two prompts to be as similar as
    the two prompts' text embeddings. A text tower that puts every event prompt at cosine
    ~0.5-0.7 to the others (what the presence loss alone leaves) makes the decoder draw the
    same mask whatever the prompt; near-orthogonal prompts ask for different masks."""
    return off_diagonal(prompts @ prompts.T).square().mean()


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
