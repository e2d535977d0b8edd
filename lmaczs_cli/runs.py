"""The `lmaczs explain` command as a library call (`run_explain`): find the audio files,
work out what a previous run already finished, shard the list under torchrun, explain with
`Explainer.explain_many` and hand each result to writer threads (`report` owns the formats);
`merge_outputs` joins the shards of a torchrun run."""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import report
from .audio import CLIP_SAMPLES, SAMPLE_RATE, audio_info, load_audio, window_starts
from .device import torchrun_rank
from .explain import Clip, ClipResult, Explainer
from .inputs import Discovery, Entry, ExplainError, check_out, discover, reason_of


# ----------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class ExplainJob:
    """Everything `lmaczs explain` was asked; `run_explain` runs it."""

    paths: tuple[str, ...]                          # files and folders
    out: str                                        # output folder
    prompts: tuple[str, ...] = ()                   # explained for every file
    file_prompts: Mapping[str, Sequence[str]] = field(default_factory=dict)  # real path -> its own prompts
    labels: tuple[str, ...] = ()                    # top-k mode: the label set ...
    top_k: int = 0                                  # ... and how many best labels to explain
    clap: str = "demo"                              # demo | laion:NAME | PATH | random:ARCH
    tokenizer: str | None = None
    trust_checkpoint: bool = False                  # unpickle a .pt --clap fully (else: `clap.trusting_checkpoints`)
    decoder: str | None = None                      # a `lmaczs train` folder (default: the demo's)
    force: bool = False                             # accept a decoder trained on another CLAP
    backend: str = "torch"                          # torch eager | onnx (ONNX Runtime) | trt (TensorRT)
    engines: str | None = None                      # onnx/trt: the `lmaczs export` folder
    device: str = "auto"
    batch_size: int = 8                             # windows per model batch
    workers: int | None = None                      # decode processes; None: `auto_workers`
    writers: int = 4                                # output-writing threads
    sr: int = SAMPLE_RATE                           # Hz of the written wavs
    check: bool = True                              # masked-similarity pass
    compile_mode: str = "auto"                      # CUDA: graphs | inductor | off (see Explainer.load)
    precision: str = "auto"                         # CUDA: encoder/decoder precision
    listen_check: bool = False                      # re-encode each written wav
    save_mask: bool = False
    save_residual: bool = False
    save_png: bool = False
    overwrite: bool = False                         # redo finished work

    @property
    def top_k_mode(self) -> bool:
        return bool(self.labels)

    def kinds(self) -> list[str]:
        """The output kinds each (file, prompt) must have."""
        return ["wav"] + [k for k, on in (("mask", self.save_mask), ("residual", self.save_residual),
                                          ("png", self.save_png)) if on]


def auto_workers(device: torch.device) -> int:
    """Decode processes when --workers is not given: none on CPU, where the model's OpenMP
    threads already take every core and a worker process stalls them (decoding in the main
    thread costs less: measured on 2 cores, bench/explain.py), up to 4 on CUDA."""
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


