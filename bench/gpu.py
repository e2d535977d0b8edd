"""The GPU benchmark of the device check (`bench/gpu.sh` runs it after the CUDA tests).

    python bench/gpu.py --out DIR [--budget-s 360]      # a CUDA machine
    python bench/gpu.py --out DIR --dry-run             # any machine: CPU, the tiny CLAP, a few seconds

Sections, each a list of rows in DIR/gpu.json (and a table in DIR/gpu.md):
  embed    CLAP audio embedding, clips/s, at batch 1..64
  explain  the explainer step (masks, listenable audio, similarities), clips/s, with and without
           the masked check, at batch 1..64; data in host memory, outputs left on the GPU
           modes: eager-fp32 (plain), eager-fp16 (autocast, fp32 front end), graphs-fp16 (fixed
           bucket shapes replayed as CUDA graphs: the CUDA default), graphs-bf16 (at one batch),
           inductor-fp16 (torch.compile, HTSAT-tiny at one batch, when the budget allows)
           for HTSAT-tiny and HTSAT-base with random weights (the real laion classes)
  parity   CUDA default vs CPU float32 on the same clips: max mask difference, audio SNR
  folder   `lmaczs explain` on 10-s wav files with 16 decode workers vs the same clips in memory
  train    `lmaczs train` on CUDA: HTSAT-base, AMP, batch 16, --mismatched 1, 50 steps: clips/s,
           peak GPU memory, the logged losses; a Clotho-sized epoch extrapolated
  nccl     a one-process NCCL process group: init, all-reduce, destroy
A section that fails is recorded under "errors" and the others still run; one that the time
budget leaves no room for is listed under "skipped". Targets (README, issue J) are checked at
the end under "targets".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CLOTHO_PAIRS = 19_195          # Clotho development: 3,839 clips x 5 captions
TARGETS = {"tiny_explain_clips_per_s": 2000, "fast_over_eager_fp32": 3.0, "check_over_embed": 0.45,
           "nocheck_over_embed": 0.8, "folder_over_memory": 0.7, "mask_max_abs": 2e-2, "audio_snr_db": 40,
           "clotho_epoch_min": 10}


class Plan:
    """Sizes of one run: the GPU's or the dry run's."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.archs = ("tiny",) if dry else ("HTSAT-tiny", "HTSAT-base")
        self.batches = (1,) if dry else (1, 8, 32, 64)
        self.one_batch = 1 if dry else 32               # where graphs-bf16 and inductor are measured
        # the dry run stands in for CUDA graphs with the same bucketed steps run eagerly
        self.fast = "buckets-fp32" if dry else "graphs-fp16"
        self.modes = ("eager-fp32", self.fast) if dry else ("eager-fp32", "eager-fp16", "graphs-fp16")
        self.min_time = 0.0 if dry else 0.4             # s of timed calls per figure (at least 2 calls)
        self.files, self.workers, self.folder_batch = (2, 2, 2) if dry else (256, 16, 32)
        self.train = dict(arch="tiny" if dry else "HTSAT-base", batch=2 if dry else 16, steps=2 if dry else 50,
                          amp=not dry, clips=4 if dry else 64, workers=0 if dry else 8)


