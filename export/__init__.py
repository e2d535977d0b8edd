"""ONNX and TensorRT export: ``lmaczs export``.

  to_onnx   torch -> audio_encoder.onnx, text_encoder.onnx, explainer.onnx, manifest.json
  to_trt    ONNX -> TensorRT engines (plain plans + sidecar keys)
  graphs    the traced modules and the patches that make laion's HTSAT export cleanly
  ops       STFT / iSTFT / bicubic stretch as slicing, concatenation and MatMul
  audit     operator audit against the pinned TensorRT table (trt_ops.json)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def export_explainer_folder(out: str | Path, *, clap: str = "demo", decoder: str | Path | None = None,
                            tokenizer: str | Path | None = None, force: bool = False, opset: int = 17,
                            max_batch: int = 8) -> dict[str, Any]:
    """Load a CLAP + decoder as `Explainer.load` does and write its ONNX graphs into ``out``.

    Returns the manifest. (Engines: ``to_trt.export_engines(out, ...)`` afterwards.)"""
    from lmaczs_cli.backends import load_models

    from .to_onnx import export_onnx

    clap_model, dec, config = load_models(clap, decoder, tokenizer, force)
    domain = config.get("domain", dec.cfg.domain)
    return export_onnx(clap_model, dec, out, domain=domain, mel_to_linear=config.get("mel_to_linear", "linear"),
                       opset=opset, max_batch=max_batch)
