"""The GPU listenable step in one launch: mask expansion -> complex multiply -> inverse DFT ->
synthesis window -> overlap-add -> window-sum normalisation (Triton), and its torch reference.

  X      complex STFT of the clips       (B, T, 513)      (given as real and imaginary parts)
  masks  one mask per (clip, prompt)     (B*K, T, M)      M = 64 (mel grid) or 513 (linear grid)
  W      mel -> linear weights           (64, 513)        only for mel-grid masks
  ->     listenable waveforms            (B*K, length)    length <= HOP * (T - 1)

Each program owns BLOCK_T consecutive 480-sample chunks of one output row (in the centre-
padded time axis) and BLOCK_N samples of each. A chunk c receives three frames: frame c's
samples [0, 480), frame c-1's [480, 960) and frame c-2's [960, 1024). For each of the three the
program expands the masks of those frames to 513 bins (a dot with W), multiplies the STFT,
and takes the needed columns of the inverse real DFT (a dot with precomputed bases that carry
the synthesis window); it then divides by the summed squared window and writes once. No
atomics, no intermediate frames in memory. Row b*K+k reads clip b's STFT: K prompts share it.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from lmaczs_cli import spectral
from lmaczs_cli.audio import HOP, N_FFT, N_FREQS

PAD = N_FFT // 2


def masked_istft_reference(re: torch.Tensor, im: torch.Tensor, masks: torch.Tensor, prompts: int,
                           mel_weights: torch.Tensor | None, length: int) -> torch.Tensor:
    """Torch reference: re, im (B, T, 513); masks (B*K, T, M) -> waves (B*K, length).

    mel_weights (64, 513) expands mel-grid masks; None means masks are already on 513 bins."""
    gain = masks @ mel_weights if mel_weights is not None else masks          # (B*K, T, 513)
    X = torch.complex(re, im).repeat_interleave(prompts, dim=0) * gain
    return spectral.istft(X, length)


@functools.lru_cache(maxsize=None)
def _bases_np() -> tuple[np.ndarray, np.ndarray]:
    return spectral.idft_bases_np()          # (513, 1024) each: inverse real DFT x synthesis window


@functools.lru_cache(maxsize=None)
def _inv_norm_np(n_frames: int) -> np.ndarray:
    """1 / overlap-added squared window over the padded axis, zero-extended to (T + 2) * HOP."""
    norm = spectral.window_square_sum_np(n_frames).astype(np.float64)
    inv = np.where(norm > 1e-8, 1.0 / np.where(norm > 1e-8, norm, 1.0), 1.0)
    out = np.zeros((n_frames + 2) * HOP, np.float32)
    out[: inv.size] = inv
    return out


def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise ImportError("the fused listenable kernel needs triton: pip install 'lmaczs[gpu]'") from e
    return triton, tl


@functools.lru_cache(maxsize=None)
def _kernel():
    """Build the @triton.jit kernel on first use (so importing this module never needs triton)."""
    triton, tl = _triton()

    @triton.jit
    def masked_istft_kernel(
        re_ptr, im_ptr, mask_ptr, w_ptr, cr_ptr, ci_ptr, inv_ptr, out_ptr,
        T, length, prompts, n_mask,
        HOP_: tl.constexpr, PAD_: tl.constexpr, NFFT: tl.constexpr, NF: tl.constexpr,
        MEL: tl.constexpr, M_BLOCK: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0)                          # b * K + k
        clip = row // prompts
        chunks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)     # (BLOCK_T,) chunk index c
        s = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)          # (BLOCK_N,) sample in chunk
        acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)   # tl.full, not tl.zeros: a @jit helper that
        # the interpreter cannot patch when triton was imported before TRITON_INTERPRET was set
        for j in tl.static_range(3):                    # frame c - j contributes samples j*HOP + s
            t = chunks - j
            t_ok = (t >= 0) & (t < T)
            n = j * HOP_ + s
            n_ok = (n < NFFT) & (s < HOP_)
            for k0 in range(0, NF, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < NF
                tk_ok = t_ok[:, None] & k_ok[None, :]
                spec = (clip * T + t)[:, None] * NF + k[None, :]
                xr = tl.load(re_ptr + spec, mask=tk_ok, other=0.0)
                xi = tl.load(im_ptr + spec, mask=tk_ok, other=0.0)
                if MEL:                                 # gain = mask rows (BLOCK_T, 64) @ W[:, k]
                    m = tl.arange(0, M_BLOCK)
                    m_ok = m < n_mask
                    mrow = tl.load(mask_ptr + (row * T + t)[:, None] * n_mask + m[None, :],
                                   mask=t_ok[:, None] & m_ok[None, :], other=0.0)
                    w = tl.load(w_ptr + m[:, None] * NF + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                    gain = tl.dot(mrow, w, input_precision="ieee")
                else:
                    gain = tl.load(mask_ptr + (row * T + t)[:, None] * NF + k[None, :], mask=tk_ok, other=0.0)
                basis = k[:, None] * NFFT + n[None, :]
                kn_ok = k_ok[:, None] & n_ok[None, :]
                cr = tl.load(cr_ptr + basis, mask=kn_ok, other=0.0)
                ci = tl.load(ci_ptr + basis, mask=kn_ok, other=0.0)
                acc += tl.dot(gain * xr, cr, input_precision="ieee")
                acc += tl.dot(gain * xi, ci, input_precision="ieee")
        p = chunks[:, None] * HOP_ + s[None, :]            # position on the padded axis
        inv = tl.load(inv_ptr + p, mask=(s[None, :] < HOP_) & (chunks[:, None] < T + 2), other=0.0)
        dst = p - PAD_
        ok = (s[None, :] < HOP_) & (dst >= 0) & (dst < length)
        tl.store(out_ptr + row * length + dst, acc * inv, mask=ok)

    return masked_istft_kernel


def masked_istft(re: torch.Tensor, im: torch.Tensor, masks: torch.Tensor, prompts: int,
                 mel_weights: torch.Tensor | None, length: int, *, block_t: int = 16, block_n: int = 32,
                 block_k: int = 32) -> torch.Tensor:
    """Fused Triton version of `masked_istft_reference` (same arguments and result).

    On CUDA tensors it runs on the GPU; with TRITON_INTERPRET=1 it runs CPU tensors in
    Triton's interpreter (the tests)."""
    triton, _ = _triton()
    BK, T, M = masks.shape
    B = re.shape[0]
    if BK != B * prompts or re.shape != (B, T, N_FREQS) or im.shape != re.shape:
        raise ValueError(f"shapes do not fit: re/im {tuple(re.shape)}, masks {tuple(masks.shape)}, K={prompts}")
    if length > HOP * (T - 1):
        raise ValueError(f"length {length} exceeds what {T} frames cover ({HOP * (T - 1)})")
    mel = mel_weights is not None
    if not mel and M != N_FREQS:
        raise ValueError(f"a mask with {M} bins needs mel_weights ({M}, {N_FREQS})")
    dev = re.device
    cr, ci = (spectral.device_constant(a, dev) for a in _bases_np())     # copied to a GPU once, kept
    inv = spectral.device_constant(_inv_norm_np(T), dev)
    w = mel_weights.to(dev, torch.float32).contiguous() if mel else torch.zeros(1, N_FREQS, device=dev)
    out = torch.empty(BK, length, device=dev, dtype=torch.float32)
    grid = (BK, triton.cdiv(T + 2, block_t), triton.cdiv(HOP, block_n))
    _kernel()[grid](
        re.float().contiguous(), im.float().contiguous(), masks.float().contiguous(), w, cr, ci, inv, out,
        T, length, prompts, M,
        HOP_=HOP, PAD_=PAD, NFFT=N_FFT, NF=N_FREQS, MEL=mel, M_BLOCK=max(16, triton.next_power_of_2(M if mel else 16)),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
