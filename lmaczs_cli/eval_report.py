"""Outputs of `lmaczs eval` (written atomically under OUT):

  metrics.json   {"n_clips", "accuracy", "settings", "methods": {method: {metric: value, "N",
                 "time_per_clip_s", ...}}, "studies": {...}}
  metrics.csv    one row per method: N, every metric, localization, seconds per clip
  metrics.md     the same as a Markdown table, ready for a README
  metrics.png             one panel per metric: a bar per method (mean over clips), whiskers the
                          95 % confidence interval of that mean
  localization.png        per clip: mask mass on the true region vs mask mean, per method, with
                          chance (data with ground truth)
  prompt_sensitivity.png  mask mean vs prompt similarity per method (with --prompt-sensitivity)
  randomization.png       SSIM to the intact model vs randomised stage per method (--randomization)
  qualitative.png         the first clip's log-mel and each method's mask (rows) for the matched
                          and the mismatched prompt (columns), on time (s) and frequency (Hz) axes
  curves.md, curves.png   insertion and deletion at equal budgets per method, with their areas (--curves)
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
            + ("; AD as SpeechBrain's L-MAC code computes it, on probabilities softmaxed twice"
               if settings.get("ad_convention") == "speechbrain" else "")
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
    curves = curves_summary(records, settings.get("budgets", metrics.BUDGETS))
    if curves:
        summary["curves"] = curves
    _write(out / "metrics.json", json.dumps(_json_safe(summary), indent=2) + "\n")
    _write(out / "metrics.csv", _csv(rows, settings))
    _write(out / "metrics.md", markdown_table(rows, acc, settings))
    if "prompt_sensitivity" in studies:
        _write(out / "prompt_sensitivity.png", plot_prompt_sensitivity(studies["prompt_sensitivity"]))
    if "randomization" in studies:
        _write(out / "randomization.png", plot_randomization(studies["randomization"]))
    _write(out / "qualitative.png", plot_qualitative(qualitative))
    _write(out / "metrics.png", _png(figure_metrics(records)))
    if any(np.isfinite(r.get("loc_mass", np.nan)) for recs in records.values() for r in recs):
        _write(out / "localization.png", _png(figure_localization(records)))
    if curves:
        _write(out / "curves.md", curves_markdown(curves, rows))
        _write(out / "curves.png", plot_curves(curves))
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
    return _png(figure_randomization(study))


def figure_randomization(study: dict[str, Any]) -> Any:
    """SSIM to the intact model's masks vs how many stages (from the top) are randomised."""
    fig, axes = _figure(1, 1, (6.5, 3.8))
    ax = axes[0][0]
    x = np.arange(1, len(study["stages"]) + 1)
    for m, values in study["ssim"].items():
        ax.plot(x, values, marker="o", label=m)
    ax.set_xticks(x, [f"+{s}" for s in study["stages"]], rotation=20, fontsize=7)
    ax.set_xlabel("encoder stages re-initialised, cumulatively from the top")
    ax.set_ylabel("SSIM to the intact model's mask")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title("Cascading randomisation: a mask that depends on the model falls", fontsize=9)
    ax.legend(fontsize=7, title="method", title_fontsize=7)
    return fig


def plot_qualitative(q: dict[str, Any]) -> bytes:
    return _png(figure_qualitative(q))


