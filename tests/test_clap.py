"""The real LAION-CLAP classes, built offline; our split API equals laion's own forward."""
from __future__ import annotations

import pytest
import torch

from lmaczs_cli import clap as C
from lmaczs_cli.audio import CLIP_SAMPLES, N_FRAMES, N_MELS


def _waves(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(n, CLIP_SAMPLES, generator=g)


def _laion_embedding(model, waves):
    with torch.no_grad():
        return model.clap.get_audio_embedding([{"waveform": w} for w in waves])


def test_import_does_not_run_laion_package_init():
    import sys

    C.laion_module("model")
    assert "laion_clap" not in sys.modules  # laion_clap/__init__ builds hub tokenizers
    assert "_lmaczs_laion_clap.clap_module.model" in sys.modules


def test_tiny_embedding_matches_laion_forward(tiny_clap):
    waves = _waves(3)
    with torch.no_grad():
        logmel = tiny_clap.front_end(waves)
        emb, hidden = tiny_clap.encode(logmel)
    assert logmel.shape == (3, N_FRAMES, N_MELS)
    ref = _laion_embedding(tiny_clap, waves)
    assert emb.shape == ref.shape == (3, 512)
    assert (emb - ref).abs().max().item() <= 1e-4
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert [tuple(h.shape) for h in hidden] == [(3, 32, 32, 32), (3, 64, 16, 16), (3, 128, 8, 8), (3, 128, 8, 8)]


# Documented in clap.py's module docstring: the last four stages as (B, C, H, W) grids.
HIDDEN_SHAPES = {
    "HTSAT-tiny": [(192, 32, 32), (384, 16, 16), (768, 8, 8), (768, 8, 8)],
    "HTSAT-base": [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (1024, 8, 8)],
    "PANN-14": [(256, 125, 8), (512, 62, 4), (1024, 31, 2), (2048, 31, 2)],
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(HIDDEN_SHAPES))
def test_full_size_models_hidden_shapes_and_parity(arch):
    model = C.random_clap(arch, seed=1)
    waves = _waves(2, seed=2)
    with torch.no_grad():
        emb, hidden = model.encode(model.front_end(waves))
    assert [tuple(h.shape[1:]) for h in hidden] == HIDDEN_SHAPES[arch]
    assert all(h.shape[0] == 2 for h in hidden)
    ref = _laion_embedding(model, waves)
    assert (emb - ref).abs().max().item() <= 1e-4
    assert C.infer_config(model.clap.state_dict()).audio == arch


def test_text_embedding_is_normalised_and_prompt_dependent(tiny_clap):
    with torch.no_grad():
        t = tiny_clap.encode_text(["glass breaking", "a dog barking", "glass breaking"])
        tokens = tiny_clap.tokenize(["glass breaking"])
        ref = torch.nn.functional.normalize(tiny_clap.clap.encode_text(tokens, device="cpu"), dim=-1)
    assert t.shape == (3, 512)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t[0], t[2]) and not torch.allclose(t[0], t[1], atol=1e-3)
    assert torch.allclose(t[0], ref[0], atol=1e-6)


def test_clap_is_frozen_and_stays_in_eval(tiny_clap):
    tiny_clap.train()
    assert not tiny_clap.training and not tiny_clap.clap.audio_branch.training
    assert not any(p.requires_grad for p in tiny_clap.parameters())


def test_gradients_flow_through_frozen_encoder_to_input(tiny_clap):
    logmel = tiny_clap.front_end(_waves(1)).requires_grad_(True)
    emb, _ = tiny_clap.encode(logmel)
    emb.sum().backward()
    assert logmel.grad is not None and logmel.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clap.parameters())


