"""TensorRT engine builds and the TrtRunner on a CPU, against a stand-in ``tensorrt`` module with the
10.x surface and with the 11.x surface (members 11 removed raise AttributeError), so both code
paths run without a GPU. The stand-in parses ONNX files itself, keeps the builder's settings for
the tests to inspect, and executes a plan with ONNX Runtime on the buffers whose addresses the
runner hands it, the way TensorRT reads and writes device memory."""
from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import types

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from lmaczs_cli.export import to_trt  # noqa: E402
from lmaczs_cli.export.to_onnx import (CLIP_BPE_VOCAB, MANIFEST_FORMAT, AuditError,  # noqa: E402
                                       ExportError)
from lmaczs_cli.files import sha256_file  # noqa: E402

VERSIONS = ("10.15.1", "11.5.0")
N, D, CTX = 16, 4, 77             # synthetic sizes: samples per clip, embedding width, tokens


# --------------------------------------------------------------------------- the stand-in module


def stand_in_tensorrt(version: str) -> types.ModuleType:
    """A ``tensorrt`` module with the documented surface of ``version`` (10.x or 11.x) for what
    lmaczs uses, and a recorder (``trt.built``) of every network and builder config built."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)   # find_spec("tensorrt") must work
    trt.__version__ = version
    trt.built = []

    class DataType(enum.Enum):
        FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64, INT4, FP4 = range(11)

    trt.DataType = DataType
    for alias, member in (("float32", "FLOAT"), ("float16", "HALF"), ("bfloat16", "BF16"), ("int8", "INT8"),
                          ("int32", "INT32"), ("int64", "INT64"), ("bool", "BOOL"), ("uint8", "UINT8")):
        setattr(trt, alias, DataType[member])
    onnx_types = {TensorProto.FLOAT: DataType.FLOAT, TensorProto.FLOAT16: DataType.HALF,
                  TensorProto.BFLOAT16: DataType.BF16, TensorProto.INT32: DataType.INT32,
                  TensorProto.INT64: DataType.INT64, TensorProto.BOOL: DataType.BOOL,
                  TensorProto.INT8: DataType.INT8, TensorProto.UINT8: DataType.UINT8}
    numpy_types = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
                   DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.INT8: np.int8, DataType.UINT8: np.uint8}

    trt.TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "TACTIC_DRAM"])
    if major == 10:   # EXPLICIT_BATCH: deprecated and ignored in 10; STRONGLY_TYPED: opt-in
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                         {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", {n: i for i, n in enumerate(
            ["FP16", "BF16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "TF32", "OBEY_PRECISION_CONSTRAINTS",
             "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "STRIP_PLAN"])})
    else:             # 11: strongly typed always; the flag is kept, deprecated and ignored
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", {n: i for i, n in enumerate(
            ["DEBUG", "GPU_FALLBACK", "REFIT", "TF32", "STRIP_PLAN"])})
    weak_flags = {n for n in ("FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")
                  if n in trt.BuilderFlag.__members__}

    class Logger:
        VERBOSE, INFO, WARNING, ERROR = 4, 3, 2, 1

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class ITensor:
        def __init__(self, name: str, dtype: DataType, shape: tuple) -> None:
            self.name, self.dtype, self.shape = name, dtype, shape

    class ILayer:
        def __init__(self, name: str, op: str) -> None:
            self.name, self.type = name, op

    if major == 10:   # weak typing controls, removed in 11
        def _set_precision(self, value):
            if self._network.strongly_typed:
                raise RuntimeError("setting layer precision is not allowed in a strongly typed network")
            self._precision = value

        ILayer.precision = property(lambda self: getattr(self, "_precision", DataType.FLOAT), _set_precision)

        def set_output_type(self, index, dtype):
            if self._network.strongly_typed:
                raise RuntimeError("setting layer output types is not allowed in a strongly typed network")

        ILayer.set_output_type = set_output_type

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.layers, self.inputs, self.outputs, self.model = [], [], [], None

        def get_flag(self, flag) -> bool:
            return bool(self.flags & (1 << int(flag)))

        @property
        def strongly_typed(self) -> bool:
            return major >= 11 or self.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, i: int) -> ILayer:
            return self.layers[i]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path)
            net = self.network
            for node in model.graph.node:
                layer = ILayer(node.name or node.op_type, node.op_type)
                layer._network = net
                net.layers.append(layer)

            def tensor(v):
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
                return ITensor(v.name, onnx_types[v.type.tensor_type.elem_type], dims)

            net.inputs, net.outputs = [tensor(v) for v in model.graph.input], [tensor(v) for v in model.graph.output]
            net.model = model.SerializeToString()
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, min, opt, max) -> None:   # noqa: A002 (TensorRT's argument names)
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

        def get_shape(self, name):
            return self.shapes[name]

    class ITimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data or b"stand-in timing cache"

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags, self.profiles, self.pools, self.cache = set(), [], {}, None

        def set_flag(self, flag) -> None:
            self.flags.add(trt.BuilderFlag(flag).name)

        def set_memory_pool_limit(self, pool, size: int) -> None:
            self.pools[pool] = size

        def add_optimization_profile(self, profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> ITimingCache:
            return ITimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache:
            return self.cache

    if major == 10:
        IBuilderConfig.int8_calibrator = None

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network, config) -> bytes | None:
            trt.built.append((network, config))
            if network.strongly_typed and config.flags & weak_flags:
                return None      # TensorRT: precision flags are not allowed with strong typing
            if len(config.profiles) != 1:
                return None
            shapes = config.profiles[0].shapes
            for t in network.inputs:
                if -1 in t.shape and t.name not in shapes:
                    return None  # a dynamic input needs its profile
            head = json.dumps({"profile": {k: [list(s) for s in v] for k, v in shapes.items()}}).encode()
            return len(head).to_bytes(8, "little") + head + network.model

    if major == 10:
        Builder.platform_has_fast_fp16 = True

    class ICudaEngine:
        def __init__(self, plan: bytes) -> None:
            n = int.from_bytes(plan[:8], "little")
            self.profile = {k: [tuple(s) for s in v] for k, v in json.loads(plan[8:8 + n])["profile"].items()}
            self.model = plan[8 + n:]
            graph = onnx.load_from_string(self.model).graph
            self.io = [(v.name, trt.TensorIOMode.INPUT, onnx_types[v.type.tensor_type.elem_type]) for v in graph.input]
            self.io += [(v.name, trt.TensorIOMode.OUTPUT, onnx_types[v.type.tensor_type.elem_type]) for v in graph.output]

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, i: int) -> str:
            return self.io[i][0]

        def get_tensor_mode(self, name: str):
            return next(m for n, m, _ in self.io if n == name)

        def get_tensor_dtype(self, name: str):
            return next(t for n, _, t in self.io if n == name)

        def get_tensor_profile_shape(self, name: str, profile_index: int):
            return self.profile[name]

        def create_execution_context(self):
            return IExecutionContext(self)

    if major == 10:
        ICudaEngine.device_memory_size = 0

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine, self.shapes, self.addresses = engine, {}, {}
            options = ort.SessionOptions()
            options.log_severity_level = 3          # the synthetic graphs share one set of constants
            self.session = ort.InferenceSession(engine.model, options, providers=["CPUExecutionProvider"])

        def set_input_shape(self, name: str, shape) -> bool:
            lo, _, hi = self.engine.profile[name]
            shape = tuple(shape)
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = shape
            return True

        def _inputs(self, read: bool) -> dict:
            out = {}
            for name, mode, dtype in self.engine.io:
                if mode == trt.TensorIOMode.INPUT:
                    shape = self.shapes[name]
                    out[name] = (_view(self.addresses[name], numpy_types[dtype], shape).copy() if read
                                 else np.zeros(shape, numpy_types[dtype]))
            return out

        def get_tensor_shape(self, name: str):
            if name in self.shapes:
                return self.shapes[name]
            outs = self.session.run(None, self._inputs(read=False))
            names = [o.name for o in self.session.get_outputs()]
            return outs[names.index(name)].shape

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            outs = self.session.run(None, self._inputs(read=True))
            for o, value in zip(self.session.get_outputs(), outs):
                dtype = numpy_types[self.engine.get_tensor_dtype(o.name)]
                _view(self.addresses[o.name], dtype, value.shape)[...] = value
            return True

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes):
            return ICudaEngine(bytes(plan))

    for cls in (Logger, ILayer, INetworkDefinition, OnnxParser, IOptimizationProfile, ITimingCache,
                IBuilderConfig, Builder, ICudaEngine, IExecutionContext, Runtime):
        setattr(trt, cls.__name__, cls)
    return trt


def _view(address: int, dtype, shape) -> np.ndarray:
    """The memory at ``address`` as a writable array (what TensorRT does with a tensor address)."""
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_ubyte * count).from_address(address)
    return np.ctypeslib.as_array(raw).view(dtype).reshape(shape)


@pytest.fixture(params=VERSIONS, ids=["trt10", "trt11"])
def trt(request, monkeypatch):
    """The stand-in of one TensorRT version, installed as `tensorrt` with a GPU seam for the CPU."""
    fake = stand_in_tensorrt(request.param)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", fake)
    monkeypatch.setattr(to_trt, "require_trt", lambda: to_trt.import_trt())
    monkeypatch.setattr(to_trt, "gpu_name", lambda: "stand-in GPU")
    return fake


# --------------------------------------------------------------------------- synthetic export folders


def _value(name: str, elem: int, dims: list) -> "onnx.ValueInfoProto":
    return helper.make_tensor_value_info(name, elem, dims)


def _explainer_nodes(waves: str, text: str, check: bool) -> list:
    """similarity = text[..., 0] * sum(waves); audio = sum_d(text) * waves; masks (B, K, 3, 2) =
    similarity, as float16; masked_similarity = similarity / 2: values that show any row mix-up."""
    nodes = [
        helper.make_node("ReduceSum", [waves, "ax1"], ["wsum"], keepdims=1),                  # (B, 1)
        helper.make_node("Gather", [text, "zero"], ["t0"], axis=2),                           # (B, K)
        helper.make_node("Mul", ["t0", "wsum"], ["similarity"]),
        helper.make_node("ReduceSum", [text, "ax2"], ["tsum"], keepdims=1),                   # (B, K, 1)
        helper.make_node("Unsqueeze", [waves, "ax1"], ["w3"]),                                # (B, 1, N)
        helper.make_node("Mul", ["tsum", "w3"], ["audio"]),                                   # (B, K, N)
        helper.make_node("Unsqueeze", ["similarity", "ax23"], ["s4"]),                        # (B, K, 1, 1)
        helper.make_node("Mul", ["s4", "ones32"], ["m32"]),
        helper.make_node("Cast", ["m32"], ["masks"], to=TensorProto.FLOAT16),
    ]
    if check:
        nodes.append(helper.make_node("Mul", ["similarity", "half"], ["masked_similarity"]))
    return nodes


def _constants() -> list:
    return [helper.make_tensor("ax1", TensorProto.INT64, [1], [1]), helper.make_tensor("ax2", TensorProto.INT64, [1], [2]),
            helper.make_tensor("ax23", TensorProto.INT64, [2], [2, 3]), helper.make_tensor("zero", TensorProto.INT64, [], [0]),
            helper.make_tensor("ones32", TensorProto.FLOAT, [3, 2], [1.0] * 6),
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("s0", TensorProto.INT64, [1], [0]), helper.make_tensor("sD", TensorProto.INT64, [1], [D])]


def _explainer_outputs(check: bool) -> list:
    outs = [_value("masks", TensorProto.FLOAT16, ["batch", "prompts", 3, 2]),
            _value("audio", TensorProto.FLOAT, ["batch", "prompts", N]),
            _value("similarity", TensorProto.FLOAT, ["batch", "prompts"])]
    return outs + ([_value("masked_similarity", TensorProto.FLOAT, ["batch", "prompts"])] if check else [])


def _model(nodes, inputs, outputs) -> "onnx.ModelProto":
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=_constants())
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def synthetic_graphs() -> dict[str, "onnx.ModelProto"]:
    """Small graphs with the names, axes and types of an lmaczs export folder's graphs."""
    waves = _value("waves", TensorProto.FLOAT, ["batch", N])
    text = _value("text", TensorProto.FLOAT, ["batch", "prompts", D])
    topk_nodes = [
        helper.make_node("Slice", ["waves", "s0", "sD", "ax1"], ["emb"]),                     # (B, D)
        helper.make_node("Transpose", ["labels"], ["lt"], perm=[1, 0]),
        helper.make_node("MatMul", ["emb", "lt"], ["scores"]),                                # (B, L)
        helper.make_node("Shape", ["k"], ["kk"]),
        helper.make_node("TopK", ["scores", "kk"], ["best", "topk"], axis=1),                 # (B, K) int64
        helper.make_node("Gather", ["labels", "topk"], ["text"], axis=0),                     # (B, K, D)
        *_explainer_nodes("waves", "text", check=True),
    ]
    return {
        "explainer": _model(_explainer_nodes("waves", "text", True), [waves, text], _explainer_outputs(True)),
        "explainer_nocheck": _model(_explainer_nodes("waves", "text", False), [waves, text],
                                    _explainer_outputs(False)),
        "explainer_topk": _model(topk_nodes, [waves, _value("labels", TensorProto.FLOAT, ["labels", D]),
                                              _value("k", TensorProto.FLOAT, ["prompts"])],
                                 [_value("scores", TensorProto.FLOAT, ["batch", "labels"]),
                                  _value("topk", TensorProto.INT64, ["batch", "prompts"]), *_explainer_outputs(True)]),
        "audio_encoder": _model([helper.make_node("Slice", ["waves", "s0", "sD", "ax1"], ["e32"]),
                                 helper.make_node("Cast", ["e32"], ["embedding"], to=TensorProto.FLOAT16)],
                                [waves], [_value("embedding", TensorProto.FLOAT16, ["batch", D])]),
        "text_encoder": _model([helper.make_node("Slice", ["input_ids", "s0", "sD", "ax1"], ["ids"]),
                                helper.make_node("Cast", ["ids"], ["embedding"], to=TensorProto.FLOAT)],
                               [_value("input_ids", TensorProto.INT64, ["batch", CTX])],
                               [_value("embedding", TensorProto.FLOAT, ["batch", D])]),
    }


