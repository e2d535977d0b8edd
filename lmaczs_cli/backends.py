"""One ``Runner`` interface over torch, ONNX Runtime and TensorRT.

A runner does the three batched model steps; `Explainer` owns one and does everything around
them (windowing, stitching, prompt cache, batching, top-k):

  explain(waves (B, 480000), text (B, K, D), check) -> {masks (B, K, 1001, bins), audio (B, K, 480000),
                                                        similarity (B, K)[, masked_similarity (B, K)]}
  embed_audio(waves (B, 480000))                    -> (B, D) L2-normalised
  embed_text(prompts: N strings)                    -> (N, D) L2-normalised

``onnx`` and ``trt`` runners read only an export folder (``lmaczs export --out``): graphs,
engines, ``manifest.json`` and a tokenizer; no torch weights are loaded.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import LmaczsError


class BackendError(LmaczsError):
    """A backend cannot run here or cannot read its files; the message names the fix."""


class Runner(ABC):
    """The batched model steps of one backend (shapes in the module docstring)."""

    domain: str                      # mask domain: "mel" or "stft"
    config: dict[str, Any]           # what produced the model (decoder config / export manifest)
    device: torch.device             # where outputs live

    @abstractmethod
    def explain(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def embed_audio(self, waves: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor: ...


# --------------------------------------------------------------------------- torch


class TorchRunner(Runner):
    """The torch `ExplainerModule` (``lmaczs_cli.model``): fp32 on the CPU; on CUDA the front end
    stays fp32 and the encoder and decoder run under float16 autocast.

    clap: a ``ClapModel``; decoder: a ``MaskDecoder``; config: the decoder's saved config
    (``domain``, ``mel_to_linear``); spectral: the model's spectral operations ("auto": the
    fused Triton listenable kernel on CUDA when triton is installed)."""

    def __init__(self, clap: Any, decoder: Any, config: dict[str, Any], device: str | torch.device = "cpu",
                 spectral: str = "auto") -> None:
        from .device import resolve_device
        from .model import ExplainerModule

        self.device = resolve_device(device)
        self.clap = clap.to(self.device)
        self.decoder = decoder.to(self.device).eval()
        self.config = config
        self.domain = config["domain"] if "domain" in config else decoder.cfg.domain
        self.model = ExplainerModule(self.clap, self.decoder, self.domain, config.get("mel_to_linear", "linear"),
                                     spectral=spectral).eval()

    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def explain(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]:
        with self._autocast():
            out = self.model(waves.to(self.device, non_blocking=True), text.to(self.device), check=check)
        return {k: v.float() for k, v in out.items()}

    @torch.no_grad()
    def embed_audio(self, waves: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.encode_audio(waves.to(self.device, non_blocking=True))[0].float()

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.clap.encode_text(list(prompts)).float().to(self.device)


# --------------------------------------------------------------------------- export folders


def _tokenizer(manifest: dict[str, Any], tokenizer_dir: str | os.PathLike | None) -> Any:
    from .clap import ClipBpeTokenizer, RobertaTokenizerWrapper

    tok = manifest["tokenizer"]
    if tok["kind"] == "roberta":
        return RobertaTokenizerWrapper(tokenizer_dir, tok["context_length"])
    return ClipBpeTokenizer(tok["context_length"])


def _token_feeds(tokens: Any, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Tokenizer output -> ONNX feeds: input_ids [, attention_mask], int64 (N, context)."""
    if isinstance(tokens, dict):
        return {n: tokens[n].numpy().astype(np.int64) for n in input_names}
    return {input_names[0]: tokens.numpy().astype(np.int64)}


