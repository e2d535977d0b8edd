"""One entry point for the benchmarks: every figure measured side by side in one run.

    python bench/run.py                 # full run on the bundled demo model
    python bench/run.py --quick         # smoke run (< 2 min on 2 CPU cores)
    python bench/run.py --clap random:HTSAT-tiny --batch-sizes 1 2 4 8

Sections (each skipped with its reason when what it needs is missing):
  embed      CLAP audio embedding, clips/s per batch size (the anchor of every ratio)
  explain    the explainer (front end, encoder, decoder, listenable iSTFT, masked check),
             clips/s per batch size and backend: torch eager; onnx (ONNX Runtime, from a
             fresh `lmaczs export` of the same model); trt when TensorRT and a GPU exist
  methods    cost per clip of each explanation method of `lmaczs eval` (LMAC-ZS one pass,
             GradCAM / GradCAM++, SmoothGrad and IG many)
Every figure is the median of --repeats timed runs (>= 5 by default; after a warm-up) with
min and max. Writes bench/results/<date>-<machine>[-<model>][-quick].json (-2, -3 ... for later
runs of the day; nothing is overwritten), a Markdown table beside it and a PNG plot (throughput
vs batch size per backend; cost per clip per method).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmaczs_cli import __version__  # noqa: E402
from lmaczs_cli.audio import CLIP_SAMPLES, SAMPLE_RATE  # noqa: E402
from lmaczs_cli.files import atomic_path  # noqa: E402


class Skip(Exception):
    """A section that cannot run here; the message says why."""


def timed(fn: Callable[[], Any], items: int, repeats: int, sync: Callable[[], None]) -> dict[str, Any]:
    """items/s of fn: median, min and max over `repeats` timed calls after one warm-up."""
    fn()
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        rates.append(items / (time.perf_counter() - t0))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats}


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "lmaczs": __version__}


def clips(n: int, seed: int = 0) -> torch.Tensor:
    """n 10-s 48-kHz test clips: a quiet noise floor with two tone bursts each."""
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    out = np.empty((n, CLIP_SAMPLES), dtype=np.float32)
    for k in range(n):
        x = 0.01 * rng.standard_normal(CLIP_SAMPLES)
        for _ in range(2):
            a = rng.uniform(0, 8)
            on = (t >= a) & (t < a + rng.uniform(0.5, 2))
            x[on] += 0.3 * np.sin(2 * np.pi * rng.uniform(200, 6000) * t[on])
        out[k] = x
    return torch.from_numpy(out)


def load_explainer(spec: str, device: str):
    from lmaczs_cli.explain import Explainer

    if spec == "demo":
        return Explainer.load("demo", device=device)
    from lmaczs_cli.clap import load_clap
    from lmaczs_cli.decoder import DecoderConfig, MaskDecoder

    clap = load_clap(spec)
    torch.manual_seed(0)
    return Explainer.from_models(clap, MaskDecoder(DecoderConfig.for_clap(clap)), {"domain": "mel", "mel_to_linear": "linear"},
                     device=device)


# ----------------------------------------------------------------------------- sections


def bench_embed(ex, args, sync) -> list[dict[str, Any]]:
    rows = []
    for b in args.batch_sizes:
        waves = clips(b).to(ex.device)
        with torch.no_grad():
            r = timed(lambda: ex.clap.embed_audio(waves), b, args.repeats, sync)
        rows.append({"section": "embed", "backend": "torch", "batch": b, "clips_per_s": r})
    return rows


def bench_explain_torch(ex, args, sync) -> list[dict[str, Any]]:
    rows = []
    for b in args.batch_sizes:
        waves = clips(b).to(ex.device)
        r = timed(lambda: ex.run_windows(waves, [args.prompt]), b, args.repeats, sync)   # with the check
        rows.append({"section": "explain", "backend": "torch", "batch": b, "clips_per_s": r})
    return rows


def _runner(backend: str, ex, args, folder: Path):
    """A fresh export of `ex` into `folder` and a Runner on it, or Skip with the reason."""
    from lmaczs_cli.backends import OnnxRunner, TrtRunner
    from lmaczs_cli.export.to_onnx import export_onnx

    if backend == "trt":
        from lmaczs_cli.export.to_trt import require_trt

        try:
            require_trt()
        except Exception as e:
            raise Skip(str(e)) from e
    export_onnx(ex.clap, ex.decoder, folder, domain=ex.domain, max_batch=max(args.batch_sizes))
    if backend == "onnx":
        return OnnxRunner(folder, device="cpu" if ex.device.type == "cpu" else "auto")
    from lmaczs_cli.export.to_trt import export_engines

    export_engines(folder, fp16=True, max_batch=max(args.batch_sizes))
    return TrtRunner(folder)


def bench_explain_backend(backend: str, ex, args, sync) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runner = _runner(backend, ex, args, Path(tmp))
        text = ex.text_embedding([args.prompt]).cpu()
        dev = "cuda" if backend == "trt" else "cpu"
        for b in args.batch_sizes:
            waves = clips(b).to(dev)
            t = text[None].expand(b, -1, -1).contiguous().to(dev)
            r = timed(lambda: runner.explain(waves, t), b, args.repeats, sync)
            rows.append({"section": "explain", "backend": backend, "batch": b, "clips_per_s": r})
    return rows


def bench_methods(ex, args, sync) -> list[dict[str, Any]]:
    """Seconds per clip of each eval method on one clip (the explained class: label 0)."""
    from lmaczs_cli.baselines import BaselineSettings
    from lmaczs_cli.evaluate import MaskMethods

    settings = BaselineSettings(ig_steps=4, smoothgrad_samples=4) if args.quick else BaselineSettings()
    labels = [args.prompt, "the sound of rain", "the sound of a bell"]
    masker = MaskMethods(ex.clap, ex.decoder, ex.domain, ex.text_embedding(labels), settings)
    waves, target = clips(1).to(ex.device), torch.zeros(1, dtype=torch.long, device=ex.device)
    rows = []
    for method in args.methods:
        r = timed(lambda: masker(method, waves, target), 1, args.repeats, sync)
        rows.append({"section": "methods", "method": method, "settings": settings.to_json(),
                     "seconds_per_clip": {"median": 1 / r["median"], "min": 1 / r["max"], "max": 1 / r["min"],
                                          "repeats": r["repeats"]}})
    return rows


# ----------------------------------------------------------------------------- outputs


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Benchmarks, {result['date']}, {m['cpu']} ({m['threads']} threads)"
             + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU") + f", model `{result['model']}`, "
             f"median of {result['repeats']} (min-max).", ""]
    thr = [r for r in result["rows"] if "clips_per_s" in r]
    if thr:
        lines += ["| section | backend | batch | clips/s |", "|---|---|---:|---:|"]
        for r in thr:
            c = r["clips_per_s"]
            lines.append(f"| {r['section']} | {r['backend']} | {r['batch']} | "
                         f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f}) |")
        lines.append("")
    cost = [r for r in result["rows"] if "seconds_per_clip" in r]
    if cost:
        lines += ["| method | s/clip |", "|---|---:|"]
        for r in cost:
            c = r["seconds_per_clip"]
            lines.append(f"| {r['method']} | {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f}) |")
        lines.append("")
    if result["ratios"]:
        lines += ["| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
        lines.append("")
    if result["skipped"]:
        lines += [f"Skipped: {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Side-by-side ratios at the largest batch both sides measured."""
    rate = {(r["section"], r["backend"], r["batch"]): r["clips_per_s"]["median"] for r in rows if "clips_per_s" in r}
    out = {}
    for backend in ("onnx", "trt"):
        common = [b for (s, be, b) in rate if s == "explain" and be == backend and ("explain", "torch", b) in rate]
        if common:
            b = max(common)
            out[f"explain {backend} / torch (batch {b})"] = rate[("explain", backend, b)] / rate[("explain", "torch", b)]
    common = [b for (s, be, b) in rate if s == "explain" and be == "torch" and ("embed", "torch", b) in rate]
    if common:
        b = max(common)
        out[f"explain torch / embed (batch {b})"] = rate[("explain", "torch", b)] / rate[("embed", "torch", b)]
    return out


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        if "clips_per_s" in r:
            series.setdefault(f"{r['section']} ({r['backend']})", []).append((r["batch"], r["clips_per_s"]["median"]))
    for name, pts in series.items():
        pts.sort()
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    a.set_xlabel("batch size"), a.set_ylabel("clips/s (10-s clips)"), a.set_xscale("log", base=2)
    a.set_title("throughput vs batch size"), a.legend(fontsize=8), a.grid(alpha=0.3)
    cost = [r for r in result["rows"] if "seconds_per_clip" in r]
    if cost:
        b.bar([r["method"] for r in cost], [r["seconds_per_clip"]["median"] for r in cost])
        b.set_yscale("log"), b.set_ylabel("seconds per clip"), b.set_title("cost per clip per method")
    else:
        b.set_axis_off()
    fig.suptitle(f"lmaczs bench {result['date']} — {result['machine']['cpu']}"
                 + (f", {result['machine']['gpu']}" if result["machine"]["gpu"] else ""), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def free_slug(folder: Path, name: str) -> str:
    """<date>-<machine>[-<model>][-quick], with -2, -3 ... appended when an earlier run of the
    day already wrote that name: results are never overwritten."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    slug, n = base, 1
    while any((folder / f"{slug}{ext}").exists() for ext in (".json", ".md", ".png")):
        n += 1
        slug = f"{base}-{n}"
    return slug


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: random:tiny CLAP, batches 1 2, 2 repeats")
    ap.add_argument("--clap", default="demo", help="demo | random:ARCH (a fresh seeded decoder) [default: demo]")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sections", nargs="+", default=["embed", "explain", "onnx", "trt", "methods"])
    ap.add_argument("--methods", nargs="+", default=["lmaczs", "gradcam", "gradcam++", "smoothgrad", "ig"])
    ap.add_argument("--prompt", default="the sound of a siren")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.clap, args.batch_sizes, args.repeats = "random:tiny", [1, 2], 2
    ex = load_explainer(args.clap, args.device)
    sync = torch.cuda.synchronize if ex.device.type == "cuda" else (lambda: None)
    sections: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "embed": lambda: bench_embed(ex, args, sync),
        "explain": lambda: bench_explain_torch(ex, args, sync),
        "onnx": lambda: bench_explain_backend("onnx", ex, args, sync),
        "trt": lambda: bench_explain_backend("trt", ex, args, sync),
        "methods": lambda: bench_methods(ex, args, sync),
    }
    now = dt.datetime.now(dt.timezone.utc)
    result: dict[str, Any] = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "model": args.clap,
                              "repeats": args.repeats, "quick": args.quick, "rows": [], "skipped": {}}
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            result["rows"] += sections[name]()
        except Skip as e:
            result["skipped"][name] = str(e)
        except Exception as e:  # a broken section is reported, the others still run
            result["skipped"][name] = f"failed: {type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    result["ratios"] = ratios(result["rows"])
    args.out.mkdir(parents=True, exist_ok=True)
    model = "" if args.clap == "demo" else f"-{Path(args.clap).name}"
    slug = free_slug(args.out, f"{now:%Y-%m-%d}-{platform.node()}{model}" + ("-quick" if args.quick else ""))
    with atomic_path(args.out / f"{slug}.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_path(args.out / f"{slug}.md") as tmp:
        tmp.write_text(markdown(result))
    plotted = plot(result, args.out / f"{slug}.png")
    print(markdown(result))
    print(f"wrote {args.out / slug}.json, .md" + (", .png" if plotted else ""), file=sys.stderr)
    return 1 if any(v.startswith("failed") for v in result["skipped"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