def _dims(v) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


def write_folder(folder, problems: dict[str, list[str]] | None = None):
    """A synthetic export folder: graphs, the CLIP BPE vocabulary, manifest.json."""
    from lmaczs_cli.clap import laion_module

    folder.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for name, model in synthetic_graphs().items():
        onnx.save(model, str(folder / f"{name}.onnx"))
        graphs[name] = {"file": f"{name}.onnx", "inputs": {v.name: _dims(v) for v in model.graph.input},
                        "outputs": {v.name: _dims(v) for v in model.graph.output}, "dynamic_axes": {},
                        "sha256": sha256_file(folder / f"{name}.onnx"), "precision": "fp16"}
    (folder / "tokenizer").mkdir(exist_ok=True)
    vocab = folder / "tokenizer" / CLIP_BPE_VOCAB
    vocab.write_bytes(open(laion_module("tokenizer").default_bpe(), "rb").read())
    manifest = {"format": MANIFEST_FORMAT, "domain": "mel", "precision": "fp16", "graphs": graphs,
                "tokenizer": {"kind": "clip-bpe", "context_length": CTX, "dir": "tokenizer",
                              "files": {CLIP_BPE_VOCAB: sha256_file(vocab)}},
                "tensorrt_audit": {"tensorrt": "10.15", **{g: [] for g in graphs}, **(problems or {})}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# numpy references of the synthetic graphs


def ref_explain(waves: np.ndarray, text: np.ndarray) -> dict[str, np.ndarray]:
    sim = text[..., 0] * waves.sum(1, keepdims=True)
    return {"similarity": sim, "masked_similarity": sim / 2, "audio": text.sum(-1, keepdims=True) * waves[:, None],
            "masks": np.broadcast_to(sim[..., None, None], (*sim.shape, 3, 2)).astype(np.float16).astype(np.float32)}


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, N, generator=g), torch.randn(32, 12, D, generator=g), torch.randn(50, D, generator=g)


