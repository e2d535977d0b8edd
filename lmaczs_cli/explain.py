"""Explaining clips: the any-length library API and the batch pipeline of `lmaczs explain`
(discover -> decode workers -> batched model -> writers).

``Explainer`` orchestrates: windows of any-length input, stitching of the per-window results,
the prompt-embedding cache, batches that mix windows of several files, top-k. It owns a
``Runner`` (``backends``: torch, ONNX Runtime or TensorRT) that does the batched model step,
the one explanation forward pass of ``model.ExplainerModule``:

    waves (B, 480000), text (B, K, D)  ->  masks (B, K, 1001, bins), audio (B, K, 480000),
                                            similarity (B, K), masked_similarity (B, K)

``Explainer.explain_many`` streams many clips, decoding in DataLoader worker processes.
The `lmaczs explain` command around it lives in ``runs`` (finding files: ``inputs``).
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import audio as audio_mod
from .audio import CLIP_SAMPLES, N_FRAMES, SAMPLE_RATE, load_audio
from .backends import Runner, load_runner
from .inputs import ExplainError, check_prompts, label_prompt, reason_of


@dataclass
class Explanation:
    """One clip explained for one prompt. Arrays cover the whole input (any length)."""

    prompt: str
    mask: np.ndarray                 # float32 (frames, bins) in [0, 1]; frames = n // 480 + 1
    audio: np.ndarray                # float32 (n,) listenable explanation at 48 kHz
    similarity: float                # cos(a, t), mean over windows
    masked_similarity: float | None  # cos(a', t) of the masked input, mean over windows
    domain: str                      # "mel" (bins = 64) or "stft" (bins = 513)
    windows: list[dict[str, float]] = field(default_factory=list)  # per window: start_s, similarity, ...
    sample_rate: int = SAMPLE_RATE   # of ``audio``, Hz

    @property
    def mask_mean(self) -> float:
        return float(self.mask.mean())

    @property
    def empty(self) -> bool:
        """Whether the mask keeps (next to) nothing: the model finds nothing of the prompt here
        (mask mean below ``report.EMPTY_MASK_MEAN``)."""
        from .report import is_empty

        return is_empty(self.mask_mean, None)

    @property
    def times(self) -> np.ndarray:
        """Centre time in s of each mask frame (row of ``mask``): float64 (frames,)."""
        from .report import mask_times

        return mask_times(self.mask.shape[0])

    @property
    def freqs(self) -> np.ndarray:
        """Frequency in Hz of each mask bin (column of ``mask``): mel band centres or STFT bins, (bins,)."""
        from .report import mask_frequencies

        return mask_frequencies(self.domain)

    def save(self, path: str | os.PathLike, sr: int | None = None) -> Path:
        """Write the listenable explanation as a 16-bit wav (at ``sr``, default its own rate),
        atomically; an existing file is refused (pick another name or delete it)."""
        from .report import write_wav

        path = Path(path)
        if path.exists():
            raise ExplainError(f"{path} exists: not overwritten; choose another path")
        write_wav(path, self.audio, sr or self.sample_rate)
        return path


class Explainer:
    """Explain any clip for any prompt with a trained decoder.

    ``Explainer.load(...)`` builds one; ``explain`` / ``explain_prompts`` take one waveform,
    ``explain_many`` streams files or waveforms. The model step runs on ``runner``."""

    def __init__(self, runner: Runner, batch_size: int = 8) -> None:
        self.runner = runner
        self.batch_size = batch_size
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, name: str | None = None, *, clap: str | None = None, decoder: str | os.PathLike | None = None,
             tokenizer: str | os.PathLike | None = None, device: str = "auto", force: bool = False,
             clap_ckpt: str | None = None, batch_size: int = 8, backend: str = "torch",
             engines: str | os.PathLike | None = None, threads: int | None = None,
             spectral: str = "auto", precision: str = "auto", compile: str = "auto",
             trust: bool = False) -> "Explainer":
        """``Explainer.load("demo")`` for the bundled demo, or ``clap=`` (demo | laion:NAME | PATH |
        hf:DIR | random:ARCH; ``clap_ckpt=`` is an alias) with ``decoder=`` (a `lmaczs train`
        folder). ``backend="onnx"`` or ``"trt"`` runs an export folder ``engines=`` instead
        (written by `lmaczs export`). Torch on CUDA: ``spectral=`` the spectral operations ("auto":
        the fused Triton listenable kernel), ``precision=`` of the encoder and decoder ("auto":
        float16; the front end is float32 always), ``compile=`` "auto" | "graphs" | "inductor" |
        "off" (fixed-shape batches under CUDA graphs or torch.compile; "off": eager).
        ``trust=True`` unpickles a LAION ``.pt`` fully (only for a file you trust: it can run code);
        by default anything but tensors and plain numbers in it is refused."""
        from .clap import trusting_checkpoints

        spec = clap or clap_ckpt or name or "demo"
        with trusting_checkpoints() if trust else contextlib.nullcontext():
            runner = load_runner(backend, clap=spec, decoder=decoder, engines=engines, tokenizer=tokenizer,
                                 device=device, force=force, threads=threads, spectral=spectral,
                                 precision=precision, compile=compile)
        return cls(runner, batch_size=batch_size)

    @classmethod
    def from_models(cls, clap: Any, decoder: Any, config: dict[str, Any] | None = None, *, device: str = "auto",
                    batch_size: int = 8, spectral: str = "auto", precision: str = "auto",
                    compile: str = "auto") -> "Explainer":
        """An explainer over torch models you already hold (a ``ClapModel`` and a ``MaskDecoder``);
        config: the decoder's saved config (``domain``, ``mel_to_linear``; default: the decoder's).
        On the CPU the decoder's convolution weights are made channels-last in place (values
        unchanged; ``TorchRunner``)."""
        from .backends import TorchRunner

        runner = TorchRunner(clap, decoder, config or {}, device=device, spectral=spectral, precision=precision,
                             compile=compile)
        return cls(runner, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def domain(self) -> str:
        """The mask grid: "mel" (64 bands) or "stft" (513 bins)."""
        return self.runner.domain

    @property
    def config(self) -> dict[str, Any]:
        return self.runner.config

    def _torch(self, what: str) -> Any:
        if not hasattr(self.runner, what):
            raise ExplainError(f"Explainer.{what} exists for the torch backend only (this one runs "
                               f"{type(self.runner).__name__})")
        return getattr(self.runner, what)

    @property
    def clap(self) -> Any:
        """The torch ``ClapModel`` (torch backend)."""
        return self._torch("clap")

    @property
    def decoder(self) -> Any:
        """The torch ``MaskDecoder`` (torch backend)."""
        return self._torch("decoder")

    @property
    def model(self) -> Any:
        """The torch ``ExplainerModule`` (torch backend)."""
        return self._torch("model")

    # ---- prompts

    @torch.no_grad()
    def text_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), D), each distinct prompt encoded once and cached."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        check_prompts(new)
        if new:
            self._text.update(zip(new, self.runner.embed_text(new).to(self.device)))
        return torch.stack([self._text[p] for p in prompts])

    # ---- the batched step

    @torch.no_grad()
    def run_batch(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]:
        """waves (B, 480000) and text embeddings (B, K, D), each row its own K prompts ->
        the model's outputs as float32 (``model.ExplainerModule``); no masked_similarity
        without ``check``."""
        return {k: v.float() for k, v in self.runner.explain(waves, text, check=check).items()}

    def run_windows(self, waves: torch.Tensor, prompts: Sequence[str], check: bool = True) -> dict[str, torch.Tensor]:
        """waves (B, 480000); the same K prompts for every window -> ExplainerModule outputs."""
        text = self.text_embedding(prompts)
        return self.run_batch(waves, text[None].expand(waves.shape[0], -1, -1), check=check)

    @torch.no_grad()
    def embed_windows(self, wave: np.ndarray, starts: Sequence[int] | None = None) -> torch.Tensor:
        """CLAP audio embeddings of a clip's 10-s windows (any length): (W, D) float32, L2-normalised."""
        starts = audio_mod.window_starts(wave.size) if starts is None else starts
        out = []
        for k in range(0, len(starts), self.batch_size):
            win = torch.from_numpy(np.stack([_window_at(wave, s) for s in starts[k: k + self.batch_size]]))
            out.append(self.runner.embed_audio(win).float())
        return torch.cat(out)

    def classify(self, wave: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Zero-shot scores of one clip against prompts: cos(a, t) averaged over its windows, (L,)."""
        scores = self.embed_windows(wave) @ self.text_embedding(prompts).T     # (W, L)
        return scores.mean(0).cpu().numpy().astype(np.float64)

    def window_similarities(self, wave: np.ndarray, prompt: str, starts: Sequence[int] | None = None) -> np.ndarray:
        """cos(a_w, t) for each window of a clip, (W,). On an explanation read back from its wav
        this is the *listened* similarity: what a listener hears, as the model hears it."""
        emb = self.embed_windows(wave, starts)
        return (emb @ self.text_embedding([prompt])[0]).cpu().numpy().astype(np.float64)

    # ---- many clips

    def explain_many(self, items: Iterable[str | os.PathLike | np.ndarray | Clip], prompts: Sequence[str] = (), *,
                     labels: Sequence[str] | None = None, top_k: int = 0, check: bool = True, workers: int = 0,
                     keep_input: bool = False) -> Iterator[ClipResult]:
        """Explain many clips, yielding one `ClipResult` per clip as soon as it is done.

        items: paths (decoded with `load_audio` in `workers` DataLoader processes; 0 decodes
        here), waveforms (float32 (n,), 48 kHz) or `Clip`s (a path or wave with its own
        prompts). Windows of several clips share each model batch (`batch_size` windows); a
        clip of any length is windowed and stitched as in `explain_prompts`. Results come in
        the order clips finish, each carrying its item's key (the path, the index of a wave,
        or `Clip.key`). A clip that cannot be decoded or explained gives a result with
        `error` set; it never stops the others.

        labels + top_k: top-k mode. Each clip is scored against every label's prompt
        (`label_prompt`) and its best `top_k` are explained; `ClipResult.topk` holds the
        scores. A clip of one window (up to 10 s) gets its scores and its explanations from one
        encoder pass; a longer clip is first scored over all its windows (scores averaged), then
        explained (one extra encoder pass per window). keep_input: return the decoded input too.
        """
        if isinstance(prompts, str):
            raise ExplainError("explain_many takes a list of prompts: explain_many(items, [prompt])")
        if labels and prompts:
            raise ExplainError("give prompts or labels (top-k mode), not both")
        label_prompts = [label_prompt(x) for x in labels] if labels else []
        if labels and not 0 < top_k <= len(label_prompts):
            raise ExplainError(f"top_k must be 1..{len(label_prompts)} (the number of labels), got {top_k}")
        clips = [_as_clip(x, i) for i, x in enumerate(items)]
        batcher = _Batcher(self, check)
        if label_prompts:
            batcher.labels = _Labels(list(labels), label_prompts, self.text_embedding(label_prompts), top_k)
        for clip, wave, error, decode_s, wait_s in _decoded(clips, workers):
            if error is None and label_prompts and wave.size <= CLIP_SAMPLES:     # one pass: scored as explained
                batcher.add(_InFlight(clip, wave, [""] * top_k, None, None, decode_s, keep_input, wait_s))
                yield from batcher.finished()
                continue
            if error is None:
                try:
                    if label_prompts:
                        scores = self.classify(wave, label_prompts)
                        best = np.argsort(-scores, kind="stable")[:top_k]
                        topk = [{"label": labels[i], "prompt": label_prompts[i], "score": float(scores[i])} for i in best]
                        clip_prompts = [t["prompt"] for t in topk]
                    else:
                        topk, clip_prompts = None, list(prompts if clip.prompts is None else clip.prompts)
                    text = self.text_embedding(clip_prompts) if clip_prompts else None
                except Exception as e:   # one clip's failure must not stop the batch
                    error = reason_of(e)
            if error is not None:
                yield ClipResult(clip.key, error=error, decode_s=decode_s, wait_s=wait_s)
            elif not clip_prompts:
                yield ClipResult(clip.key, wave=wave if keep_input else None, duration_s=wave.size / SAMPLE_RATE,
                                 decode_s=decode_s, wait_s=wait_s, topk=topk)
            else:
                batcher.add(_InFlight(clip, wave, clip_prompts, text, topk, decode_s, keep_input, wait_s))
            yield from batcher.finished()
        batcher.flush()
        yield from batcher.finished()

    # ---- any length

    def explain(self, wave: np.ndarray, prompt: str, check: bool = True) -> Explanation:
        """One clip (float32 (n,), mono, 48 kHz; any length) for one prompt."""
        if not isinstance(prompt, str):
            raise ExplainError(f"explain takes one prompt as a str, got {type(prompt).__name__}; "
                               "for several prompts use explain_prompts(wave, prompts)")
        return self.explain_prompts(wave, [prompt], check=check)[0]

    def explain_prompts(self, wave: np.ndarray, prompts: Sequence[str], check: bool = True) -> list[Explanation]:
        """One clip (float32 (n,), mono, 48 kHz; any length) for K prompts, sharing one encoder
        pass per window. Raises `ExplainError` for an empty or non-finite waveform."""
        if isinstance(prompts, str):
            raise ExplainError("explain_prompts takes a list of prompts; for one prompt use explain(wave, prompt)")
        if not prompts:
            raise ExplainError("no prompt: give at least one text such as 'dog barking'")
        result = next(self.explain_many([Clip(key=0, wave=_check_wave(wave), prompts=list(prompts))], check=check))
        if result.error is not None:
            raise ExplainError(result.error)
        return result.explanations


# ----------------------------------------------------------------------------- many clips


@dataclass
class Clip:
    """One input of `Explainer.explain_many`: a file or a waveform, optionally with its own prompts."""

    key: Any                                  # yours: comes back on its ClipResult
    path: str | os.PathLike | None = None     # decoded by load_audio (in a worker process)
    wave: np.ndarray | None = None            # or float32 (n,), mono, 48 kHz
    prompts: Sequence[str] | None = None      # instead of the call's prompts


@dataclass
class ClipResult:
    """One clip of `Explainer.explain_many`: its explanations, or why it failed."""

    key: Any
    explanations: list[Explanation] = field(default_factory=list)   # one per prompt, in order
    error: str | None = None                  # one-line reason; then nothing else is set
    topk: list[dict[str, Any]] | None = None  # top-k mode: [{label, prompt, score}], best first
    wave: np.ndarray | None = None            # the decoded input (48 kHz) with keep_input=True
    duration_s: float = 0.0                   # of the input
    decode_s: float = 0.0                     # decode + resample, in its worker
    wait_s: float = 0.0                       # the model's thread waited this long for its decode
    model_s: float = 0.0                      # its share of the batches it was in


def _as_clip(x: Any, i: int) -> Clip:
    if isinstance(x, Clip):
        return x
    if isinstance(x, np.ndarray):
        return Clip(key=i, wave=x)
    return Clip(key=x, path=x)


def _check_wave(wave: Any) -> np.ndarray:
    """A waveform as float32 (n,). Integer PCM is scaled by its type's full scale (int16 / 32768);
    anything that is not an array of numbers is refused."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    if not isinstance(wave, np.ndarray):
        raise ExplainError(f"expected a waveform as a numpy array (n,), got {type(wave).__name__}; "
                           "for a file use load_audio(path) or explain_many([path], ...)")
    if wave.dtype.kind in "iu":
        info = np.iinfo(wave.dtype)
        scale = 2.0 ** (info.bits - 1)
        wave = (wave.astype(np.float64) - (scale if wave.dtype.kind == "u" else 0)) / scale
    elif wave.dtype.kind != "f":
        raise ExplainError(f"expected a float or integer PCM waveform, got dtype {wave.dtype}")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise ExplainError(f"expected a non-empty mono waveform (n,), got shape {wave.shape}")
    if not np.isfinite(wave).all():
        raise ExplainError("the waveform holds NaN or Inf samples")
    return wave


