"""Fused Triton kernels (issue E): the GPU listenable step in one launch (``istft``).

``listenable`` is what the torch backend calls: on CUDA with triton it runs the fused kernel,
elsewhere the torch ops of ``spectral`` (the same maths; ``istft.masked_istft_reference``).
"""
from __future__ import annotations

import functools
import warnings

import torch

from lmaczs_cli import spectral


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def listenable(X: torch.Tensor, masks: torch.Tensor, prompts: int, domain: str, mel_to_linear: str,
               length: int) -> torch.Tensor:
    """X complex (B, T, 513); masks (B*K, T, 64 | 513) -> listenable waves (B*K, length).

    Row b*K+k is clip b under its k-th prompt's mask (mel masks expanded by ``mel_to_linear``)."""
    from .istft import masked_istft, masked_istft_reference

    mel_linear = domain == "mel" and mel_to_linear == "linear"
    if domain == "mel" and not mel_linear:          # the non-linear expansion happens before the kernel
        masks = spectral.mel_mask_to_linear(masks, mel_to_linear)
    weights = spectral.mel_to_linear_weights(X.device) if mel_linear else None
    if X.is_cuda and triton_available():
        return masked_istft(X.real, X.imag, masks, prompts, weights, length)
    if X.is_cuda:
        _warn_no_triton()
    return masked_istft_reference(X.real.float(), X.imag.float(), masks.float(), prompts, weights, length)


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn("triton is not installed: the listenable step runs as separate torch ops on the GPU "
                  "(pip install 'lmaczs[gpu]' for the fused kernel)", stacklevel=3)