@pytest.fixture
def built(trt, tmp_path):
    """A synthetic folder with engines built at --max-batch 8 (so 8 prompts, 64 labels)."""
    folder = write_folder(tmp_path / "export")
    keys = to_trt.export_engines(folder, max_batch=8, max_prompts=8, max_labels=64)
    return folder, keys


# --------------------------------------------------------------------------- the two API surfaces


def test_stand_ins_have_the_documented_surfaces():
    """What 11 removed is gone from the 11 stand-in (AttributeError) and present in the 10 one."""
    t10, t11 = stand_in_tensorrt("10.15.1"), stand_in_tensorrt("11.5.0")
    for name in ("FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"):
        assert getattr(t10.BuilderFlag, name) is not None
        with pytest.raises(AttributeError):
            getattr(t11.BuilderFlag, name)
    assert hasattr(t10.ILayer, "precision") and hasattr(t10.ILayer, "set_output_type")
    for removed in ("precision", "set_output_type"):
        with pytest.raises(AttributeError):
            getattr(t11.ILayer("x", "MatMul"), removed)
    with pytest.raises(AttributeError):
        t11.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    with pytest.raises(AttributeError):
        t11.Builder(t11.Logger()).platform_has_fast_fp16


def test_network_flags_ask_for_a_strongly_typed_network_on_both_versions():
    t10, t11 = stand_in_tensorrt("10.15.1"), stand_in_tensorrt("11.5.0")
    assert to_trt.network_flags(t10) == 1 << 1          # STRONGLY_TYPED, not the ignored EXPLICIT_BATCH
    assert to_trt.network_flags(t11) == 1 << 0
    assert t10.Builder(t10.Logger()).create_network(to_trt.network_flags(t10)).strongly_typed
    assert not t10.Builder(t10.Logger()).create_network(0).strongly_typed   # 10's default is weakly typed