class _DecodeDataset(torch.utils.data.Dataset):
    """Decodes paths to float32 48-kHz mono in whichever process calls __getitem__."""

    def __init__(self, paths: list[str | None]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None, float]:
        if self.paths[i] is None:
            return None, None, 0.0
        t0 = time.perf_counter()
        try:
            wave = torch.from_numpy(load_audio(self.paths[i]))   # a tensor travels in shared memory
        except Exception as e:
            return None, reason_of(e), time.perf_counter() - t0
        return wave, None, time.perf_counter() - t0


def _identity(x: Any) -> Any:
    return x


def _decoded(clips: list[Clip], workers: int) -> Iterator[tuple[Clip, np.ndarray | None, str | None, float, float]]:
    """(clip, wave, error, decode_s, wait_s) in clip order (wait_s: how long this thread
    waited for that decode); paths decoded `workers` processes ahead, or,
    with ``workers=0``, by one thread of this process a few files ahead (libsndfile and soxr
    release the GIL, so decoding overlaps the model's batches without another process)."""
    paths = [None if c.wave is not None else os.fspath(c.path) for c in clips]
    if any(p is not None for p in paths) and workers:
        loader: Iterable = torch.utils.data.DataLoader(
            _DecodeDataset(paths), batch_size=None, shuffle=False, num_workers=workers,
            collate_fn=_identity, prefetch_factor=2)
    elif any(p is not None for p in paths):
        loader = _prefetched(_DecodeDataset(paths), ahead=4)
    else:
        loader = ((None, None, 0.0) for _ in clips)
    decoded = iter(loader)
    for clip in clips:
        t0 = time.perf_counter()
        tensor, error, dt = next(decoded)
        waited = time.perf_counter() - t0
        if error is not None:
            yield clip, None, error, dt, waited
            continue
        try:
            wave = _check_wave(clip.wave if tensor is None else tensor.numpy())
        except ExplainError as e:
            yield clip, None, str(e), dt, waited
            continue
        yield clip, wave, None, dt, waited


