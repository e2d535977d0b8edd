"""ONNX -> TensorRT engines with the ``tensorrt`` Python API (extra: ``pip install lmaczs[gpu]``).

Each engine is a plain serialized plan (``<graph>.engine``, loadable by ``trtexec``) with a
sidecar ``<graph>.engine.json`` holding its key: ONNX sha256, TensorRT version, GPU name,
precision and optimisation profile. A key that no longer matches means rebuild, never crash.

Precision: with ``fp16`` the encoder and decoder layers may run in fp16; the STFT, mel, log and
inverse-STFT layers are pinned to fp32, and the text encoder is always built fp32 (fp16 text
encoders overflow). The traced graphs name a node after the nn.Module call it came from
("/layers.0/blocks.0/attn/qkv/MatMul", "/decoder/attn.0/..."); the spectral code is plain
functions, so its nodes carry no module scope ("/MatMul_3", "/Log") and that is how they are
recognised. (Unverified on a GPU here: no TensorRT in this environment.)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmaczs_cli.errors import LmaczsError
from lmaczs_cli.files import atomic_path, sha256_file

from .to_onnx import ExportError, read_manifest

TIMING_CACHE = "timing.cache"
FP32_ONLY = ("text_encoder",)


class TrtUnavailable(LmaczsError):
    """TensorRT or a CUDA GPU is missing; the message says which."""


def require_trt() -> Any:
    """Import tensorrt, or raise `TrtUnavailable` naming what is missing (GPU or package)."""
    if not torch.cuda.is_available():
        raise TrtUnavailable("TensorRT engines need a CUDA GPU, and none is visible here "
                             "(export the ONNX graphs without --trt, or run on a GPU machine)")
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TrtUnavailable("TensorRT is not installed: pip install 'lmaczs[gpu]' (tensorrt>=10)") from e
    return trt


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built from and for; any difference means rebuild."""

    onnx_sha256: str
    tensorrt: str
    gpu: str
    precision: str                   # "fp16" (model layers; front end fp32) or "fp32"
    profile: dict[str, list[list[int]]]   # input -> [min, opt, max] shapes


def _profile_shapes(spec: dict[str, Any], min_batch: int, opt_batch: int, max_batch: int,
                    max_prompts: int) -> dict[str, list[list[int]]]:
    """min/opt/max shapes per input from the manifest's shapes ("batch"/"prompts" are dynamic)."""
    sizes = {"batch": (min_batch, opt_batch, max_batch), "prompts": (1, min(2, max_prompts), max_prompts)}
    out = {}
    for name, shape in spec["inputs"].items():
        out[name] = [[sizes[d][i] if isinstance(d, str) else d for d in shape] for i in range(3)]
    return out


def _parse(trt: Any, builder: Any, onnx_path: Path) -> tuple[Any, Any]:
    network = builder.create_network(0)      # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for e in errors:
            print(f"TensorRT ONNX parser: {e}")
        raise ExportError(f"{onnx_path.name}: TensorRT could not parse it ({len(errors)} errors, printed above)")
    return network, parser


def spectral_node(name: str) -> bool:
    """True for a node/layer of the spectral code: in no nn.Module scope below the traced
    ``ExplainerModule`` ("/model/MatMul_3", not "/model/decoder/..."): kept fp32."""
    return name.count("/") <= 2


def _pin_front_end_fp32(trt: Any, network: Any) -> int:
    """Layers from no nn.Module scope (the spectral ops) run and output fp32. Returns how many."""
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not spectral_node(layer.name):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        n += 1
    return n


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, spec: dict[str, Any], min_batch: int = 1,
                 opt_batch: int | None = None, max_batch: int = 8, max_prompts: int = 8, fp16: bool = False,
                 workspace_gib: float | None = None, timing_cache: str | Path | None = None) -> EngineKey:
    """Build one engine from one ONNX graph (spec: its manifest entry). Skips the build when the
    sidecar key already matches; writes the plan and its sidecar atomically."""
    trt = require_trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    opt_batch = opt_batch or max(min_batch, min(max_batch, 4))
    key = EngineKey(sha256_file(onnx_path), trt.__version__, torch.cuda.get_device_name(),
                    "fp16" if fp16 else "fp32", _profile_shapes(spec, min_batch, opt_batch, max_batch, max_prompts))
    if engine_key(engine_path) == key:
        return key
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, onnx_path)
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_front_end_fp32(trt, network)
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in key.profile.items():
        profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build {onnx_path.name} (see its log above)")
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


def export_engines(folder: str | Path, *, fp16: bool = False, max_batch: int = 8, max_prompts: int = 8,
                   workspace_gib: float | None = None) -> dict[str, EngineKey]:
    """Build (or keep, when their keys match) the engines of every graph in an export folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    keys = {}
    for graph, spec in manifest["graphs"].items():
        keys[graph] = build_engine(folder / spec["file"], folder / f"{graph}.engine", spec=spec,
                                   max_batch=max_batch, max_prompts=max_prompts,
                                   fp16=fp16 and graph not in FP32_ONLY, workspace_gib=workspace_gib,
                                   timing_cache=folder / TIMING_CACHE)
    return keys


class TrtEngine:
    """A deserialized engine with torch CUDA tensors in and out (one profile, dynamic shapes)."""

    def __init__(self, plan: bytes) -> None:
        trt = require_trt()
        self.trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feeds: input name -> tensor (any device; made contiguous on CUDA) -> outputs on CUDA."""
        stream = torch.cuda.current_stream()
        keep = {}
        for n in self.inputs:
            dtype = torch.int64 if self.engine.get_tensor_dtype(n) == self.trt.int64 else torch.float32
            t = feeds[n].to("cuda", dtype).contiguous()
            keep[n] = t
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
        out = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            out[n] = torch.empty(shape, device="cuda", dtype=torch.float32)
            self.context.set_tensor_address(n, out[n].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise LmaczsError("TensorRT execution failed (see its log)")
        stream.synchronize()
        return out


def load_engine(folder: str | Path, graph: str) -> TrtEngine:
    """The engine of ``graph`` in an export folder, refusing one whose key is stale."""
    trt = require_trt()
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
    if key.gpu != torch.cuda.get_device_name():
        stale.append(f"built for {key.gpu}, this GPU is {torch.cuda.get_device_name()}")
    if stale:
        raise ExportError(f"{path}: {'; '.join(stale)}. Rebuild it: lmaczs export --trt --out {folder}")
    return TrtEngine(path.read_bytes())
