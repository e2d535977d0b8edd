"""The torch modules that ``lmaczs export`` traces, and the patches that make laion's HTSAT
trace with a dynamic batch and without a bicubic ``Resize``.

  AudioEncoderGraph   waves (B, 480000)                -> embedding (B, D), h1..h4
  TextEncoderGraph    tokens (B, 77) int64             -> embedding (B, D)      [CLIP-BPE towers]
                      input_ids, attention_mask (B, 77) -> embedding (B, D)     [RoBERTa towers]
  ExplainerGraph      waves (B, 480000), text (B, K, D) -> masks (B, K, 1001, bins),
                      audio (B, K, 480000), similarity (B, K), masked_similarity (B, K)
                      (``check=False``: the same without masked_similarity and its encoder pass)
  ExplainerTopkGraph  waves (B, 480000), labels (L, D), k (K,) -> scores (B, L), topk (B, K),
                      masks, audio, similarity[, masked_similarity] for each window's best K labels
  SpectrumExplainerGraph, SpectrumExplainerTopkGraph
                      the same two without their spectral ends: the mel power (B, 1001, 64) in
                      place of waves (and the linear power (B, 1001, 513) after it, for STFT
                      masks), no audio out. The int8 CPU graphs (``quantize``): their caller runs
                      torch's FFT STFT and inverse around them

The audio and explainer graphs are ``lmaczs_cli.model.ExplainerModule`` itself, built with its
``matmul`` spectral operations (framing + factorised DFT MatMuls instead of STFT ops; see
``ops``); these wrappers only turn its outputs into the tuple a traced graph returns.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmaczs_cli.audio import CLIP_SAMPLES
from lmaczs_cli.clap import ClapModel
from lmaczs_cli.laion import laion_module
from lmaczs_cli.decoder import HTSAT_FRAMES, MaskDecoder
from lmaczs_cli.model import ExplainerModule, Spectrum, parts_of

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


class AudioEncoderGraph(nn.Module):
    """waves (B, 480000) -> (embedding (B, D), h1, h2, h3, h4)."""

    def __init__(self, clap: ClapModel) -> None:
        super().__init__()
        self.model = ExplainerModule(clap, None, "mel", spectral="matmul")

    def forward(self, waves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        emb, hidden = self.model.encode_audio(waves)
        return (emb, *hidden)


class TextEncoderGraph(nn.Module):
    """Token ids (B, 77) [+ attention mask (B, 77) for RoBERTa] -> embedding (B, D), L2-normalised."""

    def __init__(self, clap: ClapModel) -> None:
        super().__init__()
        self.clap = clap

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = input_ids if attention_mask is None else {"input_ids": input_ids, "attention_mask": attention_mask}
        return F.normalize(self.clap.clap.encode_text(tokens, device=input_ids.device), dim=-1)


class ExplainerGraph(nn.Module):
    """The fused explainer: `ExplainerModule` with matmul spectral ops, outputs as a tuple
    (``OUTPUTS``; without the masked check when ``check=False``)."""

    OUTPUTS = ("masks", "audio", "similarity", "masked_similarity")
    SPECTRAL = "matmul"                    # the module's spectral operations (`model.SPECTRAL`)

    def __init__(self, clap: ClapModel, decoder: MaskDecoder, domain: str, mel_to_linear: str = "linear",
                 check: bool = True) -> None:
        super().__init__()
        self.model = ExplainerModule(clap, decoder, domain, mel_to_linear, spectral=self.SPECTRAL)
        self.check = check
        self.outputs = tuple(n for n in self.OUTPUTS if check or n != "masked_similarity")

    def forward(self, waves: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """waves (B, 480000), text (B, K, D) -> masks (B, K, 1001, bins), audio (B, K, 480000),
        similarity (B, K)[, masked_similarity (B, K)]."""
        return parts_of(self.model(waves, text, check=self.check), self.outputs)


class ExplainerTopkGraph(ExplainerGraph):
    """Top-k in one encoder pass (`ExplainerModule.forward_topk`), outputs as a tuple. K is the
    length of the input ``k`` (its values are unused), so one graph serves any K."""

    OUTPUTS = ("scores", "topk", *ExplainerGraph.OUTPUTS)

    def forward(self, waves: torch.Tensor, labels: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return parts_of(self.model.forward_topk(waves, labels, k, check=self.check), self.outputs)


class SpectrumExplainerGraph(ExplainerGraph):
    """`ExplainerGraph` from the analysis on: mel power (B, 1001, 64), text (B, K, D)[, linear
    power (B, 1001, 513) for STFT masks] -> masks, similarity[, masked_similarity]. No STFT and
    no inverse in the graph: ONNX Runtime on the CPU runs its own STFT and DFT ops, and the
    MatMul DFTs of the fused graph, several times slower than torch's FFT, so the runner computes
    both ends with torch (``backends.OnnxRunner``)."""

    OUTPUTS = ("masks", "similarity", "masked_similarity")
    SPECTRAL = "fft"                       # only its mel-domain parts run in the graph

    def forward(self, mel: torch.Tensor, text: torch.Tensor,
                power: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        feats = self.model.encode_spectrum(Spectrum(None, mel, power))
        return parts_of(self.model.explain_features(feats, text, CLIP_SAMPLES, self.check, listen=False), self.outputs)


class SpectrumExplainerTopkGraph(SpectrumExplainerGraph):
    """`ExplainerTopkGraph` from the analysis on: mel power, labels (L, D), k (K,)[, linear power]
    -> scores, topk, masks, similarity[, masked_similarity]."""

    OUTPUTS = ("scores", "topk", *SpectrumExplainerGraph.OUTPUTS)

    def forward(self, mel: torch.Tensor, labels: torch.Tensor, k: torch.Tensor,
                power: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        feats = self.model.encode_spectrum(Spectrum(None, mel, power))
        out = self.model.explain_topk_features(feats, labels, k, CLIP_SAMPLES, self.check, listen=False)
        return parts_of(out, self.outputs)
