"""The LMAC-ZS objective (Paissan et al. 2024, Eq. 6-7), with means instead of sums.

For a batch of B clips with captions, text embeddings t (B, D) and audio embeddings a (B, D)
(both L2-normalised), the CLAP similarity matrix is C_ij = t_i · a_j. A *pair* (i, j) is
(text i, audio j); its mask M_ij = D(t_i, h_j) gives the masked embedding ã_ij.

  similarity  = mean over pairs  | C_ij - t_i · ã_ij |                     (L1, every pair)
  sparsity    = mean over pairs  mean(M_ij)                                  (L1 of a mask in [0,1])
  diversity   = mean over (i, j≠i) with both (i,i) and (j,i) formed
                  | t_i · t_j  -  ã_ii · ã_ji |                              (Eq. 7)
  total       = similarity + λ1 · sparsity + λ2 · diversity

An option beyond the paper, off by default (λ_out = 0): L-MAC's masked-out term, on similarities
instead of class probabilities. With ã⁻_ii the embedding of clip i with its matched mask removed,
(1 - M_ii) ⊙ X_i, and ∅ the embedding of a clip removed everywhere (silence),

  removal     = mean over matched pairs  max(0, t_i · ã⁻_ii - t_i · ∅)
  total      += λ_out · removal

what the explanation leaves out must hold no more of the prompt than silence does. Eq. 6 and 7
alone cannot tell an empty mask for a sound that is there from the empty mask of a prompt whose
sound is absent; this term can (removing nothing leaves the whole clip).

A second option beyond the paper, off by default (λ_ov = 0): for two texts i ≠ k whose pairs
with the same clip j were both formed, their masks should not keep the same cells, to the degree
the texts differ:

  overlap     = mean over such (i, k, j)  max(0, 1 - t_i · t_k) · mean(M_ij ⊙ M_kj)
  total      += λ_ov · overlap

Where two prompts' masks on one clip are equal, Eq. 7 has no gradient (its masked embeddings are
equal unit vectors), so a decoder whose masks keep every event for every prompt stays there; this
term charges that state and lets the similarity and masked-out terms decide which prompt keeps
which cells.

Means rather than sums keep the weights independent of batch size and pair subsampling.
No logit scale multiplies C: the paper regresses raw cosine similarities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossTerms:
    total: torch.Tensor
    similarity: torch.Tensor
    sparsity: torch.Tensor
    diversity: torch.Tensor
    removal: torch.Tensor | None = None      # only when the masked-out term is on
    overlap: torch.Tensor | None = None      # only when the overlap term is on
    absent: torch.Tensor | None = None       # only when the absent-prompt term is on

    def as_floats(self) -> dict[str, float]:
        names = ("total", "similarity", "sparsity", "diversity") + tuple(
            k for k in ("removal", "overlap", "absent") if getattr(self, k) is not None)
        return {k: float(getattr(self, k).detach()) for k in names}


def all_pairs(batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every (text i, audio j) pair of a batch: (B*B, 2), matched pairs included."""
    i, j = torch.meshgrid(torch.arange(batch, device=device), torch.arange(batch, device=device), indexing="ij")
    return torch.stack([i.reshape(-1), j.reshape(-1)], dim=1)


def sample_pairs(batch: int, mismatched_per_clip: int, generator: torch.Generator) -> torch.Tensor:
    """All B matched pairs (i, i) + ``m`` mismatched texts per clip, drawn without replacement:
    (B * (1 + m), 2). With m >= B - 1 this is every pair."""
    m = min(mismatched_per_clip, batch - 1)
    pairs = [(j, j) for j in range(batch)]
    for j in range(batch):
        others = [i for i in range(batch) if i != j]
        pick = torch.randperm(len(others), generator=generator)[:m].tolist()
        pairs += [(others[k], j) for k in pick]
    return torch.tensor(pairs, dtype=torch.long)


