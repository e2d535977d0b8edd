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
      (text_readout: + a logit map <q(t), k(x)> read off this h1-grid map, brought onto the mask grid)
      -> 3 x up(ConvT)          (B, c, 1024, 64) [(B, c, 1000, 64)]
      (+ the clip's normalised log-mel as a skip channel, brought onto the same grid;
       skip_gate: instead, a text-independent gate on the log-mel multiplies the final mask)
      -> conv -> logits -> fixed time map to 1001 frames          (B, 1001, 64)
  STFT domain: logits -> fixed mel->linear map (B,1001,513) -> refine with the log-power skip
  sigmoid -> mask in [0, 1]

Cross-attention: queries are the audio feature map's positions, keys/values the K text tokens
(as in Stable Diffusion's U-Net); each "xattn" is followed by a text FiLM (per-channel scale and
shift from t; `film=False` for decoders saved before it existed). Fixed resampling steps are precomputed matrices (MatMul),
so the decoder exports without Resize ops.
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
def _interp_matrix_np(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation with aligned end points (align_corners=True)."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m.astype(np.float32)
    pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] += frac
    return m.astype(np.float32)


def interp_matrix(n_in: int, n_out: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.from_numpy(_interp_matrix_np(n_in, n_out)).to(device)


def resample_time(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Linear (align-corners) resampling of axis -2 of (..., T, F) to n_out as one MatMul."""
    m = interp_matrix(int(x.shape[-2]), n_out, x.device).to(x.dtype)   # int(): traced sizes are tensors
    return torch.matmul(m, x)


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
        for name in ("hidden_channels", "hidden_time", "hidden_freq"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    @property
    def mask_bins(self) -> int:
        return N_MELS if self.domain == "mel" else N_FREQS

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
        g = self.net(skip)
        # log p = log sigmoid(a) + log sigmoid(g); logit = log p - log(1 - p), computed stably
        log_p = F.logsigmoid(logits) + F.logsigmoid(g)
        return log_p - torch.log1p(-torch.exp(log_p).clamp_max(1 - 1e-7))


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
        self.lateral = nn.ModuleList(nn.Conv2d(c, wl, 1) for c, wl in zip(cfg.hidden_channels, widths))
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

    def grids(self, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """CLAP hidden states -> their lateral projections on (time, frequency) grids.

        The 1x1 lateral convolutions act per position, so they commute with the unfolding; they
        run first, on the folded grids, so the unfolding permutes `width` channels instead of
        CLAP's 192-768 (that permutation, with its small inner axes, was the slowest op of the
        decoder in ONNX Runtime)."""
        lat = [conv(h.contiguous()) for conv, h in zip(self.lateral, hidden)]   # same kernel for any layout
        if self.cfg.backbone == "htsat":
            return [unfold_htsat(x) for x in lat]
        return lat

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
    ) -> torch.Tensor:
        """hidden: CLAP's h1..h4 (B, C_i, H_i, W_i); text: (B, text_dim) L2-normalised;
        logmel: (B, 1001, 64) dB (needed when cfg.logmel_skip); log_power: (B, 1001, 513) dB
        (STFT domain only; the refinement sees it).  ->  mask (B, 1001, bins) in [0, 1]."""
        g1, g2, *deep = self.grids(hidden)
        tok = self.tokens(text)
        stage = 0
        if deep:                                           # h4 + h3 (or h3 alone) on the deepest grid
            x = deep[-1] + _fit(deep[0], deep[-1].shape[-2], deep[-1].shape[-1]) if len(deep) == 2 else deep[0]
            x = self.condition(0, self.mix[0](x), tok, text)
            x = _fit(self.up_deep(x), g2.shape[-2], g2.shape[-1]) + g2
            stage = 1
        else:
            x = g2
        x = self.condition(stage, self.mix[stage](x), tok, text)
        x = _fit(self.up_mid(x), g1.shape[-2], g1.shape[-1]) + g1
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
        if read is not None:                               # onto the mask grid: two fixed MatMuls
            fmap = interp_matrix(int(read.shape[-1]), N_MELS, read.device).to(read.dtype)
            logits = logits + resample_time(read, N_FRAMES) @ fmap.T
        if self.gate is not None:                          # last: nothing the prompt brings can undo it
            logits = self.gate(logits, skip)
        if self.cfg.domain == "stft":
            logits = logits @ spectral.mel_to_linear_weights(logits.device).to(logits.dtype)  # (B,1,1001,513)
            if log_power is None:
                raise DecoderError("an STFT-domain decoder needs log_power= (B, 1001, 513)")
            lp = _normalise(log_power.unsqueeze(1))
            logits = logits + self.refine(torch.cat([logits, lp], dim=1))
        return torch.sigmoid(logits[:, 0])


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


def read_decoder_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise DecoderError(f"{directory}: no config.json; pass the --out folder of `lmaczs train`")
    config = json.loads(path.read_text())
    if config.get("format") != DECODER_FORMAT:
        raise DecoderError(f"{path}: not an lmaczs decoder (format {config.get('format')!r})")
    return config


def load_decoder(directory: str | os.PathLike, clap: Any = None, force: bool = False) -> tuple[MaskDecoder, dict[str, Any]]:
    """Load a decoder saved by ``save_decoder``. With ``clap`` given, refuse a decoder that was
    trained on another CLAP (by identity hash) unless ``force``."""
    from safetensors.torch import load_file

    config = read_decoder_config(directory)
    if clap is not None:
        want = config.get("clap", {}).get("identity")
        have = clap.identity()
        if want != have and not force:
            raise DecoderError(
                f"{directory} was trained on CLAP {str(want)[:12]} ({config.get('clap', {}).get('source')}), "
                f"but the CLAP given is {have[:12]} ({clap.source}); its masks would be meaningless. "
                f"Pass the same --clap, or --force to use it anyway."
            )
    decoder = MaskDecoder(DecoderConfig.from_json(config["decoder"]))
    decoder.load_state_dict(load_file(str(Path(directory) / "decoder.safetensors")), strict=True)
    return decoder.eval(), config