def _laion_style_checkpoint(model, path):
    """Exactly the key layout of LAION's 630k-audioset-best.pt: a DDP-wrapped state dict
    (``module.`` prefix) that still holds ``text_branch.embeddings.position_ids``, plus the
    training loop's ``epoch``, ``name`` and ``optimizer`` entries."""
    sd = {f"module.{k}": v.clone() for k, v in model.clap.state_dict().items()}
    sd["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)])
    torch.save({"epoch": 45, "name": "630k-audioset", "state_dict": sd, "optimizer": opt.state_dict()}, path)


@pytest.mark.slow
def test_laion_checkpoint_round_trip_is_strict_and_identical(tmp_path, roberta_tokenizer_dir):
    model = C.random_clap("HTSAT-tiny+roberta", seed=3, tokenizer=roberta_tokenizer_dir)
    ckpt = tmp_path / "630k-audioset-best.pt"
    _laion_style_checkpoint(model, ckpt)
    loaded = C.load_clap(str(ckpt), tokenizer=roberta_tokenizer_dir)
    assert loaded.cfg == C.ClapConfig("HTSAT-tiny", "roberta")
    waves = _waves(2, seed=4)
    prompts = ["a dog", "la la"]
    with torch.no_grad():
        assert torch.equal(loaded.embed_audio(waves), model.embed_audio(waves))
        assert torch.equal(loaded.encode_text(prompts), model.encode_text(prompts))
    assert loaded.identity() == model.identity()


def test_strict_load_names_missing_and_unexpected_keys(tiny_clap):
    sd = dict(tiny_clap.clap.state_dict())
    sd.pop("audio_projection.0.weight")
    sd["audio_branch.surprise"] = torch.zeros(1)
    fresh = C.build_laion_clap(tiny_clap.cfg)
    with pytest.raises(C.ClapError, match=r"missing 1: \['audio_projection.0.weight'\].*unexpected 1: \['audio_branch.surprise'\]"):
        C.load_weights(fresh, sd, "ckpt")


def test_fusion_checkpoint_is_refused_with_a_clear_message(tmp_path, tiny_clap):
    sd = {f"module.{k}": v for k, v in tiny_clap.clap.state_dict().items()}
    sd["module.audio_branch.fusion_model.local_att.0.weight"] = torch.zeros(1)
    path = tmp_path / "630k-fusion-best.pt"
    torch.save({"state_dict": sd, "epoch": 1}, path)
    with pytest.raises(C.ClapError, match="fusion CLAP checkpoint.*630k-audioset-best.pt"):
        C.load_clap(str(path))
    with pytest.raises(C.ClapError, match="fusion model"):
        C.load_clap("laion:630k-fusion-best")


def test_our_safetensors_format_round_trip(tmp_path, tiny_clap):
    out = C.save_clap(tiny_clap, tmp_path / "clap")
    assert sorted(p.name for p in out.iterdir()) == ["clap.json", "clap.safetensors"]
    loaded = C.load_clap(str(out))
    waves = _waves(1, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded.embed_audio(waves), tiny_clap.embed_audio(waves))
    assert loaded.identity() == tiny_clap.identity()


def test_identity_changes_with_any_weight(tiny_clap):
    other = C.random_clap("tiny", seed=0)
    assert other.identity() == tiny_clap.identity()
    with torch.no_grad():
        other.clap.audio_projection[0].weight[0, 0] += 1e-3
    other._identity = None
    assert other.identity() != tiny_clap.identity()


def test_missing_tokenizer_error_names_both_places(tmp_path):
    with pytest.raises(C.ClapError, match=r"--tokenizer .*nowhere.*Hugging Face cache.*--tokenizer DIR"):
        C.random_clap("tiny+roberta", tokenizer=tmp_path / "nowhere")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("random:huge", "unknown architecture random:huge; choose one of random:HTSAT-tiny"),
        ("laion:not-a-model", "unknown LAION checkpoint 'not-a-model'"),
        ("/no/such/clap.pt", "no such file or folder"),
    ],
)
def test_bad_model_names_explain_themselves(spec, message):
    with pytest.raises(C.ClapError, match=message):
        C.load_clap(spec)


def test_laion_name_without_hub_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LMACZS_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(C.ClapError, match=r"Download 630k-audioset-best.pt yourself and pass --clap PATH"):
        C.laion_checkpoint_path("630k-audioset-best")


def test_laion_name_found_in_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LMACZS_CACHE", str(tmp_path))
    (tmp_path / "630k-best.pt").write_bytes(b"")
    assert C.laion_checkpoint_path("630k-best") == tmp_path / "630k-best.pt"
