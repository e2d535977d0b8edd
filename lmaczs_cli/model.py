"""The explanation forward pass, defined once.

``ExplainerModule`` computes, for a batch of 10-s windows and K prompts per window:

    waves (B, 480000) --front end--> log-mel (B, 1001, 64) --CLAP audio encoder--> embedding (B, D), h1..h4
    (h, text (B, K, D)) --decoder--> masks (B, K, 1001, bins)          bins = 64 (mel) or 513 (stft)
    masks x STFT, original phase --inverse STFT--> audio (B, K, 480000)  the listenable explanation
    masked input --the same encoder--> masked_similarity (B, K)          the check (optional)

The K prompts of a window share its encoder pass. Everything that explains with LMAC-ZS calls
this module: ``Explainer`` (through the torch ``Runner``), ``lmaczs export`` (it traces it),
``lmaczs eval`` (its LMAC-ZS masks) and ``lmaczs train`` (the differentiable parts:
`features`, `decode`, `masked_log_mel`).

The spectral operations are a parameter, ``spectral=``; all three compute the same maths:

  ``fft``     torch.stft / irfft + fold (``lmaczs_cli.spectral``): eager, CPU and GPU
  ``matmul``  framing by slices, DFTs as MatMuls in "DFT order" (``lmaczs_cli.export.ops``):
              what the ONNX / TensorRT graphs are traced with
  ``triton``  analysis as ``fft``; mask -> iSTFT -> overlap-add as one fused Triton kernel
              (``lmaczs_cli.kernels``): CUDA
  ``auto``    ``triton`` on CUDA when triton is installed, else ``fft``

The front end (STFT, power, mel, log) always runs in float32, also under autocast: bin power of a
full-scale signal exceeds float16's range (65504), and an inf there turns every output into NaN.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from . import spectral

SPECTRAL = ("fft", "matmul", "triton")


@dataclass
class Spectrum:
    """The analysis of a batch of windows, in the layout of the spectral implementation that made it."""

    X: Any                          # fft/triton: complex (B, 1001, 513); matmul: DFT order (B, 1001, 32, 64);
                                    # None where a caller made the analysis and nothing is heard
    mel: torch.Tensor               # mel power (B, 1001, 64), float32
    power: torch.Tensor | None      # linear power (B, 1001, 513), float32; only when asked for (STFT masks)


@dataclass
class Features:
    """What one encoder pass over a batch of windows gives (float32 front end)."""

    spectrum: Spectrum
    logmel: torch.Tensor            # (B, 1001, 64) dB
    embedding: torch.Tensor         # (B, D) L2-normalised
    hidden: list[torch.Tensor]      # the encoder's h1..h4 (B, C_i, H_i, W_i)

    @property
    def mel(self) -> torch.Tensor:
        return self.spectrum.mel

    @property
    def power(self) -> torch.Tensor | None:
        return self.spectrum.power


# ----------------------------------------------------------------------------- spectral implementations


class FftSpectral:
    """torch.stft for analysis; irfft + overlap-add (``spectral.istft``) for the listenable step."""

    name = "fft"

    def analyse(self, waves: torch.Tensor, with_power: bool) -> Spectrum:
        X = spectral.stft(waves)                                    # (B, 1001, 513) complex
        P = spectral.power(X)
        return Spectrum(X, spectral.mel_power(P), P if with_power else None)

    def gains(self, masks: torch.Tensor, domain: str, mel_to_linear: str) -> torch.Tensor:
        """masks (N, T, 64 | 513) -> gains on the 513 linear bins (N, T, 513)."""
        return spectral.mel_mask_to_linear(masks, mel_to_linear) if domain == "mel" else masks

    def listen(self, spec: Spectrum, masks: torch.Tensor, prompts: int, domain: str, mel_to_linear: str,
               length: int) -> torch.Tensor:
        """masks (B*K, T, bins), row b*K+k for clip b -> listenable waves (B*K, length)."""
        gain = self.gains(masks.float(), domain, mel_to_linear)                    # (B*K, T, 513)
        B, T, F = spec.X.shape
        masked = spec.X[:, None] * gain.reshape(B, prompts, T, F)                  # the STFT broadcast, not copied
        return spectral.istft(masked.reshape(B * prompts, T, F), length)


class TritonSpectral(FftSpectral):
    """``fft`` analysis; the listenable step as one fused Triton kernel (CUDA, or TRITON_INTERPRET=1)."""

    name = "triton"

    def listen(self, spec: Spectrum, masks: torch.Tensor, prompts: int, domain: str, mel_to_linear: str,
               length: int) -> torch.Tensor:
        from .kernels.istft import masked_istft

        masks = masks.float()
        weights = None
        if domain == "mel" and mel_to_linear == "linear":          # the kernel expands mel masks itself
            weights = spectral.mel_to_linear_weights(masks.device)
        elif domain == "mel":
            masks = spectral.mel_mask_to_linear(masks, mel_to_linear)
        return masked_istft(spec.X.real, spec.X.imag, masks, prompts, weights, length)


class MatMulSpectral:
    """Slices, concatenations and MatMuls with precomputed bases (``export.ops``): ops every runtime
    has. The spectrum stays in the DFT's own bin order; the clip's STFT is broadcast over its K
    prompts, never copied."""

    name = "matmul"

    def analyse(self, waves: torch.Tensor, with_power: bool) -> Spectrum:
        from .export import ops

        X = ops.stft_dft_order(waves)                               # (B, 1001, 32, 64)
        power = ops.power_dft_order(X)                              # (B, 1001, 1024) DFT order
        return Spectrum(X, ops.mel_power_dft_order(power), ops.natural_order(power) if with_power else None)

    def listen(self, spec: Spectrum, masks: torch.Tensor, prompts: int, domain: str, mel_to_linear: str,
               length: int) -> torch.Tensor:
        from .export import ops

        X = spec.X
        B = X.shape[0]
        gain = ops.mel_gain_dft_order(masks, mel_to_linear) if domain == "mel" else ops.gain_dft_order(masks)
        # X viewed (B, 1, 1001, 32, 2, 32): one gain per bin on Re and Im alike, broadcast over K
        masked = X.unflatten(-1, (2, ops.Q))[:, None] * gain.reshape(B, prompts, *gain.shape[1:])
        audio = ops.istft_dft_order(masked.reshape(B * prompts, *X.shape[1:]))      # (B*K, 480000)
        if length != audio.shape[-1]:
            raise ValueError(f"the matmul spectral ops handle 10-s windows only (length {audio.shape[-1]})")
        return audio


def spectral_ops(name: str, device: torch.device | str = "cpu") -> FftSpectral | MatMulSpectral:
    """The implementation called ``name`` (one of SPECTRAL, or ``auto`` for the best on ``device``)."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            if triton_available():
                return TritonSpectral()
            _warn_no_triton()
        return FftSpectral()
    ops = {"fft": FftSpectral, "matmul": MatMulSpectral, "triton": TritonSpectral}
    if name not in ops:
        raise ValueError(f"unknown spectral implementation {name!r}; use one of {SPECTRAL} or 'auto'")
    return ops[name]()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn("triton is not installed: the listenable step runs as separate torch ops on the GPU "
                  "(pip install 'lmaczs[gpu]' for the fused kernel)", stacklevel=3)


