"""torch -> ONNX: one function per graph, plus the manifest that describes them.

We call ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer) on purpose: torch 2.14
defaults to the dynamo exporter, which needs the ``onnxscript`` package (not a dependency of
lmaczs), and the graphs here are plain traced tensor programs with two dynamic axes that the
tracer handles once laion's frozen-batch ``window_reverse`` is patched (``graphs.export_patches``).

Precision is written into the graphs, never left to a runtime's flags: ``fp16=True`` traces the
audio encoder and the decoder with float16 weights, so every graph but the text encoder holds
float16 layers between explicit Casts, while the STFT, power, mel, log, masking and inverse STFT
stay float32 (``lmaczs_cli.model``). TensorRT builds such a graph as a strongly typed network
(the only kind TensorRT 11 has). Every float output is float32 either way.

An export folder is self-contained: the graphs, ``manifest.json`` and the tokenizer files
(``tokenizer/``), so ``--backend onnx|trt --engines DIR`` needs nothing else.
"""
from __future__ import annotations

import contextlib
import json
import platform
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from lmaczs_cli.audio import CLIP_SAMPLES, N_FRAMES
from lmaczs_cli.clap import ClapModel
from lmaczs_cli.decoder import MaskDecoder, decoder_hash
from lmaczs_cli.errors import LmaczsError
from lmaczs_cli.files import atomic_path, sha256_file

from .graphs import (AudioEncoderGraph, ExplainerGraph, ExplainerTopkGraph, SpectrumExplainerGraph,
                     SpectrumExplainerTopkGraph, TextEncoderGraph, export_patches)

MANIFEST_FORMAT = "lmaczs-export/1"
AUDIO_ENCODER, TEXT_ENCODER, EXPLAINER = "audio_encoder.onnx", "text_encoder.onnx", "explainer.onnx"
EXPLAINER_NOCHECK, EXPLAINER_TOPK = "explainer_nocheck.onnx", "explainer_topk.onnx"
EXPLAINER_TOPK_NOCHECK = "explainer_topk_nocheck.onnx"
TOKENIZER_DIR = "tokenizer"
CLIP_BPE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"     # laion's CLIP BPE merges (ships in the laion-clap wheel)


class ExportError(LmaczsError):
    """An export could not be written or read back; the message names the fix."""


@dataclass(frozen=True)
class GraphSpec:
    """What the manifest says about one graph: names, shapes (str = dynamic axis), file hash."""

    file: str
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    dynamic_axes: dict[str, dict[int, str]]
    sha256: str
    precision: str = "fp32"          # "fp16": half-precision layers between explicit Casts (see the module doc)
    dtypes: dict[str, str] = field(default_factory=dict)   # input / output name -> ONNX element type

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": self.inputs, "outputs": self.outputs,
                "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()},
                "sha256": self.sha256, "precision": self.precision, "dtypes": self.dtypes}


class _Float32Outputs(torch.nn.Module):
    """The traced module with every floating-point output cast to float32 (a half-precision
    graph keeps float32 outputs; integer outputs such as top-k indices are left alone)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> Any:
        out = self.module(*args)
        single = isinstance(out, torch.Tensor)
        out = tuple(t.float() if t.is_floating_point() else t for t in ((out,) if single else out))
        return out[0] if single else out


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    """Trace ``module`` on ``args`` and write ``path`` atomically, then run onnx's full checker."""
    import onnx

    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)   # constant sizes are intended (not batch)
        # known, harmless: the flips of the reflect padding (negative-step Slice) are not folded;
        # the text tower's eot Gather uses non-negative argmax indices
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(_Float32Outputs(module), args, str(tmp), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                          dynamo=False)
        onnx.checker.check_model(str(tmp), full_check=True)


def _shapes(names: list[str], example: tuple[torch.Tensor, ...], dyn: dict[str, dict[int, str]]) -> dict[str, list]:
    return {n: [dyn.get(n, {}).get(i, d) for i, d in enumerate(t.shape)] for n, t in zip(names, example)}


def _spec(path: Path, names_in: list[str], args: tuple, names_out: list[str], outs: tuple,
          dyn: dict[str, dict[int, str]]) -> GraphSpec:
    precision, dtypes = graph_types(path)
    return GraphSpec(path.name, _shapes(names_in, args, dyn), _shapes(names_out, outs, dyn), dyn, sha256_file(path),
                     precision, dtypes)


