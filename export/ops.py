"""The front end and the listenable inverse written as ops every runtime has.

``spectral.stft`` / ``spectral.istft`` use ``torch.stft``, ``torch.fft.irfft`` and ``fold``;
these export as ONNX ``STFT``/``DFT`` or ConvTranspose, which TensorRT lacks or runs poorly.
Here the same maths is slicing, concatenation and MatMul with precomputed bases:

  wave (B, 480000) --reflect pad by slice/concat--> (B, 481024)
       --framing: three slices of 480-sample chunks, concatenated--> frames (B, 1001, 1024)
       --window, DFT as MatMul--> re, im (B, 1001, 513)
  re, im --inverse DFT as MatMul, synthesis window--> frames (B, 1001, 1024)
       --overlap-add by constant pads and adds of chunk views--> (B, 481440)
       --divide by the summed squared window, cut the centre padding--> wave (B, 480000)

HTSAT's bicubic 1001 -> 1024 frame stretch becomes one MatMul with the matrix torch's own
``interpolate`` implies (align_corners=True, as laion calls it).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from lmaczs_cli.audio import CLIP_SAMPLES, HOP, N_FFT, N_FRAMES, N_FREQS
from lmaczs_cli.spectral import _hann_np, _window_square_sum_np

PAD = N_FFT // 2                                    # centre padding, samples each side
TAIL = N_FFT - 2 * HOP                              # 64: the part of a frame in its third chunk
N_CHUNKS = N_FRAMES + 2                             # 480-sample chunks the padded signal spans
if N_FFT > 3 * HOP or N_FRAMES != CLIP_SAMPLES // HOP + 1:
    raise ImportError("export.ops assumes a frame spans three hop-sized chunks and 10-s clips")


@functools.lru_cache(maxsize=None)
def _dft_np() -> tuple[np.ndarray, np.ndarray]:
    """Windowed forward DFT bases (N_FFT, N_FREQS): frames @ cos = Re X, frames @ sin = Im X."""
    n = np.arange(N_FFT)[:, None]
    k = np.arange(N_FREQS)[None, :]
    ang = 2.0 * np.pi * ((n * k) % N_FFT) / N_FFT
    win = _hann_np().astype(np.float64)[:, None]
    return (win * np.cos(ang)).astype(np.float32), (-win * np.sin(ang)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _idft_np() -> tuple[np.ndarray, np.ndarray]:
    """Inverse real DFT bases with the synthesis window folded in, (N_FREQS, N_FFT):
    frame = re @ cr + im @ ci is irfft(re + j im, n=N_FFT) * hann (DC and Nyquist counted once)."""
    k = np.arange(N_FREQS)[:, None]
    n = np.arange(N_FFT)[None, :]
    ang = 2.0 * np.pi * ((k * n) % N_FFT) / N_FFT
    weight = np.full((N_FREQS, 1), 2.0)
    weight[0] = weight[-1] = 1.0
    win = _hann_np().astype(np.float64)[None, :]
    cr = weight * np.cos(ang) / N_FFT * win
    ci = -weight * np.sin(ang) / N_FFT * win
    return cr.astype(np.float32), ci.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _inv_norm_np() -> np.ndarray:
    """1 / summed squared window over the kept samples, (CLIP_SAMPLES,)."""
    norm = _window_square_sum_np(N_FRAMES).astype(np.float64)[PAD: PAD + CLIP_SAMPLES]
    return (1.0 / np.where(norm > 1e-8, norm, 1.0)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _bicubic_np(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix equal to ``F.interpolate(..., mode="bicubic", align_corners=True)``
    along one axis: torch's kernel applied to the identity. In float32 on purpose: torch computes
    the source coordinates of a float32 input in float32, and those differ from exact ones by up
    to 3e-4 of the signal at 1001 -> 1024; the float32 identity reproduces them (error ~5e-7)."""
    eye = torch.eye(n_in, dtype=torch.float32)[None, None]          # (1, 1, n_in, n_in)
    m = F.interpolate(eye, size=(n_out, n_in), mode="bicubic", align_corners=True)[0, 0]
    return m.numpy().astype(np.float32)


def const(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A precomputed array as a constant of ``like``'s device and dtype."""
    return torch.from_numpy(a).to(like.device, like.dtype)


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32 bicubic (align_corners) resampling matrix."""
    return torch.from_numpy(_bicubic_np(n_in, n_out))


def reflect_pad(wave: torch.Tensor) -> torch.Tensor:
    """Centre reflect padding by slice/concat: (B, n) -> (B, n + N_FFT)."""
    left = wave[:, 1: PAD + 1].flip(-1)
    right = wave[:, -PAD - 1: -1].flip(-1)
    return torch.cat([left, wave, right], dim=1)


def frames(wave: torch.Tensor) -> torch.Tensor:
    """Centred analysis frames without the window: (B, 480000) -> (B, 1001, 1024).

    Frame t covers chunks t, t+1 and the first TAIL samples of t+2 of the 480-sample chunk view.
    """
    x = F.pad(reflect_pad(wave), (0, N_CHUNKS * HOP - CLIP_SAMPLES - N_FFT))   # (B, 1003 * 480)
    chunks = x.reshape(-1, N_CHUNKS, HOP)                                      # (B, 1003, 480)
    return torch.cat([chunks[:, :N_FRAMES], chunks[:, 1: N_FRAMES + 1],
                      chunks[:, 2:, :TAIL]], dim=2)


def stft_matmul(wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """wave (B, 480000) -> (Re X, Im X), each (B, 1001, 513); equals ``spectral.stft``."""
    fr = frames(wave)
    cos, sin = _dft_np()
    return fr @ const(cos, fr), fr @ const(sin, fr)


def overlap_add(fr: torch.Tensor) -> torch.Tensor:
    """Overlap-add of hop-spaced frames (B, 1001, 1024) -> (B, 1003 * 480), as three shifted
    chunk views summed (constant pads only)."""
    a = F.pad(fr[:, :, :HOP], (0, 0, 0, 2))                     # chunk t
    b = F.pad(fr[:, :, HOP: 2 * HOP], (0, 0, 1, 1))             # chunk t + 1
    c = F.pad(fr[:, :, 2 * HOP:], (0, HOP - TAIL, 2, 0))        # first TAIL samples of chunk t + 2
    return (a + b + c).reshape(-1, N_CHUNKS * HOP)


def istft_matmul(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """(Re X, Im X) (B, 1001, 513) -> wave (B, 480000); equals ``spectral.istft(X, 480000)``."""
    cr, ci = _idft_np()
    fr = re @ const(cr, re) + im @ const(ci, im)                 # windowed frames (B, 1001, 1024)
    y = overlap_add(fr)[:, PAD: PAD + CLIP_SAMPLES]
    return y * const(_inv_norm_np(), y)
