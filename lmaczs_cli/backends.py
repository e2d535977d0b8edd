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

    def to_host(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A step's outputs as CPU tensors; GPU tensors go through pinned buffers, one wait for all."""
        from .device import to_host

        return to_host(outputs)

    def explain_topk(self, waves: torch.Tensor, labels: torch.Tensor, k: int,
                     check: bool = True) -> dict[str, torch.Tensor]:
        """Each window scored against labels (L, D) and explained for its best k:
        {scores (B, L), topk (B, k) indices best first, and `explain`'s outputs for them}.
        Here in two passes (embedding, then explain); runners with a one-pass form override it."""
        scores = self.embed_audio(waves).float().to(labels.device) @ labels.float().T
        best = scores.topk(k, dim=-1).indices
        return {"scores": scores, "topk": best, **self.explain(waves, labels[best], check=check)}


# --------------------------------------------------------------------------- torch


class TorchRunner(Runner):
    """The torch `ExplainerModule` (``lmaczs_cli.model``). On the CPU: eager float32. On CUDA, by
    default: the front end in float32, the encoder and decoder under float16 autocast
    (``device.half_dtype`` says why float16), the listenable step as the fused Triton kernel,
    and every batch padded to a fixed bucket size and replayed as a captured CUDA graph
    (``device.FixedShapeSteps``), with inputs copied through pinned memory.

    clap: a ``ClapModel``; decoder: a ``MaskDecoder``; config: the decoder's saved config
    (``domain``, ``mel_to_linear``); spectral: the model's spectral operations ("auto": the
    fused Triton listenable kernel on CUDA when triton is installed); precision: "auto" |
    "fp32" | "bf16" | "fp16"; compile: "auto" (CUDA graphs on CUDA, off on the CPU) | "graphs"
    | "inductor" (torch.compile per bucket shape) | "off" (eager, exact shapes); buckets: the
    batch sizes of the fixed shapes. On the CPU the decoder's convolution weights are laid out
    channels-last, in place on the decoder given (its values, saved files and hash unchanged)."""

    def __init__(self, clap: Any, decoder: Any, config: dict[str, Any], device: str | torch.device = "cpu",
                 spectral: str = "auto", precision: str = "auto", compile: str = "auto",
                 buckets: Sequence[int] = ()) -> None:
        from .device import BUCKETS, FixedShapeSteps, compile_mode, half_dtype, resolve_device
        from .model import ExplainerModule

        self.device = resolve_device(device)
        self.clap = clap.to(self.device)
        self.decoder = decoder.to(self.device).eval()
        if self.device.type == "cpu":
            # oneDNN's convolutions over the decoder's full-resolution maps (few channels, 1024 x 64)
            # run faster channels-last. In place, on the module given: the weights' values are
            # unchanged (saving and hashing take them contiguous), their strides are not
            self.decoder.to(memory_format=torch.channels_last)
        self.config = config
        self.domain = config["domain"] if "domain" in config else decoder.cfg.domain
        self.model = ExplainerModule(self.clap, self.decoder, self.domain, config.get("mel_to_linear", "linear"),
                                     spectral=spectral).eval()
        self.half = half_dtype(precision, self.device)
        self.compile = compile_mode(compile, self.device)
        self.steps = (FixedShapeSteps(self.compile, self.device, self.half, buckets or BUCKETS)
                      if self.compile != "off" else None)

    def _autocast(self) -> Any:
        from .device import autocast

        return autocast(self.device, self.half)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        from .device import to_device

        return to_device(x, self.device)

    def _step(self, name: Any, fn: Any, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.steps is not None:
            return self.steps.run(name, fn, *inputs)
        with self._autocast():
            return fn(*inputs)

    def _explain_check(self, waves: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(waves, text, check=True)

    def _explain_nocheck(self, waves: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(waves, text, check=False)

    def _embed_step(self, waves: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": self.model.encode_audio(waves)[0]}

    @torch.no_grad()
    def explain(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]:
        fn = self._explain_check if check else self._explain_nocheck
        out = self._step(("explain", check), fn, self._in(waves), self._in(text))
        return {k: v.float() for k, v in out.items()}

    @torch.no_grad()
    def embed_audio(self, waves: torch.Tensor) -> torch.Tensor:
        return self._step("embed", self._embed_step, self._in(waves))["embedding"].float()

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.clap.encode_text(list(prompts)).float().to(self.device)

    @torch.no_grad()
    def explain_topk(self, waves: torch.Tensor, labels: torch.Tensor, k: int,
                     check: bool = True) -> dict[str, torch.Tensor]:
        """One encoder pass: the scores and the explanations of the best k come from one forward."""
        with self._autocast():
            out = self.model.forward_topk(waves.to(self.device, non_blocking=True), labels.to(self.device),
                                          torch.empty(k), check=check)
        return {n: v if n == "topk" else v.float() for n, v in out.items()}


# --------------------------------------------------------------------------- export folders


def _tokenizer(manifest: dict[str, Any], tokenizer_dir: str | os.PathLike | None,
               folder: str | os.PathLike | None = None) -> Any:
    """The export's tokenizer: ``tokenizer_dir`` when given, else the files copied into the export
    folder (its manifest's ``tokenizer.dir``, checked against their sha256), else (an export
    written before tokenizers were copied) the CLIP BPE vocabulary of the laion-clap wheel or
    a RoBERTa tokenizer in the Hugging Face cache."""
    from .clap import ClipBpeTokenizer, RobertaTokenizerWrapper
    from .files import sha256_file

    tok = manifest["tokenizer"]
    copied = Path(folder) / tok["dir"] if folder is not None and "dir" in tok else None
    if tokenizer_dir is None and copied is not None:
        for name, digest in tok.get("files", {}).items():
            if not (copied / name).is_file() or sha256_file(copied / name) != digest:
                raise BackendError(f"{copied / name} is missing or changed since the export; re-run lmaczs export")
        tokenizer_dir = copied
    if tok["kind"] == "roberta":
        return RobertaTokenizerWrapper(tokenizer_dir, tok["context_length"])
    if tokenizer_dir is not None:
        return FolderClipBpeTokenizer(Path(tokenizer_dir), tok["context_length"])
    return ClipBpeTokenizer(tok["context_length"])


class FolderClipBpeTokenizer:
    """CLIP BPE tokens from a vocabulary file in a folder (an export's copy): laion's
    SimpleTokenizer on that file, then start token + BPE ids + end token, cut to the context
    length and zero-padded, as laion's ``tokenize`` does -> (N, context) int64."""

    def __init__(self, folder: Path, context_length: int = 77) -> None:
        from .laion import laion_module
        from .export.to_onnx import CLIP_BPE_VOCAB

        path = folder / CLIP_BPE_VOCAB
        if not path.is_file():
            raise BackendError(f"{folder}: no {CLIP_BPE_VOCAB} (the CLIP BPE vocabulary); re-run lmaczs export, "
                               "or pass --tokenizer with the folder that holds it")
        self.context_length = context_length
        self._tok = laion_module("tokenizer").SimpleTokenizer(str(path))

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        start, end = self._tok.encoder["<start_of_text>"], self._tok.encoder["<end_of_text>"]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [start, *self._tok.encode(text), end][: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


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
    threads (see `DenormalFreeCaller` for why, and for the calling thread), and ORT's pool
    threads blocking, not spinning, once a run is done. Spinning kept the cores busy after every
    call, so whatever ran next beside it waited: a folder run's decode and writer threads, or
    torch (on the demo model, torch explained 32 clips/s right after an ORT call with spinning
    threads, 39 without them, on 2 cores). ORT itself runs within a few per cent of its spinning
    speed (HTSAT-tiny, batch 4: 9.7 against 10.4 clips/s without the check, 5.5 against 5.7 with
    it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
                 tokenizer: str | os.PathLike | None = None, threads: int | None = None,
                 precision: str = "fp32") -> None:
        from .export.to_onnx import read_manifest

        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("--backend onnx needs onnxruntime: pip install onnxruntime (or lmaczs[gpu])") from e
        self.folder = Path(folder)
        self.config = read_manifest(self.folder)
        _check_hashes(self.folder, self.config)
        self.precision = precision
        self._specs = self._graph_specs(precision)
        self.domain = self.config["domain"]
        self.providers = self._providers(ort, device)
        self.device = torch.device("cpu")            # outputs come back as CPU tensors
        self._options = session_options(threads)
        self._call = DenormalFreeCaller()
        self._sessions: dict[str, Any] = {}
        self._tokenizer = _tokenizer(self.config, tokenizer, self.folder)

    @staticmethod
    def _providers(ort: Any, device: str) -> list[str]:
        have = ort.get_available_providers()
        if device in ("cuda", "gpu") and "CUDAExecutionProvider" not in have:
            raise BackendError("--device cuda with --backend onnx needs onnxruntime-gpu (pip install lmaczs[gpu])")
        if device != "cpu" and "CUDAExecutionProvider" in have:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _graph_specs(self, precision: str) -> dict[str, dict[str, Any]]:
        """graph -> its manifest entry: the float32 graphs; with ``precision="int8"`` the int8
        variants written by ``lmaczs export --int8`` (``export.quantize``) in place of the graphs
        they exist for."""
        specs = dict(self.config["graphs"])
        if precision in ("auto", "fp32"):
            return specs
        if precision != "int8":
            raise BackendError(f"--backend onnx runs precision fp32 or int8, not {precision!r}")
        int8 = self.config.get("int8", {}).get("graphs", {})
        if not int8:
            raise BackendError(f"{self.folder} has no int8 graphs; write them with `lmaczs export --int8 --out "
                               f"{self.folder}`")
        from .files import sha256_file

        for spec in int8.values():
            path = self.folder / spec["file"]
            if not path.is_file() or sha256_file(path) != spec["sha256"]:
                raise BackendError(f"{path} is missing or does not match its manifest (sha256); re-run lmaczs export --int8")
        return {**specs, **int8}

    @property
    def _files(self) -> dict[str, str]:
        """graph -> the file that runs for it (float32, or its int8 variant)."""
        return {g: spec["file"] for g, spec in self._specs.items()}

    def session(self, graph: str) -> Any:
        """The ORT session of ``graph`` (audio_encoder | text_encoder | explainer...), made once, on
        the flushing worker: with `session_options`' denormal setting ONNX Runtime also sets
        flush-to-zero on the thread that makes a session, and every thread that thread starts later
        inherits it (a folder run's writers; numpy then warns that float32's smallest subnormal is 0)."""
        return self._call(self._session, graph)

    def _session(self, graph: str) -> Any:
        if graph not in self._sessions:
            import onnxruntime as ort

            path = self.folder / self._files[graph]
            self._sessions[graph] = ort.InferenceSession(str(path), self._options, providers=self.providers)
        return self._sessions[graph]

    def _graph(self, name: str) -> bool:
        return name in self.config["graphs"]

    def _run(self, graph: str, waves: torch.Tensor, feeds: dict[str, np.ndarray],
             names: list[str]) -> dict[str, torch.Tensor]:
        """One explainer graph over ``waves`` with the prompt ``feeds``: ``names`` in order. A
        spectrum graph (the int8 explainers: mel power in, no audio out) gets the clips' STFT from
        torch's FFT, and the audio is its masks on that STFT, inverted the same way."""
        if "mel" not in self._specs[graph]["inputs"]:
            outs = self._call(self.session(graph).run, names, {"waves": _np32(waves), **feeds})
            return {k: torch.from_numpy(v) for k, v in zip(names, outs)}
        from .model import FftSpectral

        with torch.no_grad():
            spec = FftSpectral().analyse(waves.detach().float().cpu(), with_power=self.domain == "stft")
        ran = [n for n in names if n != "audio"]
        outs = self._call(self.session(graph).run, ran, {**spectrum_feeds(spec), **feeds})
        result = {k: torch.from_numpy(v) for k, v in zip(ran, outs)}
        if "audio" in names:
            result["audio"] = heard(spec, result["masks"], self.domain, self.config["mel_to_linear"], waves.shape[-1])
        return {n: result[n] for n in names}

    def explain(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]:
        """Without ``check`` the explainer_nocheck graph runs (no second encoder pass), where the
        export folder has it."""
        graph = "explainer" if check or not self._graph("explainer_nocheck") else "explainer_nocheck"
        names = list(self.OUTPUTS if graph == "explainer" else self.OUTPUTS[:3])
        result = self._run(graph, waves, {"text": _np32(text)}, names)
        if not check:
            result.pop("masked_similarity", None)
        return result

    def explain_topk(self, waves: torch.Tensor, labels: torch.Tensor, k: int,
                     check: bool = True) -> dict[str, torch.Tensor]:
        """One encoder pass through the explainer_topk graph; without ``check``, through
        explainer_topk_nocheck (no masked check, no second encoder pass) where the export folder
        has it. Two passes for an export folder without a top-k graph."""
        graph = "explainer_topk" if check or not self._graph("explainer_topk_nocheck") else "explainer_topk_nocheck"
        if not self._graph(graph):
            return super().explain_topk(waves, labels, k, check)
        names = ["scores", "topk", *(self.OUTPUTS if graph == "explainer_topk" else self.OUTPUTS[:3])]
        result = self._run(graph, waves, {"labels": _np32(labels), "k": np.zeros(k, np.float32)}, names)
        if not check:
            result.pop("masked_similarity", None)
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


def heard(spec: Any, masks: torch.Tensor, domain: str, mel_to_linear: str, length: int) -> torch.Tensor:
    """The explanations of a spectrum graph heard: masks (B, K, T, bins) on their clips' STFT
    (``spec``, an `FftSpectral` analysis), inverted with torch's FFT -> (B, K, length). In groups of
    clips, as the torch runner does it (`model.clip_groups` says why)."""
    from .model import FftSpectral, clip_groups, spectrum_clips

    ends, (B, K) = FftSpectral(), masks.shape[:2]
    flat = masks.flatten(0, 1)
    with torch.no_grad():
        audio = torch.cat([ends.listen(spectrum_clips(spec, g), flat[g.start * K: g.stop * K], K, domain,
                                       mel_to_linear, length) for g in clip_groups(B, K, flat)])
    return audio.reshape(B, K, -1)


def spectrum_feeds(spec: Any) -> dict[str, np.ndarray]:
    """A spectrum graph's per-clip inputs from an analysis (``model.Spectrum``): its mel power,
    and its linear power where it has one (STFT masks)."""
    feeds = {"mel": _np32(spec.mel)}
    if spec.power is not None:
        feeds["power"] = _np32(spec.power)
    return feeds


class TrtRunner(Runner):
    """TensorRT engines built by ``lmaczs export --trt`` (one CUDA GPU). Each engine is checked
    against its sidecar key (ONNX sha256, TensorRT version, GPU, precision, profile).

    Any batch, prompt count and label count works: calls are cut into chunks that fit the
    engines' optimisation profile (``--max-batch``) and the results joined, in order. Tensor
    types come from the engines; float outputs are returned as float32. ``device``: a CUDA
    device (the CPU only with a stand-in tensorrt module, in tests)."""

    OUTPUTS = OnnxRunner.OUTPUTS
    REQUIRED = ("explainer", "audio_encoder", "text_encoder")

    def __init__(self, folder: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 device: str | torch.device = "cuda") -> None:
        from .export.to_onnx import read_manifest
        from .export.to_trt import import_trt, load_engine, require_trt

        self.device = torch.device(device)
        trt = require_trt() if self.device.type == "cuda" else import_trt()
        self.folder = Path(folder)
        self.config = read_manifest(self.folder)
        self.domain = self.config["domain"]
        missing = [g for g in self.REQUIRED if g not in self.config["graphs"]]
        if missing:
            raise BackendError(f"{self.folder}: its manifest has no {', '.join(missing)} graph; re-run lmaczs export")
        # every graph of the folder that has an engine; the required ones must
        self._engines = {g: load_engine(self.folder, g, self.device, trt) for g in self.config["graphs"]
                         if g in self.REQUIRED or (self.folder / f"{g}.engine").is_file()}
        self._tokenizer = _tokenizer(self.config, tokenizer, self.folder)

    def _explain_engine(self, graph: str, waves: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """waves (B, N), text (B, K, D) through an explainer engine, in profile-sized chunks of
        batch and prompts (every output is (B, K, ...))."""
        engine = self._engines[graph]
        bmax, kmax = engine.max_size("waves", 0), engine.max_size("text", 1)
        rows = []
        for b in range(0, waves.shape[0], bmax):
            cols = [engine.run({"waves": waves[b:b + bmax], "text": text[b:b + bmax, k:k + kmax]})
                    for k in range(0, text.shape[1], kmax)]
            rows.append({n: torch.cat([c[n] for c in cols], dim=1) for n in cols[0]})
        return {n: _float(torch.cat([r[n] for r in rows])) for n in rows[0]}

    def explain(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]:
        graph = "explainer" if check or "explainer_nocheck" not in self._engines else "explainer_nocheck"
        out = self._explain_engine(graph, waves, text)
        if not check:
            out.pop("masked_similarity", None)
        return out

    def explain_topk(self, waves: torch.Tensor, labels: torch.Tensor, k: int,
                     check: bool = True) -> dict[str, torch.Tensor]:
        """One encoder pass through the explainer_topk engine (explainer_topk_nocheck without
        ``check``, where it was built) when k and the label count fit its profile (in batch
        chunks); otherwise scores from the audio engine, then `explain`."""
        graph = "explainer_topk" if check or "explainer_topk_nocheck" not in self._engines else "explainer_topk_nocheck"
        engine = self._engines.get(graph)
        if engine is None or k > engine.max_size("k", 0) or labels.shape[0] > engine.max_size("labels", 0):
            return super().explain_topk(waves, labels, k, check)
        bmax, parts = engine.max_size("waves", 0), []
        for b in range(0, waves.shape[0], bmax):
            parts.append(engine.run({"waves": waves[b:b + bmax], "labels": labels, "k": torch.zeros(k)}))
        out = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
        out = {n: v.long() if n == "topk" else _float(v) for n, v in out.items()}
        if not check:
            out.pop("masked_similarity", None)
        return out

    def embed_audio(self, waves: torch.Tensor) -> torch.Tensor:
        engine = self._engines["audio_encoder"]
        bmax = engine.max_size("waves", 0)
        return _float(torch.cat([engine.run({"waves": waves[b:b + bmax]})["embedding"]
                                 for b in range(0, waves.shape[0], bmax)]))

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        engine = self._engines["text_encoder"]
        names = list(self.config["graphs"]["text_encoder"]["inputs"])
        bmax = engine.max_size(names[0], 0)
        out = []
        for i in range(0, len(prompts), bmax):
            feeds = _token_feeds(self._tokenizer(list(prompts[i:i + bmax])), names)
            out.append(engine.run({k: torch.from_numpy(v) for k, v in feeds.items()})["embedding"])
        return _float(torch.cat(out))

def _float(x: torch.Tensor) -> torch.Tensor:
    """Floating outputs as float32 (an engine may return float16 or bfloat16); others as they are."""
    return x.float() if x.is_floating_point() else x


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
                spectral: str = "auto", precision: str = "auto", compile: str = "auto") -> Runner:
    """The runner of ``backend``: torch loads ``clap`` (demo | laion:NAME | PATH | hf:DIR |
    random:ARCH) with ``decoder`` (a `lmaczs train` folder; the bundled one for the demo CLAP);
    onnx and trt read the export folder ``engines`` (written by `lmaczs export`). ``precision``
    and ``compile``: the torch runner's (`TorchRunner`); ``precision="int8"`` runs an onnx export
    folder's int8 variants (``lmaczs export --int8``)."""
    if backend == "torch":
        return TorchRunner(*load_models(clap, decoder, tokenizer, force), device=device, spectral=spectral,
                           precision=precision, compile=compile)
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if engines is None:
        raise BackendError(f"--backend {backend} needs --engines DIR (a folder written by `lmaczs export`)")
    if backend == "onnx":
        return OnnxRunner(engines, device=device, tokenizer=tokenizer, threads=threads,
                          precision="int8" if precision == "int8" else "fp32")
    return TrtRunner(engines, tokenizer=tokenizer)