def similarity_term(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean |C_ij - t_i·ã_ij| over pairs; both arguments (P,)."""
    return (original - masked).abs().mean()


def sparsity_term(masks: torch.Tensor) -> torch.Tensor:
    """Mean mask value over pairs and cells; masks (P, T, F) in [0, 1] (L1 / size)."""
    return masks.abs().mean()


def diversity_term(text: torch.Tensor, pairs: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Eq. 7, averaged: for each clip i and each other text j whose pair (j, i) was formed,
    | t_i·t_j - ã_ii·ã_ji |. text (B, D); pairs (P, 2) = (text, audio); masked (P, D).
    Zero when no clip has both its matched and a mismatched pair."""
    index = {(int(ti), int(aj)): k for k, (ti, aj) in enumerate(pairs.tolist())}
    rows_self, rows_other, ti, tj = [], [], [], []
    for (t_idx, a_idx), k in index.items():
        if t_idx == a_idx:
            continue
        self_k = index.get((a_idx, a_idx))
        if self_k is None:
            continue
        rows_self.append(self_k)
        rows_other.append(k)
        ti.append(a_idx)
        tj.append(t_idx)
    if not rows_self:
        return masked.new_zeros(())
    device = masked.device
    rs, ro = torch.tensor(rows_self, device=device), torch.tensor(rows_other, device=device)
    text_sim = (text[torch.tensor(ti, device=device)] * text[torch.tensor(tj, device=device)]).sum(-1)
    masked_sim = (masked[rs] * masked[ro]).sum(-1)
    return (text_sim - masked_sim).abs().mean()


def removal_term(text: torch.Tensor, removed: torch.Tensor, silence: torch.Tensor) -> torch.Tensor:
    """The masked-out term: mean of max(0, t_i·ã⁻_ii - t_i·∅) over matched pairs. text (M, D) the
    matched pairs' texts, removed (M, D) their clips' embeddings with the mask removed, silence (D,)
    the embedding of a clip removed everywhere."""
    return torch.relu((text * removed).sum(-1) - (text * silence).sum(-1)).mean()


def overlap_term(text: torch.Tensor, pairs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of max(0, 1 - t_i·t_k) · mean(M_ij ⊙ M_kj) over the pairs (i, j), (k, j) formed for one
    clip j with two different texts; the same caption at two batch positions is not compared.
    text (B, D); pairs (P, 2) = (text, audio); masks (P, T, F), those the similarity term saw (after
    any training noise). One Gram matrix per clip. Zero when no clip has two different texts."""
    flat = masks.float().flatten(1)
    total, count = flat.new_zeros(()), 0
    for clip in pairs[:, 1].unique().tolist():
        rows = (pairs[:, 1] == clip).nonzero().squeeze(1)
        if len(rows) < 2:
            continue
        kept = flat[rows]
        shared = kept @ kept.T / kept.shape[1]
        texts = text[pairs[rows, 0]].float()
        weight = torch.relu(1.0 - texts @ texts.T)
        compared = torch.triu(weight > 1e-6, diagonal=1)
        total = total + (weight * shared)[compared].sum()
        count += int(compared.sum())
    return total / count if count else total


def absent_term(text: torch.Tensor, audio: torch.Tensor, pairs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over the mismatched pairs (i, j) of w_ij · mean(M_ij), w_ij = clamp(1 - C_ij / C_jj, 0, 1):
    the mask of a text CLAP scores on clip j at a cosine of 0 or lower is charged in full, one it
    scores as high as clip j's own caption (it may name something the clip holds) not at all. The
    similarity term alone leaves such a mask free: CLAP scores the masked clip as low as the clip
    itself whatever the mask keeps. Not charged: pairs whose text belongs to the same clip at
    another batch position (identical audio embeddings, as with [data] group_by_audio) and clips whose
    own caption scores 0 or lower (nothing to measure against). text (B, D), audio (B, D) unmasked
    embeddings; pairs (P, 2) = (text, audio); masks (P, T, F), those the similarity term saw."""
    ti, aj = pairs[:, 0], pairs[:, 1]
    with torch.no_grad():
        a = audio.float()
        own_clip = a[ti.clamp_max(len(a) - 1)]                        # the clip at text i's position
        same_clip = (ti < len(a)) & ((own_clip - a[aj]).abs().amax(-1) <= 1e-6 * a.abs().amax().clamp_min(1e-12))
        off = (ti != aj) & ~same_clip
        if not bool(off.any()):
            return masks.new_zeros((), dtype=torch.float32)
        scored = (text[ti[off]].float() * a[aj[off]]).sum(-1)
        own = (text[aj[off]].float() * a[aj[off]]).sum(-1)
        weight = torch.where(own > 1e-6, (1.0 - scored / own.clamp_min(1e-6)).clamp(0.0, 1.0), torch.zeros_like(own))
    return (weight * masks[off].float().flatten(1).mean(1)).mean()


def lmac_zs_loss(
    text: torch.Tensor,
    audio: torch.Tensor,
    pairs: torch.Tensor,
    masked: torch.Tensor,
    masks: torch.Tensor,
    lambda_sparsity: float,
    lambda_diversity: float,
) -> LossTerms:
    """text (B, D), audio (B, D): CLAP embeddings of the captions and the unmasked clips;
    pairs (P, 2) = (text index, audio index); masked (P, D): embedding of audio j under the mask
    for text i; masks (P, T, F). Returns every term (the total carries the gradient)."""
    ti, aj = pairs[:, 0], pairs[:, 1]
    original = (text[ti] * audio[aj]).sum(-1)          # C_ij, no gradient path to the decoder
    kept = (text[ti] * masked).sum(-1)                 # t_i · ã_ij
    sim = similarity_term(original, kept)
    spa = sparsity_term(masks)
    div = diversity_term(text, pairs, masked)
    total = sim + lambda_sparsity * spa + lambda_diversity * div
    return LossTerms(total=total, similarity=sim, sparsity=spa, diversity=div)
