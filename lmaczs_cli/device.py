"""Choosing the torch device from the one --device option every command shares, this
process's place in a torchrun launch, and running model steps fast on a GPU: the half-precision
type, fixed-shape buckets under CUDA graphs or torch.compile, pinned host copies (`TorchRunner`
uses them); and what ONNX Runtime offers here (`lmaczs info`)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import LmaczsError


class DeviceError(LmaczsError):
    """The device asked for is not available here."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else CPU) | ``cpu`` | ``cuda`` | ``cuda:N``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun launch; the defaults outside torchrun."""

    rank: int = 0           # process index in the whole launch
    world: int = 1          # processes in the launch
    local_rank: int = 0     # process index on this machine: picks its GPU

    @property
    def main(self) -> bool:
        """Whether this process reports and writes what is written once (rank 0)."""
        return self.rank == 0


def torchrun_rank() -> Rank:
    """This process's rank from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    env = os.environ
    return Rank(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


# ----------------------------------------------------------------------------- precision and fixed shapes

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "graphs", "inductor", "off")
BUCKETS = (1, 2, 4, 8, 16, 32, 64)     # batch sizes a fixed-shape step is run at (rows padded up)


def half_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of the CLAP encoder and the decoder; None runs them in float32.

    ``auto`` is float16 on CUDA and float32 on the CPU. float16, not bfloat16, by measurement:
    on the test model with a full-scale input, masks differ from float32's by at most 0.004
    under float16 autocast and 0.034 under bfloat16 (its 8-bit mantissa), past the 2e-2 parity
    target; tensor cores run both at the same rate. float16's narrow range (65504) is kept away
    from where it bites: the front end (STFT, power, mel, log: bin power of a loud clip exceeds
    65504) is float32 whatever is chosen (``model``), autocast keeps softmax, normalisation,
    exp/log and reductions in float32, and the text tower (half-precision text encoders
    overflow) runs outside autocast. ``bf16`` stays available for a checkpoint whose encoder
    activations leave float16's range; the exported ONNX / TensorRT variant is float16 too."""
    if precision not in PRECISIONS:
        raise DeviceError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True) -> Any:
    """Autocast to ``dtype`` on ``device`` (off for None). ``cache=False`` while capturing a CUDA graph."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def compile_mode(mode: str, device: torch.device) -> str:
    """``auto``: CUDA graphs on CUDA, plain eager on the CPU. ``graphs`` (each bucket shape captured
    once as a CUDA graph and replayed) and ``inductor`` (torch.compile per bucket shape) need CUDA."""
    if mode not in COMPILE_MODES:
        raise DeviceError(f"compile {mode!r}: use one of {', '.join(COMPILE_MODES)}")
    if mode == "auto":
        return "graphs" if device.type == "cuda" else "off"
    if mode in ("graphs", "inductor") and device.type != "cuda":
        raise DeviceError(f"compile {mode!r} needs a CUDA device (this runs on {device}); use compile='off'")
    return mode


def bucket_chunks(n: int, buckets: Sequence[int] = BUCKETS) -> list[tuple[int, int]]:
    """n rows as chunks of at most the largest bucket, each with the bucket it is padded to:
    [(rows, bucket)], rows <= bucket. 70 rows -> [(64, 64), (6, 8)]."""
    out = []
    while n > 0:
        rows = min(n, buckets[-1])
        out.append((rows, next(b for b in buckets if b >= rows)))
        n -= rows
    return out


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """x (n, ...) -> (size, ...), the added rows copies of row 0: real data, so padding never meets
    an edge case (silence, a zero text vector) that the rows it sits beside do not."""
    if x.shape[0] == size:
        return x
    return torch.cat([x, x[:1].expand(size - x.shape[0], *x.shape[1:])])


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to a CUDA device through pinned memory, without blocking the host; as is elsewhere."""
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)


def to_host(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CUDA tensors to the CPU: copies into pinned buffers, queued without blocking, then one wait."""
    cuda = [v for v in outputs.values() if v.device.type == "cuda"]
    if not cuda:
        return {k: v.cpu() for k, v in outputs.items()}
    host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
            if v.device.type == "cuda" else v for k, v in outputs.items()}
    torch.cuda.current_stream(cuda[0].device).synchronize()
    return host


class FixedShapeSteps:
    """Runs model steps at a few fixed shapes: the rows (axis 0 of every input) are cut into
    chunks of at most the largest bucket and each chunk padded up to its bucket (`bucket_chunks`,
    `pad_rows`), so a step meets only len(buckets) shapes per kind of call.

    mode ``graphs``: each (step, shape) is captured once as a CUDA graph, then replayed (one
    launch for the whole forward); ``inductor``: compiled once per shape with torch.compile;
    ``eager``: only the padding (to measure it, and to test the bucketing on a CPU). The
    encoder and decoder run under ``autocast(device, dtype)`` inside the step.
    """

    def __init__(self, mode: str, device: torch.device, dtype: torch.dtype | None,
                 buckets: Sequence[int] = BUCKETS, warmup: int = 2) -> None:
        if mode not in ("graphs", "inductor", "eager"):
            raise DeviceError(f"fixed-shape mode {mode!r}: use graphs, inductor or eager")
        self.mode, self.device, self.dtype = mode, device, dtype
        self.buckets, self.warmup = tuple(sorted(buckets)), warmup
        self._steps: dict[tuple, Any] = {}
        self._pool = None

    def run(self, name: Hashable, fn: Callable[..., dict[str, torch.Tensor]],
            *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """fn(*inputs) -> {name: tensor with rows on axis 0}, run chunk by chunk at bucket shapes.
        ``name`` identifies fn: one fn per name."""
        parts, start = [], 0
        for rows, bucket in bucket_chunks(inputs[0].shape[0], self.buckets):
            chunk = [pad_rows(x[start:start + rows], bucket) for x in inputs]
            key = (name, *((tuple(x.shape), x.dtype) for x in chunk))
            out = self._call(key, fn, chunk)
            parts.append({k: v[:rows].clone() if self.mode == "graphs" else v[:rows] for k, v in out.items()})
            start += rows
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _call(self, key: tuple, fn: Callable, chunk: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.mode == "eager":
            with autocast(self.device, self.dtype):
                return fn(*chunk)
        if key not in self._steps:
            self._steps[key] = self._capture(fn, chunk) if self.mode == "graphs" else torch.compile(fn, dynamic=False)
        step = self._steps[key]
        if self.mode == "inductor":
            with autocast(self.device, self.dtype):
                return step(*chunk)
        graph, static_in, static_out = step
        for s, x in zip(static_in, chunk):
            s.copy_(x, non_blocking=True)
        graph.replay()
        return static_out

    def _capture(self, fn: Callable, chunk: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor], dict]:
        """Warm up on a side stream (lazy initialisation, cached constants), then capture."""
        static_in = [x.clone() for x in chunk]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                with autocast(self.device, self.dtype, cache=False):
                    fn(*static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:          # one memory pool for all shapes: steps run one at a time
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool), autocast(self.device, self.dtype, cache=False):
                static_out = fn(*static_in)
        except RuntimeError as e:
            raise DeviceError(f"the model step could not be captured as a CUDA graph ({e}); "
                              "run it with compile='inductor' or compile='off'") from e
        return graph, static_in, static_out
