"""The LMAC-ZS mask decoder: CLAP hidden states + text embedding -> time-frequency mask.

Shape of the computation (HTSAT-tiny; PANN-14 in brackets):

  h1..h4 (folded HTSAT grids) --lateral 1x1 conv to the decoder's width, unfold--> (time, mel) grids
  (unfolded CLAP shapes, before the lateral conv:)
      h1 (B,192,128,8) [(B,256,125,8)]  h2 (B,384,64,4) [(B,512,62,4)]
      h3 (B,768, 32,2) [(B,1024,31,2)]  h4 (B,768, 32,2) [(B,2048,31,2)]
  text t (B,512) --> K learned tokens (B,K,D)            (K >= 4: a softmax over one key is 1)
  deep = lat4(h4) + lat3(h3) -> xattn -> up(ConvT) + lat2(h2) -> xattn -> up + lat1(h1) -> xattn
      (levels=3: deep = lat3(h3); levels=2: no deep stage, start from lat2(h2) -- the decoder reads
       only CLAP's first stages, whose tokens see a neighbourhood of the clip, not all of it)
      (first_level=2: no "+ lat1(h1)"; 3: neither "+ lat2(h2)" nor "+ lat1(h1)"; 4: deep = lat4(h4)
       alone -- the mask is decoded from the deep stages by the transposed convolutions, as the
       paper's decoder; with logmel_skip=False nothing but CLAP's decision-level states reaches
       it, so re-initialising stages 3-4 must change the masks: the model-randomisation check)
      (text_readout: + a logit map <q(t), k(x)> read off this h1-grid map, brought onto the mask grid)
      -> 3 x up(ConvT)          (B, c, 1024, 64) [(B, c, 1000, 64)]
      (+ the clip's normalised log-mel as a skip channel, brought onto the same grid;
       skip_gate: instead, a text-independent gate on the log-mel multiplies the final mask)
      -> conv -> logits -> fixed time map to 1001 frames          (B, 1001, 64)
  (decision: CLAP's own per-token audio-text cosine on h4's grid -- the stage-4 tokens through
   CLAP's audio projection, against the prompt -- joins the deepest features and gates the mask;
   see DecisionMap)
  STFT domain: logits -> fixed mel->linear map (B,1001,513) -> refine with the log-power skip
  + logit_bias (a constant: the operating point, 0 unless chosen after training) -> sigmoid -> mask in [0, 1]

Cross-attention: queries are the audio feature map's positions, keys/values the K text tokens
(as in Stable Diffusion's U-Net); each "xattn" is followed by a text FiLM (per-channel scale and
shift from t; `film=False` for decoders saved before it existed). Fixed resampling steps are
precomputed: along time two Gathers blended with fixed weights, along frequency a small MatMul, so
the decoder exports without Resize ops.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import spectral
from .audio import N_FRAMES, N_FREQS, N_MELS
from .errors import LmaczsError

HTSAT_FRAMES = 1024   # laion stretches 1001 frames to 1024 (bicubic, align_corners) before folding
HTSAT_CHUNKS = 4      # ... then stacks four 256-frame chunks along the frequency axis


class DecoderError(LmaczsError):
    """A decoder could not be built or loaded; the message names the fix."""


# --------------------------------------------------------------------------- folding


def unfold_htsat(x: torch.Tensor) -> torch.Tensor:
    """Undo HTSAT's chunk stacking on any folded grid.

    x: (B, C, S, S) with rows = chunk * (S/4) + mel, cols = time within chunk
    -> (B, C, 4 * S, S / 4) with rows = time (over the 1024 stretched frames), cols = mel.
    At full resolution (S = 256) this is the exact inverse of laion's ``reshape_wav2img``.
    """
    B, C, H, W = x.shape
    if H != W or H % HTSAT_CHUNKS:
        raise DecoderError(f"not a folded HTSAT grid: {tuple(x.shape)}")
    x = x.reshape(B, C, HTSAT_CHUNKS, H // HTSAT_CHUNKS, W)   # (B, C, chunk, mel, t)
    x = x.permute(0, 1, 2, 4, 3)                              # (B, C, chunk, t, mel)
    return x.reshape(B, C, HTSAT_CHUNKS * W, H // HTSAT_CHUNKS)


@functools.lru_cache(maxsize=None)
def _interp_taps_np(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation with aligned end points (align_corners=True) from n_in to n_out
    points: output i = w_lo[i] * input lo[i] + w_hi[i] * input hi[i]."""
    if n_in == 1 or n_out == 1:
        zero = np.zeros(n_out, dtype=np.int64)
        return zero, zero, np.ones(n_out, dtype=np.float32), np.zeros(n_out, dtype=np.float32)
    pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    frac = pos - lo
    return lo, lo + 1, (1.0 - frac).astype(np.float32), frac.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _interp_matrix_np(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation with aligned end points (align_corners=True)."""
    lo, hi, w_lo, w_hi = _interp_taps_np(n_in, n_out)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = w_lo
    m[np.arange(n_out), hi] += w_hi
    return m


def interp_matrix(n_in: int, n_out: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n_out, n_in) linear interpolation matrix on ``device`` (made once per device)."""
    return spectral.device_constant(_interp_matrix_np(n_in, n_out), device)


def resample_time(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Linear (align-corners) resampling of axis -2 of (..., T, F) to n_out: each output row
    blends two input rows (two Gathers). The same map as ``interp_matrix``, whose dense MatMul
    (1001 x 1024, two non-zeros a row) cost 30x as much on the CPU at full resolution."""
    lo, hi, w_lo, w_hi = (spectral.device_constant(a, x.device)
                          for a in _interp_taps_np(int(x.shape[-2]), n_out))   # int(): traced sizes are tensors
    return x.index_select(-2, lo) * w_lo.to(x.dtype)[:, None] + x.index_select(-2, hi) * w_hi.to(x.dtype)[:, None]


def unstretch_frames(x: torch.Tensor) -> torch.Tensor:
    """(…, 1024, F) on HTSAT's stretched time axis -> (…, 1001, F) on the STFT frame grid."""
    return resample_time(x, N_FRAMES)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder; saved in config.json beside decoder.safetensors."""

    backbone: str                              # "htsat" (folded grids) or "pann" (time, mel grids)
    hidden_channels: tuple[int, int, int, int]  # channels of h1..h4
    hidden_time: tuple[int, int, int, int]      # time length of h1..h4 after unfolding
    hidden_freq: tuple[int, int, int, int]      # frequency length of h1..h4 after unfolding
    domain: str = "mel"                        # mask grid: "mel" (1001 x 64) or "stft" (1001 x 513)
    text_dim: int = 512                        # CLAP joint embedding width
    text_tokens: int = 8                       # K keys/values for cross-attention (>= 4)
    width: int = 64                            # channels of the deep decoder stages
    heads: int = 4                             # attention heads per cross-attention
    logmel_skip: bool = True                   # feed the clip's normalised log-mel at full resolution
    film: bool = True                          # text FiLM (per-channel scale and shift) after each attention
    text_readout: bool = False                 # add a text-audio dot-product logit map (TextReadout)
    levels: int = 4                            # CLAP stages read, from the first: 4 (h1..h4), 3, or 2 (h1, h2)
    skip_gate: bool = False                    # the log-mel skip gates the mask (SkipGate) instead of joining the features
    first_level: int = 1                       # shallowest CLAP stage read: 1 (h1..), 2 (h2..), 3 (h3, h4), 4 (h4)
    decision: bool = False                     # read CLAP's per-token audio-text cosine map and gate by it (DecisionMap)
    decision_contrast: bool = False            # ... and that map standardised over the clip, as a second channel
    projected: bool = False                    # read h4's tokens through CLAP's audio projection instead of h4
    logit_bias: float = 0.0                    # added to the logits before the sigmoid: the mask's operating
                                               # point, a threshold in logit units (0: the decoder as trained)

    def __post_init__(self) -> None:
        if self.domain not in spectral.MASK_DOMAINS:
            raise DecoderError(f"unknown mask domain {self.domain!r}; use mel or stft")
        if self.backbone not in ("htsat", "pann"):
            raise DecoderError(f"unknown backbone {self.backbone!r}")
        if self.text_tokens < 4:
            raise DecoderError("text_tokens must be >= 4: attention over a single key is a constant bias")
        if self.width % self.heads or self.width % 8:
            raise DecoderError("width must be a multiple of heads and of 8")
        if self.skip_gate and (not self.logmel_skip or self.domain != "mel"):
            raise DecoderError("skip_gate needs the log-mel skip and the mel domain")
        if self.levels not in (2, 3, 4):
            raise DecoderError(f"levels must be 2, 3 or 4 (CLAP stages read from the first), not {self.levels}")
        if self.projected and self.first_level != 4:
            raise DecoderError("projected reads the stage-4 tokens in the joint space: it needs first_level=4")
        if self.decision_contrast and not self.decision:
            raise DecoderError("decision_contrast is a second channel of the decision map: set decision too")
        if self.decision and self.levels != 4:
            raise DecoderError("decision needs levels=4: the cosine map lies on h4's grid, the deepest stage")
        if not 1 <= self.first_level <= self.levels:
            raise DecoderError(f"first_level {self.first_level} must lie between 1 and levels={self.levels}: "
                               "the decoder reads CLAP stages first_level..levels")
        if isinstance(self.logit_bias, bool) or not isinstance(self.logit_bias, (int, float)) \
                or not np.isfinite(self.logit_bias):
            raise DecoderError(f"logit_bias must be a finite number, not {self.logit_bias!r}")
        object.__setattr__(self, "logit_bias", float(self.logit_bias))
        for name in ("hidden_channels", "hidden_time", "hidden_freq"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    @property
    def mask_bins(self) -> int:
        return N_MELS if self.domain == "mel" else N_FREQS

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["logit_bias"]:            # as before the field existed: the same config.json and decoder_hash
            del d["logit_bias"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DecoderConfig":
        return cls(**{"film": False, "text_readout": False, **d})   # configs written before these existed
                                                                    # (levels: its default, all four)

    @classmethod
    def for_clap(cls, clap: Any, **kwargs: Any) -> "DecoderConfig":
        """Read the hidden-state geometry off a ``ClapModel`` with one dummy forward."""
        backbone = "htsat" if clap.cfg.is_htsat else "pann"
        with torch.no_grad():
            _, hidden = clap.encode(torch.zeros(1, N_FRAMES, N_MELS, device=clap.device))
        grids = [unfold_htsat(h) if backbone == "htsat" else h for h in hidden]
        return cls(
            backbone=backbone,
            hidden_channels=tuple(g.shape[1] for g in grids),
            hidden_time=tuple(g.shape[2] for g in grids),
            hidden_freq=tuple(g.shape[3] for g in grids),
            text_dim=clap.cfg.joint_dim,
            **kwargs,
        )


# --------------------------------------------------------------------------- blocks


class CrossAttention(nn.Module):
    """x (B, C, T, F) attends to text tokens (B, K, C); residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, C, T, Fq = x.shape
        q = self.norm(x.flatten(2).transpose(1, 2))          # (B, T*F, C)
        out, _ = self.attn(q, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(B, C, T, Fq)


class FiLM(nn.Module):
    """x (B, C, T, F) * (1 + scale(t)) + shift(t), per channel (Perez et al. 2018). Starts as the
    identity. Cross-attention adds a text-dependent vector at each position; FiLM lets the text
    *gate* the audio features, the multiplicative interaction a prompt-specific mask needs."""

    def __init__(self, text_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(text)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class TextReadout(nn.Module):
    """A mask logit per cell from the text: <q(t), k(x_cell)> / sqrt(d), x (B, C, T, F) -> (B, 1, T, F).

    The last text-conditioned feature map is read out against a projection of the prompt, so two
    prompts give different masks from the first step and a prompt moves its own mask directly
    towards the cells whose features match it. Without it the text reaches the logits only
    through attention and FiLM followed by three normalised up-sampling stages, and a decoder that
    starts with the same mask for every prompt sits where Eq. 7's gradient vanishes (identical
    masked clips give a cosine of 1, its maximum)."""

    def __init__(self, text_dim: int, channels: int, dim: int = 32) -> None:
        super().__init__()
        self.query = nn.Linear(text_dim, dim)
        self.key = nn.Conv2d(channels, dim, 1)
        self.scale = dim ** -0.5

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        q = self.query(text)[:, :, None, None]               # (B, d, 1, 1)
        return (q * self.key(x)).sum(1, keepdim=True) * self.scale


def _and_logits(logits: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """logit(sigmoid(logits) * sigmoid(gate)), computed stably: a cell is kept only where both keep it."""
    log_p = F.logsigmoid(logits) + F.logsigmoid(gate)
    top = 1.0 - torch.finfo(log_p.dtype).eps                  # 1 - 1e-7 is 1.0 in float16: log1p(-1) = -inf
    return log_p - torch.log1p(-torch.exp(log_p).clamp_max(top))


class DecisionMap(nn.Module):
    """CLAP's own decision, per token: cos(P(h4_i), t), where P is CLAP's audio projection (the map
    from the pooled stage-4 state to the joint space) applied to each stage-4 token h4_i, and t the
    prompt's embedding. The clip's score is made from these tokens (pooled, then projected), so
    the map says where on h4's grid the audio answers the prompt, in the model's own terms.

    The map enters twice: a 1x1 convolution adds it to the deepest features (so the transposed
    convolutions shape the mask around it), and a 3x3 convolution of it gates the final mask
    (mask = sigmoid(logits) * sigmoid(gate)), so cells whose tokens do not answer the prompt are
    closed whatever the rest of the decoder says. Re-initialising the projection or stage 4
    scrambles the map, and with it the masks: the model-randomisation check. The gate starts at
    sigmoid(20 cos - 1): open on tokens that answer (cos 0.15: 0.88), half shut on those that do not."""

    def __init__(self, width: int, contrast: bool = False) -> None:
        super().__init__()
        self.contrast = contrast
        channels = 2 if contrast else 1
        self.lateral = nn.Conv2d(channels, width, 1)      # starts at zero: a decoder given the map
        nn.init.zeros_(self.lateral.weight)               # later (distil --init) starts as it was
        nn.init.zeros_(self.lateral.bias)
        self.gate = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.gate.weight)
        with torch.no_grad():
            self.gate.weight[0, 0, 1, 1] = 20.0
        nn.init.constant_(self.gate.bias, -1.0)

    @staticmethod
    def cosine(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """tokens (B, D, H, W) in the joint space, text (B, D) L2-normalised -> (B, 1, H, W)."""
        return (F.normalize(tokens, dim=1) * text[:, :, None, None]).sum(1, keepdim=True)

    def inputs(self, cos: torch.Tensor) -> torch.Tensor:
        """The map as the decoder reads it: the cosine, and with ``contrast`` also the cosine
        standardised over the clip's grid (where, relative to the rest of the clip, the tokens
        answer the prompt; the raw cosine says how much)."""
        return torch.cat([cos, _normalise(cos)], dim=1) if self.contrast else cos


class SkipGate(nn.Module):
    """The log-mel skip as a gate: mask = sigmoid(logits) * sigmoid(g(log-mel)), returned as the
    logits of that product. g sees neither the prompt nor CLAP, so it can only take away cells (the
    quiet ones between and around events) from what the CLAP-fed logits keep; *which* events a
    prompt keeps must come from CLAP's hidden states, and a re-initialised CLAP changes the masks
    (the randomization check). Starts open (g = 4 everywhere: sigmoid 0.98)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(ConvBlock(1, channels), nn.Conv2d(channels, 1, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, 4.0)

    def forward(self, logits: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """logits (B, 1, T, F), skip (B, 1, T, F) -> logit(sigmoid(logits) * sigmoid(g(skip)))."""
        return _and_logits(logits, self.net(skip))


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.GELU(),
        )


class Up(nn.Sequential):
    """x2 in time and frequency by a transposed convolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2),
            nn.GroupNorm(min(8, c_out), c_out), nn.GELU(),
        )


def _fit(x: torch.Tensor, t: int, f: int) -> torch.Tensor:
    """Crop or zero-pad the last two axes of x to (t, f) (odd sizes after stride-2 steps)."""
    x = x[..., :t, :f]
    dt, df = t - x.shape[-2], f - x.shape[-1]
    if dt or df:
        x = F.pad(x, (0, df, 0, dt))
    return x


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Per-clip standardisation over (T, F) of a (B, 1, T, F) map."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True)
    return (x - mean) / (std + 1e-5)


class MaskDecoder(nn.Module):
    """D(h, t) -> M in [0, 1]^(1001 x bins). See the module docstring for the shapes."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        widths = (w // 2, w, w, w)[: cfg.levels]           # per level h1..h4
        read = slice(cfg.first_level - 1, cfg.levels)      # the stages read: first_level..levels
        channels = cfg.hidden_channels[read] if not cfg.projected else (cfg.text_dim,)
        self.lateral = nn.ModuleList(nn.Conv2d(c, wl, 1) for c, wl in zip(channels, widths[read]))
        self.text_tokens = nn.Linear(cfg.text_dim, cfg.text_tokens * w)
        self.token_pos = nn.Parameter(torch.randn(cfg.text_tokens, w) * 0.02)
        self.token_norm = nn.LayerNorm(w)
        stages = (w, w, w // 2) if cfg.levels > 2 else (w, w // 2)   # widths where the text comes in
        self.token_proj = nn.ModuleList(nn.Linear(w, c) for c in stages)
        self.attn = nn.ModuleList(CrossAttention(c, cfg.heads if c % cfg.heads == 0 else 1) for c in stages)
        self.film = nn.ModuleList(FiLM(cfg.text_dim, c) for c in stages) if cfg.film else None
        self.mix = nn.ModuleList(ConvBlock(c, c) for c in stages)
        self.up_deep = Up(w, w) if cfg.levels > 2 else None   # deep (h3, h4) -> h2 grid
        self.up_mid = Up(w, w // 2)                        # h2 -> h1 grid
        self.up_full = nn.Sequential(Up(w // 2, w // 4), Up(w // 4, w // 8), Up(w // 8, w // 8))
        skip = 1 if cfg.logmel_skip and not cfg.skip_gate else 0
        self.head = nn.Sequential(ConvBlock(w // 8 + skip, w // 8), nn.Conv2d(w // 8, 1, 3, padding=1))
        self.gate = SkipGate() if cfg.skip_gate else None
        self.readout = TextReadout(cfg.text_dim, w // 2) if cfg.text_readout else None
        self.decision = DecisionMap(w, cfg.decision_contrast) if cfg.decision else None
        if cfg.domain == "stft":
            # refine the mel-resolution logits on the linear grid, seeing the clip's log power
            self.refine = nn.Sequential(ConvBlock(2, 8), nn.Conv2d(8, 1, 3, padding=1))

    @property
    def full_time(self) -> int:
        return self.cfg.hidden_time[0] * 8

    def tokens(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, text_dim) -> K tokens (B, K, width)."""
        tok = self.text_tokens(text).reshape(text.shape[0], self.cfg.text_tokens, self.cfg.width)
        return self.token_norm(tok + self.token_pos)

    def grids(self, hidden: Sequence[torch.Tensor], tokens: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """CLAP hidden states -> their lateral projections on (time, frequency) grids, one per
        level 1..levels; None for the stages under first_level, which the decoder does not read.
        With cfg.projected the one stage read is h4's tokens in the joint space (``tokens``).

        The 1x1 lateral convolutions act per position, so they commute with the unfolding; they
        run first, on the folded grids, so the unfolding permutes `width` channels instead of
        CLAP's 192-768 (that permutation, with its small inner axes, was the slowest op of the
        decoder in ONNX Runtime)."""
        skipped = self.cfg.first_level - 1
        if self.cfg.projected:
            if tokens is None:
                raise DecoderError("this decoder reads h4's tokens through CLAP's projection: pass tokens=")
            hidden = [*hidden[:skipped], tokens]
        lat = [conv(h.contiguous()) for conv, h in zip(self.lateral, hidden[skipped:])]   # any layout
        if self.cfg.backbone == "htsat":
            lat = [unfold_htsat(x) for x in lat]
        return [None] * skipped + lat

    def condition(self, level: int, x: torch.Tensor, tok: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The text's way in at one level: cross-attention to the K tokens, then FiLM."""
        x = self.attn[level](x, self.token_proj[level](tok))
        return self.film[level](x, text) if self.film is not None else x

    def forward(
        self,
        hidden: Sequence[torch.Tensor],
        text: torch.Tensor,
        logmel: torch.Tensor | None = None,
        log_power: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden: CLAP's h1..h4 (B, C_i, H_i, W_i); text: (B, text_dim) L2-normalised;
        logmel: (B, 1001, 64) dB (needed when cfg.logmel_skip); log_power: (B, 1001, 513) dB
        (STFT domain only; the refinement sees it); tokens: h4's tokens through CLAP's audio
        projection, (B, text_dim, H_4, W_4) on h4's grid (needed when cfg.decision or
        cfg.projected; `model.token_embeddings` makes them).  ->  mask (B, 1001, bins) in [0, 1]."""
        g1, g2, *deep = self.grids(hidden, tokens)         # None where a stage is not read
        (t1, t2), (f1, f2) = self.cfg.hidden_time[:2], self.cfg.hidden_freq[:2]
        tok = self.tokens(text)
        cos = None
        if self.decision is not None:
            if tokens is None:
                raise DecoderError("this decoder reads CLAP's per-token decision map: pass tokens=")
            cos = DecisionMap.cosine(tokens, text)         # (B, 1, H_4, W_4)
            cos = self.decision.inputs(unfold_htsat(cos) if self.cfg.backbone == "htsat" else cos)
        stage = 0
        if deep:                                           # h4 + h3 (or one of them) on the deepest grid
            d = [g for g in deep if g is not None]
            x = d[-1] + _fit(d[0], d[-1].shape[-2], d[-1].shape[-1]) if len(d) == 2 else d[0]
            if cos is not None:
                x = x + self.decision.lateral(_fit(cos, x.shape[-2], x.shape[-1]))
            x = self.condition(0, self.mix[0](x), tok, text)
            x = _fit(self.up_deep(x), t2, f2)              # transposed convolutions up: (B, w, T2, F2)
            x = x + g2 if g2 is not None else x
            stage = 1
        else:
            x = g2
        x = self.condition(stage, self.mix[stage](x), tok, text)
        x = _fit(self.up_mid(x), t1, f1)                   # (B, w/2, T1, F1)
        x = x + g1 if g1 is not None else x
        x = self.condition(stage + 1, self.mix[stage + 1](x), tok, text)
        read = self.readout(x, text) if self.readout is not None else None      # (B, 1, T1, F1)
        x = self.up_full(x)                                # (B, c, 8*T1, 8*F1) = (B, c, 1024, 64)
        x = _fit(x, self.full_time, N_MELS)
        if self.cfg.logmel_skip:
            if logmel is None:
                raise DecoderError("this decoder takes the log-mel as a skip input: pass logmel=")
            skip = _normalise(logmel.unsqueeze(1))          # (B, 1, 1001, 64)
            if self.gate is None:
                x = torch.cat([x, resample_time(skip, self.full_time)], dim=1)
        logits = resample_time(self.head(x), N_FRAMES)     # (B, 1, 1001, 64)
        if read is not None:                               # onto the mask grid: fixed resampling
            fmap = interp_matrix(int(read.shape[-1]), N_MELS, read.device).to(read.dtype)
            logits = logits + resample_time(read, N_FRAMES) @ fmap.T
        if cos is not None:                                # CLAP's decision gates every cell
            gate = self.decision.gate(cos)
            fmap = interp_matrix(int(gate.shape[-1]), N_MELS, gate.device).to(gate.dtype)
            logits = _and_logits(logits, resample_time(gate, N_FRAMES) @ fmap.T)
        if self.gate is not None:                          # last: nothing the prompt brings can undo it
            logits = self.gate(logits, skip)
        if self.cfg.domain == "stft":
            logits = logits @ spectral.mel_to_linear_weights(logits.device).to(logits.dtype)  # (B,1,1001,513)
            if log_power is None:
                raise DecoderError("an STFT-domain decoder needs log_power= (B, 1001, 513)")
            lp = _normalise(log_power.unsqueeze(1))
            logits = logits + self.refine(torch.cat([logits, lp], dim=1))
        if self.cfg.logit_bias:                            # the operating point (DecoderConfig.logit_bias)
            logits = logits + self.cfg.logit_bias
        return torch.sigmoid(logits[:, 0])


def decoder_hash(decoder: MaskDecoder) -> str:
    """sha256 over the decoder's config and weights: what it is, whatever its folder is called."""
    import hashlib

    h = hashlib.sha256(json.dumps(decoder.cfg.to_json(), sort_keys=True).encode())
    for name, t in sorted(decoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- files


DECODER_FORMAT = "lmaczs-decoder/1"


def save_decoder(decoder: MaskDecoder, directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``decoder.safetensors`` + ``config.json`` (decoder config, CLAP identity, ``meta``)."""
    from safetensors.torch import save_file

    from .files import atomic_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    with atomic_path(directory / "decoder.safetensors") as tmp:
        save_file(tensors, str(tmp))
    config = {"format": DECODER_FORMAT, "decoder": decoder.cfg.to_json(), **meta}
    with atomic_path(directory / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def decoder_folder(path: str | os.PathLike) -> Path:
    """The folder of a decoder given as its folder or as its decoder.safetensors / config.json."""
    path = Path(path)
    return path.parent if path.is_file() else path


def read_decoder_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a decoder (its folder, or a file in it); anything missing or unreadable
    raises DecoderError naming the file and the fix."""
    given = Path(directory)
    folder = decoder_folder(given)
    train_out = "a decoder is the --out folder of `lmaczs train` (config.json + decoder.safetensors)"
    if not folder.is_dir():
        raise DecoderError(f"{given}: no such decoder folder; {train_out}")
    path = folder / "config.json"
    if not path.is_file():
        where = "beside it" if given.is_file() else "in this folder"
        raise DecoderError(f"{given}: no config.json {where}; {train_out}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DecoderError(f"{path}: not readable JSON ({type(e).__name__}: {e}); copy the decoder folder again "
                           "or re-run `lmaczs train`") from e
    if not isinstance(config, dict) or config.get("format") != DECODER_FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise DecoderError(f"{path}: not an lmaczs decoder config (format {found!r}, expected "
                           f"{DECODER_FORMAT!r}); {train_out}")
    return config


def _decoder_config(config: dict[str, Any], path: Path) -> DecoderConfig:
    try:
        return DecoderConfig.from_json(config["decoder"])
    except DecoderError as e:
        raise DecoderError(f"{path}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise DecoderError(f"{path}: not a valid decoder config ({type(e).__name__}: {e}); copy the decoder "
                           "folder again or re-run `lmaczs train`") from e


# The decoder's inputs: what DecoderConfig.for_clap reads off a CLAP. A decoder whose inputs
# differ from the CLAP's cannot run on it, identity or not.
CLAP_GEOMETRY = ("backbone", "hidden_channels", "hidden_time", "hidden_freq", "text_dim")


def check_fits_clap(cfg: DecoderConfig, clap: Any, source: str | os.PathLike) -> None:
    """Refuse a decoder whose input shapes are not those of `clap`'s hidden states and text
    embedding (a decoder trained for another CLAP architecture), naming the shapes."""
    have = DecoderConfig.for_clap(clap)
    differ = [(k, getattr(cfg, k), getattr(have, k)) for k in CLAP_GEOMETRY if getattr(cfg, k) != getattr(have, k)]
    if differ:
        shapes = "; ".join(f"{k} {_shape(want)} where this CLAP gives {_shape(got)}" for k, want, got in differ)
        raise DecoderError(f"{source}: this decoder was built for another CLAP architecture ({shapes}); "
                           "--force cannot make it fit. Pass the CLAP it was trained on, or train a decoder "
                           "for this one (`lmaczs train --clap ...`).")


def _shape(v: Any) -> str:
    return "x".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)


def load_decoder(directory: str | os.PathLike, clap: Any = None, force: bool = False) -> tuple[MaskDecoder, dict[str, Any]]:
    """Load a decoder saved by ``save_decoder`` (its folder, or a file in it). With ``clap`` given,
    refuse a decoder that was trained on another CLAP (by identity hash) unless ``force``, and
    one whose input shapes do not fit the CLAP's even with ``force``. Every unusable file raises
    DecoderError naming it and the fix."""
    from .clap import read_safetensors

    folder = decoder_folder(directory)
    config = read_decoder_config(directory)
    cfg = _decoder_config(config, folder / "config.json")
    if clap is not None:
        want = (config.get("clap") or {}).get("identity")
        have = clap.identity()
        if want != have and not force:
            raise DecoderError(
                f"{folder} was trained on CLAP {str(want)[:12]} ({(config.get('clap') or {}).get('source')}), "
                f"but the CLAP given is {have[:12]} ({clap.source}); its masks would be meaningless. "
                f"Pass the same --clap, or --force to use it anyway."
            )
        if want != have:
            check_fits_clap(cfg, clap, folder)
    weights_path = folder / "decoder.safetensors"
    weights = read_safetensors(weights_path, "copy the decoder folder again or re-run `lmaczs train`", DecoderError)
    decoder = MaskDecoder(cfg)
    own = decoder.state_dict()
    missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    problems = [f"{k} {tuple(weights[k].shape)} where config.json makes {tuple(v.shape)}"
                for k, v in own.items() if k in weights and weights[k].shape != v.shape][:3]
    if missing:
        problems.insert(0, f"{len(missing)} missing, e.g. {missing[0]}")
    if extra:
        problems.insert(0, f"{len(extra)} unexpected, e.g. {extra[0]}")
    if problems:
        detail = "; ".join(problems)
        raise DecoderError(f"{weights_path}: its weights do not match its config.json ({detail}); copy the "
                           "decoder folder again or re-run `lmaczs train`")
    decoder.load_state_dict(weights, strict=True)
    return decoder.eval(), config