def graph_types(path: Path) -> tuple[str, dict[str, str]]:
    """(precision, {input/output name: element type}) of an ONNX file: "fp16" when any weight or
    Cast in it is float16, else "fp32"."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    name = onnx.helper.tensor_dtype_to_string
    dtypes = {v.name: name(v.type.tensor_type.elem_type).removeprefix("TensorProto.").lower()
              for v in [*model.graph.input, *model.graph.output]}
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
        for n in model.graph.node)
    return ("fp16" if half else "fp32"), dtypes


@contextlib.contextmanager
def half_precision(clap: ClapModel, decoder: MaskDecoder, enabled: bool = True) -> Iterator[None]:
    """For the duration of the block: the CLAP audio encoder (branch + projection) and the decoder
    hold float16 weights; the text tower stays float32 (half-precision text encoders overflow).
    The float32 weights are put back exactly on exit."""
    if not enabled:
        yield
        return
    parts = [clap.clap.audio_branch, clap.clap.audio_projection, decoder]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in parts]
    try:
        for m in parts:
            m.half()
        yield
    finally:
        for m, sd in zip(parts, saved):
            m.float()
            m.load_state_dict(sd)


def copy_tokenizer(clap: ClapModel, out: Path) -> dict[str, Any]:
    """Copy the CLAP's tokenizer files into ``out/tokenizer`` and describe them for the manifest:
    laion's CLIP BPE merges for CLIP-style text towers, the RoBERTa tokenizer's saved files
    (vocab.json, merges.txt, ...) for RoBERTa towers."""
    folder = out / TOKENIZER_DIR
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if clap.cfg.is_roberta:
        hf = getattr(clap.tokenizer, "_tok", None)
        if hf is None or not hasattr(hf, "save_pretrained"):
            raise ExportError(f"cannot copy the RoBERTa tokenizer of {clap.source} into the export folder "
                              f"(a {type(clap.tokenizer).__name__}); load the CLAP with --tokenizer DIR")
        hf.save_pretrained(str(folder))
        kind = "roberta"
    else:
        from lmaczs_cli.laion import laion_module

        shutil.copyfile(Path(laion_module("tokenizer").default_bpe()), folder / CLIP_BPE_VOCAB)
        kind = "clip-bpe"
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    return {"kind": kind, "context_length": clap.cfg.context_length, "dir": TOKENIZER_DIR, "files": files}


def export_audio_encoder(clap: ClapModel, path: Path, opset: int = 17) -> GraphSpec:
    """waves (B, 480000) -> embedding (B, D), h1..h4 (B, C_i, H_i, W_i)."""
    graph = AudioEncoderGraph(clap).eval()
    args = (torch.zeros(2, CLIP_SAMPLES).uniform_(-0.5, 0.5),)
    names_out = ["embedding", "h1", "h2", "h3", "h4"]
    dyn = {n: {0: "batch"} for n in ["waves", *names_out]}
    with export_patches(clap):
        _export(graph, args, path, ["waves"], names_out, dyn, opset)
        with torch.no_grad():
            outs = graph(*args)
    return _spec(path, ["waves"], args, names_out, outs, dyn)


def export_text_encoder(clap: ClapModel, path: Path, opset: int = 17) -> GraphSpec:
    """Token ids (B, context) [+ attention_mask for RoBERTa] -> embedding (B, D). Always fp32:
    fp16 text encoders are known to overflow."""
    graph = TextEncoderGraph(clap).eval()
    tokens = clap.tokenize(["a dog barking", "rain on a window"])
    if isinstance(tokens, dict):
        names_in, args = ["input_ids", "attention_mask"], (tokens["input_ids"], tokens["attention_mask"])
    else:
        names_in, args = ["input_ids"], (tokens.long(),)
    dyn = {n: {0: "batch"} for n in [*names_in, "embedding"]}
    _export(graph, args, path, names_in, ["embedding"], dyn, opset)
    with torch.no_grad():
        out = graph(*args)
    return _spec(path, names_in, args, ["embedding"], (out,), dyn)


def _write_explainer(clap: ClapModel, graph: torch.nn.Module, path: Path, front: dict[str, torch.Tensor],
                     back: dict[str, torch.Tensor], topk: bool, opset: int) -> GraphSpec:
    """Trace an explainer graph whose inputs are ``front`` (per clip), then text (B, K, D) or
    labels (L, D) and k (K,) (``topk``), then ``back`` (per clip), and describe it."""
    D = clap.cfg.joint_dim
    # batch 2, K 3 (and L 5) when tracing: sizes of 1 invite broadcasting shortcuts, equal sizes mix up axes
    if topk:
        prompts = {"labels": torch.nn.functional.normalize(torch.randn(5, D), dim=-1), "k": torch.zeros(3)}
    else:
        prompts = {"text": torch.nn.functional.normalize(torch.randn(2, 3, D), dim=-1)}
    inputs = {**front, **prompts, **back}
    names_in, names_out, args = list(inputs), list(graph.outputs), tuple(inputs.values())
    dyn = {n: {0: "batch", 1: "prompts"} for n in names_out}
    dyn.update({n: {0: "batch"} for n in [*front, *back]})
    if topk:
        dyn.update(labels={0: "labels"}, k={0: "prompts"}, scores={0: "batch", 1: "labels"})
    else:
        dyn["text"] = {0: "batch", 1: "prompts"}
    with export_patches(clap):
        _export(graph, args, path, names_in, names_out, dyn, opset)
        with torch.no_grad():
            outs = graph(*args)
    return _spec(path, names_in, args, names_out, outs, dyn)


def _trace_waves() -> torch.Tensor:
    return torch.zeros(2, CLIP_SAMPLES).uniform_(-0.5, 0.5)


def export_explainer(clap: ClapModel, decoder: MaskDecoder, path: Path, domain: str,
                     mel_to_linear: str = "linear", opset: int = 17, check: bool = True) -> GraphSpec:
    """The fused graph: waves (B, 480000), text (B, K, D) -> masks (B, K, 1001, bins),
    audio (B, K, 480000), similarity (B, K), masked_similarity (B, K) (``check=False``: without
    the masked check, whose second encoder pass is then not in the graph)."""
    graph = ExplainerGraph(clap, decoder, domain, mel_to_linear, check=check).eval()
    return _write_explainer(clap, graph, path, {"waves": _trace_waves()}, {}, False, opset)


def export_explainer_topk(clap: ClapModel, decoder: MaskDecoder, path: Path, domain: str,
                          mel_to_linear: str = "linear", opset: int = 17, check: bool = True) -> GraphSpec:
    """Top-k in one encoder pass: waves (B, 480000), labels (L, D), k (K,) -> scores (B, L),
    topk (B, K) int64, then masks, audio, similarity[, masked_similarity] as `export_explainer`'s
    for each window's K best labels. K is the length of ``k``."""
    graph = ExplainerTopkGraph(clap, decoder, domain, mel_to_linear, check=check).eval()
    return _write_explainer(clap, graph, path, {"waves": _trace_waves()}, {}, True, opset)


