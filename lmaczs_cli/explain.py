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

The `lmaczs explain` command around it lives in ``runs`` (finding files: ``inputs``).
"""
from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import audio as audio_mod
from . import kernels, spectral
from .audio import CLIP_SAMPLES, HOP, N_FRAMES, SAMPLE_RATE, load_audio
from .clap import ClapModel, load_clap
from .device import resolve_device
from .decoder import MaskDecoder, load_decoder
from .inputs import ExplainError, label_prompt, reason_of


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
        # (B*K, 480000); one fused Triton launch on CUDA (lmaczs_cli.kernels), torch ops elsewhere
        listen = kernels.listenable(X, masks, K, self.domain, self.mel_to_linear, waves.shape[-1])
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
        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if any(not p.strip() for p in new):
            raise ExplainError("empty prompt: give a text such as --prompt 'dog barking'")
        if new:
            self._text.update(zip(new, self.encode_prompts(new)))
        return torch.stack([self._text[p] for p in prompts])

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), D) text embeddings on the model's device, one prompt at a time."""
        return torch.stack([self.clap.encode_text([p])[0] for p in prompts]).to(self.device)

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
                    error = reason_of(e)
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
            return None, reason_of(e), time.perf_counter() - t0
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
            self._fail({c for c, _ in chunk}, f"model failed on this batch: {reason_of(e)}")
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