@dataclass
class _Plan:
    """What one run works on: the entries found, their output stems and wanted prompts."""

    job: ExplainJob
    out: Path
    found: Discovery
    good: list[Entry]                       # the readable-looking entries (error is None)
    stems: dict[str, str]                   # rel -> output stem (report.output_stems)
    wanted: dict[str, tuple[str, ...]]      # rel -> prompts asked for it (fixed-prompt mode)

    @classmethod
    def make(cls, job: ExplainJob) -> "_Plan":
        out = Path(os.path.abspath(job.out))
        found = discover(job.paths, exclude=_outputs_filter(out))
        good = [e for e in found.entries if e.error is None]
        stems = report.output_stems([e.rel for e in good], taken=[e.rel for e in found.entries if e.error])
        return cls(job, out, found, good, stems, {e.rel: _wanted_prompts(e, job) for e in good})

    def todo(self, lines: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
        return _todo(self.job, self.out, self.good, self.stems, self.wanted, lines)


def run_explain(job: ExplainJob, explainer: Explainer | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run `lmaczs explain`: discover, skip finished work, explain, write, report.

    Under torchrun (RANK / WORLD_SIZE set) each rank takes every world-th entry of the
    sorted list and appends to its own results / errors shard; with a gloo process group
    rank 0 prepares the folder before and merges the shards after (barriers around the
    work). The output folder is checked before anything else, and the model is loaded only
    when there is work left (a rerun of a finished run loads none). Returns the summary (this
    run's counts; all ranks' under torchrun) with ``timings``, where the time went
    (`StageClock`, seconds summed over ranks).

    on_event receives, from this thread and the writer threads:
      {"event": "start", "files", "windows", "seconds"}   the work: files, 10-s windows, audio s
      {"event": "windows", "n"}                           a model batch explained n windows
      {"event": "file", "file", "status": "explained" | "failed", "windows"}
    """
    t_start = time.perf_counter()
    check_out(job.out)
    me = torchrun_rank()
    rank, world = me.rank, me.world
    plan = _Plan.make(job)
    group = _process_group(world)
    if rank == 0:
        _prepare(plan)
    _barrier(group)
    load = (lambda: explainer) if explainer is not None else (lambda: _load_for_rank(job, world))
    mine = _work(plan, load, plan.found.entries[rank::world], "" if world == 1 else f".rank{rank}",
                 on_event or (lambda e: None))
    parts = _gather(group, mine)
    merged = report.merge(plan.out) if rank == 0 else None
    _barrier(group)
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    total: Counter = Counter()
    timings: Counter = Counter()
    for p in parts:
        total.update(p["counts"])
        timings.update(p["timings"])
    seconds = time.perf_counter() - t_start
    skipped = plan.found.skipped
    return {
        "out": str(plan.out), "rank": rank, "world": world,
        "files": len(plan.good), "explained": total["explained"], "explanations": total["explanations"],
        "empty": total["empty"], "already_done": total["already_done"], "failed": total["failed"],
        "skipped": {"hidden": skipped["hidden"], "not_audio": skipped["not_audio"],
                    "outputs": skipped["outputs"], "no_prompt": total["no_prompt"]},
        "failures": sorted((f for p in parts for f in p["failures"]), key=lambda f: f["file"]),
        "seconds": round(seconds, 3), "files_per_s": round(total["explained"] / seconds, 3),
        "results": str(plan.out / report.RESULTS), "errors": str(plan.out / report.ERRORS),
        "index": str(plan.out / report.INDEX), "merged": merged,
        "timings": {k: round(v, 3) for k, v in sorted(timings.items())},
    }


class StageClock:
    """Where a folder run's time goes: seconds per stage, summed over files and threads.

    The model thread's time (``wall_s``) is ``model_s`` (the runner's batches) +
    ``input_wait_s`` (waiting for decoded input) + ``batching_s`` (the rest of
    `Explainer.explain_many`: packing windows, copying results to the host, stitching) +
    ``writers_wait_s`` (every writer busy) + ``drain_s`` (the last writes, after the last
    batch). Other threads overlap with it: ``decode_s`` (decode and resample, in the decode
    thread or worker processes) and the writers' ``wav_s``, ``mask_s``, ``png_s``,
    ``listen_s`` (written wavs re-encoded) and ``log_s`` (results and ledger lines).
    Each timed stage also has its thread's CPU
    seconds (``wav_cpu_s``, ...; ``model_cpu_s`` leaves out the model's own intra-op
    threads when it has more than one); ``cpu_s`` is the CPU time of this process
    over the run, every thread: where cores are few, threads hide waits, not CPU work.
    """

    def __init__(self) -> None:
        self._seconds: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, **seconds: float) -> None:
        with self._lock:
            self._seconds.update(seconds)

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Add the seconds the block takes to `stage` ("wav_s") and the CPU seconds of this
        thread in it to its CPU stage ("wav_cpu_s")."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            cpu = stage.removesuffix("_s") + "_cpu_s"
            self.add(**{stage: time.perf_counter() - t0, cpu: time.thread_time() - c0})

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)


def _load_for_rank(job: ExplainJob, world: int) -> Explainer:
    from .clap import trusting_checkpoints

    device = job.device
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():   # one GPU per rank
        device = f"cuda:{torchrun_rank().local_rank % torch.cuda.device_count()}"
    with trusting_checkpoints() if job.trust_checkpoint else contextlib.nullcontext():   # else as the caller's
        return Explainer.load(clap=job.clap, decoder=job.decoder, tokenizer=job.tokenizer, device=device,
                              force=job.force, batch_size=job.batch_size, backend=job.backend,
                              engines=job.engines, compile=job.compile_mode, precision=job.precision)


def _prepare(plan: _Plan) -> None:
    """Before any rank writes (rank 0): fold shards a killed run left into the joined files,
    drop the lines of work this run redoes and the errors of files it retries, remove temps."""
    plan.out.mkdir(parents=True, exist_ok=True)
    report.remove_temporaries(plan.out)
    todo = plan.todo(_all_results(plan.out))
    every = {e.rel for e in plan.found.entries}
    report.merge(plan.out, index=False, drop_result=lambda r: _redone(r, todo, plan.job),
                 drop_error=lambda r: r.get("file") in every)


def _work(plan: _Plan, load: Callable[[], Explainer], mine: list[Entry], suffix: str,
          emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Explain this rank's entries: the model in this thread, writes in a thread pool (at most
    2 x writers files waiting, so memory stays flat). The model is loaded (`load`) only when
    there is work. Returns its counts and failures."""
    job, out = plan.job, plan.out
    todo = plan.todo(report.read_jsonl(out / report.RESULTS))
    results_log = report.JsonlLog(out / f"results{suffix}.jsonl")
    errors_log = report.JsonlLog(out / f"errors{suffix}.jsonl")
    counts: Counter = Counter()
    failures: list[dict[str, str]] = []
    lock = threading.Lock()
    clock = StageClock()

    def fail(entry: Entry, reason: str, windows: int = 0) -> None:
        errors_log.append([{"file": entry.rel, "input": os.path.abspath(entry.path), "reason": reason}])
        with lock:
            counts["failed"] += 1
            failures.append({"file": entry.rel, "reason": reason})
        emit({"event": "file", "file": entry.rel, "status": "failed", "windows": windows})

    work: list[Clip] = []
    for e in mine:
        if e.error is None and e.rel in todo:
            work.append(Clip(key=e, path=e.path, prompts=None if job.top_k_mode else todo[e.rel]))
        elif e.error is None:
            counts["no_prompt" if not (plan.wanted[e.rel] or job.top_k_mode) else "already_done"] += 1
    sizes = {c.key.rel: _size(c.path) for c in work}      # (windows, seconds) from each file's header
    try:
        explainer = load() if work else None               # before "start": its errors stay one line
        emit({"event": "start", "files": len(work) + sum(e.error is not None for e in mine),
              "windows": sum(w for w, _ in sizes.values()), "seconds": sum(t for _, t in sizes.values())})
        for e in mine:
            if e.error is not None:
                fail(e, e.error)
        if explainer is not None:
            _explain_work(job, out, explainer, plan, work, sizes, results_log, counts, lock, fail, emit, clock)
    finally:
        results_log.close()
        errors_log.close()
    return {"counts": dict(counts), "failures": failures, "timings": clock.seconds()}


def _size(path: str | os.PathLike) -> tuple[int, float]:
    """(10-s windows, seconds) of an audio file by its header; (1, 0.0) when it cannot be read
    (it fails later, with its reason)."""
    try:
        info = audio_info(path)
    except Exception:
        return 1, 0.0
    n = int(round(info.frames * SAMPLE_RATE / max(info.samplerate, 1)))
    return len(window_starts(max(n, 1))), info.duration_s


def _explain_work(job: ExplainJob, out: Path, explainer: Explainer, plan: _Plan, work: list[Clip],
                  sizes: dict[str, tuple[int, float]], results_log: report.JsonlLog, counts: Counter,
                  lock: threading.Lock, fail: Callable[..., None], emit: Callable[[dict[str, Any]], None],
                  clock: StageClock) -> None:
    """Run the model over `work` and hand each result to the writer threads."""
    writer = _Writer(job, out, explainer, plan.stems, plan.wanted, results_log,
                     {os.path.realpath(e.path) for e in plan.good}, clock)
    slots = threading.BoundedSemaphore(2 * job.writers)
    workers = auto_workers(explainer.device) if job.workers is None else job.workers

    def write(entry: Entry, res: ClipResult) -> None:
        try:
            n, empty = writer.write(entry, res)
        except Exception as e:
            fail(entry, f"writing its outputs failed: {reason_of(e)}")
        else:
            with lock:
                counts["explained"] += 1
                counts["explanations"] += n
                counts["empty"] += empty
            emit({"event": "file", "file": entry.rel, "status": "explained", "windows": sizes[entry.rel][0]})
        finally:
            slots.release()

    keep_freed_memory()
    threads = torch.get_num_threads()
    runner = explainer.runner
    explainer.runner = _CountingRunner(runner, emit, clock)
    cpu0 = time.process_time()
    t0 = t_drain = time.perf_counter()
    waited = 0.0
    try:
        with ThreadPoolExecutor(max_workers=job.writers, thread_name_prefix="lmaczs-write",
                                initializer=_writer_thread if _openmp() else None) as pool:
            for res in explainer.explain_many(work, labels=job.labels or None, top_k=job.top_k, check=job.check,
                                              workers=workers, keep_input=True):
                clock.add(decode_s=res.decode_s, input_wait_s=res.wait_s)
                if res.error is not None:
                    fail(res.key, res.error, sizes[res.key.rel][0])
                    continue
                t1 = time.perf_counter()
                slots.acquire()
                waited += time.perf_counter() - t1
                pool.submit(write, res.key, res)
            t_drain = time.perf_counter()
    finally:
        if _openmp():
            torch.set_num_threads(threads)   # the count torch gives threads it has not seen yet: the writers' 1
        explainer.runner = runner
        writer.ledger.close()
        end = time.perf_counter()
        so_far = clock.seconds()
        main = so_far.get("model_s", 0.0) + so_far.get("input_wait_s", 0.0) + waited
        clock.add(wall_s=end - t0, cpu_s=time.process_time() - cpu0, writers_wait_s=waited,
                  drain_s=end - t_drain, batching_s=max(0.0, t_drain - t0 - main))


TOP_PAD = 256 << 20          # bytes of freed memory at the top of the heap the process keeps (glibc's M_TOP_PAD)
MMAP_THRESHOLD = 32 << 20    # allocations from this size up get their own mapping (glibc's largest M_MMAP_THRESHOLD)


def keep_freed_memory() -> bool:
    """Have glibc keep up to TOP_PAD of freed memory instead of handing it back to the kernel
    at once. Every batch frees and allocates again tensors of several MB (a batch's STFT, its
    audio); with glibc's default each new allocation faulted its pages in again, thousands of
    page faults a clip, ~15 % of the demo model's time in a folder run, against none with the
    pad. Resident memory then stays at its level between batches instead of dropping and
    rising. Process-wide and kept after the run (processes forked later, such as decode
    workers, inherit it; the pad is address space, resident only where used); set once per
    folder run. True when both settings took; False where the C library is not glibc."""
    if not is_glibc():
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TOP_PAD, M_MMAP_THRESHOLD = -2, -3          # malloc.h
    # setting either stops glibc's own threshold adjustment: tensors below MMAP_THRESHOLD then
    # come from the heap, whose freed top TOP_PAD keeps (32-bit glibc refuses the threshold)
    mapped = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    padded = bool(libc.mallopt(M_TOP_PAD, TOP_PAD))
    return mapped and padded


def is_glibc() -> bool:
    """Whether this process runs on glibc (most Linux distributions; not musl ones such as Alpine)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):   # macOS, musl: no such name; Windows: no confstr
        return False


@functools.lru_cache(maxsize=None)
def _openmp() -> bool:
    """Whether torch's CPU parallelism is OpenMP, where a thread's count is its own (with TBB
    `torch.set_num_threads` is process-wide)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _writer_thread() -> None:
    """Torch ops in a writer thread (a picture's spectrogram) run on that thread alone. With
    torch's default, each writer thread opened its own OpenMP team of workers, which spun
    beside the model's threads and took the cores from the model. With OpenMP the count is the
    calling thread's: the model's thread keeps its own (torch also records it as the default
    of threads yet to come, which the run restores when its writers are done)."""
    torch.set_num_threads(1)


class _CountingRunner:
    """The explainer's runner, reporting how many windows each model batch explains (progress
    within a long file) and timing its batches; everything else is the runner's own."""

    def __init__(self, runner: Any, emit: Callable[[dict[str, Any]], None], clock: StageClock) -> None:
        self._runner, self._emit, self._clock = runner, emit, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def explain(self, waves: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        with self._clock.timing("model_s"):
            out = self._runner.explain(waves, *args, **kwargs)
        self._emit({"event": "windows", "n": int(waves.shape[0])})
        return out

    def explain_topk(self, waves: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        with self._clock.timing("model_s"):
            out = self._runner.explain_topk(waves, *args, **kwargs)
        self._emit({"event": "windows", "n": int(waves.shape[0])})
        return out


def merge_outputs(out: str | os.PathLike) -> dict[str, Any]:
    """`lmaczs merge DIR`: join the rank shards of DIR into results.jsonl /
    errors.jsonl (sorted, one line per key) and rewrite index.html."""
    out = Path(out)
    shards = report.shard_paths(out)
    if not (out / report.RESULTS).exists() and not shards["results"] and not shards["errors"]:
        raise ExplainError(f"{out}: no results.jsonl and no results.rank<r>.jsonl shards; pass an `lmaczs explain --out` folder")
    counts = report.merge(out)
    return {"out": str(out), **counts, "index": str(out / report.INDEX)}


def _all_results(out: Path) -> list[dict[str, Any]]:
    """Results lines of the joined file and every shard (a killed torchrun run leaves shards)."""
    shards = report.shard_paths(out)["results"]
    return [r for p in [out / report.RESULTS, *shards] for r in report.read_jsonl(p)]


def _outputs_filter(out: Path) -> Callable[[str], bool] | None:
    """path -> whether it is one of our outputs or report files under `out` (for discovery)."""
    real_out = os.path.realpath(out)
    names = set(report.read_ledger(out)) | {report.RESULTS, report.ERRORS, report.INDEX}
    ours = {os.path.join(real_out, *n.split("/")) for n in names}
    return lambda p: os.path.realpath(p) in ours


def _wanted_prompts(entry: Entry, job: ExplainJob) -> tuple[str, ...]:
    own = job.file_prompts.get(os.path.realpath(entry.path), ())
    return tuple(dict.fromkeys([*job.prompts, *own]))


def _todo(job: ExplainJob, out: Path, good: list[Entry], stems: dict[str, str],
          wanted: dict[str, tuple[str, ...]], lines: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """What is left to do: file rel -> prompts to explain (top-k mode: () for "the whole file").

    A (file, prompt) is done when its results lines are there and every output the job asks
    for exists under the name it would get now, at the same --sr, with the checks asked for.
    """
    by_pair: dict[tuple[str, str], dict[str, Any]] = {}
    by_file: dict[str, list[dict[str, Any]]] = {}
    for r in lines:
        by_pair.setdefault((r.get("file"), r.get("prompt")), r)
        by_file.setdefault(r.get("file"), []).append(r)
    todo: dict[str, tuple[str, ...]] = {}
    for e in good:
        if job.top_k_mode:
            mine = by_file.get(e.rel, [])
            prompts = {r.get("prompt") for r in mine}
            done = (not job.overwrite and bool(mine) and len(prompts) == min(job.top_k, len(job.labels))
                    and all(r.get("top_k") == job.top_k for r in mine)
                    and all(_satisfies(by_pair[(e.rel, p)], job, out, stems[e.rel]) for p in prompts))
            if not done:
                todo[e.rel] = ()
            continue
        left = tuple(p for p in wanted[e.rel]
                     if job.overwrite or (e.rel, p) not in by_pair
                     or not _satisfies(by_pair[(e.rel, p)], job, out, stems[e.rel]))
        if left:
            todo[e.rel] = left
    return todo


def _satisfies(line: dict[str, Any], job: ExplainJob, out: Path, stem: str) -> bool:
    names = report.output_names(stem, line.get("prompt", ""))
    outputs = line.get("outputs") or {}
    return (line.get("sr") == job.sr and (line.get("top_k") or 0) == job.top_k
            and (not job.check or line.get("masked_similarity") is not None)
            and (not job.listen_check or line.get("listened_similarity") is not None)
            and all(outputs.get(k) == names[k] and (out / names[k]).is_file() for k in job.kinds()))


def _redone(line: dict[str, Any], todo: dict[str, tuple[str, ...]], job: ExplainJob) -> bool:
    """Whether a results line belongs to work this run redoes (so it is dropped first)."""
    file = line.get("file")
    if file not in todo:
        return False
    return job.top_k_mode or line.get("prompt") in todo[file]


def _process_group(world: int) -> Any:
    """Join torchrun's gloo group (for the barriers around the work); None outside torchrun."""
    if world <= 1:
        return None
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ExplainError("WORLD_SIZE > 1 without MASTER_ADDR: start it with torchrun")
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    return dist.group.WORLD


def _barrier(group: Any) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.barrier()


def _gather(group: Any, obj: Any) -> list[Any]:
    if group is None:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


class _Writer:
    """Writes one explained file's outputs (atomically), then its results lines (one write)."""

    def __init__(self, job: ExplainJob, out: Path, explainer: Explainer, stems: dict[str, str],
                 wanted: dict[str, tuple[str, ...]], results: report.JsonlLog, inputs: set[str],
                 clock: StageClock) -> None:
        self.job, self.out, self.ex, self.stems, self.results, self.inputs = job, out, explainer, stems, results, inputs
        self.wanted = wanted     # rel -> prompts in the order given (the report keeps it)
        self.ledger = report.Ledger(out)
        self.clock = clock

    def write(self, entry: Entry, res: ClipResult) -> tuple[int, int]:
        """Returns the number of explanations written and how many of them are empty
        (`report.is_empty`: the model finds nothing of the prompt there)."""
        t0 = time.perf_counter()
        job, lines, clock = self.job, [], self.clock
        listen_s = 0.0
        n_empty = 0
        for rank, ex in enumerate(res.explanations):
            names = report.output_names(self.stems[entry.rel], ex.prompt)
            names = {k: names[k] for k in job.kinds()}
            targets = {k: self.out / v for k, v in names.items()}
            for path in targets.values():
                if os.path.realpath(path) in self.inputs:
                    raise ExplainError(f"output {path} would overwrite an input file; use another --out")
            with clock.timing("log_s"):
                self.ledger.add(names.values())     # listed before it exists: discovery must never take it as input
            with clock.timing("wav_s"):
                peak = report.write_wav(targets["wav"], ex.audio, job.sr)
                if "residual" in targets:
                    report.write_wav(targets["residual"], res.wave - ex.audio, job.sr)
            if "mask" in targets:
                with clock.timing("mask_s"):
                    report.write_mask(targets["mask"], ex.mask, ex.domain, ex.prompt, entry.rel)
            if "png" in targets:
                with clock.timing("png_s"):
                    report.write_png(targets["png"], res.wave, ex.mask, ex.domain, ex.prompt, ex.similarity,
                                     ex.masked_similarity)
            level_db = report.relative_level_db(ex.audio, res.wave)
            empty = report.is_empty(ex.mask_mean, level_db)
            n_empty += empty
            listened = None
            if job.listen_check:
                t1 = time.perf_counter()
                back = load_audio(targets["wav"])                      # what a listener gets, at 48 kHz
                back = np.pad(back, (0, max(0, ex.audio.size - back.size)))[: ex.audio.size]
                listened = self.ex.window_similarities(back, ex.prompt,
                                                       [int(round(w["start_s"] * SAMPLE_RATE)) for w in ex.windows])
                listen_s += time.perf_counter() - t1
            for w in ex.windows:
                line = {"file": entry.rel, "input": os.path.abspath(entry.path), "prompt": ex.prompt,
                        "window": w["window"], "start_s": round(w["start_s"], 6),
                        "end_s": round(min(w["start_s"] + CLIP_SAMPLES / SAMPLE_RATE, res.duration_s), 6),
                        "duration_s": round(res.duration_s, 6),
                        "similarity": w["similarity"], "masked_similarity": w.get("masked_similarity"),
                        "mask_mean": w["mask_mean"], "domain": ex.domain, "sr": job.sr,
                        "peak": round(peak, 6), "outputs": names, "empty": empty,
                        "level_db": None if level_db is None else round(level_db, 2)}
                if listened is not None:
                    line["listened_similarity"] = float(listened[w["window"]])
                if res.topk is not None:
                    line.update(top_k=job.top_k, rank=rank, topk=res.topk)
                elif ex.prompt in self.wanted.get(entry.rel, ()):
                    line["prompt_order"] = self.wanted[entry.rel].index(ex.prompt)
                lines.append(line)
        timing = {"decode_s": round(res.decode_s, 4), "model_s": round(res.model_s, 4),
                  "write_s": round(time.perf_counter() - t0 - listen_s, 4), "listen_s": round(listen_s, 4)}
        for line in lines:
            line["timing"] = timing
        with clock.timing("log_s"):
            self.results.append(lines)      # after every output of the file is in place
        clock.add(listen_s=listen_s)
        return len(res.explanations), n_empty
