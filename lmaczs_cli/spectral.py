"""The STFT -> power -> mel -> log front end of LAION-CLAP, written as plain tensor ops.

LAION-CLAP computes this inside its audio branch with torchlibrosa modules; we compute it
ourselves so that masks can be applied between the steps (before the log, so 0 means
silence) and so that every step exports as ordinary MatMul/elementwise ops.
Parity with laion's own modules is proven in ``tests/test_frontend.py``.

Layout convention throughout: time first, then frequency.
  X  complex STFT     (B, N_FRAMES, N_FREQS)  = (B, 1001, 513)
  P  power |X|^2      (B, N_FRAMES, N_FREQS)
  S  log-mel (dB)     (B, N_FRAMES, N_MELS)   = (B, 1001, 64)
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .audio import F_MAX, F_MIN, HOP, N_FFT, N_FREQS, N_MELS, SAMPLE_RATE

AMIN = 1e-10  # power floor before log10 (torchlibrosa's amin; ref = 1.0, no top_db)
_ON_GPU: dict[tuple[int, torch.device], tuple[np.ndarray, torch.Tensor]] = {}


def device_constant(array: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """A constant array (window, filterbank, bases: each made once by a cached function) as a
    tensor on ``device``. On the CPU it shares the array's memory, and a traced graph records it
    as a constant; on a GPU it is copied once and kept: a host-to-device copy in every forward
    would stall the stream, and cannot be captured in a CUDA graph."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu":
        return torch.from_numpy(array)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (id(array), device)
    if key not in _ON_GPU:           # the array is kept with it: its id cannot be reused
        _ON_GPU[key] = (array, torch.from_numpy(array).to(device))
    return _ON_GPU[key][1]


@functools.lru_cache(maxsize=None)
def hann_np() -> np.ndarray:
    # periodic ("fftbins") Hann of length N_FFT, as librosa/torchlibrosa use for analysis
    n = np.arange(N_FFT)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)


def hann_window(device: torch.device | str | None = None) -> torch.Tensor:
    """Periodic Hann window, shape (N_FFT,), float32."""
    return device_constant(hann_np(), device)


@functools.lru_cache(maxsize=None)
def mel_np() -> np.ndarray:
    import librosa.filters

    # librosa's default mel: Slaney scale, Slaney area normalisation — what laion uses.
    fb = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX)
    return np.ascontiguousarray(fb.T.astype(np.float32))  # (N_FREQS, N_MELS)


def mel_filterbank(device: torch.device | str | None = None) -> torch.Tensor:
    """Mel filterbank matrix, shape (N_FREQS, N_MELS) = (513, 64); ``P @ fb`` is mel power."""
    return device_constant(mel_np(), device)


def stft(wave: torch.Tensor) -> torch.Tensor:
    """Complex STFT (Hann 1024, hop 480, centred, reflect padding).

    wave: (B, n) float32  ->  X: (B, n // HOP + 1, N_FREQS) complex64
    """
    X = torch.stft(
        wave,
        n_fft=N_FFT,
        hop_length=HOP,
        window=hann_window(wave.device).to(wave.dtype),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )  # (B, F, T)
    return X.transpose(1, 2)


def power(X: torch.Tensor) -> torch.Tensor:
    """|X|^2 of a complex STFT, same shape, real."""
    return X.real.square() + X.imag.square()


def mel_power(P: torch.Tensor) -> torch.Tensor:
    """Linear power (B, T, 513) -> mel power (B, T, 64)."""
    return P @ mel_filterbank(P.device).to(P.dtype)


def to_db(mel: torch.Tensor) -> torch.Tensor:
    """Power -> decibels, 10·log10(max(x, AMIN)); the log step of laion's LogmelFilterBank."""
    return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """The whole front end: wave (B, n) -> log-mel S (B, n // HOP + 1, N_MELS) in dB."""
    return to_db(mel_power(power(stft(wave))))


# --------------------------------------------------------------------------- masking
# A mask is a gain on magnitude in both domains, so power sees M². It multiplies power
# *before* the log, so a mask of 0 is silence (the AMIN floor), never 0 dB.

MASK_DOMAINS = ("mel", "stft")
SILENCE_DB = 10.0 * float(np.log10(AMIN))  # -100 dB: the log-mel a zero mask gives (= to_db(0))


