"""ONNX -> TensorRT engines with the ``tensorrt`` Python API (extra: ``pip install 'lmaczs[gpu]'``).

Supported: TensorRT 10.x and 11.x (``TRT_MAJORS``; the ``gpu`` extra pins ``tensorrt>=10.0,<12``).

Networks are **strongly typed**: every layer runs in the type the ONNX graph gives it. The
precision is decided at export (``lmaczs export --fp16`` writes graphs whose audio encoder and
decoder layers are float16 between explicit Casts, with the STFT, mel, log and inverse STFT in
float32; see ``to_onnx``), never by builder flags or per-layer pinning: TensorRT 11 removed
``BuilderFlag.FP16``, ``OBEY_PRECISION_CONSTRAINTS``, ``ILayer.precision`` and
``set_output_type``, and the same graph builds the same engine on 10.x and 11.x. The one place
the two versions differ for this code is how a strongly typed network is asked for
(`network_flags`).

Each engine is a plain serialized plan (``<graph>.engine``, loadable by ``trtexec``) with a
sidecar ``<graph>.engine.json`` holding its key: ONNX sha256, TensorRT version, GPU name,
precision and optimisation profile. A key that no longer matches means rebuild, never crash.

`TrtEngine` runs one engine: tensor types are read from the engine (float32, float16, bfloat16,
int32, int64, bool, ...), every input shape is checked against the profile, and
`TrtEngine.max_size` tells a caller how to chunk (``backends.TrtRunner`` does).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmaczs_cli.errors import LmaczsError
from lmaczs_cli.files import atomic_path, sha256_file

from .to_onnx import ExportError, check_audit, read_manifest

TIMING_CACHE = "timing.cache"
TRT_MAJORS = (10, 11)                 # TensorRT major versions this module is written and tested for
TRT_PIN = "tensorrt>=10.0,<12"        # the gpu extra's requirement, named in messages
MAX_LABELS = 1024                     # top-k graph: most labels per call in an engine's profile
# torch type of each TensorRT DataType, by the module-level alias TensorRT exports (trt.float32 ...)
_TORCH_TYPES = (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
                ("int32", torch.int32), ("int64", torch.int64), ("bool", torch.bool), ("int8", torch.int8),
                ("uint8", torch.uint8))


class TrtUnavailable(LmaczsError):
    """TensorRT or a CUDA GPU is missing, or this TensorRT is not supported; the message says which."""


def import_trt() -> Any:
    """Import tensorrt and check its major version is one of ``TRT_MAJORS``."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TrtUnavailable(f"TensorRT is not installed: pip install 'lmaczs[gpu]' ({TRT_PIN})") from e
    major = int(str(trt.__version__).split(".")[0])
    if major not in TRT_MAJORS:
        raise TrtUnavailable(f"TensorRT {trt.__version__} is not supported (10.x and 11.x are): "
                             f"pip install '{TRT_PIN}'")
    return trt


def require_trt() -> Any:
    """tensorrt on a machine with a CUDA GPU, or `TrtUnavailable` naming what is missing."""
    if not torch.cuda.is_available():
        raise TrtUnavailable("TensorRT engines need a CUDA GPU, and none is visible here "
                             "(export the ONNX graphs without --trt, or run on a GPU machine)")
    return import_trt()


def gpu_name() -> str:
    """The name recorded in an engine's key (engines are specific to a GPU model)."""
    return torch.cuda.get_device_name()


def network_flags(trt: Any) -> int:
    """create_network flags for a strongly typed network: TensorRT 10 needs STRONGLY_TYPED; in 11
    every network is strongly typed and the flag is deprecated and ignored (0 where it is gone)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The torch type of a TensorRT DataType (float32, float16, bfloat16, int32, int64, bool, int8, uint8)."""
    for name, torch_type in _TORCH_TYPES:
        if hasattr(trt, name) and getattr(trt, name) == dtype:
            return torch_type
    raise ExportError(f"an engine tensor has TensorRT type {dtype}, which lmaczs cannot feed or read; "
                      "re-export with `lmaczs export` (its graphs use float32, float16, int32, int64 and bool)")


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built from and for; any difference means rebuild."""

    onnx_sha256: str
    tensorrt: str
    gpu: str
    precision: str                   # the ONNX graph's: "fp16" (encoder/decoder layers) or "fp32"
    profile: dict[str, list[list[int]]]   # input -> [min, opt, max] shapes


def profile_shapes(spec: dict[str, Any], sizes: dict[str, tuple[int, int, int]]) -> dict[str, list[list[int]]]:
    """min/opt/max shapes per input from the manifest's shapes; ``sizes`` gives (min, opt, max)
    for each dynamic axis name ("batch", "prompts", "labels")."""
    out = {}
    for name, shape in spec["inputs"].items():
        unknown = [d for d in shape if isinstance(d, str) and d not in sizes]
        if unknown:
            raise ExportError(f"input {name!r} has dynamic axis {unknown[0]!r}, which has no engine profile size; "
                              f"known: {', '.join(sizes)}")
        out[name] = [[sizes[d][i] if isinstance(d, str) else d for d in shape] for i in range(3)]
    return out


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0] if errors else "no error recorded"
        raise ExportError(f"{onnx_path.name}: TensorRT could not parse it ({len(errors)} errors; first: {first}); "
                          "check `lmaczs export`'s audit, or report the node it names")
    return network, parser


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, spec: dict[str, Any], min_batch: int = 1,
                 opt_batch: int | None = None, max_batch: int = 8, max_prompts: int = 8,
                 max_labels: int = MAX_LABELS, workspace_gib: float | None = None,
                 timing_cache: str | Path | None = None) -> EngineKey:
    """Build one strongly typed engine from one ONNX graph (spec: its manifest entry). Skips the
    build when the sidecar key already matches; writes the plan and its sidecar atomically."""
    trt = require_trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    opt_batch = opt_batch or max(min_batch, min(max_batch, 4))
    sizes = {"batch": (min_batch, opt_batch, max_batch), "prompts": (1, min(2, max_prompts), max_prompts),
             "labels": (1, min(64, max_labels), max_labels)}
    key = EngineKey(sha256_file(onnx_path), trt.__version__, gpu_name(), spec.get("precision", "fp32"),
                    profile_shapes(spec, sizes))
    if engine_key(engine_path) == key:
        return key
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in key.profile.items():
        profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build {onnx_path.name} (its log above says why)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(plan))
    if cache_path:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    with atomic_path(_sidecar(engine_path)) as tmp:
        tmp.write_text(json.dumps(asdict(key), indent=2) + "\n")
    return key


def _sidecar(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def engine_key(engine_path: str | Path) -> EngineKey | None:
    """The key in an engine's sidecar, or None when the engine or its sidecar is missing."""
    engine_path = Path(engine_path)
    side = _sidecar(engine_path)
    if not (engine_path.is_file() and side.is_file()):
        return None
    return EngineKey(**json.loads(side.read_text()))


