"""Explaining clips: the batched model step, the any-length library API, and the batch
pipeline of `lmaczs explain` (discover -> decode workers -> batched model -> writers).

``ExplainerModule`` is the whole computation for a batch of 10-s windows and K prompts per
window — one CLAP encoder pass shared by the K prompts, the decoder, the masked encoder
pass (the check that the mask keeps the similarity) and the listenable inverse:

    waves (B, 480000), text (B, K, D)  ->  masks (B, K, 1001, bins), audio (B, K, 480000),
                                            similarity (B, K), masked_similarity (B, K)

It is what ``lmaczs export`` traces and what ``Explainer`` runs in eager mode.
``Explainer`` adds loading, a prompt-embedding cache, windowing of any-length input and
stitching of the per-window results; ``Explainer.explain_many`` streams many clips through
batches that mix windows of several files, decoding in DataLoader worker processes.

``run_explain`` is the `lmaczs explain` command as a library call: it finds the audio
files, works out what a previous run already finished, shards the list under torchrun,
and hands each explained file to writer threads (`report` owns the file formats).
"""
from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import audio as audio_mod
from . import report
from . import spectral
from .audio import CLIP_SAMPLES, HOP, N_FRAMES, SAMPLE_RATE, AudioError, load_audio
from .clap import ClapModel, load_clap
from .device import resolve_device
from .decoder import MaskDecoder, load_decoder
from .errors import LmaczsError


class ExplainError(LmaczsError):
    """An explanation cannot be made as asked; the message names the fix."""


class ExplainerModule(nn.Module):
    """CLAP + decoder for a batch of windows and K prompts per window (see module docstring)."""

    def __init__(self, clap: ClapModel, decoder: MaskDecoder, domain: str, mel_to_linear: str = "linear") -> None:
        super().__init__()
        self.clap, self.decoder = clap, decoder
        self.domain, self.mel_to_linear = domain, mel_to_linear

    def forward(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]:
        B, K, Dm = text.shape
        X = spectral.stft(waves)                                  # (B, 1001, 513) complex
        P = spectral.power(X)
        mel = spectral.mel_power(P)
        logmel = spectral.to_db(mel)                              # (B, 1001, 64)
        emb, hidden = self.clap.encode(logmel)                    # (B, D), h1..h4
        similarity = (text * emb[:, None]).sum(-1)                # (B, K)
        rep = torch.arange(B, device=waves.device).repeat_interleave(K)
        log_power = spectral.to_db(P)[rep] if self.domain == "stft" else None
        masks = self.decoder([h[rep] for h in hidden], text.reshape(B * K, Dm), logmel[rep], log_power)
        out = {"masks": masks.reshape(B, K, *masks.shape[1:]), "similarity": similarity}
        gain = spectral.mel_mask_to_linear(masks, self.mel_to_linear) if self.domain == "mel" else masks
        listen = spectral.istft(X[rep] * gain, waves.shape[-1])   # (B*K, 480000)
        out["audio"] = listen.reshape(B, K, -1)
        if check:
            if self.domain == "mel":
                masked_logmel = spectral.masked_log_mel_from_mel(mel[rep], masks)
            else:
                masked_logmel = spectral.masked_log_mel_from_power(P[rep], masks)
            masked_emb, _ = self.clap.encode(masked_logmel)
            out["masked_similarity"] = (text.reshape(B * K, Dm) * masked_emb).sum(-1).reshape(B, K)
        return out


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

    @property
    def mask_mean(self) -> float:
        return float(self.mask.mean())