def masked_log_mel_from_mel(mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mel-masking: mel power (B, T, 64) and mask (B, T, 64) -> log(M² ⊙ mel(P)) (B, T, 64)."""
    return to_db(mel * mask.square())


def masked_log_mel_from_power(P: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """STFT-masking: power (B, T, 513) and mask (B, T, 513) -> log(mel(M² ⊙ P)) (B, T, 64)."""
    return to_db(mel_power(P * mask.square()))


@functools.lru_cache(maxsize=None)
def mel_to_linear_np() -> np.ndarray:
    """(N_MELS, N_FREQS) weights W with W.sum(0) == 1: the linear mask of bin f is the
    filterbank-weighted average of the mel mask over the bands covering f. The bins no mel
    filter covers (below ~94 Hz and above 14 kHz) copy the nearest band, so ones map to ones."""
    fb = mel_np()                                        # (513, 64)
    w = fb.copy()
    covered = w.sum(axis=1) > 0
    idx = np.flatnonzero(covered)
    first_band, last_band = int(np.argmax(fb[idx[0]])), int(np.argmax(fb[idx[-1]]))
    w[: idx[0], first_band] = 1.0                         # below the lowest filter
    w[idx[-1] + 1 :, last_band] = 1.0                     # above the highest filter
    w /= w.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(w.T.astype(np.float32))  # (64, 513)


def mel_to_linear_weights(device: torch.device | str | None = None) -> torch.Tensor:
    """(N_MELS, N_FREQS) averaging weights used by ``mel_mask_to_linear`` (columns sum to 1)."""
    return device_constant(mel_to_linear_np(), device)


MEL_TO_LINEAR = ("linear", "power")


def mel_mask_to_linear(mask: torch.Tensor, method: str = "linear") -> torch.Tensor:
    """Map a mel-grid mask (B, T, 64) to the linear STFT grid (B, T, 513), for listening.

    ``linear``: filterbank-weighted average of the band gains (a linear map).
    ``power``:  the same average taken on M² (then square-rooted), so a bin's power gain is the
                average of the power gains the encoder saw in its bands — non-linear in M, and
                closer to what the masked mel input held where a loud band sits beside a quiet one.
    Both map a mask of ones to ones and zeros to zeros.
    """
    w = mel_to_linear_weights(mask.device).to(mask.dtype)
    if method == "linear":
        return mask @ w
    if method == "power":
        return (mask.square() @ w).clamp_min(0).sqrt()
    raise ValueError(f"unknown mel-to-linear method {method!r}; use one of {MEL_TO_LINEAR}")


# --------------------------------------------------------------------------- inverse STFT


@functools.lru_cache(maxsize=None)
def window_square_sum_np(n_frames: int) -> np.ndarray:
    """Overlap-added squared Hann window over the centred, padded signal (not constant: 1024/480 is not COLA)."""
    win2 = hann_np().astype(np.float64) ** 2
    total = np.zeros(N_FFT + HOP * (n_frames - 1))
    for t in range(n_frames):
        total[t * HOP : t * HOP + N_FFT] += win2
    return total.astype(np.float32)


@functools.lru_cache(maxsize=None)
def idft_bases_np() -> tuple[np.ndarray, np.ndarray]:
    """Inverse real DFT bases with the synthesis window folded in, (N_FREQS, N_FFT):
    frame = re @ cr + im @ ci is irfft(re + j im, n=N_FFT) * hann (DC and Nyquist counted once)."""
    k = np.arange(N_FREQS)[:, None]
    n = np.arange(N_FFT)[None, :]
    ang = 2.0 * np.pi * ((k * n) % N_FFT) / N_FFT
    weight = np.full((N_FREQS, 1), 2.0)
    weight[0] = weight[-1] = 1.0
    win = hann_np().astype(np.float64)[None, :]
    cr = weight * np.cos(ang) / N_FFT * win
    ci = -weight * np.sin(ang) / N_FFT * win
    return cr.astype(np.float32), ci.astype(np.float32)


def istft(X: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``stft``: complex (B, T, 513) -> wave (B, length).

    Each frame is inverse-DFT'd, multiplied by the synthesis window, overlap-added, and divided
    by the overlap-added squared window (window-sum normalisation); the centre padding is cut off.
    The overlap-add adds the p-th hop-long part of every windowed frame into the output shifted
    by p hops (three strided adds); ``F.fold`` first transposed every frame, a copy that cost
    5x the rest of the inverse on the CPU.
    """
    B, T, _ = X.shape
    parts = -(-N_FFT // HOP)                                                   # 3 hops a frame
    frames = torch.fft.irfft(X, n=N_FFT, dim=-1).mul_(hann_window(X.device).to(X.real.dtype))  # (B, T, N_FFT)
    y = frames.new_zeros(B, T + parts - 1, HOP)
    for p in range(parts):
        n = min(HOP, N_FFT - p * HOP)
        y[:, p : p + T, :n] += frames[:, :, p * HOP : p * HOP + n]
    out_len = N_FFT + HOP * (T - 1)
    y = y.reshape(B, -1)[:, :out_len]
    norm = device_constant(window_square_sum_np(T), y.device).to(y.dtype)
    y = y / torch.where(norm > 1e-8, norm, torch.ones_like(norm))
    start = N_FFT // 2
    y = y[:, start : start + length]
    if y.shape[1] < length:  # only when asked for more than the frames cover
        y = torch.nn.functional.pad(y, (0, length - y.shape[1]))
    return y