def _check_hashes(folder: Path, manifest: dict[str, Any]) -> None:
    from .files import sha256_file

    for g in manifest["graphs"].values():
        if sha256_file(folder / g["file"]) != g["sha256"]:
            raise BackendError(f"{folder / g['file']} does not match its manifest (sha256); re-run lmaczs export")


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options for our graphs: denormals flushed to zero on ORT's own
    threads (see `DenormalFreeCaller` for why, and for the calling thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


class DenormalFreeCaller:
    """Runs calls on one worker thread whose floating-point unit flushes denormals to zero.

    HTSAT's shifted windows add -100 to masked attention logits, so their softmax leaves ~e^-100
    (denormal) weights, and on x86 the attention-times-values MatMul on them ran ~18x slower than
    in the unshifted blocks (HTSAT-tiny explainer on 2 CPU threads: 0.81 s per batch of 4 -> 0.64 s
    with ORT's threads flushing, 0.54 s with the calling thread flushing too). ORT's option covers
    only its pool threads; the calling thread does part of every op, so `OnnxRunner` calls ORT from
    this worker rather than changing the floating-point mode of the caller's thread. Only values
    below 1.2e-38 change (to 0), far below every parity tolerance. ``flushes`` is False where the
    CPU has no such mode (then calls simply run on the worker)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lmaczs-ort")
        self.flushes = bool(self._worker.submit(torch.set_flush_denormal, True).result())

    def __call__(self, fn: Any, *args: Any) -> Any:
        return self._worker.submit(fn, *args).result()


class OnnxRunner(Runner):
    """ONNX Runtime over an export folder: CUDA provider when present and asked for, else CPU."""

    OUTPUTS = ("masks", "audio", "similarity", "masked_similarity")

    def __init__(self, folder: str | os.PathLike, device: str = "auto",
                 tokenizer: str | os.PathLike | None = None, threads: int | None = None) -> None:
        from .export.to_onnx import read_manifest

        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("--backend onnx needs onnxruntime: pip install onnxruntime (or lmaczs[gpu])") from e
        self.folder = Path(folder)
        self.config = read_manifest(self.folder)
        _check_hashes(self.folder, self.config)
        self.domain = self.config["domain"]
        self.providers = self._providers(ort, device)
        self.device = torch.device("cpu")            # outputs come back as CPU tensors
        self._options = session_options(threads)
        self._call = DenormalFreeCaller()
        self._sessions: dict[str, Any] = {}
        self._tokenizer = _tokenizer(self.config, tokenizer)

    @staticmethod
    def _providers(ort: Any, device: str) -> list[str]:
        have = ort.get_available_providers()
        if device in ("cuda", "gpu") and "CUDAExecutionProvider" not in have:
            raise BackendError("--device cuda with --backend onnx needs onnxruntime-gpu (pip install lmaczs[gpu])")
        if device != "cpu" and "CUDAExecutionProvider" in have:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def session(self, graph: str) -> Any:
        """The ORT session of ``graph`` (audio_encoder | text_encoder | explainer), made once."""
        if graph not in self._sessions:
            import onnxruntime as ort

            path = self.folder / self.config["graphs"][graph]["file"]
            self._sessions[graph] = ort.InferenceSession(str(path), self._options, providers=self.providers)
        return self._sessions[graph]

    def explain(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]:
        feeds = {"waves": _np32(waves), "text": _np32(text)}
        outs = self._call(self.session("explainer").run, list(self.OUTPUTS), feeds)
        result = {k: torch.from_numpy(v) for k, v in zip(self.OUTPUTS, outs)}
        if not check:
            del result["masked_similarity"]   # the graph always computes it
        return result

    def embed_audio(self, waves: torch.Tensor) -> torch.Tensor:
        feeds = {"waves": _np32(waves)}
        return torch.from_numpy(self._call(self.session("audio_encoder").run, ["embedding"], feeds)[0])

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        names = list(self.config["graphs"]["text_encoder"]["inputs"])
        feeds = _token_feeds(self._tokenizer(list(prompts)), names)
        return torch.from_numpy(self._call(self.session("text_encoder").run, ["embedding"], feeds)[0])


def _np32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


class TrtRunner(Runner):
    """TensorRT engines built by ``lmaczs export --trt`` (one CUDA GPU). Each engine is checked
    against its sidecar key (ONNX sha256, TensorRT version, GPU, precision, profile)."""

    OUTPUTS = OnnxRunner.OUTPUTS

    def __init__(self, folder: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> None:
        from .export.to_onnx import read_manifest
        from .export.to_trt import load_engine, require_trt

        require_trt()
        self.folder = Path(folder)
        self.config = read_manifest(self.folder)
        self.domain = self.config["domain"]
        self.device = torch.device("cuda")
        self._engines = {g: load_engine(self.folder, g) for g in ("explainer", "audio_encoder", "text_encoder")}
        self._tokenizer = _tokenizer(self.config, tokenizer)

    def explain(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]:
        out = self._engines["explainer"].run({"waves": waves, "text": text})
        if not check:
            del out["masked_similarity"]
        return out

    def embed_audio(self, waves: torch.Tensor) -> torch.Tensor:
        return self._engines["audio_encoder"].run({"waves": waves})["embedding"]

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        names = list(self.config["graphs"]["text_encoder"]["inputs"])
        feeds = {k: torch.from_numpy(v) for k, v in _token_feeds(self._tokenizer(list(prompts)), names).items()}
        return self._engines["text_encoder"].run(feeds)["embedding"]


# --------------------------------------------------------------------------- choosing one


BACKENDS = ("torch", "onnx", "trt")


def load_models(clap: str = "demo", decoder: str | os.PathLike | None = None,
                tokenizer: str | os.PathLike | None = None, force: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(ClapModel, MaskDecoder, decoder config) for ``--clap`` / ``--decoder``; no decoder means the
    bundled demo decoder, which only the demo CLAP has. A decoder trained on another CLAP is
    refused unless ``force``."""
    from .clap import demo_dir, load_clap
    from .decoder import load_decoder
    from .inputs import check_decoder

    check_decoder(clap, decoder)
    folder = Path(demo_dir() if decoder is None else decoder)
    if folder.is_file():            # decoder.safetensors: its config.json is beside it
        folder = folder.parent
    clap_model = load_clap(clap, tokenizer)
    dec, config = load_decoder(folder, clap=clap_model, force=force)
    return clap_model, dec, config


def load_runner(backend: str = "torch", *, clap: str = "demo", decoder: str | os.PathLike | None = None,
                engines: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                device: str = "auto", force: bool = False, threads: int | None = None,
                spectral: str = "auto") -> Runner:
    """The runner of ``backend``: torch loads ``clap`` (demo | laion:NAME | PATH | hf:DIR |
    random:ARCH) with ``decoder`` (a `lmaczs train` folder; the bundled one for the demo CLAP);
    onnx and trt read the export folder ``engines`` (written by `lmaczs export`)."""
    if backend == "torch":
        return TorchRunner(*load_models(clap, decoder, tokenizer, force), device=device, spectral=spectral)
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if engines is None:
        raise BackendError(f"--backend {backend} needs --engines DIR (a folder written by `lmaczs export`)")
    if backend == "onnx":
        return OnnxRunner(engines, device=device, tokenizer=tokenizer, threads=threads)
    return TrtRunner(engines, tokenizer=tokenizer)
