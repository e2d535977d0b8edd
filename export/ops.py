"""The front end and the listenable inverse written as ops every runtime has.

``spectral.stft`` / ``spectral.istft`` use ``torch.stft``, ``torch.fft.irfft`` and ``fold``;
these export as ONNX ``STFT``/``DFT`` or ConvTranspose, which TensorRT lacks or runs poorly.
Here the same maths is slicing, concatenation and MatMul with precomputed bases:

  wave (B, 480000) --reflect pad by slice/concat--> (B, 481024)
       --framing: three slices of 480-sample chunks, concatenated--> frames (B, 1001, 1024)
       --window, DFT as two 32-point MatMul stages--> X in DFT order (B, 1001, 32, 64)
  X * gain --inverse DFT as two 32-point MatMul stages, synthesis window--> frames (B, 1001, 1024)
       --overlap-add by constant pads and adds of chunk views--> (B, 481440)
       --divide by the summed squared window, cut the centre padding--> wave (B, 480000)

The DFTs are factorised 1024 = 32 x 32 (Cooley-Tukey's "four-step" form without its
transposes): a 32-point DFT along one axis of the frame viewed as a 32 x 32 matrix (one
MatMul), a twiddle product (elementwise), a 32-point DFT along the other axis (one MatMul).
That is ~10x fewer multiply-adds than one dense (1024 x 513) basis per direction. The
spectrum stays in the order the factorisation leaves it ("DFT order": bin k1 + 32 k2 at row
k1, column k2, all 1024 bins) and everything downstream reads that order: the mel filterbank
and the mel -> linear mask weights have their rows/columns permuted once, at export, and the
inverse DFT's first stage is written for it — so no transpose, Hermitian extension or
reordering runs per clip. ``stft_matmul`` / ``istft_matmul`` give natural order for callers
that want it (one Gather each). The dense inverse basis the Triton kernel uses is ``spectral.idft_bases_np``.

HTSAT's bicubic 1001 -> 1024 frame stretch becomes one MatMul with the matrix torch's own
``interpolate`` implies (align_corners=True, as laion calls it).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from lmaczs_cli.audio import CLIP_SAMPLES, HOP, N_FFT, N_FRAMES, N_FREQS
from lmaczs_cli.spectral import hann_np, window_square_sum_np

PAD = N_FFT // 2                                    # centre padding, samples each side
TAIL = N_FFT - 2 * HOP                              # 64: the part of a frame in its third chunk
N_CHUNKS = N_FRAMES + 2                             # 480-sample chunks the padded signal spans
if N_FFT > 3 * HOP or N_FRAMES != CLIP_SAMPLES // HOP + 1:
    raise ImportError("export.ops assumes a frame spans three hop-sized chunks and 10-s clips")


@functools.lru_cache(maxsize=None)
def _inv_norm_np() -> np.ndarray:
    """1 / summed squared window over the kept samples, (CLIP_SAMPLES,)."""
    norm = window_square_sum_np(N_FRAMES).astype(np.float64)[PAD: PAD + CLIP_SAMPLES]
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


P = Q = 32                                          # N_FFT = P * Q for the factorised DFTs
if P * Q != N_FFT or P != Q:
    raise ImportError("export.ops factorises a 1024-point DFT as 32 x 32 (the inverse reads rows as columns: P == Q)")


def _angles(rows: int, cols: int, n: int) -> np.ndarray:
    """2 pi (r c mod n) / n for r < rows, c < cols, in float64."""
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    return 2.0 * np.pi * ((r * c) % n) / n


@functools.lru_cache(maxsize=None)
def _fft_np() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Constants of the factorised forward DFT, with n = Q n1 + n2 and k = k1 + P k2:

      Y[k1, n2] = sum_n1 W_P^(n1 k1) x[n1, n2]        stage 1: (2P, P) @ x (P, Q) -> [Re; Im]
      Z[k1, n2] = Y[k1, n2] W_N^(n2 k1)               twiddle (P, Q), cos and sin
      X[k1, k2] = sum_n2 Z[k1, n2] W_Q^(n2 k2)         stage 2: [Re Z, Im Z] (P, 2Q) @ (2Q, 2Q)

    with W_M = exp(-2 pi i / M). Returns (stage1, twiddle cos, twiddle sin, stage2) in float32."""
    a1 = _angles(P, P, P)                                            # (k1, n1)
    stage1 = np.concatenate([np.cos(a1), -np.sin(a1)], axis=0)      # W = cos - i sin
    tw = _angles(P, Q, N_FFT)                                        # (k1, n2)
    a2 = _angles(Q, Q, Q)                                            # (n2, k2)
    c2, s2 = np.cos(a2), np.sin(a2)
    # (zr + i zi)(c - i s) = zr c + zi s + i (zi c - zr s)
    stage2 = np.block([[c2, -s2], [s2, c2]])
    return tuple(a.astype(np.float32) for a in (stage1, np.cos(tw), np.sin(tw), stage2))


