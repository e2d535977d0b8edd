"""Baseline explanations of CLAP's zero-shot score: GradCAM, GradCAM++, SmoothGrad and
Integrated Gradients, for comparison with LMAC-ZS (`lmaczs eval`).

Every baseline explains the same number LMAC-ZS does: the **prompt similarity**
``t_ĉᵀ f_audio(X)`` of the predicted class's prompt (never HTSAT's 527-class AudioSet head),
as a function of CLAP's input X, the log-mel (B, 1001, 64) in dB. Every baseline returns a
mask on LMAC-ZS's mel grid, (B, 1001, 64) float32, normalised per clip by min-max to [0, 1]
(what pytorch-grad-cam does to its CAMs; we do the same to the gradient methods), so masks
of all methods can be applied as gains and compared by the same metrics.

  GradCAM, GradCAM++   pytorch-grad-cam on one layer of the audio encoder. HTSAT's token maps
                       are folded (four 256-frame chunks stacked along frequency): the reshape
                       transform turns tokens into the folded grid and unfolds it with
                       `decoder.unfold_htsat` to (time, mel) before the CAM is computed and
                       resized to (1001, 64). Default layer: HTSAT's final norm (the tokens the
                       embedding is pooled from; tiny: 32 x 2 after unfolding), PANN-14's
                       last conv block (conv_block6, 31 x 2).
  SmoothGrad           captum NoiseTunnel(Saliency): mean |∂s/∂X| over `smoothgrad_samples`
                       noisy copies, noise σ = `smoothgrad_sigma` x (max − min) of the clip's
                       log-mel (the SmoothGrad paper's 10-20 % of the input range).
  Integrated Gradients captum IntegratedGradients from a baseline input (`ig_baseline`:
                       "silence" = every cell at the AMIN floor, −100 dB, i.e. power 0 — the
                       input a mask of 0 produces; or "mean" = the clip's mean level) in
                       `ig_steps` Gauss-Legendre steps; the mask keeps the positive part
                       (evidence for the prompt).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import spectral
from .clap import ClapModel
from .decoder import unfold_htsat
from .errors import LmaczsError

BASELINES = ("gradcam", "gradcam++", "smoothgrad", "ig")
IG_BASELINES = ("silence", "mean")


class BaselineError(LmaczsError):
    """A baseline could not be computed with these settings; the message names the fix."""


@dataclass(frozen=True)
class BaselineSettings:
    """Settings of the baselines; recorded with every eval run (the paper does not give them)."""

    gradcam_layer: str | None = None   # module path inside the audio branch; None: "norm" (HTSAT),
                                       # "conv_block6" (PANN-14). Its output must be a tensor:
                                       # (B, L, C) tokens (HTSAT) or a (B, C, T, F) grid
    ig_steps: int = 32                 # Integrated Gradients: integration steps (Gauss-Legendre)
    ig_baseline: str = "silence"       # "silence" (−100 dB everywhere) | "mean" (clip's mean level)
    smoothgrad_samples: int = 25       # SmoothGrad: noisy copies per clip
    smoothgrad_sigma: float = 0.15     # SmoothGrad: noise σ as a share of the clip's log-mel range
    internal_batch: int = 16           # inputs per forward pass inside IG and SmoothGrad

    def __post_init__(self) -> None:
        if self.ig_baseline not in IG_BASELINES:
            raise BaselineError(f"unknown IG baseline {self.ig_baseline!r}; use one of {', '.join(IG_BASELINES)}")
        if self.ig_steps < 2 or self.smoothgrad_samples < 1 or self.smoothgrad_sigma < 0 or self.internal_batch < 1:
            raise BaselineError("need ig_steps >= 2, smoothgrad_samples >= 1, smoothgrad_sigma >= 0, internal_batch >= 1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PromptSimilarity(nn.Module):
    """The function every baseline explains: log-mel (B, 1, 1001, 64) -> similarities (B, C)
    of the clip's CLAP embedding to C fixed text embeddings (the label prompts)."""

    def __init__(self, clap: ClapModel, text: torch.Tensor) -> None:
        super().__init__()
        self.clap = clap
        self.register_buffer("text", text.detach().float())   # (C, D), L2-normalised

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        emb, _ = self.clap.encode(logmel[:, 0])               # (B, D)
        return emb @ self.text.T                              # (B, C)


