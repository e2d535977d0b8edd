"""The torch modules that ``lmaczs export`` traces, and the patches that make laion's HTSAT
trace with a dynamic batch and without a bicubic ``Resize``.

  AudioEncoderGraph   waves (B, 480000)                -> embedding (B, D), h1..h4
  TextEncoderGraph    tokens (B, 77) int64             -> embedding (B, D)      [CLIP-BPE towers]
                      input_ids, attention_mask (B, 77) -> embedding (B, D)     [RoBERTa towers]
  ExplainerGraph      waves (B, 480000), text (B, K, D) -> masks (B, K, 1001, bins),
                      audio (B, K, 480000), similarity (B, K), masked_similarity (B, K)

All three compute in eager mode exactly what ``ClapModel`` / ``ExplainerModule`` compute (the
tests hold them to it); only the ops differ (``ops``: framing + factorised DFT MatMuls instead of
STFT, the spectrum kept in the DFT's own bin order).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmaczs_cli import spectral
from lmaczs_cli.clap import ClapModel, laion_module
from lmaczs_cli.decoder import HTSAT_FRAMES, MaskDecoder

from . import ops


def _window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """laion's ``window_reverse`` with the batch axis left to reshape (-1).

    windows (num_windows * B, ws, ws, C) -> (B, H, W, C). laion computes B with ``int(...)`` from
    the shapes, which the tracer records as a constant: a graph traced at batch 2 then silently
    mixes clips at any other batch size. Same values in eager mode.
    """
    C = windows.shape[-1]
    x = windows.reshape(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def _reshape_wav2img_matmul(branch: nn.Module):
    """``HTSAT_Swin_Transformer.reshape_wav2img`` with its bicubic time stretch as a MatMul.

    x (B, 1, 1001, 64) -> folded image (B, 1, 256, 256), as laion's (F is already 64 there)."""
    ratio = branch.freq_ratio

    def reshape_wav2img(x: torch.Tensor) -> torch.Tensor:
        m = ops.bicubic_matrix(x.shape[2], HTSAT_FRAMES).to(x.device, x.dtype)
        x = torch.matmul(m, x)                                   # (B, 1, 1024, 64)
        x = x.permute(0, 1, 3, 2)                                # (B, 1, 64, 1024)
        x = x.reshape(-1, 1, x.shape[2], ratio, x.shape[3] // ratio)
        x = x.permute(0, 1, 3, 2, 4)                             # (B, 1, 4, 64, 256)
        return x.reshape(-1, 1, x.shape[2] * x.shape[3], x.shape[4])

    return reshape_wav2img


@contextlib.contextmanager
def export_patches(clap: ClapModel) -> Iterator[None]:
    """For the duration of an export: dynamic-batch ``window_reverse``, MatMul frame stretch."""
    if not clap.cfg.is_htsat:
        yield
        return
    htsat = laion_module("htsat")
    saved = htsat.window_reverse
    htsat.window_reverse = _window_reverse
    clap.branch.reshape_wav2img = _reshape_wav2img_matmul(clap.branch)
    try:
        yield
    finally:
        htsat.window_reverse = saved
        del clap.branch.reshape_wav2img


def log_mel_parts(waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """waves (B, 480000) -> STFT in DFT order X (B, 1001, 32, 64) (`ops.stft_dft_order`), its
    power in DFT order (B, 1001, 1024), mel power (B, 1001, 64)."""
    X = ops.stft_dft_order(waves)
    power = ops.power_dft_order(X)
    return X, power, ops.mel_power_dft_order(power)


class AudioEncoderGraph(nn.Module):
    """waves (B, 480000) -> (embedding (B, D), h1, h2, h3, h4)."""

    def __init__(self, clap: ClapModel) -> None:
        super().__init__()
        self.clap = clap

    def forward(self, waves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *_, mel = log_mel_parts(waves)
        emb, hidden = self.clap.encode(spectral.to_db(mel))
        return (emb, *hidden)


class TextEncoderGraph(nn.Module):
    """Token ids (B, 77) [+ attention mask (B, 77) for RoBERTa] -> embedding (B, D), L2-normalised."""

    def __init__(self, clap: ClapModel) -> None:
        super().__init__()
        self.clap = clap

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = input_ids if attention_mask is None else {"input_ids": input_ids, "attention_mask": attention_mask}
        return F.normalize(self.clap.clap.encode_text(tokens, device=input_ids.device), dim=-1)


def _repeat_rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """(B, ...) -> (B * K, ...), row b repeated K times in a row (Expand + Reshape, no Gather)."""
    return x.unsqueeze(1).expand(x.shape[0], K, *x.shape[1:]).reshape(-1, *x.shape[1:])


class ExplainerGraph(nn.Module):
    """The fused explainer: front end, encoder, decoder, masked encoder pass, listenable inverse."""

    def __init__(self, clap: ClapModel, decoder: MaskDecoder, domain: str, mel_to_linear: str = "linear") -> None:
        super().__init__()
        self.clap, self.decoder = clap, decoder
        self.domain, self.mel_to_linear = domain, mel_to_linear

    def forward(self, waves: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """waves (B, 480000), text (B, K, D) -> masks (B, K, 1001, bins), audio (B, K, 480000),
        similarity (B, K), masked_similarity (B, K)."""
        B, K, D = text.shape
        X, power, mel = log_mel_parts(waves)                    # DFT order; (B, 1001, 64)
        P = ops.natural_order(power) if self.domain == "stft" else None   # (B, 1001, 513)
        logmel = spectral.to_db(mel)
        emb, hidden = self.clap.encode(logmel)                  # (B, D), h1..h4
        similarity = (text * emb[:, None]).sum(-1)              # (B, K)
        flat_text = text.reshape(-1, D)                         # (B*K, D)
        log_power = _repeat_rows(spectral.to_db(P), K) if self.domain == "stft" else None
        masks = self.decoder([_repeat_rows(h, K) for h in hidden], flat_text, _repeat_rows(logmel, K), log_power)
        if self.domain == "mel":
            gain = ops.mel_gain_dft_order(masks, self.mel_to_linear)     # (B*K, 1001, 32, 1, 32)
        else:
            gain = ops.gain_dft_order(masks)
        # X viewed (B, 1, 1001, 32, 2, 32): one gain per bin on Re and Im, broadcast over K (no copy of X)
        masked_X = X.unflatten(-1, (2, ops.Q))[:, None] * gain.reshape(B, K, *gain.shape[1:])
        audio = ops.istft_dft_order(masked_X.reshape(B * K, *X.shape[1:]))   # (B*K, 480000)
        if self.domain == "mel":
            masked_logmel = spectral.masked_log_mel_from_mel(_repeat_rows(mel, K), masks)
        else:
            masked_logmel = spectral.masked_log_mel_from_power(_repeat_rows(P, K), masks)
        masked_emb, _ = self.clap.encode(masked_logmel)
        masked_similarity = (flat_text * masked_emb).sum(-1)
        return (masks.reshape(B, K, *masks.shape[1:]), audio.reshape(B, K, -1),
                similarity, masked_similarity.reshape(B, K))