@functools.lru_cache(maxsize=None)
def _ifft_np() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Constants of the factorised inverse DFT of a spectrum in DFT order (see `stft_dft_order`):
    F[a, b] = X[a + P b], i.e. X[Q k1 + k2] = F[k2, k1]; output n = n1 + P n2:

      A[k2, n1] = sum_k1 F[k2, k1] W_P^(-n1 k1)         stage 1: [Re F, Im F] (Q, 2P) @ (2P, 2P)
      B[k2, n1] = A[k2, n1] W_N^(-n1 k2)                twiddle (Q, P), cos and sin
      x[n2, n1] = Re sum_k2 W_Q^(-n2 k2) B[k2, n1]      stage 2: (Q, 2Q) @ [Re B; Im B] (2Q, P)

    The 1 / N of the inverse is folded into stage 2. Returns (stage1, twiddle cos, twiddle sin,
    stage2) in float32."""
    a1 = _angles(P, P, P)                                            # (k1, n1)
    c1, s1 = np.cos(a1), np.sin(a1)
    stage1 = np.block([[c1, s1], [-s1, c1]])                        # (fr + i fi)(c + i s), right-multiplied
    tw = _angles(Q, P, N_FFT)                                        # (k2, n1)
    a2 = _angles(Q, Q, Q)                                            # (n2, k2)
    stage2 = np.concatenate([np.cos(a2), -np.sin(a2)], axis=1) / N_FFT   # Re((br + i bi)(c + i s))
    return tuple(a.astype(np.float32) for a in (stage1, np.cos(tw), np.sin(tw), stage2))


def _bins_np() -> np.ndarray:
    """(P, Q) the DFT bin k1 + P k2 that DFT-order entry [k1, k2] holds (0..1023)."""
    return np.arange(P)[:, None] + P * np.arange(Q)[None, :]


@functools.lru_cache(maxsize=None)
def _dft_order_np() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index maps between natural bin order and DFT order (P, 2Q) = [Re X[k1 + P k2] | Im ...]:
    (source (P*2Q,) into concat(re, im) of natural (N_FREQS,) halves, with bins past Nyquist
    read from their mirror; its sign (-1 on mirrored imaginary parts); natural (N_FREQS,) into a
    (P*Q,) DFT-order power)."""
    col = np.arange(2 * Q)[None, :]
    k = np.concatenate([_bins_np()] * 2, axis=1)                     # (P, 2Q) bin of each entry
    mirrored = k > N_FFT // 2
    b = np.where(mirrored, N_FFT - k, k)
    imag = col >= Q
    source = (b + imag * N_FREQS).reshape(-1)
    sign = np.where(imag & mirrored, -1.0, 1.0).reshape(-1)
    kn = np.arange(N_FREQS)
    natural = (kn % P) * Q + kn // P
    return source.astype(np.int64), sign.astype(np.float32), natural.astype(np.int64)


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


def stft_dft_order(wave: torch.Tensor) -> torch.Tensor:
    """wave (B, 480000) -> STFT in DFT order (B, 1001, P, 2Q): entry [k1, k2] is Re X[k1 + P k2]
    and [k1, Q + k2] its Im, all 1024 bins (past Nyquist: conjugates). The order the factorised
    DFT leaves them in; consumers take it as it is (`power_dft_order`, `mel_power_dft_order`,
    `istft_dft_order`), so no transpose is spent on reordering."""
    fr = frames(wave) * const(hann_np(), wave)
    stage1, tw_c, tw_s, stage2 = (const(a, wave) for a in _fft_np())
    y = stage1 @ fr.reshape(*fr.shape[:-1], P, Q)                   # (B, T, 2P, Q): Re Y over Im Y
    yr, yi = y[..., :P, :], y[..., P:, :]
    z = torch.cat([yr * tw_c + yi * tw_s, yi * tw_c - yr * tw_s], dim=-1)   # (B, T, P, 2Q)
    return z @ stage2


def power_dft_order(X: torch.Tensor) -> torch.Tensor:
    """|X|^2 of a DFT-order STFT (B, T, P, 2Q) -> (B, T, P * Q), bin k1 + P k2 at k1 * Q + k2."""
    return (X[..., :Q].square() + X[..., Q:].square()).flatten(-2)


