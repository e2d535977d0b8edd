"""One entry point for the benchmarks: every figure measured side by side in one run.

    python bench/run.py                 # full run on the bundled demo model
    python bench/run.py --quick         # smoke run (< 2 min on 2 CPU cores)
    python bench/run.py --clap random:HTSAT-tiny --batch-sizes 1 2 4 8

Sections (each skipped with its reason when what it needs is missing):
  embed      CLAP audio embedding, clips/s per batch size (the anchor of every ratio)
  ceiling    how close torch's audio encoder already runs to torch's own fp32 GEMM rate here: the
             encoder's counted FLOPs per clip (matmuls and convolutions, 2 a multiply-add,
             torch.utils.flop_counter), its GFLOP/s at the largest batch size (best and median of
             the timed calls), and torch's best fp32 GEMM rate on large and encoder-shaped
             matrices. Their quotient (best against best) is the gain over torch's encoder, the
             bulk of an explain call, left to a runtime that ran every counted FLOP at that GEMM
             rate: not a bound on other kernels or on graphs that compute fewer FLOPs
  explain    the explainer (front end, encoder, decoder, listenable iSTFT[, masked check]),
             clips/s per batch size, with and without the check, on real recordings and on
             synthetic clips, per backend: torch eager; onnx (ONNX Runtime, from a fresh
             `lmaczs export` of the same model; "onnx" in --sections); onnx-int8 (its int8
             variants, `lmaczs export --int8`; "int8" in --sections); trt when TensorRT and a
             GPU exist. The backends are timed interleaved, call by call.
  topk       --labels (50) --top-k 3 in one encoder pass vs a one-prompt explain of the same clips
  spectral   the STFT and its inverse alone (real clips, the largest batch size), on the CPU:
             torch's FFT (what the runner computes around the int8 explainers) against the fused
             graphs' MatMul DFTs in ONNX Runtime and against ONNX Runtime's own STFT and DFT ops
  folder     `lmaczs explain` over a folder of 10-s files (decode, model, writes) vs the in-memory
             batched rate of the same model and batch size (timed just before each folder run);
             where its time goes (the run's `timings`: seconds per stage, and CPU seconds)
  rss        resident memory growth of `lmaczs explain` over many short files
  startup    `lmaczs --help`, `import lmaczs_cli`, loading the demo model (fresh processes)
  methods    cost per clip of each explanation method of `lmaczs eval` (LMAC-ZS one pass,
             GradCAM / GradCAM++, SmoothGrad and IG many)
Real recordings: bench/audio/ (four sounds of the freedesktop sound theme, Debian package
sound-theme-freedesktop; licences in bench/audio/README.md), each tiled to 10 s.
The process keeps freed memory as `lmaczs explain` does (`runs.keep_freed_memory`, glibc), so
every section, in memory or folder, measures under the same allocator settings.
Every figure is the median of --repeats timed runs (>= 5 by default; after a warm-up) with
min and max. Writes bench/results/<date>-<machine>[-<model>][-quick].json (-2, -3 ... for later
runs of the day; nothing is overwritten), a Markdown table beside it and a PNG plot (throughput
vs batch size per backend; cost per clip per method).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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


AUDIO = ROOT / "bench" / "audio"


def recordings(n: int) -> torch.Tensor:
    """n 10-s clips from the real recordings in bench/audio (cycled), each tiled to 10 s."""
    from lmaczs_cli.audio import load_audio

    files = sorted(p for p in AUDIO.iterdir() if p.suffix in (".oga", ".ogg", ".flac", ".wav"))
    if not files:
        raise Skip(f"no recordings in {AUDIO}")
    waves = [np.resize(load_audio(files[k % len(files)]), CLIP_SAMPLES) for k in range(n)]
    return torch.from_numpy(np.stack(waves).astype(np.float32))


def clip_set(kind: str, n: int) -> torch.Tensor:
    return recordings(n) if kind == "real" else clips(n)


def timed_together(fns: dict[str, Callable[[], Any]], items: int, repeats: int,
                   sync: Callable[[], None]) -> dict[str, dict[str, Any]]:
    """`timed` for several functions, their calls interleaved (one warm-up each, then
    round-robin), so that a slow spell of the machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            rates[k].append(items / (time.perf_counter() - t0))
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "repeats": repeats}
            for k, v in rates.items()}


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
        waves = clips(b)
        r = timed(lambda: ex.runner.embed_audio(waves), b, args.repeats, sync)
        rows.append({"section": "embed", "backend": "torch", "batch": b, "clips_per_s": r})
    return rows


