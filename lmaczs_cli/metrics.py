"""Metrics on masks. Localization against ground truth (the demo world has it); the
faithfulness metrics of the paper (AI, AD, AG, FF, Fid-In, SPS, COMP, MM), with AD also in
SpeechBrain's convention (`AD_CONVENTIONS`); insertion and deletion at equal budgets
(`top_cells`, `curve_area`), which compare methods whatever the size of their masks."""
from __future__ import annotations

import numpy as np

# The decoder's effective resolution on the mel grid: its finest CLAP input (HTSAT stage 1,
# unfolded) has one token per 8 stretched frames x 8 mel bands. Ground-truth regions are
# dilated by half a token each way before asking how much of a mask lies inside them.
TOKEN_FRAMES = 8
TOKEN_BANDS = 8


def dilate(region: np.ndarray, frames: int = TOKEN_FRAMES // 2, bins: int = TOKEN_BANDS // 2) -> np.ndarray:
    """Binary dilation of a (T, F) bool region by a (2*frames+1) x (2*bins+1) box."""
    from scipy.ndimage import binary_dilation

    box = np.ones((2 * frames + 1, 2 * bins + 1), dtype=bool)
    return binary_dilation(np.asarray(region, dtype=bool), structure=box)


def mass_in_region(mask: np.ndarray, region: np.ndarray) -> float:
    """Share of a mask's total mass that lies inside ``region`` (same (T, F) shape)."""
    mask = np.asarray(mask, dtype=np.float64)
    total = mask.sum()
    if total <= 0:
        return 0.0
    return float(mask[np.asarray(region, dtype=bool)].sum() / total)


def region_auc(mask: np.ndarray, region: np.ndarray) -> float:
    """ROC AUC of mask values as a detector of region cells (0.5 = chance, 1 = perfect)."""
    from sklearn.metrics import roc_auc_score

    region = np.asarray(region, dtype=bool).ravel()
    if region.all() or not region.any():
        return float("nan")
    return float(roc_auc_score(region, np.asarray(mask, dtype=np.float64).ravel()))


# --------------------------------------------------------------------------- faithfulness
# The evaluation of the LMAC-ZS paper (Paissan et al., NeurIPS 2024). Class probabilities are
# p_c(X) = softmax_c(t_cᵀ f_audio(X)) over the label prompts; ĉ = argmax_c of the original
# clip's. Every function below takes per-clip arrays and returns per-clip values (N,);
# `summarise` averages them on the paper's scale.

HIGHER_IS_BETTER = {"AI": True, "AD": False, "AG": True, "FF": True, "Fid-In": True, "SPS": True,
                    "COMP": False, "MM": None, "loc_mass": True, "loc_auc": True}
PERCENT = ("AI", "AD", "AG")  # reported as 100/N Σ, the others as 1/N Σ


def class_probabilities(similarity: np.ndarray, logit_scale: float = 1.0) -> np.ndarray:
    """similarity (N, C) of each clip to the C label prompts -> probabilities (N, C).

    ``logit_scale`` 1 is the paper's formula (a softmax of the raw cosine similarities);
    CLAP's own logit scale (exp(logit_scale_a), ~33 when trained) sharpens it."""
    z = logit_scale * np.asarray(similarity, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def increase(p: np.ndarray, p_masked: np.ndarray) -> np.ndarray:
    """AI per clip: 1 where the masked input raises the predicted class's probability. (N,) -> (N,)."""
    return (np.asarray(p_masked) > np.asarray(p)).astype(np.float64)


def drop(p: np.ndarray, p_masked: np.ndarray) -> np.ndarray:
    """AD per clip: max(0, p − p_masked) / p, the relative probability lost. (N,) -> (N,)."""
    p, p_masked = np.asarray(p, np.float64), np.asarray(p_masked, np.float64)
    return np.maximum(0.0, p - p_masked) / p


def gain(p: np.ndarray, p_masked: np.ndarray) -> np.ndarray:
    """AG per clip: max(0, p_masked − p) / (1 − p), the share of the possible gain won. (N,) -> (N,)."""
    p, p_masked = np.asarray(p, np.float64), np.asarray(p_masked, np.float64)
    return np.maximum(0.0, p_masked - p) / (1.0 - p)


def drop_softmaxed_twice(prob: np.ndarray, prob_masked: np.ndarray) -> np.ndarray:
    """AD per clip as SpeechBrain's L-MAC code computes it (``compute_AD`` of its ESC-50 interpret
    recipe): its inputs are already class probabilities and it applies a softmax to them again,
    then takes `drop` of ĉ's entries. prob, prob_masked (N, C) probabilities, ĉ the argmax of
    prob (a softmax keeps it) -> (N,). The second softmax squeezes C probabilities into
    [1/(e + C - 1), e/(e + C - 1)], so no drop passes 1 - 1/e (63 %); offered only to set figures
    beside theirs (their 1e-10 in the denominator is left out: it changes nothing visible)."""
    pred = np.asarray(prob).argmax(axis=1)
    return drop_of_top_class(class_probabilities(prob), class_probabilities(prob_masked), pred)


def drop_of_top_class(prob: np.ndarray, prob_masked: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    """AD per clip as the paper defines it: `drop` of the entries of ĉ (``pred``, default each
    row's argmax of prob). prob, prob_masked (N, C) -> (N,)."""
    prob, prob_masked = np.asarray(prob), np.asarray(prob_masked)
    pred = prob.argmax(axis=1) if pred is None else np.asarray(pred)
    rows = np.arange(len(prob))
    return drop(prob[rows, pred], prob_masked[rows, pred])


# AD conventions of `per_clip_metrics`: name -> per clip AD from the (N, C) probabilities of the
# original and the masked input. "paper" is the paper's formula, the default everywhere.
AD_CONVENTIONS = {"paper": drop_of_top_class, "speechbrain": drop_softmaxed_twice}


def faithfulness_removal(p: np.ndarray, p_removed: np.ndarray) -> np.ndarray:
    """FF per clip: p_ĉ(X) − p_ĉ(X − X_int), the probability lost when the explanation is removed."""
    return np.asarray(p, np.float64) - np.asarray(p_removed, np.float64)


def fidelity_in(pred: np.ndarray, pred_masked: np.ndarray) -> np.ndarray:
    """Fid-In per clip: 1 where the masked input keeps the original top class. (N,) ints -> (N,)."""
    return (np.asarray(pred) == np.asarray(pred_masked)).astype(np.float64)


def _flat_abs(mask: np.ndarray) -> np.ndarray:
    """(N, ...) -> (N, n) float64 |mask|, one row per clip."""
    m = np.abs(np.asarray(mask, dtype=np.float64))
    return m.reshape(m.shape[0], -1)


def sparseness(mask: np.ndarray) -> np.ndarray:
    """SPS per clip: Gini index of the flattened |mask|, Σ(2i−n−1)a_(i) / (n Σ a_(i)) with a
    sorted ascending, i = 1..n. One-hot -> (n−1)/n, constant -> 0. mask (N, ...) -> (N,);
    an all-zero mask has no distribution and gives NaN."""
    a = np.sort(_flat_abs(mask), axis=1)
    n = a.shape[1]
    i = np.arange(1, n + 1, dtype=np.float64)
    total = a.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((2 * i - n - 1) * a).sum(axis=1) / (n * total)


def complexity(mask: np.ndarray) -> np.ndarray:
    """COMP per clip: entropy (nats) of |mask| / Σ|mask|. Constant -> log n, one-hot -> 0.
    mask (N, ...) -> (N,); an all-zero mask gives NaN."""
    a = _flat_abs(mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = a / a.sum(axis=1, keepdims=True)
        logs = np.where(q > 0, np.log(np.where(q > 0, q, 1.0)), 0.0)
    return -(q * logs).sum(axis=1)


def mask_mean(mask: np.ndarray) -> np.ndarray:
    """MM per clip: the mean mask value. (N, ...) -> (N,)."""
    return np.asarray(mask, dtype=np.float64).reshape(len(mask), -1).mean(axis=1)


def per_clip_metrics(prob: np.ndarray, prob_masked: np.ndarray, prob_removed: np.ndarray,
                     masks: np.ndarray, ad: str = "paper") -> dict[str, np.ndarray]:
    """Every metric of the paper per clip, from the class probabilities of the original input
    (N, C), the masked input M⊙X (N, C) and the input with the explanation removed X − X_int
    (N, C), and the masks (N, T, F). ĉ is the original's top class. ``ad`` names the AD
    convention (`AD_CONVENTIONS`; "paper" unless figures are to be set beside SpeechBrain's)."""
    if ad not in AD_CONVENTIONS:
        raise ValueError(f"unknown AD convention {ad!r}; use one of {', '.join(AD_CONVENTIONS)}")
    pred = prob.argmax(axis=1)
    rows = np.arange(len(pred))
    p, pm, pr = prob[rows, pred], prob_masked[rows, pred], prob_removed[rows, pred]
    return {
        "AI": increase(p, pm), "AD": AD_CONVENTIONS[ad](prob, prob_masked), "AG": gain(p, pm),
        "FF": faithfulness_removal(p, pr), "Fid-In": fidelity_in(pred, prob_masked.argmax(axis=1)),
        "SPS": sparseness(masks), "COMP": complexity(masks), "MM": mask_mean(masks),
    }


def summarise(values: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-clip values -> the paper's aggregates: 100/N Σ for AI, AD, AG; 1/N Σ for the rest
    (NaN clips, e.g. an all-zero mask's SPS or a clip without ground truth, left out)."""
    out = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        mean = float(v.mean()) if v.size else float("nan")
        out[name] = 100.0 * mean if name in PERCENT else mean
    return out


def localization(mask: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """How well a (T, F) mask finds a (T, F) bool ground-truth region: ``loc_mass`` is the
    share of mask mass inside the region dilated by half a token (chance: ``loc_chance``, the
    dilated region's share of the grid), ``loc_auc`` the ROC AUC of mask vs region (0.5 chance)."""
    grown = dilate(region)
    return {"loc_mass": mass_in_region(mask, grown), "loc_auc": region_auc(mask, region),
            "loc_chance": float(grown.mean())}


# --------------------------------------------------------------------------- equal budgets
# AI and AD judge each mask at its own size, and a method that keeps more of the clip keeps more
# of the class's evidence. Insertion and deletion curves compare methods at equal budgets: each
# mask is binarised to its top q of cells, then ĉ's probability is read with only those cells kept
# (insertion: higher is better) and with only those removed (deletion: lower is better).

BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)   # shares q of a mask's cells kept or removed


def top_cells(mask: np.ndarray, budgets: tuple[float, ...] = BUDGETS) -> np.ndarray:
    """Binarised masks at each budget: masks (N, ...) -> bool (Q, N, ...), row q of clip n keeping
    exactly round(budgets[q] · cells) of the clip's cells, those with the largest values. Ties
    (a flat or saturated mask) are broken in one fixed pseudo-random order of the cells, so a flat
    mask keeps cells spread over the grid, not its first frames. One ranking per clip serves every
    budget, so a larger budget keeps every cell a smaller one keeps."""
    if any(not 0 <= q <= 1 for q in budgets):
        raise ValueError(f"budgets are shares of the mask's cells, in [0, 1]; got {budgets}")
    m = np.asarray(mask, dtype=np.float64)
    flat = m.reshape(len(m), -1)
    n = flat.shape[1]
    tie = np.random.default_rng(0).permutation(n)
    out = np.zeros((len(budgets), *flat.shape), dtype=bool)
    for i, row in enumerate(flat):
        order = np.lexsort((tie, -row))            # largest value first, ties in the fixed order
        for b, q in enumerate(budgets):
            out[b, i, order[: int(round(q * n))]] = True
    return out.reshape(len(budgets), *m.shape)


def curve_area(values: np.ndarray, budgets: tuple[float, ...] = BUDGETS) -> np.ndarray:
    """Area under per-clip curves sampled at ``budgets``: values (N, Q) -> (N,), the trapezoid
    rule over the budgets divided by their span (first to last), so the area is in the values'
    own unit: a curve constant at p has area p."""
    x = np.asarray(budgets, dtype=np.float64)
    if len(x) < 2 or np.any(np.diff(x) <= 0):
        raise ValueError(f"budgets must be at least two increasing shares; got {budgets}")
    v = np.asarray(values, dtype=np.float64)
    return (((v[:, 1:] + v[:, :-1]) / 2) * np.diff(x)).sum(axis=1) / (x[-1] - x[0])