class Explainer:
    """Explain any clip for any prompt with a trained decoder (DESIGN §11)."""

    def __init__(self, clap: ClapModel, decoder: MaskDecoder, config: dict[str, Any],
                 device: str | torch.device = "cpu", batch_size: int = 8) -> None:
        self.device = resolve_device(device)
        self.clap = clap.to(self.device)
        self.decoder = decoder.to(self.device).eval()
        self.config = config
        self.domain = config["domain"] if "domain" in config else decoder.cfg.domain
        self.module = ExplainerModule(self.clap, self.decoder, self.domain, config.get("mel_to_linear", "linear")).eval()
        self.batch_size = batch_size
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, name: str | None = None, *, clap: str | None = None, decoder: str | os.PathLike | None = None,
             tokenizer: str | os.PathLike | None = None, device: str = "auto", force: bool = False,
             clap_ckpt: str | None = None, batch_size: int = 8) -> "Explainer":
        """``Explainer.load("demo")`` for the bundled demo, or ``clap=`` (demo | laion:NAME | PATH |
        random:ARCH; ``clap_ckpt=`` is an alias) with ``decoder=`` (a `lmaczs train` folder)."""
        spec = clap or clap_ckpt or name or "demo"
        if decoder is None:
            if spec != "demo":
                raise ExplainError(f"--clap {spec} needs --decoder DIR (a folder written by `lmaczs train`)")
            decoder = demo_dir()
        clap_model = load_clap(spec, tokenizer)
        dec, config = load_decoder(decoder, clap=clap_model, force=force)
        return cls(clap_model, dec, config, device=device, batch_size=batch_size)

    # ---- prompts

    @torch.no_grad()
    def text_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), D), each distinct prompt encoded once and cached."""
        for p in dict.fromkeys(prompts):
            if p not in self._text:
                if not p.strip():
                    raise ExplainError("empty prompt: give a text such as --prompt 'dog barking'")
                self._text[p] = self.clap.encode_text([p])[0].to(self.device)
        return torch.stack([self._text[p] for p in prompts])

    # ---- the batched step

    @torch.no_grad()
    def run_batch(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True) -> dict[str, torch.Tensor]:
        """waves (B, 480000) and text embeddings (B, K, D), each row its own K prompts ->
        ExplainerModule outputs as float32, on the model's device."""
        use_amp = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            out = self.module(waves.to(self.device, non_blocking=True), text.to(self.device), check=check)
        return {k: v.float() for k, v in out.items()}

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
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                out.append(self.clap.embed_audio(win.to(self.device)).float())
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

        labels + top_k: top-k mode. Each clip is first scored against every label's prompt
        (`label_prompt`), then its best `top_k` are explained (one extra encoder pass per
        window); `ClipResult.topk` holds the scores. keep_input: return the decoded input too.
        """
        if labels and prompts:
            raise ExplainError("give prompts or labels (top-k mode), not both")
        label_prompts = [label_prompt(x) for x in labels] if labels else []
        if labels and not 0 < top_k <= len(label_prompts):
            raise ExplainError(f"top_k must be 1..{len(label_prompts)} (the number of labels), got {top_k}")
        clips = [_as_clip(x, i) for i, x in enumerate(items)]
        batcher = _Batcher(self, check)
        for clip, wave, error, decode_s in _decoded(clips, workers):
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
                    error = _reason(e)
            if error is not None:
                yield ClipResult(clip.key, error=error, decode_s=decode_s)
            elif not clip_prompts:
                yield ClipResult(clip.key, wave=wave if keep_input else None, duration_s=wave.size / SAMPLE_RATE,
                                 decode_s=decode_s, topk=topk)
            else:
                batcher.add(_InFlight(clip, wave, clip_prompts, text, topk, decode_s, keep_input))
            yield from batcher.finished()
        batcher.flush()
        yield from batcher.finished()

    # ---- any length

    def explain(self, wave: np.ndarray, prompt: str, check: bool = True) -> Explanation:
        """One clip (float32 (n,), mono, 48 kHz; any length) for one prompt."""
        return self.explain_prompts(wave, [prompt], check=check)[0]

    def explain_prompts(self, wave: np.ndarray, prompts: Sequence[str], check: bool = True) -> list[Explanation]:
        """One clip (float32 (n,), mono, 48 kHz; any length) for K prompts, sharing one encoder
        pass per window. Raises `ExplainError` for an empty or non-finite waveform."""
        if not prompts:
            raise ExplainError("no prompt: give at least one text such as 'dog barking'")
        result = next(self.explain_many([Clip(key=0, wave=np.asarray(wave), prompts=list(prompts))], check=check))
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
    model_s: float = 0.0                      # its share of the batches it was in


def _as_clip(x: Any, i: int) -> Clip:
    if isinstance(x, Clip):
        return x
    if isinstance(x, np.ndarray):
        return Clip(key=i, wave=x)
    return Clip(key=x, path=x)


def _reason(e: BaseException) -> str:
    if isinstance(e, AudioError):
        return e.reason
    text = " ".join(str(e).split())
    return text if isinstance(e, LmaczsError) else f"{type(e).__name__}: {text}"


def _check_wave(wave: np.ndarray) -> np.ndarray:
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
            return None, _reason(e), time.perf_counter() - t0
        return wave, None, time.perf_counter() - t0


def _identity(x: Any) -> Any:
    return x


def _decoded(clips: list[Clip], workers: int) -> Iterator[tuple[Clip, np.ndarray | None, str | None, float]]:
    """(clip, wave, error, decode_s) in clip order; paths decoded `workers` processes ahead."""
    paths = [None if c.wave is not None else os.fspath(c.path) for c in clips]
    if any(p is not None for p in paths):
        loader: Iterable = torch.utils.data.DataLoader(
            _DecodeDataset(paths), batch_size=None, shuffle=False, num_workers=workers,
            collate_fn=_identity, prefetch_factor=2 if workers else None)
    else:
        loader = ((None, None, 0.0) for _ in clips)
    for clip, (tensor, error, dt) in zip(clips, loader):
        if error is not None:
            yield clip, None, error, dt
            continue
        try:
            wave = _check_wave(clip.wave if tensor is None else tensor.numpy())
        except ExplainError as e:
            yield clip, None, str(e), dt
            continue
        yield clip, wave, None, dt


class _Stitch:
    """`audio.stitch` fed one window at a time, in order (axis 0 is time).

    Keeps only the output: the summed crossfade weight under a new window is rebuilt from the
    windows before it that overlap it, so no second full-length array is held.
    """

    def __init__(self, length: int, starts: Sequence[int], win: int, rest: tuple[int, ...]) -> None:
        gaps = np.diff(starts)
        self.weights = audio_mod.crossfade_weights(win, win - int(gaps.max()) if len(gaps) else 0)
        self.out = np.zeros((length, *rest), np.float32)
        self.starts, self.win, self.length, self.i = list(starts), win, length, 0

    def add(self, part: np.ndarray) -> None:
        """part: (win, *rest), the next window's values."""
        s = self.starts[self.i]
        end = min(s + self.win, self.length)
        total = np.zeros(end - s)
        for j in range(self.i - 1, -1, -1):           # earlier windows reaching into [s, end)
            sj = self.starts[j]
            if sj + self.win <= s:
                break
            hi = min(sj + self.win, end)
            total[: hi - s] += self.weights[s - sj: hi - sj]
        w = self.weights[: end - s]
        share = (w / (total + w)).astype(np.float32).reshape((-1,) + (1,) * (self.out.ndim - 1))
        seg = self.out[s:end]
        seg += (part[: end - s] - seg) * share
        self.i += 1


