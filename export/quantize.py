"""Optional int8 variants of an export's graphs, for ONNX Runtime on the CPU.

``lmaczs export --int8`` (``add_int8``) writes ``<graph>_int8.onnx`` beside each audio-side graph:
ONNX Runtime's dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``) of the CLAP
audio encoder's Swin-block MatMuls only -- the MatMuls with a weight, under ``/layers.`` in the
traced names (attention qkv / proj, MLP fc1 / fc2), where most of the CPU time goes. Their
weights become int8 (per output channel) and their inputs are quantised to uint8 per call. The
decoder and the text encoder stay float32.

The int8 explainers are CPU graphs, and they leave the STFT and its inverse out
(`graphs.SpectrumExplainerGraph`: mel power in, no audio out): the runner computes both with
torch's FFT around the graph. The fused graphs' MatMul DFTs are the form TensorRT takes; on the
CPU they cost several times torch's FFT (``bench/run.py --sections spectral``, 2 threads: the
analysis 8-11 ms a clip in ONNX Runtime against 2 ms, ONNX Runtime's own STFT op 18-20 ms; the
inverse 10 ms against 3 ms), and with the encoder in int8 they are a large part of a clip's
time. So each int8 explainer is traced anew from the models (``clap``, ``decoder``: those the
folder was exported from) and then quantised. The int8 audio encoder is the quantised float32
graph, its STFT still MatMul DFTs (it serves the label scores of a two-pass top-k and
``embed_audio``).

Each variant is audited against its float32 graph on fixed test clips before it is kept:
the audio embeddings' cosine, and the masks' mean and 99th-percentile absolute difference (an
explainer's audio, as the runner makes it from the int8 masks, is recorded beside them as its SNR
against the fused graph's audio; the mask bounds are what gate). A variant that drifts past a
bound is deleted and the export fails naming the figure; the float32 graphs stay as they were.
The manifest records the variants and their audit under ``int8``; ``OnnxRunner(precision="int8")``
runs them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmaczs_cli.audio import CLIP_SAMPLES, SAMPLE_RATE
from lmaczs_cli.files import atomic_path, sha256_file

from .to_onnx import ExportError, GraphSpec, graph_types, read_manifest

INT8_GRAPHS = ("audio_encoder", "explainer", "explainer_nocheck", "explainer_topk", "explainer_topk_nocheck")
# what the audit allows (fp32 vs int8 on the audit clips)
MIN_EMBEDDING_COSINE = 0.99
MAX_MASK_MEAN_DIFF = 0.02
MAX_MASK_P99_DIFF = 0.1


class QuantizationError(ExportError):
    """An int8 variant drifted too far from its float32 graph (the audit); it was not kept."""


def int8_file(graph_file: str) -> str:
    return graph_file.removesuffix(".onnx") + "_int8.onnx"


def quantized_nodes(model: Any) -> list[str]:
    """The names of the MatMul nodes to quantise: the audio encoder's Swin-block layers (a weight
    as one input, ``/layers.`` in the name)."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and "/layers." in n.name and any(i in weights for i in n.input)]


def quantize_graph(src: Path, dst: Path) -> int:
    """Write the int8 variant of the graph ``src`` to ``dst``; returns how many MatMuls it quantised."""
    import logging
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_logger = logging.getLogger()          # onnxruntime.quantization logs on the root logger
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(dir=dst.parent) as work, atomic_path(dst) as tmp:
            # ONNX Runtime's basic optimisation folds the weight Transposes of the masked encoder
            # pass (traced twice, its weights shared), so every encoder MatMul has a weight input
            folded = Path(work) / "folded.onnx"
            quant_pre_process(str(src), str(folded), skip_onnx_shape=True, skip_symbolic_shape=True)
            nodes = quantized_nodes(onnx.load(str(folded), load_external_data=False))
            if not nodes:
                raise ExportError(f"{src.name}: no encoder MatMul to quantise")
            quantize_dynamic(str(folded), str(tmp), op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                             per_channel=True, weight_type=QuantType.QInt8)
    finally:
        quant_logger.setLevel(level)
    onnx.checker.check_model(str(dst), full_check=True)
    return len(nodes)


