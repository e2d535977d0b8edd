"""ONNX and TensorRT export: ``lmaczs export``.

  to_onnx   torch -> the graphs (audio / text encoders, explainer with and without the check,
            top-k explainer; float32 or ``--fp16``), tokenizer files, manifest.json
  to_trt    ONNX -> strongly typed TensorRT engines (plain plans + sidecar keys), TensorRT 10.x / 11.x
  graphs    the traced modules and the patches that make laion's HTSAT export cleanly
  ops       STFT / iSTFT / bicubic stretch as slicing, concatenation and MatMul
  audit     op and type audit against the pinned TensorRT table (trt_ops.json); a problem fails the export
  quantize  optional int8 variants of the audio-side graphs (``--int8``, ONNX Runtime on the CPU;
            explainers without their STFT ends), audited against fp32
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def export_explainer_folder(out: str | Path, *, clap: str = "demo", decoder: str | Path | None = None,
                            tokenizer: str | Path | None = None, force: bool = False, opset: int = 17,
                            max_batch: int = 8, fp16: bool = False, int8: bool = False) -> dict[str, Any]:
    """Load a CLAP + decoder as `Explainer.load` does and write its ONNX graphs (float16 encoder
    and decoder layers with ``fp16``) and tokenizer files into ``out``; with ``int8``, also the
    audited int8 variants of the audio-side graphs (``quantize.add_int8``; its explainers take
    the clips' mel power, the runner computing the STFT and its inverse with torch).

    Returns the manifest; its audit problems (``to_onnx.audit_problems``) make
    ``to_trt.export_engines(out, ...)`` refuse to build."""
    from lmaczs_cli.backends import load_models

    from .to_onnx import ExportError, export_onnx

    if int8 and fp16:
        raise ExportError("--int8 quantises the float32 graphs for ONNX Runtime on the CPU; --fp16 is for TensorRT "
                          "on a GPU: export them into two folders")
    clap_model, dec, config = load_models(clap, decoder, tokenizer, force)
    if int8 and not clap_model.cfg.is_htsat:
        raise ExportError(f"--int8 quantises the Swin blocks of an HTSAT audio encoder; this CLAP's is "
                          f"{clap_model.cfg.audio}: export without --int8")
    domain = config.get("domain", dec.cfg.domain)
    manifest = export_onnx(clap_model, dec, out, domain=domain, mel_to_linear=config.get("mel_to_linear", "linear"),
                           opset=opset, max_batch=max_batch, fp16=fp16)
    if int8:
        from .quantize import add_int8

        manifest = add_int8(out, clap_model, dec)
    return manifest