class _InFlight:
    """A clip whose windows are queued or in the model; collects and stitches their outputs."""

    def __init__(self, clip: Clip, wave: np.ndarray, prompts: list[str], text: torch.Tensor,
                 topk: list[dict[str, Any]] | None, decode_s: float, keep_input: bool) -> None:
        self.clip, self.wave, self.prompts, self.text, self.topk = clip, wave, prompts, text, topk
        self.decode_s, self.keep_input, self.model_s = decode_s, keep_input, 0.0
        n, K = wave.size, len(prompts)
        self.starts = audio_mod.window_starts(n)
        self.audio = _Stitch(n, self.starts, CLIP_SAMPLES, (K,))
        self.mask: _Stitch | None = None
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
            self.mask = _Stitch(audio_mod.num_frames(self.wave.size), [s // HOP for s in self.starts], N_FRAMES,
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
                          duration_s=self.wave.size / SAMPLE_RATE, decode_s=self.decode_s, model_s=self.model_s)


class _Batcher:
    """Packs windows of in-flight clips into model batches of `batch_size` windows.

    Windows wait in one queue per prompt count K (a batch's text is (B, K, D)); a queue
    runs as soon as it holds a full batch, so at most one partial batch per K waits.
    A clip is finished when its last window comes back.
    """

    def __init__(self, explainer: Explainer, check: bool) -> None:
        self.ex, self.check = explainer, check
        self.queues: dict[int, list[tuple[_InFlight, int]]] = {}
        self.done: deque[ClipResult] = deque()

    def add(self, clip: _InFlight) -> None:
        q = self.queues.setdefault(len(clip.prompts), [])
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
            text = torch.stack([c.text for c, _ in chunk])
            out = self.ex.run_batch(waves, text, check=self.check)
            arrays = {k: v.cpu().numpy() for k, v in out.items()}
        except Exception as e:   # the whole batch failed (e.g. out of memory): fail its clips
            self._fail({c for c, _ in chunk}, f"model failed on this batch: {_reason(e)}")
            return
        share = (time.perf_counter() - t0) / len(chunk)
        msim = arrays.get("masked_similarity")
        for i, (c, w) in enumerate(chunk):
            c.add(w, arrays["masks"][i], arrays["audio"][i], arrays["similarity"][i],
                  None if msim is None else msim[i], share)
            if c.received == c.n_windows:
                self.done.append(c.result(self.ex.domain, self.check))

    def _fail(self, clips: set[_InFlight], reason: str) -> None:
        for k, q in self.queues.items():
            self.queues[k] = [(c, w) for c, w in q if c not in clips]
        for c in sorted(clips, key=lambda c: c.received):
            self.done.append(ClipResult(c.clip.key, error=reason, decode_s=c.decode_s))


def _window_at(wave: np.ndarray, start: int) -> np.ndarray:
    """The 10-s window at ``start``; short clips repeat-padded, a short tail zero-padded."""
    if wave.size <= CLIP_SAMPLES and start == 0:
        return audio_mod.pad_clip(wave)
    w = wave[start : start + CLIP_SAMPLES]
    if w.size < CLIP_SAMPLES:
        w = np.pad(w, (0, CLIP_SAMPLES - w.size))
    return w


def demo_dir() -> Path:
    """Folder of the bundled demo model (CLAP + decoder)."""
    return Path(__file__).parent / "demo" / "model"


# ----------------------------------------------------------------------------- prompts


def label_prompt(label: str) -> str:
    """The text a label is scored and explained with in top-k mode.

    A label that already reads as a sentence (4 or more words, or ending in . ! ?) is used
    as written; any other gets the caption labelled folders are trained with:
    "dog_barking" -> "this is the sound of dog barking" (`data.class_caption`).
    """
    from .data import class_caption

    text = " ".join(label.split())
    if len(text.split()) >= 4 or text.endswith((".", "!", "?")):
        return text
    return class_caption(text)


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a text file, stripped; lines starting with # are comments."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExplainError(f"{path}: cannot read it ({_reason(e)})") from e
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def read_prompts_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """Per-file prompts from a CSV of ``path,prompt`` rows (a header row is allowed).

    Returns {real path of the audio file: [prompts]}; relative paths are taken from the
    CSV's folder. A file may have several rows.
    """
    import csv

    out: dict[str, list[str]] = {}
    folder = Path(path).parent
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ExplainError(f"{path}: cannot read it as CSV ({_reason(e)})") from e
    for i, row in enumerate(rows, 1):
        if not row or not "".join(row).strip():
            continue
        if i == 1 and row[0].strip().lower() in ("path", "file", "audio", "file_name"):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ExplainError(f"{path}, line {i}: expected two columns, path,prompt (quote a prompt with commas)")
        key = os.path.realpath(folder / row[0].strip())
        out.setdefault(key, [])
        if row[1].strip() not in out[key]:
            out[key].append(row[1].strip())
    return out


# ----------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Entry:
    """One audio file found, or one path that looked like audio and cannot be read."""

    rel: str                  # POSIX path relative to the inputs' common folder: the key of every record
    path: str                 # where it is read from, as found (links not resolved)
    error: str | None = None  # why it cannot be read (symlink loop, folder named like audio, ...)


@dataclass
class Discovery:
    entries: list[Entry]      # sorted by rel; one per rel
    skipped: Counter          # "hidden", "not_audio", "outputs": counts of what was passed over
    base: str                 # the common folder rel is relative to


def _extension(name: str) -> str:
    return name.rpartition(".")[2].lower() if "." in name else ""


def discover(paths: Sequence[str | os.PathLike], exclude: Callable[[str], bool] | None = None) -> Discovery:
    """Find the audio files under `paths` (files and folders), recursively, sorted.

    Folders are walked following symbolic links; a link back to a folder above it, or a
    link that resolves to itself, is an error entry, never followed. Hidden names (".x")
    and files without an audio extension (`data.AUDIO_EXTENSIONS`, any case) are skipped
    and counted; a folder or special file (pipe, device) named like audio is an error
    entry. A file named on the command line is taken whatever its extension. `exclude`
    (a path -> bool) leaves out our own outputs when --out lies inside an input folder.
    `rel` is relative to the common folder of the arguments (a folder argument itself,
    the parent of a file argument).
    """
    from .data import AUDIO_EXTENSIONS

    absolute = [os.path.abspath(os.fspath(p)) for p in paths]
    base = os.path.commonpath([p if os.path.isdir(p) else os.path.dirname(p) for p in absolute])
    found: dict[str, Entry] = {}
    skipped: Counter = Counter()

    def rel_of(p: str) -> str:
        r = os.path.relpath(p, base).replace(os.sep, "/")
        return "" if r == "." else r

    def add(rel: str, path: str, error: str | None = None) -> None:
        found.setdefault(rel, Entry(rel, path, error))

    stack: list[tuple[str, str, frozenset]] = []
    for p in absolute:
        if os.path.isdir(p):
            st = os.stat(p)
            stack.append((p, rel_of(p), frozenset({(st.st_dev, st.st_ino)})))
        else:
            rel = rel_of(p)
            try:
                regular = stat.S_ISREG(os.stat(p).st_mode)
            except OSError as e:
                add(rel, p, _stat_error(e, os.path.islink(p)))
                continue
            add(rel, p, None if regular else "not a regular file (a pipe, socket or device)")
    while stack:
        folder, prefix, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as e:
            add(prefix or ".", folder, f"folder not readable ({e.strerror})")
            continue
        for child in children:
            rel = f"{prefix}/{child.name}" if prefix else child.name
            if child.name.startswith("."):
                skipped["hidden"] += 1
                continue
            if exclude is not None and exclude(child.path):
                skipped["outputs"] += 1
                continue
            audio = _extension(child.name) in AUDIO_EXTENSIONS
            try:
                st = os.stat(child.path)
            except OSError as e:
                if audio or e.errno == errno.ELOOP:
                    add(rel, child.path, _stat_error(e, child.is_symlink()))
                else:
                    skipped["not_audio"] += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    add(rel, child.path, "symlink loop: links back to a folder above it (not followed)")
                elif audio:
                    add(rel, child.path, "is a directory, not an audio file")
                else:
                    stack.append((child.path, rel, ancestors | {ident}))
            elif not audio:
                skipped["not_audio"] += 1
            elif stat.S_ISREG(st.st_mode):
                add(rel, child.path)
            else:
                add(rel, child.path, "not a regular file (a pipe, socket or device)")
    return Discovery([found[k] for k in sorted(found)], skipped, base)


def _stat_error(e: OSError, is_link: bool) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop: the link resolves to itself (not followed)"
    if is_link and e.errno == errno.ENOENT:
        return "broken symlink: its target does not exist"
    return f"not accessible ({e.strerror})"


# ----------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class ExplainJob:
    """Everything `lmaczs explain` was asked; `run_explain` runs it."""

    paths: tuple[str, ...]                          # files and folders
    out: str                                        # output folder
    prompts: tuple[str, ...] = ()                   # explained for every file
    file_prompts: Mapping[str, Sequence[str]] = field(default_factory=dict)  # real path -> its own prompts
    labels: tuple[str, ...] = ()                    # top-k mode: the label set ...
    top_k: int = 0                                  # ... and how many best labels to explain
    clap: str = "demo"                              # demo | laion:NAME | PATH | random:ARCH
    tokenizer: str | None = None
    decoder: str | None = None                      # a `lmaczs train` folder (default: the demo's)
    force: bool = False                             # accept a decoder trained on another CLAP
    device: str = "auto"
    batch_size: int = 8                             # windows per model batch
    workers: int | None = None                      # decode processes; None: `auto_workers`
    writers: int = 4                                # output-writing threads
    sr: int = SAMPLE_RATE                           # Hz of the written wavs
    check: bool = True                              # masked-similarity pass
    listen_check: bool = False                      # re-encode each written wav
    save_mask: bool = False
    save_residual: bool = False
    save_png: bool = False
    overwrite: bool = False                         # redo finished work

    @property
    def top_k_mode(self) -> bool:
        return bool(self.labels)

    def kinds(self) -> list[str]:
        """The output kinds each (file, prompt) must have."""
        return ["wav"] + [k for k, on in (("mask", self.save_mask), ("residual", self.save_residual),
                                          ("png", self.save_png)) if on]


def auto_workers(device: torch.device) -> int:
    """Decode processes when --workers is not given: none on CPU, where the model's OpenMP
    threads already take every core and a worker process stalls them (decoding in the main
    thread costs less: measured on 2 cores, bench/explain.py), up to 4 on CUDA."""
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class _Plan:
    """What one run works on: the entries found, their output stems and wanted prompts."""

    job: ExplainJob
    out: Path
    found: Discovery
    good: list[Entry]                       # the readable-looking entries (error is None)
    stems: dict[str, str]                   # rel -> output stem (report.output_stems)
    wanted: dict[str, tuple[str, ...]]      # rel -> prompts asked for it (fixed-prompt mode)

    @classmethod
    def make(cls, job: ExplainJob) -> "_Plan":
        out = Path(os.path.abspath(job.out))
        found = discover(job.paths, exclude=_outputs_filter(out))
        good = [e for e in found.entries if e.error is None]
        stems = report.output_stems([e.rel for e in good], taken=[e.rel for e in found.entries if e.error])
        return cls(job, out, found, good, stems, {e.rel: _wanted_prompts(e, job) for e in good})

    def todo(self, lines: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
        return _todo(self.job, self.out, self.good, self.stems, self.wanted, lines)


def run_explain(job: ExplainJob, explainer: Explainer | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run `lmaczs explain`: discover, skip finished work, explain, write, report.

    Under torchrun (RANK / WORLD_SIZE set) each rank takes every world-th entry of the
    sorted list and appends to its own results / errors shard; with a gloo process group
    rank 0 prepares the folder before and merges the shards after (barriers around the
    work). Returns the summary (this run's counts; all ranks' under torchrun).
    on_event receives {"event": "start", "total", "done"} and {"event": "file", "file",
    "status": "explained" | "failed"} (from writer threads too).
    """
    t_start = time.perf_counter()
    rank, world = rank_world()
    plan = _Plan.make(job)
    explainer = explainer or _load_for_rank(job, world)
    group = _process_group(world)
    if rank == 0:
        _prepare(plan)
    _barrier(group)
    mine = _work(plan, explainer, plan.found.entries[rank::world], "" if world == 1 else f".rank{rank}",
                 on_event or (lambda e: None))
    parts = _gather(group, mine)
    merged = report.merge(plan.out) if rank == 0 else None
    _barrier(group)
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    total: Counter = Counter()
    for p in parts:
        total.update(p["counts"])
    seconds = time.perf_counter() - t_start
    skipped = plan.found.skipped
    return {
        "out": str(plan.out), "rank": rank, "world": world,
        "files": len(plan.good), "explained": total["explained"], "explanations": total["explanations"],
        "already_done": total["already_done"], "failed": total["failed"],
        "skipped": {"hidden": skipped["hidden"], "not_audio": skipped["not_audio"],
                    "outputs": skipped["outputs"], "no_prompt": total["no_prompt"]},
        "failures": sorted((f for p in parts for f in p["failures"]), key=lambda f: f["file"]),
        "seconds": round(seconds, 3), "files_per_s": round(total["explained"] / seconds, 3),
        "results": str(plan.out / report.RESULTS), "errors": str(plan.out / report.ERRORS),
        "index": str(plan.out / report.INDEX), "merged": merged,
    }


def _load_for_rank(job: ExplainJob, world: int) -> Explainer:
    device = job.device
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():   # one GPU per rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return Explainer.load(clap=job.clap, decoder=job.decoder, tokenizer=job.tokenizer, device=device,
                          force=job.force, batch_size=job.batch_size)


def _prepare(plan: _Plan) -> None:
    """Before any rank writes (rank 0): fold shards a killed run left into the joined files,
    drop the lines of work this run redoes and the errors of files it retries, remove temps."""
    plan.out.mkdir(parents=True, exist_ok=True)
    report.remove_temporaries(plan.out)
    todo = plan.todo(_all_results(plan.out))
    every = {e.rel for e in plan.found.entries}
    report.merge(plan.out, index=False, drop_result=lambda r: _redone(r, todo, plan.job),
                 drop_error=lambda r: r.get("file") in every)


def _work(plan: _Plan, explainer: Explainer, mine: list[Entry], suffix: str,
          emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Explain this rank's entries: the model in this thread, writes in a thread pool (at most
    2 x writers files waiting, so memory stays flat). Returns its counts and failures."""
    job, out = plan.job, plan.out
    todo = plan.todo(report.read_jsonl(out / report.RESULTS))
    results_log = report.JsonlLog(out / f"results{suffix}.jsonl")
    errors_log = report.JsonlLog(out / f"errors{suffix}.jsonl")
    counts: Counter = Counter()
    failures: list[dict[str, str]] = []
    lock = threading.Lock()

    def fail(entry: Entry, reason: str) -> None:
        errors_log.append([{"file": entry.rel, "input": os.path.abspath(entry.path), "reason": reason}])
        with lock:
            counts["failed"] += 1
            failures.append({"file": entry.rel, "reason": reason})
        emit({"event": "file", "file": entry.rel, "status": "failed"})

    work: list[Clip] = []
    for e in mine:
        if e.error is None and e.rel in todo:
            work.append(Clip(key=e, path=e.path, prompts=None if job.top_k_mode else todo[e.rel]))
        elif e.error is None:
            counts["no_prompt" if not (plan.wanted[e.rel] or job.top_k_mode) else "already_done"] += 1
    emit({"event": "start", "total": len(work) + sum(e.error is not None for e in mine), "done": 0})
    for e in mine:
        if e.error is not None:
            fail(e, e.error)
    writer = _Writer(job, out, explainer, plan.stems, results_log, {os.path.realpath(e.path) for e in plan.good})
    slots = threading.BoundedSemaphore(2 * job.writers)
    workers = auto_workers(explainer.device) if job.workers is None else job.workers

    def write(entry: Entry, res: ClipResult) -> None:
        try:
            n = writer.write(entry, res)
        except Exception as e:
            fail(entry, f"writing its outputs failed: {_reason(e)}")
        else:
            with lock:
                counts["explained"] += 1
                counts["explanations"] += n
            emit({"event": "file", "file": entry.rel, "status": "explained"})
        finally:
            slots.release()

    try:
        with ThreadPoolExecutor(max_workers=job.writers, thread_name_prefix="lmaczs-write") as pool:
            for res in explainer.explain_many(work, labels=job.labels or None, top_k=job.top_k, check=job.check,
                                              workers=workers, keep_input=job.save_residual or job.save_png):
                if res.error is not None:
                    fail(res.key, res.error)
                    continue
                slots.acquire()
                pool.submit(write, res.key, res)
    finally:
        results_log.close()
        errors_log.close()
        writer.ledger.close()
    return {"counts": dict(counts), "failures": failures}


def merge_outputs(out: str | os.PathLike) -> dict[str, Any]:
    """`lmaczs explain --merge DIR`: join the rank shards of DIR into results.jsonl /
    errors.jsonl (sorted, one line per key) and rewrite index.html."""
    out = Path(out)
    shards = report.shard_paths(out)
    if not (out / report.RESULTS).exists() and not shards["results"] and not shards["errors"]:
        raise ExplainError(f"{out}: no results.jsonl and no results.rank<r>.jsonl shards; pass an `lmaczs explain --out` folder")
    counts = report.merge(out)
    return {"out": str(out), **counts, "index": str(out / report.INDEX)}


def _all_results(out: Path) -> list[dict[str, Any]]:
    """Results lines of the joined file and every shard (a killed torchrun run leaves shards)."""
    shards = report.shard_paths(out)["results"]
    return [r for p in [out / report.RESULTS, *shards] for r in report.read_jsonl(p)]


def _outputs_filter(out: Path) -> Callable[[str], bool] | None:
    """path -> whether it is one of our outputs or report files under `out` (for discovery)."""
    real_out = os.path.realpath(out)
    names = set(report.read_ledger(out)) | {report.RESULTS, report.ERRORS, report.INDEX}
    ours = {os.path.join(real_out, *n.split("/")) for n in names}
    return lambda p: os.path.realpath(p) in ours


def _wanted_prompts(entry: Entry, job: ExplainJob) -> tuple[str, ...]:
    own = job.file_prompts.get(os.path.realpath(entry.path), ())
    return tuple(dict.fromkeys([*job.prompts, *own]))


def _todo(job: ExplainJob, out: Path, good: list[Entry], stems: dict[str, str],
          wanted: dict[str, tuple[str, ...]], lines: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """What is left to do: file rel -> prompts to explain (top-k mode: () for "the whole file").

    A (file, prompt) is done when its results lines are there and every output the job asks
    for exists under the name it would get now, at the same --sr, with the checks asked for.
    """
    by_pair: dict[tuple[str, str], dict[str, Any]] = {}
    by_file: dict[str, list[dict[str, Any]]] = {}
    for r in lines:
        by_pair.setdefault((r.get("file"), r.get("prompt")), r)
        by_file.setdefault(r.get("file"), []).append(r)
    todo: dict[str, tuple[str, ...]] = {}
    for e in good:
        if job.top_k_mode:
            mine = by_file.get(e.rel, [])
            prompts = {r.get("prompt") for r in mine}
            done = (not job.overwrite and bool(mine) and len(prompts) == min(job.top_k, len(job.labels))
                    and all(r.get("top_k") == job.top_k for r in mine)
                    and all(_satisfies(by_pair[(e.rel, p)], job, out, stems[e.rel]) for p in prompts))
            if not done:
                todo[e.rel] = ()
            continue
        left = tuple(p for p in wanted[e.rel]
                     if job.overwrite or (e.rel, p) not in by_pair
                     or not _satisfies(by_pair[(e.rel, p)], job, out, stems[e.rel]))
        if left:
            todo[e.rel] = left
    return todo


def _satisfies(line: dict[str, Any], job: ExplainJob, out: Path, stem: str) -> bool:
    names = report.output_names(stem, line.get("prompt", ""))
    outputs = line.get("outputs") or {}
    return (line.get("sr") == job.sr and (line.get("top_k") or 0) == job.top_k
            and (not job.check or line.get("masked_similarity") is not None)
            and (not job.listen_check or line.get("listened_similarity") is not None)
            and all(outputs.get(k) == names[k] and (out / names[k]).is_file() for k in job.kinds()))


def _redone(line: dict[str, Any], todo: dict[str, tuple[str, ...]], job: ExplainJob) -> bool:
    """Whether a results line belongs to work this run redoes (so it is dropped first)."""
    file = line.get("file")
    if file not in todo:
        return False
    return job.top_k_mode or line.get("prompt") in todo[file]


def _process_group(world: int) -> Any:
    """Join torchrun's gloo group (for the barriers around the work); None outside torchrun."""
    if world <= 1:
        return None
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ExplainError("WORLD_SIZE > 1 without MASTER_ADDR: start it with torchrun")
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    return dist.group.WORLD


def _barrier(group: Any) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.barrier()


def _gather(group: Any, obj: Any) -> list[Any]:
    if group is None:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


class _Writer:
    """Writes one explained file's outputs (atomically), then its results lines (one write)."""

    def __init__(self, job: ExplainJob, out: Path, explainer: Explainer, stems: dict[str, str],
                 results: report.JsonlLog, inputs: set[str]) -> None:
        self.job, self.out, self.ex, self.stems, self.results, self.inputs = job, out, explainer, stems, results, inputs
        self.ledger = report.Ledger(out)

    def write(self, entry: Entry, res: ClipResult) -> int:
        """Returns the number of explanations written."""
        t0 = time.perf_counter()
        job, lines = self.job, []
        listen_s = 0.0
        for rank, ex in enumerate(res.explanations):
            names = report.output_names(self.stems[entry.rel], ex.prompt)
            names = {k: names[k] for k in job.kinds()}
            targets = {k: self.out / v for k, v in names.items()}
            for path in targets.values():
                if os.path.realpath(path) in self.inputs:
                    raise ExplainError(f"output {path} would overwrite an input file; use another --out")
            self.ledger.add(names.values())     # listed before it exists: discovery must never take it as input
            peak = report.write_wav(targets["wav"], ex.audio, job.sr)
            if "residual" in targets:
                report.write_wav(targets["residual"], res.wave - ex.audio, job.sr)
            if "mask" in targets:
                report.write_mask(targets["mask"], ex.mask, ex.domain, ex.prompt, entry.rel)
            if "png" in targets:
                report.write_png(targets["png"], res.wave, ex.mask, ex.domain)
            listened = None
            if job.listen_check:
                t1 = time.perf_counter()
                back = load_audio(targets["wav"])                      # what a listener gets, at 48 kHz
                back = np.pad(back, (0, max(0, ex.audio.size - back.size)))[: ex.audio.size]
                listened = self.ex.window_similarities(back, ex.prompt,
                                                       [int(round(w["start_s"] * SAMPLE_RATE)) for w in ex.windows])
                listen_s += time.perf_counter() - t1
            for w in ex.windows:
                line = {"file": entry.rel, "input": os.path.abspath(entry.path), "prompt": ex.prompt,
                        "window": w["window"], "start_s": round(w["start_s"], 6),
                        "end_s": round(min(w["start_s"] + CLIP_SAMPLES / SAMPLE_RATE, res.duration_s), 6),
                        "duration_s": round(res.duration_s, 6),
                        "similarity": w["similarity"], "masked_similarity": w.get("masked_similarity"),
                        "mask_mean": w["mask_mean"], "domain": ex.domain, "sr": job.sr,
                        "peak": round(peak, 6), "outputs": names}
                if listened is not None:
                    line["listened_similarity"] = float(listened[w["window"]])
                if res.topk is not None:
                    line.update(top_k=job.top_k, rank=rank, topk=res.topk)
                lines.append(line)
        timing = {"decode_s": round(res.decode_s, 4), "model_s": round(res.model_s, 4),
                  "write_s": round(time.perf_counter() - t0 - listen_s, 4), "listen_s": round(listen_s, 4)}
        for line in lines:
            line["timing"] = timing
        self.results.append(lines)      # after every output of the file is in place
        return len(res.explanations)
