"""Outputs of `lmaczs eval` (written atomically under OUT):

  metrics.json   {"n_clips", "accuracy", "settings", "methods": {method: {metric: value, "N",
                 "time_per_clip_s", ...}}, "studies": {...}}
  metrics.csv    one row per method: N, every metric, localization, seconds per clip
  metrics.md     the same as a Markdown table, ready for a README
  prompt_sensitivity.png  mask mean vs prompt similarity per method (with --prompt-sensitivity)
  randomization.png       SSIM to the intact model vs randomised stage per method (--randomization)
  qualitative.png         the first clip's log-mel and each method's mask, matched and mismatched prompt
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import metrics
from .files import atomic_path

COLUMNS = ("AI", "AD", "AG", "FF", "Fid-In", "SPS", "COMP", "MM", "loc_mass", "loc_auc", "loc_chance")


def method_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-clip records of one method -> its row: N, the paper's aggregates, localization
    (over clips whose ĉ has ground truth: N_loc), mean seconds per clip for the mask."""
    values = {k: np.array([r.get(k, np.nan) for r in records], dtype=np.float64) for k in COLUMNS}
    row: dict[str, Any] = {"N": len(records), **metrics.summarise(values)}
    row["N_loc"] = int(np.isfinite(values["loc_mass"]).sum())
    row["time_per_clip_s"] = float(np.mean([r["seconds"] for r in records])) if records else math.nan
    return row


def accuracy(records: Sequence[dict[str, Any]]) -> float:
    """Zero-shot accuracy (%): ĉ among the clip's labels (the same for every method's records)."""
    return 100.0 * float(np.mean([r["correct"] for r in records])) if records else math.nan


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: dict[str, dict[str, Any]], acc: float, settings: dict[str, Any]) -> str:
    cols = ["N", *COLUMNS, "time_per_clip_s"]
    arrows = {k: {True: " ↑", False: " ↓"}.get(metrics.HIGHER_IS_BETTER.get(k), "") for k in cols}
    lines = ["| method | " + " | ".join(c + arrows[c] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for m, row in rows.items():
        lines.append(f"| {m} | " + " | ".join(_fmt(row.get(c, math.nan)) for c in cols) + " |")
    note = (f"\nZero-shot accuracy: {acc:.1f} %. AI, AD, AG in %; FF, Fid-In, SPS, COMP, MM as 1/N Σ; "
            "loc_mass = share of mask mass in the (dilated) true region of ĉ's event, loc_chance its area "
            f"share; time = seconds per clip for the mask. Data: {settings['data']}"
            + (f", contaminated by {settings['contaminate']} at {settings['snr']} dB SNR" if settings.get("contaminate") else "")
            + ".\n")
    return "\n".join(lines) + "\n" + note


def _write(path: Path, text: str | bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(text) if isinstance(text, bytes) else tmp.write_text(text, encoding="utf-8")


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"baselines": {"ig_steps": 32}} -> {"baselines.ig_steps": 32}."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = "" if v is None else v
    return out


def _csv(rows: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    """One row per method: the metrics, then the run's settings repeated on every row, so
    that the CSVs of several runs (clean, contaminated, other data) concatenate into one table."""
    cols = ["method", "N", *COLUMNS, "N_loc", "time_per_clip_s"]
    flat = _flat(settings)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + list(flat))
    for m, row in rows.items():
        w.writerow([m, *[row.get(c, math.nan) for c in cols[1:]], *flat.values()])
    return buf.getvalue()


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def report_eval(out: Path, cfg: Any, ds: Any, records: dict[str, list[dict[str, Any]]],
                studies: dict[str, Any], qualitative: dict[str, Any]) -> dict[str, Any]:
    """Write every output of a run; return the metrics.json content."""
    rows = {m: method_summary(r) for m, r in records.items()}
    acc = accuracy(next(iter(records.values())))
    settings = json.loads(json.dumps(cfg.settings()))
    summary = {"n_clips": len(ds.clips), "layout": ds.layout, "classes": ds.classes, "accuracy": acc,
               "settings": settings, "methods": rows,
               "studies": {k: _without_points(v) if k == "prompt_sensitivity" else v for k, v in studies.items()}}
    _write(out / "metrics.json", json.dumps(_json_safe(summary), indent=2) + "\n")
    _write(out / "metrics.csv", _csv(rows, settings))
    _write(out / "metrics.md", markdown_table(rows, acc, settings))
    if "prompt_sensitivity" in studies:
        _write(out / "prompt_sensitivity.png", plot_prompt_sensitivity(studies["prompt_sensitivity"]))
    if "randomization" in studies:
        _write(out / "randomization.png", plot_randomization(studies["randomization"]))
    _write(out / "qualitative.png", plot_qualitative(qualitative))
    return summary


def _without_points(study: dict[str, Any]) -> dict[str, Any]:
    return {m: {k: v for k, v in s.items() if k != "points"} for m, s in study.items()}


# ----------------------------------------------------------------------------- plots


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, axes


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_prompt_sensitivity(study: dict[str, Any]) -> bytes:
    """One panel per method: mask mean vs prompt similarity, matched and mismatched prompts."""
    fig, axes = _figure(1, len(study), (3.2 * len(study), 3.2))
    for ax, (m, s) in zip(axes[0], study.items()):
        for matched, color, label in ((True, "tab:green", "matched"), (False, "tab:gray", "mismatched")):
            pts = [p for p in s["points"] if p["matched"] == matched]
            ax.scatter([p["similarity"] for p in pts], [p["mask_mean"] for p in pts], s=10, c=color, label=label)
        ax.set_title(f"{m} (r = {s['pearson_r']:.2f})")
        ax.set_xlabel("prompt similarity")
        ax.set_ylabel("mask mean")
    axes[0][0].legend(fontsize=7)
    return _png(fig)


def plot_randomization(study: dict[str, Any]) -> bytes:
    """SSIM to the intact model's masks vs how many stages (from the top) are randomised."""
    fig, axes = _figure(1, 1, (6, 3.5))
    ax = axes[0][0]
    x = np.arange(1, len(study["stages"]) + 1)
    for m, values in study["ssim"].items():
        ax.plot(x, values, marker="o", label=m)
    ax.set_xticks(x, [f"+{s}" for s in study["stages"]], rotation=20, fontsize=7)
    ax.set_ylabel("SSIM to original mask")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_qualitative(q: dict[str, Any]) -> bytes:
    """Log-mel of the first clip, then each method's mask for the matched and mismatched prompt."""
    from . import spectral
    import torch

    logmel = spectral.log_mel(torch.from_numpy(q["wave"][None]))[0].numpy()   # (1001, 64)
    methods = list(q["masks"])
    fig, axes = _figure(len(methods) + 1, 2, (9, 1.6 * (len(methods) + 1)))
    for j, kind in enumerate(("matched", "mismatched")):
        axes[0][j].imshow(logmel.T, origin="lower", aspect="auto", cmap="magma")
        axes[0][j].set_title(f"{q['key']} log-mel; {kind}: \"{q['prompts'][kind]}\"", fontsize=7)
        for i, m in enumerate(methods, start=1):
            mask = q["masks"][m][kind]
            axes[i][j].imshow(mask.T, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
            axes[i][j].set_title(f"{m} (mean {mask.mean():.3f})", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)