def default_layer(clap: ClapModel) -> str:
    return "norm" if clap.cfg.is_htsat else "conv_block6"


def target_layer(clap: ClapModel, path: str | None) -> nn.Module:
    """The audio-branch module named by a dotted path ("norm", "layers.2.downsample", "conv_block6")."""
    path = path or default_layer(clap)
    try:
        return clap.branch.get_submodule(path)
    except AttributeError as e:
        raise BaselineError(f"--gradcam-layer {path}: no such module in the audio branch "
                            f"(e.g. {default_layer(clap)})") from e


def htsat_tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """HTSAT tokens (B, L, C) of a square folded grid -> unfolded (B, C, time, mel) grid."""
    B, L, C = x.shape
    side = int(round(L ** 0.5))
    if side * side != L:
        raise BaselineError(f"HTSAT layer output has {L} tokens, not a square grid; pick another --gradcam-layer")
    return unfold_htsat(x.transpose(1, 2).reshape(B, C, side, side))


def _reshape_for(clap: ClapModel) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise BaselineError("the GradCAM layer returns a tuple; pick a module whose output is a tensor "
                                "(HTSAT: norm, layers.N.downsample, layers.N.blocks.M.norm1)")
        if clap.cfg.is_htsat and x.dim() == 3:
            return htsat_tokens_to_grid(x)
        if x.dim() != 4:
            raise BaselineError(f"GradCAM layer output of shape {tuple(x.shape)}: need (B, L, C) tokens or (B, C, T, F)")
        return x
    return reshape


def normalise_maps(a: np.ndarray) -> np.ndarray:
    """Per-clip min-max to [0, 1]: (B, T, F) -> (B, T, F) float32; a constant map gives zeros."""
    a = np.asarray(a, dtype=np.float64)
    lo = a.min(axis=(1, 2), keepdims=True)
    span = a.max(axis=(1, 2), keepdims=True) - lo
    out = np.where(span > 0, (a - lo) / np.where(span > 0, span, 1.0), 0.0)
    return out.astype(np.float32)


def _cam(cam_class: type, clap: ClapModel, text: torch.Tensor, logmel: torch.Tensor, target: torch.Tensor,
         settings: BaselineSettings) -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = PromptSimilarity(clap, text)
    layer = target_layer(clap, settings.gradcam_layer)
    targets = [ClassifierOutputTarget(int(c)) for c in target]
    # CLAP's weights are frozen: the input must ask for gradients, or no activation gets one
    x = logmel[:, None].float().detach().clone().requires_grad_(True)     # (B, 1, 1001, 64)
    with cam_class(model=model, target_layers=[layer], reshape_transform=_reshape_for(clap)) as cam:
        maps = cam(input_tensor=x, targets=targets)                         # (B, 1001, 64), min-max'd
    return normalise_maps(maps)


def gradcam(clap: ClapModel, text: torch.Tensor, logmel: torch.Tensor, target: torch.Tensor,
            settings: BaselineSettings = BaselineSettings()) -> np.ndarray:
    """GradCAM of the similarity to prompt ``target``. text (C, D); logmel (B, 1001, 64);
    target (B,) class indices -> mask (B, 1001, 64) float32 in [0, 1]."""
    from pytorch_grad_cam import GradCAM

    return _cam(GradCAM, clap, text, logmel, target, settings)


