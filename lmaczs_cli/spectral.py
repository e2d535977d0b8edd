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

from .audio import F_MAX, F_MIN, HOP, N_FFT, N_MELS, SAMPLE_RATE

AMIN = 1e-10  # power floor before log10 (torchlibrosa's amin; ref = 1.0, no top_db)


@functools.lru_cache(maxsize=None)
def _hann_np() -> np.ndarray:
    # periodic ("fftbins") Hann of length N_FFT, as librosa/torchlibrosa use for analysis
    n = np.arange(N_FFT)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)


def hann_window(device: torch.device | str | None = None) -> torch.Tensor:
    """Periodic Hann window, shape (N_FFT,), float32."""
    return torch.from_numpy(_hann_np()).to(device)


@functools.lru_cache(maxsize=None)
def _mel_np() -> np.ndarray:
    import librosa.filters

    # librosa's default mel: Slaney scale, Slaney area normalisation — what laion uses.
    fb = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX)
    return np.ascontiguousarray(fb.T.astype(np.float32))  # (N_FREQS, N_MELS)


def mel_filterbank(device: torch.device | str | None = None) -> torch.Tensor:
    """Mel filterbank matrix, shape (N_FREQS, N_MELS) = (513, 64); ``P @ fb`` is mel power."""
    return torch.from_numpy(_mel_np()).to(device)


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
