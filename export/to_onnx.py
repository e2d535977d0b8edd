"""torch -> ONNX: one function per graph, plus the manifest that describes them.

We call ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer) on purpose: torch 2.14
defaults to the dynamo exporter, which needs the ``onnxscript`` package (not a dependency of
lmaczs), and the graphs here are plain traced tensor programs with two dynamic axes that the
tracer handles once laion's frozen-batch ``window_reverse`` is patched (``graphs.export_patches``).
"""
from __future__ import annotations

import hashlib
import json
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmaczs_cli.audio import CLIP_SAMPLES, N_FRAMES
from lmaczs_cli.clap import ClapModel
from lmaczs_cli.decoder import MaskDecoder
from lmaczs_cli.errors import LmaczsError
from lmaczs_cli.files import atomic_path, sha256_file

from .graphs import AudioEncoderGraph, ExplainerGraph, TextEncoderGraph, export_patches

MANIFEST_FORMAT = "lmaczs-export/1"
AUDIO_ENCODER, TEXT_ENCODER, EXPLAINER = "audio_encoder.onnx", "text_encoder.onnx", "explainer.onnx"


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

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": self.inputs, "outputs": self.outputs,
                "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()},
                "sha256": self.sha256}


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
        torch.onnx.export(module, args, str(tmp), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                          dynamo=False)
        onnx.checker.check_model(str(tmp), full_check=True)


def _shapes(names: list[str], example: tuple[torch.Tensor, ...], dyn: dict[str, dict[int, str]]) -> dict[str, list]:
    return {n: [dyn.get(n, {}).get(i, d) for i, d in enumerate(t.shape)] for n, t in zip(names, example)}


def _spec(path: Path, names_in: list[str], args: tuple, names_out: list[str], outs: tuple,
          dyn: dict[str, dict[int, str]]) -> GraphSpec:
    return GraphSpec(path.name, _shapes(names_in, args, dyn), _shapes(names_out, outs, dyn), dyn, sha256_file(path))


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


def export_explainer(clap: ClapModel, decoder: MaskDecoder, path: Path, domain: str,
                     mel_to_linear: str = "linear", opset: int = 17) -> GraphSpec:
    """The fused graph: waves (B, 480000), text (B, K, D) -> masks (B, K, 1001, bins),
    audio (B, K, 480000), similarity (B, K), masked_similarity (B, K)."""
    graph = ExplainerGraph(clap, decoder, domain, mel_to_linear).eval()
    D = clap.cfg.joint_dim
    # batch 2 and K 3 when tracing: sizes of 1 invite broadcasting shortcuts, equal sizes mix up axes
    text = torch.nn.functional.normalize(torch.randn(2, 3, D), dim=-1)
    args = (torch.zeros(2, CLIP_SAMPLES).uniform_(-0.5, 0.5), text)
    names_in, names_out = ["waves", "text"], ["masks", "audio", "similarity", "masked_similarity"]
    dyn = {n: {0: "batch", 1: "prompts"} for n in ["text", *names_out]}
    dyn["waves"] = {0: "batch"}
    with export_patches(clap):
        _export(graph, args, path, names_in, names_out, dyn, opset)
        with torch.no_grad():
            outs = graph(*args)
    return _spec(path, names_in, args, names_out, outs, dyn)


def decoder_hash(decoder: MaskDecoder) -> str:
    """sha256 over the decoder config and weights."""
    h = hashlib.sha256(json.dumps(decoder.cfg.to_json(), sort_keys=True).encode())
    for name, t in sorted(decoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _audit(out: Path, graphs: dict[str, GraphSpec]) -> dict[str, Any]:
    """Each graph against the pinned TensorRT operator table (``audit``): its problems, [] if none."""
    from .audit import EXPLAINER_FORBIDDEN, audit, trt_table

    result: dict[str, Any] = {"tensorrt": trt_table()["tensorrt_version"], "source": trt_table()["source"]}
    for name, g in graphs.items():
        result[name] = audit(out / g.file, EXPLAINER_FORBIDDEN if name == "explainer" else ())
    return result


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import onnx

    return {"lmaczs": version("lmaczs"), "torch": torch.__version__, "onnx": onnx.__version__,
            "python": platform.python_version()}


def export_onnx(clap: ClapModel, decoder: MaskDecoder, out: str | Path, *, domain: str,
                mel_to_linear: str = "linear", opset: int = 17, max_batch: int = 8) -> dict[str, Any]:
    """Write the three graphs and ``manifest.json`` into ``out``; returns the manifest.

    ``max_batch`` is recorded for engine builds; the ONNX graphs take any batch size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clap, decoder = clap.to("cpu").eval(), decoder.to("cpu").eval()
    graphs = {
        "audio_encoder": export_audio_encoder(clap, out / AUDIO_ENCODER, opset),
        "text_encoder": export_text_encoder(clap, out / TEXT_ENCODER, opset),
        "explainer": export_explainer(clap, decoder, out / EXPLAINER, domain, mel_to_linear, opset),
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "opset": opset,
        "max_batch": max_batch,
        "domain": domain,
        "mel_to_linear": mel_to_linear,
        "mask_shape": [N_FRAMES, decoder.cfg.mask_bins],
        "joint_dim": clap.cfg.joint_dim,
        "tokenizer": {"kind": "roberta" if clap.cfg.is_roberta else "clip-bpe",
                      "context_length": clap.cfg.context_length},
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