def test_unsupported_tensorrt_majors_are_refused_naming_the_range(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", stand_in_tensorrt("12.0.0"))
    with pytest.raises(to_trt.TrtUnavailable, match=r"TensorRT 12.0.0 is not supported.*tensorrt>=10.0,<12"):
        to_trt.import_trt()


# --------------------------------------------------------------------------- building


def test_engines_are_strongly_typed_with_no_precision_flags(trt, built):
    folder, keys = built
    assert set(keys) == {"explainer", "explainer_nocheck", "explainer_topk", "audio_encoder", "text_encoder"}
    assert len(trt.built) == 5
    for network, config in trt.built:
        assert network.strongly_typed and not config.flags
    for graph, key in keys.items():
        assert (folder / f"{graph}.engine").is_file() and to_trt.engine_key(folder / f"{graph}.engine") == key
        assert key.tensorrt == trt.__version__ and key.precision == "fp16" and key.gpu == "stand-in GPU"
    assert keys["explainer"].profile["text"] == [[1, 1, D], [4, 2, D], [8, 8, D]]
    assert keys["explainer_topk"].profile["labels"] == [[1, D], [64, D], [64, D]]
    assert (folder / to_trt.TIMING_CACHE).is_file()


def test_matching_keys_are_kept_not_rebuilt(trt, built):
    folder, keys = built
    assert to_trt.export_engines(folder, max_batch=8, max_prompts=8, max_labels=64) == keys
    assert len(trt.built) == 5                     # nothing built the second time
    to_trt.export_engines(folder, max_batch=4, max_prompts=8, max_labels=64)
    assert len(trt.built) == 10                    # a new profile is a new key


def test_an_engine_from_another_tensorrt_is_refused_with_the_fix(trt, built, monkeypatch):
    folder, _ = built
    other = stand_in_tensorrt("11.5.0" if trt.__version__.startswith("10") else "10.15.1")
    with pytest.raises(ExportError, match=rf"built with TensorRT {trt.__version__}, this is {other.__version__}"
                                          r".*Rebuild it: lmaczs export --trt"):
        to_trt.load_engine(folder, "explainer", "cpu", other)


def test_a_failed_audit_builds_no_engine(trt, tmp_path):
    folder = write_folder(tmp_path / "bad", problems={"explainer": ["Resize '/model/Resize_3': not allowed in this graph"]})
    with pytest.raises(AuditError, match=r"explainer: Resize '/model/Resize_3'.*No engine was built"):
        to_trt.export_engines(folder)
    assert not list(folder.glob("*.engine")) and not trt.built


def test_fp16_must_match_the_graphs_precision(trt, tmp_path):
    folder = write_folder(tmp_path / "e")
    with pytest.raises(ExportError, match=r"holds fp16 graphs.*lmaczs export --fp32"):
        to_trt.export_engines(folder, fp16=False)


# --------------------------------------------------------------------------- running


def test_tensor_types_are_read_from_the_engine(trt, tmp_path):
    """Inputs are converted to each engine tensor's type (float32, float16, int32, int64, bool),
    outputs come back in theirs."""
    T = TensorProto
    names = {"f32": T.FLOAT, "h": T.FLOAT16, "i32": T.INT32, "i64": T.INT64, "b": T.BOOL}
    nodes = [helper.make_node("Cast", ["h"], ["h32"], to=T.FLOAT), helper.make_node("Add", ["f32", "h32"], ["o_f32"]),
             helper.make_node("Cast", ["o_f32"], ["o_h"], to=T.FLOAT16), helper.make_node("Add", ["i32", "i32"], ["o_i32"]),
             helper.make_node("Mul", ["i64", "two"], ["o_i64"]), helper.make_node("Not", ["b"], ["o_b"])]
    outs = {"o_f32": T.FLOAT, "o_h": T.FLOAT16, "o_i32": T.INT32, "o_i64": T.INT64, "o_b": T.BOOL}
    graph = helper.make_graph(nodes, "types", [_value(n, t, ["batch", 3]) for n, t in names.items()],
                              [_value(n, t, ["batch", 3]) for n, t in outs.items()],
                              initializer=[helper.make_tensor("two", T.INT64, [], [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "types.onnx"))
    spec = {"inputs": {n: ["batch", 3] for n in names}, "precision": "fp16"}
    to_trt.build_engine(tmp_path / "types.onnx", tmp_path / "types.engine", spec=spec, max_batch=4)
    engine = to_trt.TrtEngine((tmp_path / "types.engine").read_bytes(), trt, "cpu")
    assert engine.dtypes == {"f32": torch.float32, "h": torch.float16, "i32": torch.int32, "i64": torch.int64,
                             "b": torch.bool, "o_f32": torch.float32, "o_h": torch.float16, "o_i32": torch.int32,
                             "o_i64": torch.int64, "o_b": torch.bool}
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3)           # float64 in: converted per input
    out = engine.run({"f32": x, "h": x + 0.5, "i32": x, "i64": x, "b": x > 2})
    assert {n: t.dtype for n, t in out.items()} == {n: engine.dtypes[n] for n in outs}
    assert torch.equal(out["o_f32"], (2 * x + 0.5).float()) and torch.equal(out["o_h"], (2 * x + 0.5).half())
    assert torch.equal(out["o_i32"], (2 * x).int()) and torch.equal(out["o_i64"], (2 * x).long())
    assert torch.equal(out["o_b"], x <= 2)


def test_every_input_shape_is_checked_against_the_profile(trt, built):
    folder, _ = built
    engine = to_trt.load_engine(folder, "explainer", "cpu", trt)
    assert engine.max_size("waves", 0) == 8 and engine.max_size("text", 1) == 8
    with pytest.raises(ExportError, match=r"input 'waves' of shape \(9, 16\) is outside the engine's profile "
                                          r"\(1, 16\)\.\.\(8, 16\); chunk it"):
        engine.run({"waves": torch.zeros(9, N), "text": torch.zeros(9, 2, D)})


def test_runner_chunks_batch_and_prompts_to_the_profile(trt, built, inputs):
    """Batch 32 with 12 prompts through engines that take 8 of each: same as one big call."""
    from lmaczs_cli.backends import TrtRunner

    folder, _ = built
    waves, text, _ = inputs
    runner = TrtRunner(folder, device="cpu")
    out = runner.explain(waves, text)
    ref = ref_explain(waves.numpy(), text.numpy())
    assert out["masks"].dtype == torch.float32 and out["masks"].shape == (32, 12, 3, 2)
    for name, value in ref.items():
        np.testing.assert_allclose(out[name].numpy(), value, rtol=1e-4, atol=1e-4, err_msg=name)
    nocheck = runner.explain(waves, text, check=False)
    assert set(nocheck) == {"masks", "audio", "similarity"}
    np.testing.assert_allclose(nocheck["audio"].numpy(), ref["audio"], rtol=1e-4, atol=1e-4)


def test_runner_embeds_any_number_of_prompts_and_clips(trt, built, inputs):
    from lmaczs_cli.backends import TrtRunner
    from lmaczs_cli.clap import ClipBpeTokenizer

    folder, _ = built
    runner = TrtRunner(folder, device="cpu")
    prompts = [f"label number {i}" for i in range(50)]
    ids = ClipBpeTokenizer(CTX)(prompts)          # the wheel's own tokenizer: the folder's copy must agree
    got = runner.embed_text(prompts)
    assert got.dtype == torch.float32 and torch.equal(got, ids[:, :D].float())
    waves = inputs[0]
    emb = runner.embed_audio(waves)                # float16 engine output, float32 to the caller
    assert emb.dtype == torch.float32 and emb.shape == (32, D)
    assert torch.equal(emb, waves[:, :D].half().float())


@pytest.mark.parametrize("k", [3, 12])
def test_runner_top_k_over_50_labels(trt, built, inputs, k):
    """k=3 runs the one-pass top-k engine in batch chunks; k=12 is past its profile (8 prompts), so
    the scores come from the audio engine and the explanations from the chunked explainer."""
    from lmaczs_cli.backends import TrtRunner

    folder, _ = built
    waves, _, labels = inputs
    out = TrtRunner(folder, device="cpu").explain_topk(waves, labels, k)
    scores = waves[:, :D].half().float() @ labels.T if k > 8 else waves[:, :D] @ labels.T
    best = scores.topk(k, dim=-1).indices
    assert out["topk"].dtype == torch.int64 and torch.equal(out["topk"], best)
    np.testing.assert_allclose(out["scores"].numpy(), scores.numpy(), rtol=1e-4, atol=1e-4)
    ref = ref_explain(waves.numpy(), labels[best].numpy())
    np.testing.assert_allclose(out["similarity"].numpy(), ref["similarity"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["audio"].numpy(), ref["audio"], rtol=1e-4, atol=1e-4)


def test_runner_refuses_a_changed_tokenizer_file(trt, built):
    from lmaczs_cli.backends import BackendError, TrtRunner

    folder, _ = built
    with open(folder / "tokenizer" / CLIP_BPE_VOCAB, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BackendError, match="missing or changed since the export; re-run lmaczs export"):
        TrtRunner(folder, device="cpu")


def test_cli_export_with_a_failed_audit_exits_2_naming_the_node(trt, tmp_path, monkeypatch):
    """`lmaczs export --trt`: the audit's problem is named, exit 2, and no engine is written."""
    from click.testing import CliRunner

    import lmaczs_cli.export as export_pkg
    from lmaczs_cli.cli import main
    from lmaczs_cli.export.to_onnx import read_manifest

    def fake_export(out, **kwargs):
        write_folder(out, problems={"explainer_topk": ["Cast '/model/Cast_7': to double, a type TensorRT lacks; "
                                                       "cast to float32"]})
        return read_manifest(out)

    monkeypatch.setattr(export_pkg, "export_explainer_folder", fake_export)
    out = tmp_path / "e"
    result = CliRunner().invoke(main, ["export", "--trt", "--fp16", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "explainer_topk: Cast '/model/Cast_7': to double, a type TensorRT lacks" in result.output
    assert "No engine was built" in result.output
    assert not list(out.glob("*.engine")) and not trt.built