def figure_qualitative(q: dict[str, Any]) -> Any:
    """The first clip's log-mel, then each method's mask (rows) for the matched and the
    mismatched prompt (columns); time in s, frequency in Hz, a colorbar per row."""
    from . import spectral
    from .audio import HOP, SAMPLE_RATE
    from .report import mask_frequencies
    import torch

    logmel = spectral.log_mel(torch.from_numpy(q["wave"][None]))[0].numpy()   # (1001, 64)
    methods = list(q["masks"])
    fig, axes = _figure(len(methods) + 1, 2, (10, 1.9 * (len(methods) + 1)))
    seconds = logmel.shape[0] * HOP / SAMPLE_RATE
    for j, kind in enumerate(("matched", "mismatched")):
        rows = [("log-mel (dB)", logmel, "magma", None, None, "mel")]
        rows += [(m, q["masks"][m][kind], "viridis", 0.0, 1.0, q.get("domain", "mel")) for m in methods]
        for i, (name, grid, cmap, lo, hi, domain) in enumerate(rows):
            ax = axes[i][j]
            im = ax.imshow(grid.T, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
                           extent=(0, seconds, -0.5, grid.shape[1] - 0.5), interpolation="nearest")
            freqs = mask_frequencies(domain) if grid.shape[1] in (64, 513) else np.arange(grid.shape[1])
            ticks = [hz for hz in (100, 1000, 5000, 10_000) if freqs[0] <= hz <= freqs[-1]]
            ax.set_yticks([float(np.interp(hz, freqs, np.arange(len(freqs)))) for hz in ticks],
                          [f"{hz // 1000}k" if hz >= 1000 else str(hz) for hz in ticks], fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_ylabel("Hz", fontsize=7)
            title = name if i else f"{kind}: \u201c{q['prompts'][kind]}\u201d\n{q['key']}, log-mel"
            ax.set_title(title + (f" (mask mean {grid.mean():.3f})" if i else ""), fontsize=7)
            bar = fig.colorbar(im, ax=ax, pad=0.01)
            bar.set_label("dB" if i == 0 else "mask", fontsize=7)
            bar.ax.tick_params(labelsize=6)
        axes[-1][j].set_xlabel("time (s)", fontsize=8)
    return fig


def figure_metrics(records: dict[str, Sequence[dict[str, Any]]]) -> Any:
    """One panel per metric: a bar per method at its mean over clips (AI, AD, AG in %), the
    whiskers the 95 % confidence interval of that mean (1.96 standard errors)."""
    shown = [c for c in COLUMNS if c != "loc_chance"
             and any(np.isfinite(r.get(c, np.nan)) for recs in records.values() for r in recs)]
    cols = 4
    rows = -(-len(shown) // cols)
    fig, axes = _figure(rows, cols, (3.0 * cols, 2.6 * rows))
    methods = list(records)
    colors = [f"C{i}" for i in range(len(methods))]
    for ax, metric in zip(axes.ravel(), shown):
        mean, half = metric_spread(records, metric)
        ax.bar(np.arange(len(methods)), mean, yerr=half, color=colors, capsize=3)
        ax.set_xticks(np.arange(len(methods)), methods, rotation=30, fontsize=7, ha="right")
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(metrics.HIGHER_IS_BETTER.get(metric), "")
        ax.set_title(metric + arrow, fontsize=8)
        ax.set_ylabel("%" if metric in metrics.PERCENT else "mean over clips", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes.ravel()[len(shown):]:
        ax.set_visible(False)
    handles = [_patch(c) for c in colors]
    fig.legend(handles, methods, loc="upper center", ncol=len(methods), fontsize=8, title_fontsize=8,
               title="method (bars: mean over clips; whiskers: 95 % confidence interval of the mean)",
               bbox_to_anchor=(0.5, 1.0))
    return fig


def _patch(color: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=color)


def metric_spread(records: dict[str, Sequence[dict[str, Any]]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per method: the mean of a metric over clips (x 100 for AI, AD, AG) and the half-width of
    its 95 % confidence interval, 1.96 s / sqrt(n) (0 for a single clip)."""
    scale = 100.0 if metric in metrics.PERCENT else 1.0
    means, halves = [], []
    for recs in records.values():
        v = np.array([r.get(metric, np.nan) for r in recs], dtype=np.float64)
        v = scale * v[np.isfinite(v)]
        means.append(float(v.mean()) if v.size else np.nan)
        halves.append(float(1.96 * v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0)
    return np.array(means), np.array(halves)


def figure_localization(records: dict[str, Sequence[dict[str, Any]]]) -> Any:
    """Per clip with ground truth: the share of mask mass on the true region against the mask
    mean, one colour per method; the dashed line is chance (the region's share of the grid)."""
    fig, axes = _figure(1, 1, (6.5, 4.2))
    ax = axes[0][0]
    chance = []
    for m, recs in records.items():
        pts = [(r["MM"], r["loc_mass"]) for r in recs
               if np.isfinite(r.get("loc_mass", np.nan)) and np.isfinite(r.get("MM", np.nan))]
        chance += [r["loc_chance"] for r in recs if np.isfinite(r.get("loc_chance", np.nan))]
        if pts:
            x, y = np.array(pts).T
            ax.scatter(x, y, s=14, alpha=0.8, label=f"{m} (mean {np.mean(y):.2f})")
    if chance:
        ax.axhline(float(np.mean(chance)), color="gray", linestyle="--", label=f"chance ({np.mean(chance):.2f})")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("mask mean (share of the grid the mask keeps)")
    ax.set_ylabel("mask mass on the true region")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Localization vs mask size, per clip", fontsize=9)
    ax.legend(fontsize=7)
    return fig


# ----------------------------------------------------------------------------- equal budgets


def curves_summary(records: dict[str, Sequence[dict[str, Any]]],
                   budgets: Sequence[float] = metrics.BUDGETS) -> dict[str, Any]:
    """Insertion and deletion at equal budgets (`evaluate.budget_curves`), from the per-clip records
    of a run with curves: ``budgets`` (shares of cells) and per method the mean ``insertion`` and
    ``deletion`` curves (p_ĉ at each budget), the mean areas ``insertion_auc`` (higher is better)
    and ``deletion_auc`` (lower is better) and ``p`` the mean p_ĉ of the whole clips. {} when the
    run measured none."""
    out: dict[str, Any] = {}
    for m, recs in records.items():
        recs = [r for r in recs if "insertion" in r]
        if recs:
            out[m] = {"N": len(recs), **{k: np.mean([r[k] for r in recs], axis=0).tolist()
                                         for k in ("insertion", "deletion")},
                      **{k: float(np.mean([r[k] for r in recs])) for k in ("insertion_auc", "deletion_auc")},
                      "p": float(np.mean([r["p_pred"] for r in recs]))}
    return {"budgets": list(budgets), "methods": out} if out else {}


def curves_markdown(curves: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    """The areas at equal budgets beside each method's own-threshold AI / AD / AG and mask mean."""
    lines = ["| method | N | insertion AUC ↑ | deletion AUC ↓ | AI ↑ | AD ↓ | AG ↑ | MM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, c in curves["methods"].items():
        own = rows.get(m, {})
        values = (c["insertion_auc"], c["deletion_auc"], *(own.get(k, math.nan) for k in ("AI", "AD", "AG", "MM")))
        lines.append(f"| {m} | {c['N']} | " + " | ".join(_fmt(v) for v in values) + " |")
    budgets = ", ".join(f"{100 * q:g}" for q in curves["budgets"])
    note = (f"\nEach mask binarised to its top q % of cells, q in {budgets}; insertion: p_ĉ with only those cells "
            "kept, deletion: with them removed; AUC: trapezoid over q divided by the span of q (in p_ĉ units). "
            "AI, AD, AG (%) and MM: each method at its own mask, as in metrics.md.\n")
    return "\n".join(lines) + "\n" + note


def plot_curves(curves: dict[str, Any]) -> bytes:
    """Insertion (left) and deletion (right): mean p_ĉ against the share of cells kept / removed."""
    fig, axes = _figure(1, 2, (9, 3.5))
    x = 100 * np.asarray(curves["budgets"])
    whole = next(iter(curves["methods"].values()))["p"]     # the same clips for every method
    for ax, kind in zip(axes[0], ("insertion", "deletion")):
        for m, c in curves["methods"].items():
            ax.plot(x, c[kind], marker="o", label=f"{m} ({c[kind + '_auc']:.3f})")
        ax.axhline(whole, color="gray", linestyle="--", linewidth=1, label=f"whole clip ({whole:.3f})")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel("top q % of cells " + ("kept" if kind == "insertion" else "removed"))
        ax.set_ylabel("p of the predicted class")
        ax.set_title(f"{kind} (area in the legend; {'higher' if kind == 'insertion' else 'lower'} is better)",
                     fontsize=8)
        ax.legend(fontsize=7)
    return _png(fig)
