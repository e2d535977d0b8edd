"""Baselines (GradCAM, GradCAM++, SmoothGrad, IG) on the prompt similarity: shapes, range,
IG completeness, and localization on the demo world better than chance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmaczs_cli import baselines as B
from lmaczs_cli import spectral
from lmaczs_cli.audio import N_FRAMES, N_MELS

FAST = B.BaselineSettings(ig_steps=4, smoothgrad_samples=2)


def _inputs(clap, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    waves = torch.randn(n, 480_000, generator=g) * 0.1
    text = clap.encode_text(["a dog barking", "rain on a roof", "a siren"])
    return text, spectral.log_mel(waves), torch.tensor([0, 2, 1][:n])


def _check_mask(mask: np.ndarray, n: int) -> None:
    assert mask.shape == (n, N_FRAMES, N_MELS) and mask.dtype == np.float32
    assert np.isfinite(mask).all() and mask.min() >= 0 and mask.max() <= 1


@pytest.mark.parametrize("method", B.BASELINES)
def test_baseline_gives_a_finite_mask_on_the_mel_grid_for_htsat(tiny_clap, method: str) -> None:
    text, logmel, target = _inputs(tiny_clap)
    mask = B.explain_baseline(method, tiny_clap, text, logmel, target, FAST)
    _check_mask(mask, 2)
    assert mask.max() == pytest.approx(1.0)      # min-max normalised per clip


@pytest.fixture(scope="module")
def pann():
    from lmaczs_cli.clap import random_clap

    return random_clap("PANN-14", seed=0)


@pytest.mark.parametrize("method", B.BASELINES)
def test_baseline_gives_a_finite_mask_for_pann14(pann, method: str) -> None:
    text, logmel, target = _inputs(pann, n=1)
    _check_mask(B.explain_baseline(method, pann, text, logmel, target, FAST), 1)


def test_gradcam_reads_pann14s_last_conv_block_and_htsats_final_norm(tiny_clap, pann) -> None:
    assert B.target_layer(pann, None) is pann.branch.conv_block6
    assert B.target_layer(tiny_clap, None) is tiny_clap.branch.norm


def test_htsat_tokens_are_unfolded_to_time_by_mel() -> None:
    # 8 x 8 folded tokens: row = chunk * 2 + mel, col = time within chunk
    grid = torch.arange(64.0).reshape(1, 1, 8, 8)
    tokens = grid.flatten(2).transpose(1, 2)                       # (1, 64, 1)
    out = B.htsat_tokens_to_grid(tokens)                           # (1, 1, 32, 2)
    assert out.shape == (1, 1, 32, 2)
    assert out[0, 0, 8, 1] == grid[0, 0, 1 * 2 + 1, 0]             # chunk 1, time 0, mel 1


def test_gradcam_targets_the_prompt_not_a_fixed_head(tiny_clap) -> None:
    text, logmel, _ = _inputs(tiny_clap, n=1)
    a = B.gradcam(tiny_clap, text, logmel, torch.tensor([0]))
    b = B.gradcam(tiny_clap, text, logmel, torch.tensor([1]))
    assert np.abs(a - b).max() > 1e-3


def test_integrated_gradients_are_complete(tiny_clap) -> None:
    text, logmel, target = _inputs(tiny_clap, n=1)
    attr, delta = B.ig_attributions(tiny_clap, text, logmel, target, B.BaselineSettings(ig_steps=32))
    model = B.PromptSimilarity(tiny_clap, text)
    with torch.no_grad():
        rows = torch.arange(1)
        diff = model(logmel[:, None])[rows, target] - model(B.ig_baseline(logmel, "silence")[:, None])[rows, target]
    total = attr.sum(dim=(1, 2))
    assert torch.allclose(total, diff, atol=0.02 * float(diff.abs().max()) + 1e-4), (total, diff)
    assert torch.allclose(delta.abs(), (total - diff).abs(), atol=1e-4)


def test_smoothgrad_is_seeded(tiny_clap) -> None:
    text, logmel, target = _inputs(tiny_clap, n=1)
    assert np.array_equal(B.smoothgrad(tiny_clap, text, logmel, target, FAST),
                          B.smoothgrad(tiny_clap, text, logmel, target, FAST))


def test_unknown_settings_are_refused_with_the_fix(tiny_clap) -> None:
    with pytest.raises(B.BaselineError, match="use one of silence, mean"):
        B.BaselineSettings(ig_baseline="zeros")
    with pytest.raises(B.BaselineError, match="no such module"):
        B.target_layer(tiny_clap, "layers.9")

# Localization of every baseline on the demo world (better than chance) is asserted on the
# records of a real `lmaczs eval` run, in tests/test_eval.py.


@pytest.fixture(scope="module")
def demo_scenes():
    """The bundled demo CLAP, its label prompts' embeddings, two demo scenes and their
    predicted classes."""
    from lmaczs_cli.evaluate import load_dataset, load_models, EvalConfig, probabilities

    ds = load_dataset("demo", limit=2)
    clap, _, _ = load_models(EvalConfig(data="demo", out="unused", device="cpu"))
    text = clap.encode_text(ds.prompts).detach()
    logmel = spectral.log_mel(torch.from_numpy(np.stack([c.wave() for c in ds.clips])))
    target = torch.from_numpy(probabilities(clap, text, logmel, 1.0).argmax(axis=1))
    return clap, text, logmel, target


@pytest.mark.parametrize("method", B.BASELINES)
def test_baseline_gives_a_finite_non_constant_mask_on_the_demo_model(demo_scenes, method: str) -> None:
    clap, text, logmel, target = demo_scenes
    mask = B.explain_baseline(method, clap, text, logmel, target, FAST)
    _check_mask(mask, 2)
    for m in mask:                       # a flat map would pass the range check and explain nothing
        assert m.max() == pytest.approx(1.0) and m.std() > 0.01
    other = B.explain_baseline(method, clap, text, logmel, (target + 7) % text.shape[0], FAST)
    assert all(np.abs(a - b).mean() > 1e-3 for a, b in zip(mask, other))    # the map follows the prompt