def export_engines(folder: str | Path, *, max_batch: int = 8, max_prompts: int = 8, max_labels: int = MAX_LABELS,
                   workspace_gib: float | None = None, fp16: bool | None = None) -> dict[str, EngineKey]:
    """Build (or keep, when their keys match) an engine for every graph in an export folder.

    Refused, before any build, when the folder's export audit found problems. Precision is the
    graphs' own (``lmaczs export --fp16``); ``fp16``, when given, must match it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_audit(manifest, folder)
    precision = manifest.get("precision", "fp32")
    if fp16 is not None and fp16 != (precision == "fp16"):
        want = "--fp16" if fp16 else "--fp32"
        raise ExportError(f"{folder} holds {precision} graphs, and engines take the graphs' precision: "
                          f"re-export with `lmaczs export {want} --out {folder}`")
    require_trt()
    keys = {}
    for graph, spec in manifest["graphs"].items():
        keys[graph] = build_engine(folder / spec["file"], folder / f"{graph}.engine", spec=spec,
                                   max_batch=max_batch, max_prompts=max_prompts, max_labels=max_labels,
                                   workspace_gib=workspace_gib, timing_cache=folder / TIMING_CACHE)
    return keys


class TrtEngine:
    """A deserialized engine run with torch tensors (one profile, dynamic shapes).

    ``device``: where its tensors live (a CUDA device; the CPU only with a stand-in tensorrt)."""

    def __init__(self, plan: bytes, trt: Any, device: torch.device | str = "cuda", name: str = "engine") -> None:
        self.trt, self.device, self.name = trt, torch.device(device), name
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ExportError(f"{name}: TensorRT could not load the plan; rebuild it with `lmaczs export --trt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)] for n in self.inputs}

    def max_size(self, name: str, axis: int) -> int:
        """The profile's largest size of input ``name`` along ``axis``: chunk calls to it."""
        return int(self.profile[name][2][axis])

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One call: feeds (input name -> tensor, any device and type; converted to the engine's
        type on its device) -> outputs in the engine's types on its device. Shapes must lie in
        the profile (`max_size`); a shape outside it raises, naming the limit."""
        keep = {}
        for n in self.inputs:
            if n not in feeds:
                raise ExportError(f"{self.name}: input {n!r} not given (inputs: {', '.join(self.inputs)})")
            t = feeds[n].to(self.device, self.dtypes[n], non_blocking=True).contiguous()
            keep[n] = t
            if not self.context.set_input_shape(n, tuple(t.shape)):
                lo, _, hi = self.profile[n]
                raise ExportError(f"{self.name}: input {n!r} of shape {tuple(t.shape)} is outside the engine's "
                                  f"profile {lo}..{hi}; chunk it, or rebuild with a larger "
                                  "`lmaczs export --trt --max-batch`")
            self._address(n, t)
        out = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise ExportError(f"{self.name}: TensorRT cannot infer the shape of output {n!r} ({shape}) "
                                  "from the input shapes given")
            out[n] = torch.empty(shape, device=self.device, dtype=self.dtypes[n])
            self._address(n, out[n])
        if not self.context.execute_async_v3(self._stream()):
            raise ExportError(f"{self.name}: TensorRT execution failed (its log above says why)")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def _address(self, name: str, t: torch.Tensor) -> None:
        if self.context.set_tensor_address(name, t.data_ptr()) is False:
            raise ExportError(f"{self.name}: TensorRT refused the buffer of {name!r}")


def load_engine(folder: str | Path, graph: str, device: torch.device | str = "cuda", trt: Any = None) -> TrtEngine:
    """The engine of ``graph`` in an export folder, refusing one whose key is stale."""
    trt = trt or require_trt()
    folder = Path(folder)
    manifest = read_manifest(folder)
    path = folder / f"{graph}.engine"
    key = engine_key(path)
    if key is None:
        raise ExportError(f"{path} is missing: run `lmaczs export --trt --out {folder}`")
    stale = []
    if key.onnx_sha256 != manifest["graphs"][graph]["sha256"]:
        stale.append("its ONNX graph changed")
    if key.tensorrt != trt.__version__:
        stale.append(f"built with TensorRT {key.tensorrt}, this is {trt.__version__}")
    if key.gpu != gpu_name():
        stale.append(f"built for {key.gpu}, this GPU is {gpu_name()}")
    if stale:
        raise ExportError(f"{path}: {'; '.join(stale)}. Rebuild it: lmaczs export --trt --out {folder}")
    return TrtEngine(path.read_bytes(), trt, device, name=path.name)