def export_spectrum_explainer(clap: ClapModel, decoder: MaskDecoder, path: Path, domain: str,
                              mel_to_linear: str = "linear", opset: int = 17, check: bool = True,
                              topk: bool = False) -> GraphSpec:
    """The explainer (``topk``: its one-pass top-k form) without its spectral ends
    (`graphs.SpectrumExplainerGraph`): mel (B, 1001, 64) mel power, then text (B, K, D) or
    labels (L, D) and k (K,), then, for STFT masks, power (B, 1001, 513) -> the fused graph's
    outputs but audio."""
    from lmaczs_cli.model import FftSpectral

    cls = SpectrumExplainerTopkGraph if topk else SpectrumExplainerGraph
    graph = cls(clap, decoder, domain, mel_to_linear, check=check).eval()
    spec = FftSpectral().analyse(_trace_waves(), with_power=domain == "stft")
    back = {"power": spec.power} if domain == "stft" else {}
    return _write_explainer(clap, graph, path, {"mel": spec.mel}, back, topk, opset)


def _audit(out: Path, graphs: dict[str, GraphSpec]) -> dict[str, Any]:
    """Each graph against the pinned TensorRT operator table and the types TensorRT takes
    (``audit``): its problems, [] if none."""
    from .audit import EXPLAINER_FORBIDDEN, audit, trt_table

    result: dict[str, Any] = {"tensorrt": trt_table()["tensorrt_version"], "source": trt_table()["source"]}
    for name, g in graphs.items():
        result[name] = audit(out / g.file, EXPLAINER_FORBIDDEN if name.startswith("explainer") else ())
    return result


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import onnx

    return {"lmaczs": version("lmaczs"), "torch": torch.__version__, "onnx": onnx.__version__,
            "python": platform.python_version()}