# --------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], Any], items: int, device: torch.device, min_time: float) -> dict[str, float]:
    """items/s of fn: one warm-up call (captures / compiles happen there), then timed calls until
    min_time has passed (at least two); median, min, max."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    rates, spent = [], 0.0
    while len(rates) < 2 or spent < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        spent += dt
        rates.append(items / dt)
    return {"clips_per_s": round(statistics.median(rates), 2), "min": round(min(rates), 2),
            "max": round(max(rates), 2), "calls": len(rates), "first_call_s": round(first, 3)}


def clips(n: int, seed: int = 0) -> torch.Tensor:
    """n 10-s 48-kHz clips: a noise floor with two tone bursts each (host memory)."""
    from lmaczs_cli.audio import CLIP_SAMPLES, SAMPLE_RATE

    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    out = 0.01 * rng.standard_normal((n, CLIP_SAMPLES)).astype(np.float32)
    for k in range(n):
        for _ in range(2):
            a = rng.uniform(0, 8)
            on = (t >= a) & (t < a + rng.uniform(0.5, 2))
            out[k, on] += (0.3 * np.sin(2 * np.pi * rng.uniform(200, 6000) * t[on])).astype(np.float32)
    return torch.from_numpy(out)


def models(arch: str) -> tuple[Any, Any]:
    """random:ARCH CLAP (laion's classes) and a seeded decoder of the default size."""
    from lmaczs_cli.clap import random_clap
    from lmaczs_cli.decoder import DecoderConfig, MaskDecoder

    clap = random_clap(arch, seed=0)
    torch.manual_seed(0)
    kwargs = dict(width=16, heads=2, text_tokens=4) if arch == "tiny" else {}
    return clap, MaskDecoder(DecoderConfig.for_clap(clap, **kwargs)).eval()


def runner(clap: Any, decoder: Any, mode: str, device: torch.device) -> Any:
    """A TorchRunner for "eager-fp32" | "eager-fp16" | "graphs-fp16" | "graphs-bf16" |
    "inductor-fp16" | "buckets-fp32" (bucketed steps run eagerly: the dry run's stand-in)."""
    from lmaczs_cli.backends import TorchRunner
    from lmaczs_cli.device import FixedShapeSteps

    kind, precision = mode.split("-")
    compile_ = {"eager": "off", "graphs": "graphs", "inductor": "inductor", "buckets": "off"}[kind]
    r = TorchRunner(clap, decoder, {"domain": "mel", "mel_to_linear": "linear"}, device=device,
                    precision=precision, compile=compile_)
    if kind == "buckets":
        r.steps = FixedShapeSteps("eager", r.device, r.half)
    return r


class Bench:
    def __init__(self, plan: Plan, budget_s: float) -> None:
        self.plan, self.deadline = plan, time.perf_counter() + budget_s
        self.rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, str]] = []
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    @contextlib.contextmanager
    def section(self, name: str, needs_s: float = 0.0):
        """Run a section, recording (not raising) its failure; skip it when the budget is short."""
        if self.left() < needs_s:
            self.skipped.append(f"{name} ({self.left():.0f} s left, needs ~{needs_s:.0f})")
            yield False
            return
        try:
            yield True
        except Exception as e:  # one section's failure must not lose the others' figures
            self.errors.append({"section": name, "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()[-2000:]})
            print(f"[{name}] failed: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            if self.plan.device.type == "cuda":
                torch.cuda.empty_cache()

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------- sections


def bench_model(b: Bench, arch: str) -> None:
    """embed and explain rows for one architecture, every mode and batch; parity of the fast mode."""
    plan, dev = b.plan, b.plan.device
    clap, decoder = models(arch)
    n = max(*plan.batches, 2)
    data = clips(n)
    text = torch.nn.functional.normalize(torch.randn(n, 1, clap.cfg.joint_dim), dim=-1)
    modes = list(plan.modes) + ([] if plan.dry else ["graphs-bf16"])
    for mode in modes:
        with b.section(f"{arch} {mode}", needs_s=20) as ok:
            if not ok:
                continue
            r = runner(clap, decoder, mode, dev)
            batches = (plan.one_batch,) if mode == "graphs-bf16" else plan.batches
            for batch in batches:
                w, t = data[:batch], text[:batch]
                b.add(section="embed", arch=arch, mode=mode, batch=batch,
                      **rate(lambda: r.embed_audio(w), batch, dev, plan.min_time))
                for check in (True, False):
                    b.add(section="explain", arch=arch, mode=mode, batch=batch, check=check,
                          **rate(lambda: r.explain(w, t, check=check), batch, dev, plan.min_time))
            del r
    with b.section(f"{arch} parity", needs_s=20) as ok:
        if ok:
            w, t = data[:2], text[:2].expand(2, 2, -1).contiguous()
            ref = runner(*models(arch), "eager-fp32", torch.device("cpu")).explain(w, t)   # the same seeded weights
            fast = runner(clap, decoder, plan.fast, dev)
            got = fast.to_host(fast.explain(w, t))
            a, r_ = got["audio"].numpy(), ref["audio"].numpy()
            b.add(section="parity", arch=arch, mode=plan.fast,
                  mask_max_abs=float((got["masks"] - ref["masks"]).abs().max()),
                  audio_snr_db=round(float(10 * np.log10((r_ ** 2).sum() / max(((a - r_) ** 2).sum(), 1e-30))), 2),
                  similarity_max_abs=float((got["similarity"] - ref["similarity"]).abs().max()))
    if arch in ("HTSAT-tiny", "tiny") and not plan.dry:
        with b.section(f"{arch} inductor-fp16", needs_s=150) as ok:
            if ok:
                r = runner(clap, decoder, "inductor-fp16", dev)
                w, t = data[:plan.one_batch], text[:plan.one_batch]
                b.add(section="explain", arch=arch, mode="inductor-fp16", batch=plan.one_batch, check=True,
                      **rate(lambda: r.explain(w, t, check=True), plan.one_batch, dev, plan.min_time))


def write_clips(folder: Path, n: int) -> list[Path]:
    import soundfile as sf

    from lmaczs_cli.audio import SAMPLE_RATE

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, n, 32):
        for i, wave in enumerate(clips(min(32, n - k), seed=k).numpy()):
            paths.append(folder / f"clip{k + i:04d}.wav")
            sf.write(paths[-1], wave, SAMPLE_RATE, subtype="PCM_16")
    return paths


def bench_folder(b: Bench, work: Path) -> list[Path]:
    """`lmaczs explain` (run_explain) on wav files vs Explainer.explain_many on the same clips in memory."""
    from lmaczs_cli.audio import load_audio
    from lmaczs_cli.explain import Explainer
    from lmaczs_cli.runs import ExplainJob, run_explain

    plan, dev = b.plan, b.plan.device
    arch = plan.archs[0]
    paths = write_clips(work / "clips", plan.files)
    clap, decoder = models(arch)
    ex = Explainer(runner(clap, decoder, plan.fast, dev), batch_size=plan.folder_batch)
    waves = [load_audio(p) for p in paths]
    list(ex.explain_many(waves[: plan.folder_batch], ["a dog barking"]))          # warm-up: captures, caches
    sync(dev)
    t0 = time.perf_counter()
    done = sum(1 for r in ex.explain_many(waves, ["a dog barking"]) if r.error is None)
    sync(dev)
    memory = done / (time.perf_counter() - t0)
    job = ExplainJob(paths=(str(work / "clips"),), out=str(work / "out"), prompts=("a dog barking",),
                     device=str(dev), batch_size=plan.folder_batch, workers=plan.workers, writers=8)
    t0 = time.perf_counter()
    summary = run_explain(job, explainer=ex)
    seconds = time.perf_counter() - t0
    b.add(section="folder", arch=arch, mode=plan.fast, files=plan.files, workers=plan.workers,
          batch=plan.folder_batch, explained=summary["explained"], clips_per_s=round(summary["explained"] / seconds, 2),
          in_memory_clips_per_s=round(memory, 2), ratio=round(summary["explained"] / seconds / memory, 3))
    return paths


def bench_train(b: Bench, work: Path, paths: list[Path]) -> None:
    """`lmaczs train` in this process (so its peak GPU memory can be read), from a JSONL of the clips."""
    from lmaczs_cli.cli import main

    dev, t = b.plan.device, b.plan.train
    words = ["dog", "rain", "siren", "birds", "engine", "bell", "voice", "water"]
    rng = np.random.default_rng(0)
    manifest = work / "train.jsonl"
    rows = t["steps"] * t["batch"]                 # one epoch covers every step: no worker restarts
    with manifest.open("w") as f:
        for p in (paths[: t["clips"]] * (1 + rows // max(1, min(len(paths), t["clips"]))))[:rows]:
            caption = " and ".join(rng.choice(words, 2, replace=False))
            f.write(json.dumps({"audio": str(p), "caption": f"a recording of {caption}"}) + "\n")
    out = work / "train"
    args = ["train", "--data", str(manifest), "--clap", f"random:{t['arch']}", "--batch-size", str(t["batch"]),
            "--mismatched", "1", "--max-steps", str(t["steps"]), "--epochs", "1000", "--device", str(dev),
            "--workers", str(t["workers"]), "--log-every", "1", "--save-every", "100000", "--val-fraction", "0",
            "--out", str(out), "--amp" if t["amp"] else "--no-amp"]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    main.main(args=args, standalone_mode=False)
    seconds = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "clips_per_s" in x]
    losses = [round(float(x["total"]), 5) for x in steps if "total" in x]
    rates = [x["clips_per_s"] for x in steps[len(steps) // 5:]]          # past the warm-up steps
    cps = statistics.median(rates) if rates else 0.0
    head, tail = losses[: max(1, len(losses) // 5)], losses[-max(1, len(losses) // 5):]
    b.add(section="train", arch=t["arch"], batch=t["batch"], steps=len(steps), amp=t["amp"], mismatched=1,
          clips_per_s=round(cps, 2), wall_s=round(seconds, 1),
          peak_memory_gib=round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2) if dev.type == "cuda" else None,
          losses=losses, loss_falling=bool(losses) and statistics.mean(tail) < statistics.mean(head),
          clotho_epoch_min_extrapolated=round(CLOTHO_PAIRS / cps / 60, 1) if cps else None)


def bench_nccl(b: Bench) -> None:
    """One process: init a process group (NCCL on CUDA, gloo on the CPU), all-reduce, destroy."""
    import torch.distributed as dist

    dev = b.plan.device
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if dev.type == "cuda" else "gloo"
    t0 = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    x = torch.ones(4, device=dev)
    dist.all_reduce(x)
    sync(dev)
    dist.destroy_process_group()
    b.add(section="nccl", backend=backend, ok=bool(torch.equal(x.cpu(), torch.ones(4))),
          seconds=round(time.perf_counter() - t0, 3))


# --------------------------------------------------------------------------- targets and report


def _best(rows: list[dict], **match: Any) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(found, key=lambda r: r["clips_per_s"]) if found else None


def targets(rows: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """Each target with the measured figure (None when its rows are missing) and whether it is met."""
    arch, fast = plan.archs[0], plan.fast
    out = []

    def add(name: str, value: float | None, goal: float, higher: bool = True, note: str = "") -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        out.append({"target": name, "value": None if value is None else round(value, 3), "goal": goal,
                    "met": met, "note": note})

    best = _best(rows, section="explain", arch=arch, mode=fast, check=True)
    add(f"{arch} explain with check, best batch (clips/s)", best and best["clips_per_s"],
        TARGETS["tiny_explain_clips_per_s"], note=best and f"batch {best['batch']}")
    if best:
        eager = _best(rows, section="explain", arch=arch, mode="eager-fp32", check=True, batch=best["batch"])
        add(f"{fast} / eager-fp32, same batch", eager and best["clips_per_s"] / eager["clips_per_s"],
            TARGETS["fast_over_eager_fp32"])
    for check, key in ((True, "check_over_embed"), (False, "nocheck_over_embed")):
        ex = _best(rows, section="explain", arch=arch, mode=fast, check=check)
        emb = ex and _best(rows, section="embed", arch=arch, mode=fast, batch=ex["batch"])
        add(f"explain {'with' if check else 'without'} check / embedding-only, same batch",
            emb and ex["clips_per_s"] / emb["clips_per_s"], TARGETS[key])
    folder = _best(rows, section="folder")
    add("folder run / in-memory", folder and folder["ratio"], TARGETS["folder_over_memory"])
    parity = next((r for r in rows if r["section"] == "parity" and r["arch"] == arch), None)
    add("masks, CUDA vs CPU fp32, max abs", parity and parity["mask_max_abs"], TARGETS["mask_max_abs"], higher=False)
    add("listenable audio, CUDA vs CPU fp32, SNR dB", parity and parity["audio_snr_db"], TARGETS["audio_snr_db"])
    train = next((r for r in rows if r["section"] == "train"), None)
    add("Clotho-sized epoch (min, extrapolated from the measured steps)",
        train and train["clotho_epoch_min_extrapolated"], TARGETS["clotho_epoch_min"], higher=False,
        note=train and f"{train['steps']} steps of batch {train['batch']}")
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Device check {result['date']}" + (" (dry run: CPU, tiny sizes)" if result["dry_run"] else ""),
             "", f"{m['gpu'] or 'no GPU'}; torch {m['torch']}, triton {m['triton']}, python {m['python']}; "
             f"{result['seconds']:.0f} s", "", "| section | arch | mode | batch | check | clips/s |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["section"] in ("embed", "explain", "folder"):
            lines.append(f"| {r['section']} | {r['arch']} | {r['mode']} | {r['batch']} | {r.get('check', '')} | "
                         f"{r['clips_per_s']} |")
    for r in result["rows"]:
        if r["section"] == "parity":
            lines.append(f"\nParity ({r['arch']}, {r['mode']} vs CPU fp32): masks max abs {r['mask_max_abs']:.4g}, "
                         f"audio SNR {r['audio_snr_db']} dB, similarity max abs {r['similarity_max_abs']:.3g}")
        if r["section"] == "train":
            lines.append(f"\nTrain ({r['arch']}, batch {r['batch']}, AMP {r['amp']}, --mismatched 1): "
                         f"{r['steps']} steps, {r['clips_per_s']} clips/s, peak {r['peak_memory_gib']} GiB, "
                         f"loss {r['losses'][:1]} -> {r['losses'][-1:]} (falling: {r['loss_falling']}); "
                         f"Clotho epoch ~{r['clotho_epoch_min_extrapolated']} min (extrapolated)")
        if r["section"] == "folder":
            lines.append(f"\nFolder run: {r['files']} files, {r['workers']} workers: {r['clips_per_s']} clips/s vs "
                         f"{r['in_memory_clips_per_s']} in memory ({r['ratio']}x)")
        if r["section"] == "nccl":
            lines.append(f"\nOne-process {r['backend']} group: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s")
    lines += ["", "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {t['goal']} | {t['met']} |" for t in result["targets"]]
    if result["errors"] or result["skipped"]:
        lines += ["", "## Not measured", ""]
        lines += [f"- {e['section']}: {e['error']}" for e in result["errors"]]
        lines += [f"- skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--dry-run", action="store_true", help="CPU, the tiny CLAP, a few calls: validates the script")
    ap.add_argument("--budget-s", type=float, default=360.0, help="time for the whole benchmark (s)")
    args = ap.parse_args()
    plan = Plan(args.dry_run)
    if not plan.dry and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    started = time.perf_counter()
    b = Bench(plan, args.budget_s)
    work = Path(tempfile.mkdtemp(prefix="lmaczs-gpu-"))
    for arch in plan.archs:
        bench_model(b, arch)
    paths: list[Path] = []
    with b.section("folder", needs_s=40) as ok:
        if ok:
            paths = bench_folder(b, work)
    with b.section("train", needs_s=60) as ok:
        if ok:
            bench_train(b, work, paths or write_clips(work / "clips", plan.train["clips"]))
    with b.section("nccl", needs_s=5) as ok:
        if ok:
            bench_nccl(b)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": plan.dry, "device": plan.device.type,
              "machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                          "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "seconds": round(time.perf_counter() - started, 1), "rows": b.rows, "errors": b.errors,
              "skipped": b.skipped}
    result["targets"] = targets(b.rows, plan)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "gpu.md").write_text(markdown(result))
    print(f"wrote {args.out / 'gpu.json'} and gpu.md in {result['seconds']} s; {len(b.errors)} section(s) failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
