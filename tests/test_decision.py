"""The decoder's decision map (`DecoderConfig.decision`): CLAP's per-token audio-text cosine,
made with CLAP's own audio projection, joins the deepest features and gates the mask; so the
masks answer to the projection and stage 4 (the model-randomisation check), in every backend."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lmaczs_cli.audio import CLIP_SAMPLES
from lmaczs_cli.decoder import DecisionMap, DecoderConfig, DecoderError, MaskDecoder, unfold_htsat
from lmaczs_cli.evaluate import encoder_stages, reinitialise_
from lmaczs_cli.model import ExplainerModule, token_embeddings


def _decoder(clap, decision: bool, seed: int = 0, **kwargs) -> MaskDecoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig.for_clap(clap, width=16, heads=2, text_tokens=4, text_readout=True, logmel_skip=False,
                                 first_level=4, decision=decision, **kwargs)
    return MaskDecoder(cfg).eval()


@pytest.fixture(scope="module")
def clips():
    g = torch.Generator().manual_seed(3)
    t = torch.arange(CLIP_SAMPLES) / 48_000
    waves = 0.05 * torch.randn(2, CLIP_SAMPLES, generator=g)
    waves += 0.3 * torch.sin(2 * torch.pi * torch.tensor([[440.0], [2500.0]]) * t)
    text = torch.nn.functional.normalize(torch.randn(2, 2, 512, generator=g), dim=-1)
    return waves, text


def test_decision_needs_the_deepest_stage():
    geometry = dict(backbone="htsat", hidden_channels=(8, 16, 32, 32), hidden_time=(128, 64, 32, 32),
                    hidden_freq=(8, 4, 2, 2))
    with pytest.raises(DecoderError, match="levels=4"):
        DecoderConfig(**geometry, levels=3, decision=True)
    with pytest.raises(DecoderError, match="first_level=4"):
        DecoderConfig(**geometry, first_level=3, projected=True)
    with pytest.raises(DecoderError, match="set decision"):
        DecoderConfig(**geometry, decision_contrast=True)


def test_token_embeddings_pool_to_the_clips_embedding(tiny_clap, clips):
    """HTSAT projects the mean of its stage-4 tokens; `token_embeddings` projects each token. On
    h4's grid, one per token, in the joint space; the projection of their mean input is the
    clip's own (unnormalised) embedding."""
    waves, _ = clips
    with torch.no_grad():
        emb, hidden = tiny_clap.encode(tiny_clap.front_end(waves))
        z = token_embeddings(tiny_clap, hidden)
        pooled = tiny_clap.clap.audio_projection(hidden[-1].flatten(2).mean(-1))
        one = tiny_clap.clap.audio_projection(hidden[-1][:, :, 3, 5])            # token (3, 5) alone
    assert z.shape == (2, emb.shape[-1], *hidden[-1].shape[-2:])
    torch.testing.assert_close(z[:, :, 3, 5], one)
    assert not torch.allclose(z[:, :, 3, 5], z[:, :, 0, 0])                     # one embedding per token
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), emb)


def test_the_gate_closes_cells_whose_tokens_do_not_answer_the_prompt(tiny_clap, clips):
    """Tokens that point along the prompt on the first half of the clip and against it on the
    second: the gate keeps the first half's mask and all but shuts the second's; without tokens
    the decoder says what it needs."""
    dec = _decoder(tiny_clap, decision=True)
    waves, text = clips
    with torch.no_grad():
        _, hidden = tiny_clap.encode(tiny_clap.front_end(waves))
        t = text[:, 0]
        sign = torch.ones(1, 1, *hidden[-1].shape[-2:])
        unfolded = unfold_htsat(sign)                                  # time on axis -2
        unfolded[..., unfolded.shape[-2] // 2:, :] = -1.0
        folded = _fold(unfolded, hidden[-1].shape[-1])
        tokens = t[:, :, None, None] * folded
        with pytest.raises(DecoderError, match="tokens="):
            dec(hidden, t)
        mask = dec(hidden, t, tokens=tokens)
        cos = DecisionMap.cosine(tokens, t)
    assert torch.allclose(cos.abs(), torch.ones_like(cos), atol=1e-5)
    first, second = mask[:, : mask.shape[1] // 2 - 40], mask[:, mask.shape[1] // 2 + 40:]
    assert second.mean() < 0.05 * first.mean(), (float(first.mean()), float(second.mean()))


def _fold(x: torch.Tensor, side: int) -> torch.Tensor:
    """The inverse of `unfold_htsat`: (B, C, 4 S, S / 4) -> (B, C, S, S)."""
    B, C, T, F = x.shape
    x = x.reshape(B, C, 4, side, F).permute(0, 1, 2, 4, 3)            # (B, C, chunk, mel, t)
    return x.reshape(B, C, side, side)


def test_fold_helper_inverts_unfold():
    x = torch.randn(1, 2, 8, 8)
    assert torch.equal(_fold(unfold_htsat(x), 8), x)


def test_re_initialising_the_projection_moves_only_masks_that_read_the_decision(tiny_clap, clips):
    """The top of the cascading randomisation: a new audio projection changes the masks of a
    decoder with the decision map (either channel) or reading the projected tokens, and leaves
    those of one that reads h4 itself exactly as they were."""
    waves, text = clips
    broken = type(tiny_clap)(copy.deepcopy(tiny_clap.clap), tiny_clap.cfg, tiny_clap.tokenizer, "randomised")
    name, modules = encoder_stages(broken)[0]
    assert name == "projection"
    reinitialise_(modules, 0)
    for decision, kwargs in ((True, {}), (True, {"decision_contrast": True}), (False, {"projected": True}),
                             (False, {})):
        dec = _decoder(tiny_clap, decision, **kwargs)
        if kwargs.get("decision_contrast"):
            with torch.no_grad():                      # the standardised channel alone moves the gate
                dec.decision.gate.weight[0, 0].zero_()
                dec.decision.gate.weight[0, 1, 1, 1] = 4.0
        with torch.no_grad():
            intact = ExplainerModule(tiny_clap, dec, "mel")(waves, text, check=False, listen=False)["masks"]
            moved = ExplainerModule(broken, dec, "mel")(waves, text, check=False, listen=False)["masks"]
        change = float((intact - moved).abs().max())
        if decision or kwargs:
            assert change > 1e-3, (kwargs, change)
        else:
            assert change == 0.0, change


def test_a_decision_decoder_exports_and_matches_eager(tiny_clap, clips, tmp_path):
    """The decision map is part of the traced forward: the ONNX explainer reproduces eager masks."""
    ort = pytest.importorskip("onnxruntime")
    from lmaczs_cli.backends import session_options
    from lmaczs_cli.export.to_onnx import export_explainer

    dec = _decoder(tiny_clap, decision=True, seed=1)
    with torch.no_grad():                                  # a gate that is not near-uniform
        dec.decision.lateral.weight.normal_(0, 1.0)
    export_explainer(tiny_clap, dec, tmp_path / "explainer.onnx", "mel")
    waves, text = clips
    s = ort.InferenceSession(str(tmp_path / "explainer.onnx"), session_options(threads=1),
                             providers=["CPUExecutionProvider"])
    got = s.run(["masks"], {"waves": waves.numpy(), "text": text.numpy()})[0]
    with torch.no_grad():
        ref = ExplainerModule(tiny_clap, dec, "mel")(waves, text, check=False, listen=False)["masks"].numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3