def gradcam_plus_plus(clap: ClapModel, text: torch.Tensor, logmel: torch.Tensor, target: torch.Tensor,
                      settings: BaselineSettings = BaselineSettings()) -> np.ndarray:
    """GradCAM++ (same shapes as `gradcam`)."""
    from pytorch_grad_cam import GradCAMPlusPlus

    return _cam(GradCAMPlusPlus, clap, text, logmel, target, settings)


def smoothgrad(clap: ClapModel, text: torch.Tensor, logmel: torch.Tensor, target: torch.Tensor,
               settings: BaselineSettings = BaselineSettings(), seed: int = 0) -> np.ndarray:
    """SmoothGrad (mean |gradient| over noisy copies), one clip at a time since σ follows each
    clip's range. Same shapes as `gradcam`. Seeded: the same call gives the same mask."""
    from captum.attr import NoiseTunnel, Saliency

    model = PromptSimilarity(clap, text)
    tunnel = NoiseTunnel(Saliency(model))
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for b in range(logmel.shape[0]):
            x = logmel[b: b + 1, None].float()
            sigma = settings.smoothgrad_sigma * float(x.max() - x.min())
            attr = tunnel.attribute(x, nt_type="smoothgrad", nt_samples=settings.smoothgrad_samples,
                                    nt_samples_batch_size=settings.internal_batch, stdevs=sigma,
                                    target=int(target[b]))
            out.append(attr[:, 0].detach().cpu().numpy())
    return normalise_maps(np.concatenate(out))


def ig_baseline(logmel: torch.Tensor, kind: str) -> torch.Tensor:
    """IG's reference input for logmel (B, 1001, 64): silence (the −100 dB floor) or the clip's mean."""
    if kind == "silence":
        return torch.full_like(logmel, spectral.SILENCE_DB)
    if kind == "mean":
        return logmel.mean(dim=(1, 2), keepdim=True).expand_as(logmel).clone()
    raise BaselineError(f"unknown IG baseline {kind!r}; use one of {', '.join(IG_BASELINES)}")


def ig_attributions(clap: ClapModel, text: torch.Tensor, logmel: torch.Tensor, target: torch.Tensor,
                    settings: BaselineSettings = BaselineSettings()) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Integrated Gradients: (attributions (B, 1001, 64), convergence delta (B,)). Completeness:
    attributions.sum() ≈ s(X) − s(baseline) for each clip, delta being the difference."""
    from captum.attr import IntegratedGradients

    model = PromptSimilarity(clap, text)
    x = logmel[:, None].float()
    base = ig_baseline(logmel, settings.ig_baseline)[:, None].float()
    attr, delta = IntegratedGradients(model).attribute(
        x, baselines=base, target=target.long(), n_steps=settings.ig_steps,
        internal_batch_size=settings.internal_batch, return_convergence_delta=True)
    return attr[:, 0].detach(), delta.detach()


def integrated_gradients(clap: ClapModel, text: torch.Tensor, logmel: torch.Tensor, target: torch.Tensor,
                         settings: BaselineSettings = BaselineSettings()) -> np.ndarray:
    """Integrated Gradients' positive part, min-max normalised. Same shapes as `gradcam`."""
    attr, _ = ig_attributions(clap, text, logmel, target, settings)
    return normalise_maps(attr.clamp_min(0).cpu().numpy())


BASELINE_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gradcam": gradcam, "gradcam++": gradcam_plus_plus, "smoothgrad": smoothgrad, "ig": integrated_gradients,
}


def explain_baseline(method: str, clap: ClapModel, text: torch.Tensor, logmel: torch.Tensor, target: torch.Tensor,
                     settings: BaselineSettings = BaselineSettings()) -> np.ndarray:
    """Run baseline ``method`` (one of BASELINES): mask (B, 1001, 64) float32 in [0, 1]."""
    if method not in BASELINE_FUNCTIONS:
        raise BaselineError(f"unknown baseline {method!r}; use one of {', '.join(BASELINES)}")
    with torch.enable_grad():
        return BASELINE_FUNCTIONS[method](clap, text, logmel, target, settings)
