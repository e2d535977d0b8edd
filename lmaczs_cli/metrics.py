"""Metrics on masks. Localization against ground truth (the demo world has it); the
faithfulness metrics of the paper (AI, AD, AG, FF, Fid-In, SPS, COMP, MM) join them here."""
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