def export_onnx(clap: ClapModel, decoder: MaskDecoder, out: str | Path, *, domain: str,
                mel_to_linear: str = "linear", opset: int = 17, max_batch: int = 8,
                fp16: bool = False) -> dict[str, Any]:
    """Write the graphs (audio and text encoders; the explainer and its one-pass top-k form, each
    with and without the masked check) and ``manifest.json`` into ``out``; returns the manifest.

    ``max_batch`` is recorded for engine builds; the ONNX graphs take any batch size. ``fp16``:
    the audio encoder and decoder layers in float16 (see the module doc; the text encoder, the
    spectral front end and the inverse STFT stay float32). The tokenizer files are copied in.
    Audit problems are recorded in the manifest (``audit_problems``); engines are refused then."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clap, decoder = clap.to("cpu").eval(), decoder.to("cpu").eval()
    with half_precision(clap, decoder, enabled=fp16):
        graphs = {
            "audio_encoder": export_audio_encoder(clap, out / AUDIO_ENCODER, opset),
            "text_encoder": export_text_encoder(clap, out / TEXT_ENCODER, opset),
            "explainer": export_explainer(clap, decoder, out / EXPLAINER, domain, mel_to_linear, opset),
            "explainer_nocheck": export_explainer(clap, decoder, out / EXPLAINER_NOCHECK, domain, mel_to_linear,
                                                  opset, check=False),
            "explainer_topk": export_explainer_topk(clap, decoder, out / EXPLAINER_TOPK, domain, mel_to_linear,
                                                    opset),
            "explainer_topk_nocheck": export_explainer_topk(clap, decoder, out / EXPLAINER_TOPK_NOCHECK, domain,
                                                            mel_to_linear, opset, check=False),
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "opset": opset,
        "max_batch": max_batch,
        "domain": domain,
        "mel_to_linear": mel_to_linear,
        "mask_shape": [N_FRAMES, decoder.cfg.mask_bins],
        "joint_dim": clap.cfg.joint_dim,
        "precision": "fp16" if fp16 else "fp32",
        "tokenizer": copy_tokenizer(clap, out),
        "sources": {"clap": {"source": clap.source, "identity": clap.identity(), "config": clap.cfg.to_json()},
                    "decoder": {"sha256": decoder_hash(decoder), "config": decoder.cfg.to_json()}},
        "versions": _versions(),
        "graphs": {k: g.to_json() for k, g in graphs.items()},
        "tensorrt_audit": _audit(out, graphs),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    with atomic_path(out / "manifest.json") as tmp:
        tmp.write_text(text)
    return json.loads(text)          # as a reader will see it (tuples become lists)


class AuditError(ExportError):
    """An exported graph holds an op or type TensorRT cannot take (the export audit); no engine is built."""


def audit_problems(manifest: dict[str, Any]) -> list[str]:
    """The export audit's problems recorded in a manifest, each as "graph: problem" ([] when none)."""
    checked = manifest.get("tensorrt_audit", {})
    return [f"{g}: {p}" for g in manifest["graphs"] for p in checked.get(g, [])]


def check_audit(manifest: dict[str, Any], folder: str | Path) -> None:
    """Raise `AuditError` naming the first problem (and how many) when the export audit found any."""
    problems = audit_problems(manifest)
    if problems:
        more = f" (and {len(problems) - 1} more, listed in {Path(folder) / 'manifest.json'})" if len(problems) > 1 else ""
        raise AuditError(f"the TensorRT audit of {folder} failed: {problems[0]}{more}. No engine was built; "
                         "change the model code so the graph avoids it, then re-export")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, checked for format and for the graph files it names."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise ExportError(f"{folder}: no manifest.json; pass a folder written by `lmaczs export --out`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}; re-run lmaczs export")
    for g in manifest["graphs"].values():
        if not (folder / g["file"]).is_file():
            raise ExportError(f"{folder}: {g['file']} is missing; re-run lmaczs export")
    return manifest