def _prefetched(dataset: "_DecodeDataset", ahead: int) -> Iterator[Any]:
    """dataset[0], dataset[1], ... in order, decoded by one background thread up to `ahead`
    items in advance (bounded: at most `ahead` decoded waves wait in memory)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="lmaczs-decode") as pool:
        pending: deque = deque()
        for i in range(len(dataset)):
            pending.append(pool.submit(dataset.__getitem__, i))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _InFlight:
    """A clip whose windows are queued or in the model; collects and stitches their outputs."""

    def __init__(self, clip: Clip, wave: np.ndarray, prompts: list[str], text: torch.Tensor,
                 topk: list[dict[str, Any]] | None, decode_s: float, keep_input: bool, wait_s: float = 0.0) -> None:
        self.clip, self.wave, self.prompts, self.text, self.topk = clip, wave, prompts, text, topk
        self.decode_s, self.wait_s, self.keep_input, self.model_s = decode_s, wait_s, keep_input, 0.0
        n, K = wave.size, len(prompts)
        self.starts = audio_mod.window_starts(n)
        self.audio = audio_mod.Stitcher(n, self.starts, CLIP_SAMPLES, (K,))
        self.mask: audio_mod.Stitcher | None = None
        W = len(self.starts)
        self.sim, self.msim, self.mmean = np.zeros((W, K)), np.full((W, K), np.nan), np.zeros((W, K))
        self.received = 0

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    def window(self, w: int) -> np.ndarray:
        return _window_at(self.wave, self.starts[w])

    def add(self, w: int, masks: np.ndarray, audio: np.ndarray, sim: np.ndarray, msim: np.ndarray | None,
            seconds: float) -> None:
        """masks (K, 1001, bins), audio (K, 480000), sim / msim (K,) of window w (in order)."""
        if self.mask is None:
            self.mask = audio_mod.Stitcher(audio_mod.num_frames(self.wave.size), audio_mod.frame_starts(self.wave.size), N_FRAMES,
                                (len(self.prompts), masks.shape[-1]))
        self.audio.add(audio.T)
        self.mask.add(masks.transpose(1, 0, 2))
        self.sim[w], self.mmean[w] = sim, masks.mean(axis=(1, 2))
        if msim is not None:
            self.msim[w] = msim
        self.model_s += seconds
        self.received += 1

    def result(self, domain: str, check: bool) -> ClipResult:
        assert self.mask is not None and self.received == self.n_windows
        explanations = []
        for j, prompt in enumerate(self.prompts):
            windows = [{"window": w, "start_s": s / SAMPLE_RATE, "similarity": float(self.sim[w, j]),
                        **({"masked_similarity": float(self.msim[w, j])} if check else {}),
                        "mask_mean": float(self.mmean[w, j])} for w, s in enumerate(self.starts)]
            explanations.append(Explanation(
                prompt=prompt, mask=np.ascontiguousarray(self.mask.out[:, j]),
                audio=np.ascontiguousarray(self.audio.out[:, j]),
                similarity=float(self.sim[:, j].mean()),
                masked_similarity=float(self.msim[:, j].mean()) if check else None,
                domain=domain, windows=windows))
        return ClipResult(self.clip.key, explanations, topk=self.topk, wave=self.wave if self.keep_input else None,
                          duration_s=self.wave.size / SAMPLE_RATE, decode_s=self.decode_s, wait_s=self.wait_s,
                          model_s=self.model_s)


@dataclass
class _Labels:
    """Top-k mode: the labels, their prompts and text embeddings (L, D), and K."""

    names: list[str]
    prompts: list[str]
    text: torch.Tensor
    k: int


class _Batcher:
    """Packs windows of in-flight clips into model batches of `batch_size` windows.

    Windows wait in one queue per prompt count K (a batch's text is (B, K, D)), and one-window
    clips of top-k mode in a queue of their own (their prompts come out of the batch); a queue
    runs as soon as it holds a full batch, so at most one partial batch per queue waits.
    A clip is finished when its last window comes back.
    """

    def __init__(self, explainer: Explainer, check: bool) -> None:
        self.ex, self.check = explainer, check
        self.queues: dict[int | str, list[tuple[_InFlight, int]]] = {}
        self.done: deque[ClipResult] = deque()
        self.labels: _Labels | None = None

    def add(self, clip: _InFlight) -> None:
        q = self.queues.setdefault("topk" if clip.text is None else len(clip.prompts), [])
        q.extend((clip, w) for w in range(clip.n_windows))
        bs = self.ex.batch_size
        while len(q) >= bs:
            self._run(q[:bs])
            del q[:bs]

    def flush(self) -> None:
        for q in self.queues.values():
            while q:
                chunk = q[: self.ex.batch_size]
                del q[: len(chunk)]
                self._run(chunk)

    def finished(self) -> Iterator[ClipResult]:
        while self.done:
            yield self.done.popleft()

    def _run(self, chunk: list[tuple[_InFlight, int]]) -> None:
        t0 = time.perf_counter()
        try:
            waves = torch.from_numpy(np.stack([c.window(w) for c, w in chunk]))
            if chunk[0][0].text is None:                   # top-k, one pass
                assert self.labels is not None
                out = self.ex.runner.explain_topk(waves, self.labels.text, self.labels.k, check=self.check)
                self._choose(chunk, out.pop("scores").float().cpu().numpy(), out.pop("topk").cpu().numpy())
                out = {k: v.float() for k, v in out.items()}
            else:
                text = torch.stack([c.text for c, _ in chunk])
                out = self.ex.run_batch(waves, text, check=self.check)
            arrays = {k: v.numpy() for k, v in self.ex.runner.to_host(out).items()}
        except Exception as e:   # the whole batch failed (e.g. out of memory): fail its clips
            self._fail({c for c, _ in chunk}, f"model failed on this batch: {reason_of(e)}")
            return
        share = (time.perf_counter() - t0) / len(chunk)
        msim = arrays.get("masked_similarity")
        for i, (c, w) in enumerate(chunk):
            c.add(w, arrays["masks"][i], arrays["audio"][i], arrays["similarity"][i],
                  None if msim is None else msim[i], share)
            if c.received == c.n_windows:
                self.done.append(c.result(self.ex.domain, self.check))

    def _choose(self, chunk: list[tuple[_InFlight, int]], scores: np.ndarray, best: np.ndarray) -> None:
        """Top-k, one pass: each clip's labels, best first, from the batch's scores (B, L) and picks (B, K)."""
        lab = self.labels
        assert lab is not None
        for (c, _), row, picks in zip(chunk, scores, best):
            c.topk = [{"label": lab.names[i], "prompt": lab.prompts[i], "score": float(row[i])} for i in picks]
            c.prompts = [t["prompt"] for t in c.topk]

    def _fail(self, clips: set[_InFlight], reason: str) -> None:
        for k, q in self.queues.items():
            self.queues[k] = [(c, w) for c, w in q if c not in clips]
        for c in sorted(clips, key=lambda c: c.received):
            self.done.append(ClipResult(c.clip.key, error=reason, decode_s=c.decode_s, wait_s=c.wait_s))


def _window_at(wave: np.ndarray, start: int) -> np.ndarray:
    """The 10-s window at ``start``; short clips repeat-padded, a short tail zero-padded."""
    if wave.size == CLIP_SAMPLES:
        return wave
    if wave.size < CLIP_SAMPLES and start == 0:
        return audio_mod.pad_clip(wave)
    w = wave[start : start + CLIP_SAMPLES]
    if w.size < CLIP_SAMPLES:
        w = np.pad(w, (0, CLIP_SAMPLES - w.size))
    return w
