"""The fused Triton listenable kernel vs its torch reference and torch.istft (CPU: Triton's interpreter)."""
from __future__ import annotations

import os

import pytest
import torch

from lmaczs_cli import spectral
from lmaczs_cli.audio import HOP, N_FFT
from lmaczs_cli.kernels import istft


@pytest.fixture(scope="module")
def interpreted():
    """Triton in interpreter mode on CPU tensors; skipped only when triton cannot be imported."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"      # read when the kernel is built (below, once)
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton cannot be imported here: {e}")
    istft._kernel.cache_clear()
    yield "cuda" if torch.cuda.is_available() else "cpu"
    istft._kernel.cache_clear()
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


def _case(B: int, K: int, T: int, bins: int, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    X = spectral.stft(torch.randn(B, HOP * (T - 1), generator=g))
    masks = torch.rand(B * K, T, bins, generator=g)
    return X.real.to(device), X.imag.to(device), masks.to(device)


# small blocks would be faster on a GPU; large ones keep the interpreter quick
BLOCKS = dict(block_t=32, block_n=128, block_k=128)


@pytest.mark.parametrize("B,K,T,domain", [(1, 1, 11, "mel"), (2, 3, 7, "stft"), (1, 2, 21, "mel"), (3, 1, 5, "mel")])
def test_kernel_matches_torch_reference(interpreted, B, K, T, domain):
    bins = 64 if domain == "mel" else 513
    re, im, masks = _case(B, K, T, bins, seed=T, device=interpreted)
    W = spectral.mel_to_linear_weights(interpreted) if domain == "mel" else None
    length = HOP * (T - 1)
    got = istft.masked_istft(re, im, masks, K, W, length, **BLOCKS)
    ref = istft.masked_istft_reference(re, im, masks, K, W, length)
    assert got.shape == (B * K, length)
    assert float((got - ref).abs().max()) <= 1e-4
    assert float(ref.abs().max()) > 0.1          # not two zero signals


def test_kernel_matches_torch_istft(interpreted):
    """Mask of ones on the linear grid: the kernel is torch.istft of the clip's own STFT."""
    T, length = 9, HOP * 8 - 100
    re, im, _ = _case(2, 1, T, 513, seed=5, device=interpreted)
    ones = torch.ones(2, T, 513, device=interpreted)
    got = istft.masked_istft(re, im, ones, 1, None, length, **BLOCKS)
    ref = torch.istft(torch.complex(re, im).transpose(1, 2), n_fft=N_FFT, hop_length=HOP,
                      window=spectral.hann_window(interpreted), center=True, length=length)
    assert float((got - ref).abs().max()) <= 1e-4


def test_kernel_rejects_mismatched_shapes(interpreted):
    re, im, masks = _case(1, 2, 5, 64, seed=1, device=interpreted)
    with pytest.raises(ValueError, match="shapes do not fit"):
        istft.masked_istft(re, im, masks, 3, spectral.mel_to_linear_weights(interpreted), 100)
    with pytest.raises(ValueError, match="needs mel_weights"):
        istft.masked_istft(re, im, masks, 2, None, 100)


@pytest.mark.parametrize("method", spectral.MEL_TO_LINEAR)
def test_triton_and_fft_listenable_implementations_agree(interpreted, method):
    """The model's two implementations of the listenable step: the Triton kernel (interpreted
    here) and torch FFT ops, K = 2 prompts per clip, mel masks expanded either way."""
    from lmaczs_cli.model import FftSpectral, Spectrum, TritonSpectral

    re, im, masks = _case(2, 2, 6, 64, seed=7, device=interpreted)
    spec = Spectrum(torch.complex(re, im), torch.zeros(0), None)
    got = TritonSpectral().listen(spec, masks, 2, "mel", method, HOP * 5)
    ref = FftSpectral().listen(spec, masks, 2, "mel", method, HOP * 5)
    assert float((got - ref).abs().max()) <= 1e-4