def _gemm_rate(m: int, k: int, n: int, repeats: int) -> float:
    """torch's fp32 GEMM rate on (m x k) @ (k x n), GFLOP/s, the best of `repeats` calls."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n * timed(lambda: a @ b, 1, repeats, lambda: None)["max"] / 1e9


def bench_ceiling(ex, args, sync) -> list[dict[str, Any]]:
    """The encoder's counted FLOPs and achieved rate beside torch's fp32 GEMM rate (CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    if ex.device.type != "cpu":
        raise Skip("the fp32 GEMM ceiling is measured on the CPU only")
    b = max(args.batch_sizes)
    waves = clips(b)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            ex.runner.embed_audio(waves)
        r = timed(lambda: ex.runner.embed_audio(waves), b, args.repeats, sync)
    per_clip = counter.get_total_flops() / b
    achieved = per_clip * r["max"] / 1e9                 # best against best: the GEMM rate is a best too
    dim = ex.clap.cfg.htsat_embed_dim if ex.clap.cfg.is_htsat else 96   # stage 1's width; its MLP is 4x
    shapes = {"2048 x 2048 x 2048": (2048, 2048, 2048), f"16384 x {dim} x {4 * dim}": (16384, dim, 4 * dim)}
    gemm = {name: _gemm_rate(*shape, max(args.repeats, 5)) for name, shape in shapes.items()}
    best = max(gemm.values())
    return [{"section": "ceiling", "batch": b, "gflop_per_clip": per_clip / 1e9, "encoder_clips_per_s": r,
             "encoder_gflops": achieved, "encoder_gflops_median": per_clip * r["median"] / 1e9,
             "gemm_gflops": gemm, "headroom": best / achieved, "threads": torch.get_num_threads()}]


def _runner(backend: str, ex, args, folder: Path):
    """A fresh export of `ex` into `folder` and a Runner on it, or Skip with the reason.
    onnx-int8: the export's int8 variants (quantised and audited once, beside the float32 graphs)."""
    from lmaczs_cli.backends import OnnxRunner, TrtRunner
    from lmaczs_cli.export.to_onnx import export_onnx, read_manifest

    if backend == "trt":
        from lmaczs_cli.export.to_trt import require_trt

        try:
            require_trt()
        except Exception as e:
            raise Skip(str(e)) from e
    if backend in ("onnx", "onnx-int8"):
        if not (folder / "manifest.json").exists():
            export_onnx(ex.clap, ex.decoder, folder, domain=ex.domain, max_batch=max(args.batch_sizes))
        if backend == "onnx-int8" and not read_manifest(folder).get("int8"):
            from lmaczs_cli.export.quantize import QuantizationError, add_int8

            try:
                add_int8(folder, ex.clap, ex.decoder)
            except QuantizationError as e:
                raise Skip(str(e)) from e
        return OnnxRunner(folder, device="cpu" if ex.device.type == "cpu" else "auto",
                          threads=torch.get_num_threads(), precision="int8" if backend == "onnx-int8" else "fp32")
    from lmaczs_cli.export.to_trt import export_engines

    folder = folder / "fp16"               # TensorRT precision comes from the graph: an fp16 export
    export_onnx(ex.clap, ex.decoder, folder, domain=ex.domain, max_batch=max(args.batch_sizes), fp16=True)
    export_engines(folder, max_batch=max(args.batch_sizes))
    return TrtRunner(folder)


def _runners(ex, args, folder: Path, skipped: dict[str, str]) -> dict[str, Any]:
    """torch and every other backend asked for in --sections that can run here."""
    runners = {"torch": ex.runner}
    for backend, section in (("onnx", "onnx"), ("onnx-int8", "int8"), ("trt", "trt")):
        if section in args.sections:
            try:
                runners[backend] = _runner(backend, ex, args, folder)
            except Skip as e:
                skipped[backend] = str(e)
            except Exception as e:      # a backend that fails to build is reported; the others still run
                skipped[backend] = f"failed: {type(e).__name__}: {e}"
                traceback.print_exc()
    return runners


def bench_explain(ex, args, sync, runners: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    text = ex.text_embedding([args.prompt]).cpu()
    for kind in ("real", "synthetic"):
        for b in args.batch_sizes:
            waves = clip_set(kind, b)
            t = text[None].expand(b, -1, -1).contiguous()
            for check in (True, False):
                fns = {name: (lambda r=r, c=check: r.explain(waves, t, check=c)) for name, r in runners.items()}
                for name, r in timed_together(fns, b, args.repeats, sync).items():
                    rows.append({"section": "explain", "backend": name, "batch": b, "clips": kind, "check": check,
                                 "clips_per_s": r})
    return rows


def bench_topk(ex, args, sync, runners: dict[str, Any]) -> list[dict[str, Any]]:
    """50 labels, top 3, one encoder pass, vs one prompt (same clips, batch, check)."""
    labels = ex.text_embedding([f"this is the sound of label {i}" for i in range(50)]).cpu()
    text = ex.text_embedding([args.prompt]).cpu()
    b = max(args.batch_sizes)
    waves = clip_set("real", b)
    t = text[None].expand(b, -1, -1).contiguous()
    rows = []
    for check in (True, False):
        fns = {}
        for name, r in runners.items():
            fns[f"{name} top-3 of 50"] = lambda r=r, c=check: r.explain_topk(waves, labels, 3, check=c)
            fns[f"{name} one prompt"] = lambda r=r, c=check: r.explain(waves, t, check=c)
        for name, r in timed_together(fns, b, args.repeats, sync).items():
            backend, _, mode = name.partition(" ")
            rows.append({"section": "topk", "backend": backend, "mode": mode, "batch": b, "clips": "real",
                         "check": check, "clips_per_s": r})
    return rows


def bench_spectral(ex, args, sync) -> list[dict[str, Any]]:
    """The spectral ends alone, b real clips, clips/s: the analysis (STFT) and the inverse (one
    prompt a clip) as torch's FFT, as the fused graphs' MatMul DFTs (``export.ops``) in ONNX
    Runtime, and as ONNX Runtime's own STFT op and inverse DFT op (the latter without the
    overlap-add, so a bound in its favour)."""
    import warnings

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lmaczs_cli import spectral
    from lmaczs_cli.audio import HOP, N_FFT
    from lmaczs_cli.backends import DenormalFreeCaller, session_options
    from lmaczs_cli.export import ops

    if ex.device.type != "cpu":
        raise Skip("the spectral ends are compared on the CPU only")
    call = DenormalFreeCaller()           # ONNX Runtime made and run off this thread, as `OnnxRunner` does
    b = max(args.batch_sizes)
    waves = clip_set("real", b)
    X = spectral.stft(waves)                                                  # (b, 1001, 513) complex
    options = session_options(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        def traced(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, name: str) -> Any:
            class Graph(torch.nn.Module):
                def forward(self, x: torch.Tensor) -> torch.Tensor:
                    return fn(x)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(Graph(), (example,), f"{tmp}/{name}.onnx", input_names=["x"], output_names=["y"],
                                  opset_version=17, dynamo=False)
            return call(ort.InferenceSession, f"{tmp}/{name}.onnx", options, ["CPUExecutionProvider"])

        def one_op(node: Any, x: np.ndarray, consts: list[Any]) -> Any:
            graph = helper.make_graph([node], "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=consts)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            return call(ort.InferenceSession, model.SerializeToString(), options, ["CPUExecutionProvider"])

        analysis = traced(ops.stft_dft_order, waves, "analysis")
        Xd = ops.stft_dft_order(waves)
        inverse = traced(ops.istft_dft_order, Xd, "inverse")
        padded = np.pad(waves.numpy(), ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")[..., None]
        stft_op = one_op(helper.make_node("STFT", ["x", "step", "window", "length"], ["y"], onesided=1), padded,
                         [numpy_helper.from_array(np.array(HOP, np.int64), "step"),
                          numpy_helper.from_array(spectral.hann_np().astype(np.float32), "window"),
                          numpy_helper.from_array(np.array(N_FFT, np.int64), "length")])
        full = torch.fft.fft(torch.fft.irfft(X, n=N_FFT), dim=-1)                # the two-sided spectrum
        two_sided = np.ascontiguousarray(torch.view_as_real(full).numpy(), dtype=np.float32)
        dft_op = one_op(helper.make_node("DFT", ["x"], ["y"], inverse=1, axis=2, onesided=0), two_sided, [])
        w, xd = waves.numpy(), Xd.numpy()
        fns = {
            ("torch (FFT)", "analysis"): lambda: spectral.stft(waves),
            ("onnx (MatMul DFT)", "analysis"): lambda: call(analysis.run, None, {"x": w}),
            ("onnx (STFT op)", "analysis"): lambda: call(stft_op.run, None, {"x": padded}),
            ("torch (FFT)", "inverse"): lambda: spectral.istft(X, CLIP_SAMPLES),
            ("onnx (MatMul DFT)", "inverse"): lambda: call(inverse.run, None, {"x": xd}),
            ("onnx (DFT op, no overlap-add)", "inverse"): lambda: call(dft_op.run, None, {"x": two_sided}),
        }
        with torch.inference_mode():
            timed_rates = timed_together(fns, b, args.repeats, sync)
    return [{"section": "spectral", "backend": backend, "mode": mode, "batch": b, "clips": "real", "clips_per_s": r}
            for (backend, mode), r in timed_rates.items()]


def bench_folder(ex, args, sync) -> list[dict[str, Any]]:
    """`lmaczs explain` over --folder-files 10-s files (flac; no pictures, then the default
    pictures) vs the in-memory batched rate of the same model and batch size. The in-memory
    rate is timed just before each folder run (as many clips as a folder run, at most 64), so
    that a slow spell of the machine falls on both alike. `where`: the run's timings
    (`runs.StageClock`), from the last run of each mode."""
    import soundfile as sf

    from lmaczs_cli.runs import ExplainJob, run_explain

    b = max(args.batch_sizes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in"
        inp.mkdir()
        waves = recordings(args.folder_files).numpy()
        for k, w in enumerate(waves):
            sf.write(inp / f"clip{k:04d}.flac", w, SAMPLE_RATE)
        mem = clip_set("real", b)
        text = ex.text_embedding([args.prompt]).cpu()[None].expand(b, -1, -1).contiguous()
        calls = max(1, min(args.folder_files, 64) // b)

        def in_memory() -> float:
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                ex.runner.explain(mem, text)
            sync()
            return calls * b / (time.perf_counter() - t0)

        ex.runner.explain(mem, text)                       # warm-up
        modes = (("folder, no pictures", False), ("folder, pictures", True))
        memory: list[float] = []
        rates: dict[str, list[float]] = {m: [] for m, _ in modes}
        where: dict[str, dict[str, Any]] = {}
        for rep in range(max(1, args.repeats // 2)):
            for mode, png in modes:
                memory.append(in_memory())
                job = ExplainJob(paths=(str(inp),), out=str(Path(tmp) / f"out-{png}-{rep}"), prompts=(args.prompt,),
                                 batch_size=b, workers=args.workers, save_png=png, device=args.device)
                t0 = time.perf_counter()
                summary = run_explain(job, explainer=ex)
                wall = time.perf_counter() - t0
                rates[mode].append(args.folder_files / wall)
                where[mode] = {"wall_s": wall, "seconds": summary["seconds"], "timings": summary.get("timings", {})}
        rows.append({"section": "folder", "backend": "torch", "mode": "in memory", "batch": b, "clips": "real",
                     "check": True, "clips_per_s": _spread(memory)})
        for mode, _ in modes:
            rows.append({"section": "folder", "backend": "torch", "mode": mode, "batch": b, "clips": "real",
                         "check": True, "files": args.folder_files, "workers": args.workers, "where": where[mode],
                         "clips_per_s": _spread(rates[mode])})
    return rows


# (label, key) of the folder run's timings, in the order the report prints them
WHERE = (("model", "model_s"), ("waiting for input", "input_wait_s"), ("batching and stitching", "batching_s"),
         ("waiting for writers", "writers_wait_s"), ("last writes", "drain_s"), ("decode", "decode_s"),
         ("wav", "wav_s"), ("mask", "mask_s"), ("pictures", "png_s"), ("logs", "log_s"), ("re-encode", "listen_s"))


def where_line(r: dict[str, Any]) -> str:
    """One line of the report: where a folder run's time went, in seconds and ms per file."""
    n, t = max(r["files"], 1), r["where"].get("timings", {})
    head = (f"Folder run, {r['mode']}: {r['files']} files in {r['where'].get('wall_s', 0):.1f} s "
            f"({r.get('workers')} decode workers)")
    if "model_s" not in t:
        return head + "."

    def fig(key: str) -> str:
        cpu = t.get(key.removesuffix("_s") + "_cpu_s")
        return f"{t[key]:.2f} s" + (f" ({cpu:.2f} CPU)" if cpu is not None else "")

    parts = [f"{label} {fig(key)}" for label, key in WHERE if t.get(key)]
    return (head + f"; model thread {t.get('wall_s', 0):.2f} s, process CPU {t.get('cpu_s', 0):.2f} s "
            f"({1000 * t.get('cpu_s', 0) / n:.0f} ms a file); " + ", ".join(parts)
            + ". Decode and writes run in other threads, beside the model.")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def bench_rss(ex, args, sync) -> list[dict[str, Any]]:
    """Resident memory of `lmaczs explain` (this process) over --rss-files short files: after
    the first 5 % and at the end (growth = the difference), sampled every 0.2 s."""
    import threading

    import soundfile as sf

    from lmaczs_cli.runs import ExplainJob, run_explain

    if not os.path.exists("/proc/self/statm"):
        raise Skip("needs /proc (Linux) to read resident memory")
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in"
        inp.mkdir()
        rng = np.random.default_rng(0)
        for k in range(args.rss_files):
            sf.write(inp / f"s{k:05d}.wav", (0.1 * rng.standard_normal(4_800)).astype(np.float32), SAMPLE_RATE)
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                samples.append((time.perf_counter(), _rss_mb()))

        thread = threading.Thread(target=sample, daemon=True)
        job = ExplainJob(paths=(str(inp),), out=str(Path(tmp) / "out"), prompts=(args.prompt,),
                         batch_size=max(args.batch_sizes), workers=args.workers, check=False, device=args.device)
        events: list[tuple[float, int]] = []
        done = [0]

        def on_event(e: dict[str, Any]) -> None:
            if e.get("event") == "file":
                done[0] += 1
                if done[0] in (max(1, args.rss_files // 20), args.rss_files):
                    events.append((time.perf_counter(), done[0]))

        start_rss = _rss_mb()
        thread.start()
        t0 = time.perf_counter()
        run_explain(job, explainer=ex, on_event=on_event)
        wall = time.perf_counter() - t0
        stop.set()
        thread.join()
        end_rss = _rss_mb()
    early = events[0][0] if events else t0
    after_early = [m for t, m in samples if t >= early] or [end_rss]
    return [{"section": "rss", "files": args.rss_files, "rss_start_mb": start_rss,
             "rss_after_5pct_mb": after_early[0], "rss_end_mb": end_rss, "rss_peak_mb": max(after_early),
             "growth_mb": end_rss - after_early[0], "files_per_s": args.rss_files / wall}]


def bench_startup(ex, args, sync) -> list[dict[str, Any]]:
    """Fresh processes: `lmaczs --help`, `import lmaczs_cli`, and loading the demo model
    (time inside the process, from before the import to a loaded Explainer)."""
    import shutil
    import subprocess

    exe = shutil.which("lmaczs") or str(Path(sys.executable).parent / "lmaczs")
    load = ("import time; t0 = time.perf_counter(); from lmaczs_cli import Explainer; "
            "Explainer.load('demo', device='cpu'); print(time.perf_counter() - t0)")
    cases = {"lmaczs --help": [exe, "--help"], "import lmaczs_cli": [sys.executable, "-c", "import lmaczs_cli"]}
    rows = []
    for name, cmd in cases.items():
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True, cwd=tempfile.gettempdir())
            times.append(time.perf_counter() - t0)
        rows.append({"section": "startup", "what": name, "seconds": _spread(times)})
    times = [float(subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, check=True,
                                  cwd=tempfile.gettempdir()).stdout.split()[-1]) for _ in range(args.repeats)]
    rows.append({"section": "startup", "what": "load the demo model (import + Explainer.load)", "seconds": _spread(times)})
    return rows


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}


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


def _fig(c: dict[str, Any], fmt: str = ".2f") -> str:
    return f"{c['median']:{fmt}} ({c['min']:{fmt}}-{c['max']:{fmt}})"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Benchmarks, {result['date']}, {m['cpu']} ({m['threads']} threads)"
             + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU") + f", model `{result['model']}`, "
             f"median of {result['repeats']} (min-max).", ""]
    rows = result["rows"]
    thr = [r for r in rows if "clips_per_s" in r]
    if thr:
        lines += ["| section | backend | mode | clips | check | batch | clips/s |", "|---|---|---|---|---|---:|---:|"]
        for r in thr:
            check = {True: "yes", False: "no"}.get(r.get("check"), "")
            lines.append(f"| {r['section']} | {r['backend']} | {r.get('mode', '')} | {r.get('clips', 'synthetic')} | "
                         f"{check} | {r['batch']} | {_fig(r['clips_per_s'])} |")
        lines.append("")
    for r in (r for r in rows if r["section"] == "folder" and "where" in r):
        lines.append(where_line(r))
    rss = [r for r in rows if r["section"] == "rss"]
    for r in rss:
        lines.append(f"Resident memory over {r['files']} short files: {r['rss_after_5pct_mb']:.0f} MB after the first "
                     f"5 %, {r['rss_end_mb']:.0f} MB at the end (growth {r['growth_mb']:+.0f} MB, peak "
                     f"{r['rss_peak_mb']:.0f} MB), {r['files_per_s']:.1f} files/s.")
    for r in (r for r in rows if r["section"] == "ceiling"):
        gemm = ", ".join(f"{k} {v:.0f}" for k, v in r["gemm_gflops"].items())
        lines += ["", f"fp32 ceiling ({r['threads']} threads): the audio encoder counts {r['gflop_per_clip']:.2f} GFLOP "
                  f"a clip and runs at {r['encoder_gflops']:.0f} GFLOP/s in torch at best ({r['encoder_gflops_median']:.0f} "
                  f"median; batch {r['batch']}); torch's best fp32 GEMM rate here is {gemm} GFLOP/s, so a runtime "
                  f"that ran every counted encoder FLOP at the best of those rates would be {r['headroom']:.2f}x "
                  "torch's best encoder call."]
    startup = [r for r in rows if r["section"] == "startup"]
    if startup:
        lines += ["", "| startup | seconds |", "|---|---:|"] + [f"| {r['what']} | {_fig(r['seconds'], '.3f')} |"
                                                             for r in startup]
    cost = [r for r in rows if "seconds_per_clip" in r]
    if cost:
        lines += ["", "| method | s/clip |", "|---|---:|"]
        for r in cost:
            lines.append(f"| {r['method']} | {_fig(r['seconds_per_clip'], '.3f')} |")
    if result["ratios"]:
        lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    if result["skipped"]:
        lines += [""] + [f"Skipped: {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The figures side by side: each ratio of two clips/s medians measured in the same run."""
    rate = {(r["section"], r["backend"], r.get("mode", ""), r.get("clips", ""), r.get("check"), r["batch"]):
            r["clips_per_s"]["median"] for r in rows if "clips_per_s" in r}
    out: dict[str, float] = {}

    def put(name: str, num: tuple, den: tuple) -> None:
        if num in rate and den in rate:
            out[name] = rate[num] / rate[den]

    batches = sorted({k[-1] for k in rate if k[0] == "explain"})
    for b in batches:
        for kind in ("real", "synthetic"):
            for check, label in ((True, "check"), (False, "no check")):
                for backend in ("onnx", "onnx-int8", "trt"):
                    put(f"explain {backend} / torch, {kind}, {label}, batch {b}",
                        ("explain", backend, "", kind, check, b), ("explain", "torch", "", kind, check, b))
                put(f"explain onnx-int8 / onnx, {kind}, {label}, batch {b}",
                    ("explain", "onnx-int8", "", kind, check, b), ("explain", "onnx", "", kind, check, b))
            for backend in ("torch", "onnx", "onnx-int8", "trt"):
                put(f"{backend} no check / check, {kind}, batch {b}",
                    ("explain", backend, "", kind, False, b), ("explain", backend, "", kind, True, b))
        put(f"explain torch / embed, synthetic, check, batch {b}",
            ("explain", "torch", "", "synthetic", True, b), ("embed", "torch", "", "", None, b))
    for k in [k for k in rate if k[0] == "topk" and k[2] == "one prompt"]:
        label = "check" if k[4] else "no check"
        put(f"top-3 of 50 cost / one-prompt cost, {k[1]}, {label}, batch {k[5]}", k, (*k[:2], "top-3 of 50", *k[3:]))
    for k in [k for k in rate if k[0] == "spectral" and k[1] != "torch (FFT)"]:
        put(f"spectral {k[1]} / torch (FFT), {k[2]}, batch {k[5]}", k, ("spectral", "torch (FFT)", *k[2:]))
    for k in [k for k in rate if k[0] == "folder" and k[2] != "in memory"]:
        put(f"{k[2]} / in memory, batch {k[5]}", k, ("folder", "torch", "in memory", "real", True, k[5]))
    for r in (r for r in rows if r["section"] == "ceiling"):
        out[f"fp32 ceiling: best GEMM rate / best torch encoder rate, batch {r['batch']}"] = r["headroom"]
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
            if r["section"] in ("embed", "explain"):
                check = {True: ", check", False: ", no check"}.get(r.get("check"), "")
                name = f"{r['section']} {r['backend']} ({r.get('clips', 'synthetic')}{check})"
                series.setdefault(name, []).append((r["batch"], r["clips_per_s"]["median"]))
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
    ap.add_argument("--sections", nargs="+",
                    default=["embed", "ceiling", "explain", "onnx", "int8", "trt", "topk", "spectral", "folder", "rss", "startup",
                             "methods"])
    ap.add_argument("--methods", nargs="+", default=["lmaczs", "gradcam", "gradcam++", "smoothgrad", "ig"])
    ap.add_argument("--prompt", default="the sound of a siren")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--folder-files", type=int, default=200, help="10-s files of the folder section")
    ap.add_argument("--rss-files", type=int, default=10_000, help="short files of the rss section")
    ap.add_argument("--workers", type=int, default=0, help="decode processes of the folder and rss sections")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.clap, args.batch_sizes, args.repeats = "random:tiny", [1, 2], 2
        args.folder_files, args.rss_files = 4, 20
    from lmaczs_cli.runs import keep_freed_memory

    keep_freed_memory()         # what every `lmaczs explain` run sets first: each section measures under it
    ex = load_explainer(args.clap, args.device)
    sync = torch.cuda.synchronize if ex.device.type == "cuda" else (lambda: None)
    skipped: dict[str, str] = {}
    export_dir = tempfile.TemporaryDirectory()
    runners: dict[str, Any] = {}

    def with_runners(fn: Callable[..., list[dict[str, Any]]]) -> Callable[[], list[dict[str, Any]]]:
        def run() -> list[dict[str, Any]]:
            if not runners:
                runners.update(_runners(ex, args, Path(export_dir.name), skipped))
            return fn(ex, args, sync, runners)
        return run

    sections: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "embed": lambda: bench_embed(ex, args, sync),
        "ceiling": lambda: bench_ceiling(ex, args, sync),
        "explain": with_runners(bench_explain),
        "topk": with_runners(bench_topk),
        "spectral": lambda: bench_spectral(ex, args, sync),
        "folder": lambda: bench_folder(ex, args, sync),
        "rss": lambda: bench_rss(ex, args, sync),
        "startup": lambda: bench_startup(ex, args, sync),
        "methods": lambda: bench_methods(ex, args, sync),
    }
    now = dt.datetime.now(dt.timezone.utc)
    result: dict[str, Any] = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "model": args.clap,
                              "repeats": args.repeats, "quick": args.quick, "rows": [], "skipped": skipped}
    for name in [n for n in args.sections if n in sections]:
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