def audit_clips(n: int = 2, seed: int = 0) -> np.ndarray:
    """Fixed 10-s audit clips: a noise floor, a chirp and a tone burst each (float32, (n, 480000))."""
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    out = 0.02 * rng.standard_normal((n, CLIP_SAMPLES))
    for k in range(n):
        f0 = rng.uniform(100, 1000)
        out[k] += 0.2 * np.sin(2 * np.pi * (f0 + 300 * t) * t)
        on = (t > rng.uniform(1, 6)) & (t < rng.uniform(7, 9))
        out[k, on] += 0.3 * np.sin(2 * np.pi * rng.uniform(2000, 8000) * t[on])
    return out.astype(np.float32)


def _feeds(graph: str, manifest: dict[str, Any], waves: np.ndarray, inputs: list[str]) -> dict[str, np.ndarray]:
    """The audit inputs of ``graph`` for a graph taking ``inputs``: the clips as waves, or as
    their analysis (mel, power) for a spectrum graph, and fixed random prompts."""
    from lmaczs_cli.backends import spectrum_feeds
    from lmaczs_cli.model import FftSpectral

    rng = np.random.default_rng(1)
    D = manifest["joint_dim"]

    def unit(*shape: int) -> np.ndarray:
        x = rng.standard_normal((*shape, D)).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    if "mel" in inputs:
        clips = spectrum_feeds(FftSpectral().analyse(torch.from_numpy(waves), with_power="power" in inputs))
    else:
        clips = {"waves": waves}
    if graph == "audio_encoder":
        return clips
    if graph.startswith("explainer_topk"):
        return {**clips, "labels": unit(5), "k": np.zeros(2, np.float32)}
    return {**clips, "text": unit(len(waves), 2)}