# ----------------------------------------------------------------------------- the module


def repeat_rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """(B, ...) -> (B * K, ...), row b repeated K times in a row (Expand + Reshape: no Gather when exported)."""
    return x.unsqueeze(1).expand(x.shape[0], K, *x.shape[1:]).reshape(-1, *x.shape[1:])


def _take(x: torch.Tensor, rows: torch.Tensor | int) -> torch.Tensor:
    """Rows of ``x`` for (clip, prompt) pairs: ``rows`` an index tensor (N,), or a count K (an int,
    or a 0-d tensor when traced) meaning K consecutive pairs per clip."""
    if isinstance(rows, torch.Tensor) and rows.dim() == 1:
        return x[rows]
    return repeat_rows(x, rows)


def _float32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for the block when it is on (the front end stays float32)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class ExplainerModule(nn.Module):
    """CLAP + mask decoder: the whole explanation of a batch of windows (see the module docstring).

    clap: a ``ClapModel``; decoder: a ``MaskDecoder``; domain: "mel" or "stft" (the decoder's mask
    grid); mel_to_linear: how a mel mask spreads over linear bins to be heard ("linear" | "power");
    spectral: "fft" | "matmul" | "triton" | "auto".
    """

    def __init__(self, clap: nn.Module, decoder: nn.Module, domain: str, mel_to_linear: str = "linear",
                 spectral: str = "fft") -> None:
        super().__init__()
        self.clap, self.decoder = clap, decoder
        self.domain, self.mel_to_linear = domain, mel_to_linear
        self.ops = spectral_ops(spectral, _device_of(clap))

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The CLAP audio encoder's weight type: its log-mel input is cast to it (float32 stays float32)."""
        return _dtype_of(getattr(self.clap, "branch", self.clap))

    # ---- the parts (training calls these with gradients on)

    def analyse(self, waves: torch.Tensor) -> Spectrum:
        """waves (B, 480000) -> the front end's spectrum, mel power (and power for STFT masks), float32."""
        with _float32_region(waves.device.type):
            return self.ops.analyse(waves.float(), with_power=self.domain == "stft")

    def features(self, waves: torch.Tensor) -> Features:
        """waves (B, 480000) -> the front end (float32) and one encoder pass."""
        return self.encode_spectrum(self.analyse(waves))

    def encode_spectrum(self, spec: Spectrum) -> Features:
        """One encoder pass over an analysis already made (`analyse`, or a caller's own front end:
        only ``spec.mel`` is read here)."""
        with _float32_region(spec.mel.device.type):
            logmel = spectral.to_db(spec.mel)                       # (B, 1001, 64)
        embedding, hidden = self.clap.encode(logmel.to(self.encoder_dtype))    # Cast: a half-precision encoder
        return Features(spec, logmel, embedding, hidden)

    def decode(self, feats: Features, rows: torch.Tensor | int, text: torch.Tensor) -> torch.Tensor:
        """Masks (N, 1001, bins) for N (clip, prompt) pairs: text (N, D); rows (N,) the clip of each
        pair, or an int K when each clip takes K consecutive prompts (pair b*K+k is clip b)."""
        dtype = _dtype_of(self.decoder)            # float32, or the half type of a half-precision decoder
        log_power = _take(spectral.to_db(feats.power), rows).to(dtype) if self.domain == "stft" else None
        cfg = getattr(getattr(self.decoder, "module", self.decoder), "cfg", None)   # .module: under DDP
        extra = {}
        if getattr(cfg, "decision", False) or getattr(cfg, "projected", False):   # h4 through CLAP's projection
            extra["tokens"] = _take(token_embeddings(self.clap, feats.hidden), rows).to(dtype)
        return self.decoder([_take(h, rows).to(dtype) for h in feats.hidden], text.to(dtype),
                            _take(feats.logmel, rows).to(dtype), log_power, **extra)

    def masked_log_mel(self, feats: Features | Spectrum, rows: torch.Tensor | int,
                       masks: torch.Tensor) -> torch.Tensor:
        """The encoder input of masked clips: masks (N, 1001, bins) applied to the clips ``rows``
        (as in `decode`) -> log-mel (N, 1001, 64). A mask is a gain on magnitude, applied to power
        before the log (so 0 is silence)."""
        with _float32_region(masks.device.type):
            if self.domain == "mel":
                return spectral.masked_log_mel_from_mel(_take(feats.mel, rows), masks.float())
            return spectral.masked_log_mel_from_power(_take(feats.power, rows), masks.float())

    def listen(self, feats: Features | Spectrum, masks: torch.Tensor, prompts: int, length: int) -> torch.Tensor:
        """The listenable explanation: each mask on its clip's STFT with the original phase,
        inverted. masks (B*K, 1001, bins), K = prompts consecutive rows per clip -> waves (B*K, length)."""
        spec = feats.spectrum if isinstance(feats, Features) else feats
        return self.ops.listen(spec, masks, prompts, self.domain, self.mel_to_linear, length)

    # ---- whole passes

    def encode_audio(self, waves: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """waves (B, 480000) -> (embedding (B, D), [h1..h4]): the zero-shot classifier's audio side."""
        feats = self.features(waves)
        return feats.embedding, feats.hidden

    def forward(self, waves: torch.Tensor, text: torch.Tensor, check: bool = True,
                listen: bool = True) -> dict[str, torch.Tensor]:
        """waves (B, 480000), text (B, K, D) L2-normalised ->
        masks (B, K, 1001, bins), similarity (B, K), audio (B, K, 480000) unless ``listen=False``,
        masked_similarity (B, K) unless ``check=False`` (then the second encoder pass is skipped)."""
        return self.explain_features(self.features(waves), text, waves.shape[-1], check, listen)

    def forward_topk(self, waves: torch.Tensor, labels: torch.Tensor, k_like: torch.Tensor, check: bool = True,
                     listen: bool = True) -> dict[str, torch.Tensor]:
        """Top-k in one encoder pass: each window is scored against every label and explained for
        its best K, all from the same forward. labels (L, D) L2-normalised; k_like (K,): any tensor
        whose length is K (a shape, so that an exported graph takes any K) ->
        scores (B, L), topk (B, K) label indices best first, and `forward`'s outputs for them."""
        return self.explain_topk_features(self.features(waves), labels, k_like, waves.shape[-1], check, listen)

    def explain_topk_features(self, feats: Features, labels: torch.Tensor, k_like: torch.Tensor, length: int,
                              check: bool = True, listen: bool = True) -> dict[str, torch.Tensor]:
        """`forward_topk` after the encoder pass."""
        scores = feats.embedding.to(labels.dtype) @ labels.T                        # (B, L)
        best = scores.topk(k_like.shape[0], dim=-1).indices                         # (B, K)
        out = self.explain_features(feats, labels[best], length, check, listen)
        return {"scores": scores, "topk": best, **out}

    def explain_features(self, feats: Features, text: torch.Tensor, length: int, check: bool = True,
                         listen: bool = True) -> dict[str, torch.Tensor]:
        """`forward` after the encoder pass: feats of B windows, text (B, K, D)."""
        B, K, D = text.shape
        flat = text.reshape(B * K, D)
        groups = clip_groups(B, K, flat)
        masks = torch.cat([self.decode(_clip_features(feats, g), K, flat[g.start * K: g.stop * K])
                           for g in groups])                                     # (B*K, 1001, bins)
        out = {"masks": masks.reshape(B, K, *masks.shape[1:]),
               "similarity": (text * feats.embedding[:, None].to(text.dtype)).sum(-1)}
        if listen:
            out["audio"] = torch.cat([self.listen(spectrum_clips(feats.spectrum, g), masks[g.start * K: g.stop * K], K,
                                                  length) for g in groups]).reshape(B, K, -1)
        if check:
            masked_emb = torch.cat([self.clap.encode(self.masked_log_mel(spectrum_clips(feats.spectrum, g), K,
                                                                         masks[g.start * K: g.stop * K])
                                                     .to(self.encoder_dtype))[0] for g in groups])
            out["masked_similarity"] = (flat * masked_emb.to(flat.dtype)).sum(-1).reshape(B, K)
        return out


def clip_groups(B: int, K: int, like: torch.Tensor) -> list[slice]:
    """The clips of a batch in groups whose (clip, prompt) pairs number about B, for the per-pair
    steps (decoder, listenable inverse, masked check). With K prompts a clip those steps see
    B x K rows; run at once on the CPU, their tensors (full-resolution decoder maps, a complex
    STFT per row) outgrow what the C allocator keeps for reuse, and every call pays for fresh
    pages (a top-3 inverse took 6x, not 3x, one prompt's). In groups they cost what K one-prompt
    batches cost. One group when K = 1, on a GPU (its caching allocator has no such cost) and
    when traced for export."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or like.device.type != "cpu" or K == 1:
        return [slice(0, B)]
    per = max(1, -(-B // K))                                          # ceil(B / K) clips a group
    return [slice(i, min(i + per, B)) for i in range(0, B, per)]


def _clip_features(feats: Features, group: slice) -> Features:
    """What the decoder reads of the clips ``group`` of a batch."""
    if group.start == 0 and group.stop == feats.logmel.shape[0]:
        return feats
    return Features(spectrum_clips(feats.spectrum, group), feats.logmel[group], feats.embedding[group],
                    [h[group] for h in feats.hidden])


def spectrum_clips(spec: Spectrum, group: slice) -> Spectrum:
    """The analysis of the clips ``group`` of a batch."""
    if group.start == 0 and group.stop == spec.mel.shape[0]:
        return spec

    def part(x: Any) -> Any:
        return x[group] if x is not None else None

    return Spectrum(part(spec.X), spec.mel[group], part(spec.power))


def token_embeddings(clap: Any, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """The deepest stage's tokens carried into the joint space by CLAP's own audio head, one
    embedding per position: (B, D, H, W) on the grid of h4 (HTSAT: folded, as h4; PANN: (T', F')).

    HTSAT pools its normalised stage-4 tokens by a mean and projects the mean; here each token is
    projected. PANN's head (fc1 + ReLU on the max + mean over time of the frequency-averaged map)
    is applied to each cell (a cell's input is one cell where the clip's is a max plus a mean over
    time, so its scale differs; no PANN decoder has yet been trained with the map). The decoder
    reads the cosine of these with the prompt (DecisionMap):
    re-initialising the projection or a deep stage changes them, as it changes the clip's score."""
    h = hidden[-1]                                                  # (B, C, H, W)
    B, C, H, W = h.shape
    x = h.flatten(2).transpose(1, 2)                                # (B, H*W, C)
    if not clap.cfg.is_htsat:
        x = torch.relu(clap.branch.fc1(x))
    z = clap.clap.audio_projection(x)                               # (B, H*W, D)
    return z.transpose(1, 2).reshape(B, z.shape[-1], H, W)


def _dtype_of(module: nn.Module | None) -> torch.dtype:
    """The floating-point type of a module's weights (float32 when it has none).

    A module converted to half precision (``lmaczs export --fp16`` traces the audio encoder and
    decoder so, giving an ONNX graph whose own types say which layers are half) gets its inputs
    cast to its type here; under autocast the weights stay float32 and these casts are no-ops."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None) if module is not None else None
    return p.dtype if p is not None else torch.float32


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def parts_of(outputs: dict[str, torch.Tensor], names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The outputs named, in order (a traced graph returns a tuple)."""
    return tuple(outputs[n] for n in names)