@functools.lru_cache(maxsize=None)
def _mel_fb_np() -> np.ndarray:
    """``spectral``'s mel filterbank (N_FREQS, N_MELS) with rows in DFT order (P * Q, N_MELS),
    zero past Nyquist: ``power_dft_order(X) @ it`` equals ``natural power @ filterbank``."""
    from lmaczs_cli.spectral import mel_np

    below = (_bins_np() <= N_FFT // 2).reshape(-1, 1)
    return np.ascontiguousarray(np.where(below, mel_np()[_gain_source_np()], 0.0).astype(np.float32))


def mel_power_dft_order(power: torch.Tensor) -> torch.Tensor:
    """DFT-order power (B, T, P * Q) -> mel power (B, T, N_MELS), as ``spectral.mel_power``."""
    return power @ const(_mel_fb_np(), power)


def natural_order(x: torch.Tensor) -> torch.Tensor:
    """Values on DFT-order bins (B, T, P * Q) -> natural order (B, T, N_FREQS) (one Gather)."""
    return x[..., torch.from_numpy(_dft_order_np()[2]).to(x.device)]


def _gain_source_np() -> np.ndarray:
    """(P * Q,) natural bin (its mirror past Nyquist) of each DFT-order bin: a real gain's source."""
    return _dft_order_np()[0].reshape(P, 2 * Q)[:, :Q].reshape(-1)


def gain_dft_order(gain: torch.Tensor) -> torch.Tensor:
    """A real gain on natural bins (B, T, N_FREQS) -> DFT order (B, T, P, 1, Q): one value per
    bin (a bin's mirror takes the bin's), to multiply a spectrum viewed as (B, T, P, 2, Q), Re and
    Im alike (one Gather)."""
    source = torch.from_numpy(_gain_source_np()).to(gain.device)
    return gain[..., source].unflatten(-1, (P, 1, Q))


@functools.lru_cache(maxsize=None)
def _mel_gain_np() -> np.ndarray:
    """``spectral``'s mel -> linear mask weights (N_MELS, N_FREQS) with columns in DFT order (N_MELS, P * Q)."""
    from lmaczs_cli.spectral import mel_to_linear_np

    return np.ascontiguousarray(mel_to_linear_np()[:, _gain_source_np()])


def mel_gain_dft_order(masks: torch.Tensor, method: str = "linear") -> torch.Tensor:
    """``spectral.mel_mask_to_linear`` straight into DFT order: masks (B, T, N_MELS) -> gain
    (B, T, P, 1, Q) as `gain_dft_order` gives it (one MatMul, no Gather)."""
    w = const(_mel_gain_np(), masks)
    if method == "linear":
        gain = masks @ w
    elif method == "power":
        gain = (masks.square() @ w).clamp_min(0).sqrt()
    else:
        raise ValueError(f"unknown mel-to-linear method {method!r}; use linear or power")
    return gain.unflatten(-1, (P, 1, Q))


def to_dft_order(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """Natural (Re X, Im X) (B, T, N_FREQS) -> DFT order (B, T, P, 2Q), mirrors conjugated."""
    source, sign, _ = _dft_order_np()
    x = torch.cat([re, im], dim=-1)[..., torch.from_numpy(source).to(re.device)] * const(sign, re)
    return x.unflatten(-1, (P, 2 * Q))


def stft_matmul(wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """wave (B, 480000) -> (Re X, Im X), each (B, 1001, 513) in natural order; equals ``spectral.stft``."""
    X = stft_dft_order(wave)
    return natural_order(X[..., :Q].flatten(-2)), natural_order(X[..., Q:].flatten(-2))


def overlap_add(fr: torch.Tensor) -> torch.Tensor:
    """Overlap-add of hop-spaced frames (B, 1001, 1024) -> (B, 1003 * 480), as three shifted
    chunk views summed (constant pads only)."""
    a = F.pad(fr[:, :, :HOP], (0, 0, 0, 2))                     # chunk t
    b = F.pad(fr[:, :, HOP: 2 * HOP], (0, 0, 1, 1))             # chunk t + 1
    c = F.pad(fr[:, :, 2 * HOP:], (0, HOP - TAIL, 2, 0))        # first TAIL samples of chunk t + 2
    return (a + b + c).reshape(-1, N_CHUNKS * HOP)


def istft_dft_order(X: torch.Tensor) -> torch.Tensor:
    """A spectrum in DFT order (B, 1001, P, 2Q), Hermitian, -> wave (B, 480000); with the
    spectrum of `stft_dft_order` it equals ``spectral.istft`` of the natural one."""
    stage1, tw_c, tw_s, stage2 = (const(a, X) for a in _ifft_np())
    a = X @ stage1                                                    # (B, T, Q, 2P): [Re A | Im A]
    ar, ai = a[..., :P], a[..., P:]
    b = torch.cat([ar * tw_c - ai * tw_s, ai * tw_c + ar * tw_s], dim=-2)   # (B, T, 2Q, P)
    fr = (stage2 @ b).flatten(-2) * const(hann_np(), X)              # (n2, n1) -> n = n1 + P n2, windowed
    y = overlap_add(fr)[:, PAD: PAD + CLIP_SAMPLES]
    return y * const(_inv_norm_np(), y)


def istft_matmul(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """(Re X, Im X) (B, 1001, 513) -> wave (B, 480000); equals ``spectral.istft(X, 480000)``."""
    return istft_dft_order(to_dft_order(re, im))