def compare(graph: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """The audit figures of one graph: embedding cosine (audio encoder) or mask differences."""
    if graph == "audio_encoder":
        a, b = ref["embedding"], got["embedding"]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        return {"embedding_cosine_min": float(cos.min())}
    diff = np.abs(ref["masks"] - got["masks"])
    figures = {"mask_mean_abs_diff": float(diff.mean()), "mask_p99_abs_diff": float(np.quantile(diff, 0.99)),
               "similarity_max_abs_diff": float(np.abs(ref["similarity"] - got["similarity"]).max())}
    if "masked_similarity" in ref:
        figures["masked_similarity_max_abs_diff"] = float(np.abs(ref["masked_similarity"]
                                                                 - got["masked_similarity"]).max())
    if "topk" in ref:
        figures["topk_agreement"] = float((ref["topk"] == got["topk"]).mean())
    if "audio" in ref and "audio" in got:          # the explanation heard, against the fused graph's
        err = float(((got["audio"] - ref["audio"]) ** 2).sum())
        figures["audio_snr_db"] = float(10 * np.log10(float((ref["audio"] ** 2).sum()) / max(err, 1e-30)))
    return figures


def drift(figures: dict[str, float]) -> str | None:
    """The first audit figure past its bound, described; None when all are within."""
    bounds = [("embedding_cosine_min", MIN_EMBEDDING_COSINE, False), ("mask_mean_abs_diff", MAX_MASK_MEAN_DIFF, True),
              ("mask_p99_abs_diff", MAX_MASK_P99_DIFF, True)]
    for name, bound, upper in bounds:
        if name in figures and (figures[name] > bound if upper else figures[name] < bound):
            return f"{name} {figures[name]:.4f} ({'max' if upper else 'min'} {bound})"
    return None


def _check_sources(manifest: dict[str, Any], clap: Any, decoder: Any, folder: Path) -> None:
    """The models given are those the folder was exported from (CLAP identity, decoder hash)."""
    from lmaczs_cli.decoder import decoder_hash

    sources = manifest["sources"]
    if clap.identity() != sources["clap"]["identity"] or decoder_hash(decoder) != sources["decoder"]["sha256"]:
        raise ExportError(f"{folder} was exported from another CLAP or decoder than the ones given for its int8 "
                          "graphs; export again with --int8")


def add_int8(folder: str | Path, clap: Any, decoder: Any, *, graphs: tuple[str, ...] = INT8_GRAPHS,
             clips: int = 2) -> dict[str, Any]:
    """Quantise and audit the int8 variants of ``graphs`` in an export folder, and record them in
    its manifest (``int8``: {graphs: {name: spec}, audit: {name: figures}}); returns the manifest.
    ``clap``, ``decoder``: the models the folder was exported from (moved to the CPU, in eval
    mode); the int8 explainers are traced from them without their spectral ends (see the module
    doc). Raises `ExportError` when the models are not the folder's (its manifest's CLAP identity
    and decoder hash), and `QuantizationError` when a variant drifts past a bound; either way no
    variant is kept and the manifest is unchanged."""
    import tempfile

    import onnxruntime as ort

    from lmaczs_cli.backends import DenormalFreeCaller, heard, session_options
    from lmaczs_cli.model import FftSpectral

    from .to_onnx import export_spectrum_explainer

    folder = Path(folder)
    manifest = read_manifest(folder)
    _check_sources(manifest, clap, decoder, folder)
    clap, decoder = clap.to("cpu").eval(), decoder.to("cpu").eval()
    waves = audit_clips(clips)
    call = DenormalFreeCaller()              # sessions made and run off this thread (`OnnxRunner.session`)
    specs, figures, written = {}, {}, []
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".int8-") as work:
            for graph in [g for g in graphs if g in manifest["graphs"]]:
                fp32 = manifest["graphs"][graph]
                path = folder / int8_file(fp32["file"])
                written.append(path)
                if graph == "audio_encoder":
                    src, spec = folder / fp32["file"], fp32
                else:
                    src = Path(work) / fp32["file"]
                    spec = export_spectrum_explainer(clap, decoder, src, manifest["domain"], manifest["mel_to_linear"],
                                                     manifest["opset"], check="nocheck" not in graph,
                                                     topk=graph.startswith("explainer_topk")).to_json()
                count = quantize_graph(src, path)
                outs = {}
                runs = (("fp32", folder / fp32["file"], fp32["inputs"]), ("int8", path, spec["inputs"]))
                for name, file, inputs in runs:
                    s = call(ort.InferenceSession, str(file), session_options(), ["CPUExecutionProvider"])
                    names = [o.name for o in s.get_outputs()]
                    outs[name] = dict(zip(names, call(s.run, names, _feeds(graph, manifest, waves, list(inputs)))))
                if "audio" in outs["fp32"] and "audio" not in outs["int8"]:
                    spectrum = FftSpectral().analyse(torch.from_numpy(waves), with_power=False)
                    outs["int8"]["audio"] = heard(spectrum, torch.from_numpy(outs["int8"]["masks"]), manifest["domain"],
                                                  manifest["mel_to_linear"], waves.shape[-1]).numpy()
                figures[graph] = {"quantized_matmuls": count, **compare(graph, outs["fp32"], outs["int8"])}
                bad = drift(figures[graph])
                if bad:
                    raise QuantizationError(f"the int8 variant of {graph} drifts from its float32 graph: {bad} on the "
                                            "audit clips; it was not kept (the float32 graphs are unchanged)")
                _, dtypes = graph_types(path)
                axes = {k: {int(a): n for a, n in v.items()} for k, v in spec["dynamic_axes"].items()}
                specs[graph] = GraphSpec(path.name, spec["inputs"], spec["outputs"], axes, sha256_file(path), "int8",
                                         dtypes).to_json()
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    manifest["int8"] = {"graphs": specs, "audit": figures,
                        "bounds": {"embedding_cosine_min": MIN_EMBEDDING_COSINE,
                                   "mask_mean_abs_diff": MAX_MASK_MEAN_DIFF, "mask_p99_abs_diff": MAX_MASK_P99_DIFF}}
    text = json.dumps(manifest, indent=2) + "\n"
    with atomic_path(folder / "manifest.json") as tmp:
        tmp.write_text(text)
    return json.loads(text)
