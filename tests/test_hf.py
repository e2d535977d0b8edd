"""hf:DIR: a transformers ClapModel folder loads into laion's classes and embeds as transformers does."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from lmaczs_cli.audio import CLIP_SAMPLES, F_MIN
from lmaczs_cli.clap import ClapConfig, ClapError
from lmaczs_cli.hf import clap_config_from_hf, hf_names, laion_name, load_hf_clap

# a small HTSAT (two blocks per stage, so shifted windows are exercised) and a small RoBERTa
SMALL_AUDIO = dict(patch_embeds_hidden_size=16, hidden_size=128, depths=[2, 2, 2, 2],
                   num_attention_heads=[1, 2, 4, 8])
SMALL_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                  vocab_size=128)
PROMPTS = ["a dog", "la la la", "dog dog"]


def _hf_config(audio=None, text=None):
    from transformers import ClapConfig as HfClapConfig

    return HfClapConfig(audio_config={**SMALL_AUDIO, **(audio or {})},
                        text_config={**SMALL_TEXT, **(text or {})}, projection_dim=64)


def _perturbed(model, seed=0):
    """Every tensor away from its init value (HF zeroes the position-bias tables, sets LayerNorms
    to 1/0), so that a tensor mapped to the wrong place cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.is_floating_point() and not name.startswith("logit_scale"):
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model.eval()


def _copy(src, dst, tensors=None):
    """A copy of an hf folder, optionally with other weights."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, roberta_tokenizer_dir):
    """(folder, the transformers ClapModel saved in it), tokenizer saved alongside."""
    from transformers import ClapModel as HfClapModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _perturbed(HfClapModel(_hf_config()))
    folder = tmp_path_factory.mktemp("hf") / "clap"
    model.save_pretrained(str(folder))
    for f in roberta_tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder, model


@pytest.fixture(scope="module")
def loaded(hf_folder):
    return load_hf_clap(hf_folder[0])


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_audio_embedding_equals_transformers_get_audio_features(hf_folder, loaded):
    _, hf = hf_folder
    g = torch.Generator().manual_seed(1)
    waves = 0.1 * torch.randn(2, CLIP_SAMPLES, generator=g)
    with torch.no_grad():
        logmel = loaded.front_end(waves)                                   # (2, 1001, 64)
        ours = loaded.encode(logmel)[0]
        theirs = hf.get_audio_features(input_features=logmel[:, None]).pooler_output  # (2, 1, 1001, 64) in
    assert ours.shape == theirs.shape == (2, 64)
    assert torch.allclose(theirs.norm(dim=-1), torch.ones(2), atol=1e-5)   # transformers normalises too
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours[0] - ours[1]).abs().max().item() > 1e-2                 # and the inputs mattered


def test_text_embedding_equals_transformers_get_text_features(hf_folder, loaded):
    _, hf = hf_folder
    tokens = loaded.tokenize(PROMPTS)                                      # padded to 77, as laion does
    with torch.no_grad():
        ours = loaded.encode_text(PROMPTS)
        theirs = hf.get_text_features(**tokens).pooler_output
    assert ours.shape == theirs.shape == (3, 64)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours[0] - ours[1]).abs().max().item() > 1e-2


def test_folder_config_becomes_our_config(loaded):
    assert loaded.cfg == ClapConfig(
        "HTSAT-custom", "roberta-custom", joint_dim=64, htsat_embed_dim=16, htsat_depths=(2, 2, 2, 2),
        htsat_heads=(1, 2, 4, 8), text_width=32, text_layers=2, text_heads=2, vocab_size=128,
        text_norm_eps=1e-12,
    )
    assert loaded.source.startswith("hf:")
    # transformers' ClapTextConfig default, which its conversion of LAION's models kept
    norms = [m for m in loaded.clap.text_branch.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(m.eps == 1e-12 for m in norms)


def test_laion_only_parts_are_zeroed_and_identity_is_reproducible(hf_folder, loaded):
    sd = loaded.clap.state_dict()
    for name in ("audio_branch.head.weight", "audio_branch.tscam_conv.weight",
                 "audio_transform.sequential.0.weight", "text_transform.sequential.3.bias"):
        assert not sd[name].any(), name
    assert load_hf_clap(hf_folder[0]).identity() == loaded.identity()


def test_published_layouts_are_recognised():
    from transformers import ClapConfig as HfClapConfig

    # transformers' defaults are laion/clap-htsat-unfused's architecture
    assert clap_config_from_hf(HfClapConfig()) == ClapConfig("HTSAT-tiny", "roberta", text_norm_eps=1e-12)
    base = HfClapConfig(audio_config=dict(patch_embeds_hidden_size=128, hidden_size=1024, depths=[2, 2, 12, 2]))
    assert clap_config_from_hf(base).audio == "HTSAT-base"


def test_names_map_both_ways():
    blk = "audio_model.audio_encoder.layers.2.blocks.1."
    assert laion_name(blk + "attention.self.key.bias") == ("audio_branch.layers.2.blocks.1.attn.qkv.bias", "key")
    assert laion_name(blk + "layernorm_after.weight") == ("audio_branch.layers.2.blocks.1.norm2.weight", None)
    assert laion_name("audio_model.audio_encoder.batch_norm.running_var") == ("audio_branch.bn0.running_var", None)
    assert laion_name("text_projection.linear2.weight") == ("text_projection.2.weight", None)
    assert laion_name("audio_model.audio_encoder.patch_embed.mel_conv2d.weight") is None   # fusion-only
    assert hf_names("audio_branch.layers.0.blocks.0.attn.qkv.weight") == [
        f"audio_model.audio_encoder.layers.0.blocks.0.attention.self.{p}.weight" for p in ("query", "key", "value")
    ]


def test_fusion_folder_is_refused(hf_folder, tmp_path):
    folder = _copy(hf_folder[0], tmp_path / "fused")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["audio_config"]["enable_fusion"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ClapError, match="fusion CLAP .*use laion/clap-htsat-unfused"):
        load_hf_clap(folder)


@pytest.mark.parametrize("tower, field, value", [
    ("audio_config", "window_size", 4),
    ("audio_config", "patch_stride", [2, 2]),
    ("text_config", "intermediate_size", 100),
    ("text_config", "hidden_act", "relu"),
])
def test_architectures_laion_cannot_build_are_refused(tower, field, value):
    hf = _hf_config(**{tower.split("_")[0]: {field: value}})
    with pytest.raises(ClapError, match=rf"{tower}\.{field} = "):
        clap_config_from_hf(hf)


def test_missing_weight_is_named(hf_folder, tmp_path):
    gone = "audio_model.audio_encoder.layers.1.blocks.0.attention.self.value.weight"
    tensors = {k: v for k, v in _weights(hf_folder[0]).items() if k != gone}
    with pytest.raises(ClapError, match=rf"missing 1: \['{re.escape(gone)}'\]; unexpected 0"):
        load_hf_clap(_copy(hf_folder[0], tmp_path / "missing", tensors))


@pytest.mark.parametrize("extra", [
    "audio_model.audio_encoder.patch_embed.mel_conv2d.weight",   # a fusion model's tensor
    "text_model.encoder.layer.2.output.dense.weight",            # a layer the config does not have
    "audio_model.audio_encoder.tscam_conv.weight",               # laion's name, not transformers'
])
def test_unexpected_weight_is_named(hf_folder, tmp_path, extra):
    tensors = {**_weights(hf_folder[0]), extra: torch.zeros(2, 2)}
    with pytest.raises(ClapError, match=rf"missing 0: \[\]; unexpected 1: \['{re.escape(extra)}'\]"):
        load_hf_clap(_copy(hf_folder[0], tmp_path / "extra", tensors))


def test_wrong_shape_names_the_tensor(hf_folder, tmp_path):
    name = "audio_projection.linear1.weight"
    tensors = {**_weights(hf_folder[0]), name: torch.zeros(64, 100)}
    with pytest.raises(ClapError, match=rf"{re.escape(name)} has shape \(64, 100\)"):
        load_hf_clap(_copy(hf_folder[0], tmp_path / "shape", tensors))


def test_tokenizer_from_the_folder_or_the_option(hf_folder, tmp_path, roberta_tokenizer_dir):
    folder = tmp_path / "no_tok"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hf_folder[0] / f, folder / f)
    with pytest.raises(ClapError, match="no tokenizer saved with the model.*--tokenizer DIR"):
        load_hf_clap(folder)
    model = load_hf_clap(folder, tokenizer=roberta_tokenizer_dir)
    assert model.tokenize(["a dog"])["input_ids"].shape == (1, 77)
    (folder / "vocab.json").write_text("{not json")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ClapError, match=r"tokenizer files there \(merges.txt, vocab.json\) cannot be read"):
        load_hf_clap(folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(ClapError, match="no tokenizer saved with the model"):
        load_hf_clap(folder)
    with pytest.raises(ClapError, match=r"tokenizer there is incomplete: vocab.json missing"):
        load_hf_clap(folder, tokenizer=folder)                 # --tokenizer DIR with half a tokenizer


def test_not_a_clap_folder_says_what_it_needs(tmp_path):
    with pytest.raises(ClapError, match="no config.json here.*save_pretrained"):
        load_hf_clap(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clap_audio_model"}))
    with pytest.raises(ClapError, match="not a transformers ClapModel"):
        load_hf_clap(tmp_path)


def _without_weights(src, dst):
    """A copy of an hf folder with its model.safetensors left out."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    return dst


def _pickle_that_calls_print():
    import pickle

    class Calls:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    return pickle.dumps({"weight": Calls()})


@pytest.mark.parametrize("case, match", [
    ("config list", r"config.json holds a JSON list, not the object"),
    ("weights cut", r"model.safetensors: not a readable safetensors file .*save_pretrained"),
    ("index garbage", r"model.safetensors.index.json: not a safetensors index"),
    ("index too deep", r"model.safetensors.index.json: not a safetensors index"),
    ("index escapes", r"shard '\.\./secret.safetensors' is not a file name in the model's folder"),
    ("index shard missing", r"model-00001.safetensors: missing; write the model again"),
    ("bin cut", r"pytorch_model.bin: not a readable weights-only PyTorch file"),
    ("bin runs code", r"pytorch_model.bin: not a readable weights-only PyTorch file"),
    ("bin not a state dict", r"pytorch_model.bin: not a state dict of named tensors"),
])
def test_unusable_folders_raise_clap_error_naming_the_file(hf_folder, tmp_path, capsys, case, match):
    """Every way an hf: folder's config or weights can be cut, corrupt or hostile is a ClapError that
    names the file; nothing in a pickled file runs, and no index can point outside the folder."""
    src = hf_folder[0]
    folder = _copy(src, tmp_path / "f") if case.startswith(("config", "weights")) else _without_weights(src, tmp_path / "f")
    if case == "config list":
        (folder / "config.json").write_text("[1, 2]")
    elif case == "weights cut":
        data = (src / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "index garbage":
        (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    elif case == "index too deep":
        (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif case == "index escapes":
        (tmp_path / "secret.safetensors").write_bytes((src / "model.safetensors").read_bytes())
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    elif case == "index shard missing":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    elif case == "bin cut":
        torch.save(_weights(src), folder / "pytorch_model.bin")
        data = (folder / "pytorch_model.bin").read_bytes()
        (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    elif case == "bin runs code":
        (folder / "pytorch_model.bin").write_bytes(_pickle_that_calls_print())
    elif case == "bin not a state dict":
        torch.save([torch.zeros(2)], folder / "pytorch_model.bin")
    with pytest.raises(ClapError, match=match):
        load_hf_clap(folder)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_sharded_and_torch_weights_load_as_the_single_file_does(hf_folder, loaded, tmp_path):
    from safetensors.torch import save_file

    tensors = _weights(hf_folder[0])
    names = sorted(tensors)
    sharded = _without_weights(hf_folder[0], tmp_path / "sharded")
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / shard))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}))
    binary = _without_weights(hf_folder[0], tmp_path / "bin")
    torch.save(tensors, binary / "pytorch_model.bin")
    want = loaded.clap.state_dict()
    for folder in (sharded, binary):
        got = load_hf_clap(folder).clap.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_feature_extractor_matches_our_front_end_only_with_laion_settings():
    """ClapFeatureExtractor's defaults (fusion: HTK mel bank, 0 Hz) are not laion's front end;
    rand_trunc (Slaney bank) from 50 Hz is. See hf.py's docstring."""
    from transformers import ClapFeatureExtractor

    from lmaczs_cli import spectral

    t = np.arange(CLIP_SAMPLES) / 48_000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(CLIP_SAMPLES))
    x = x.astype(np.float32)
    ours = spectral.log_mel(torch.from_numpy(x)[None])[0]                  # (1001, 64) dB

    laion_like = ClapFeatureExtractor(truncation="rand_trunc", frequency_min=F_MIN)
    feats = laion_like(x, sampling_rate=48_000, return_tensors="pt")["input_features"]
    assert feats.shape == (1, 1, 1001, 64)
    assert (feats[0, 0] - ours).abs().max().item() < 1e-3

    default = ClapFeatureExtractor()(x, sampling_rate=48_000, return_tensors="pt")["input_features"]
    assert default.shape == (1, 4, 1001, 64)                               # four mels for fusion
    assert (default[0, 0] - ours).abs().mean().item() > 5.0


@pytest.mark.slow
def test_full_size_unfused_layout_parity(tmp_path, roberta_tokenizer_dir):
    """transformers' default ClapConfig (laion/clap-htsat-unfused: HTSAT-tiny + roberta-base)."""
    from transformers import ClapConfig as HfClapConfig, ClapModel as HfClapModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = _perturbed(HfClapModel(HfClapConfig()), seed=1)
    hf.save_pretrained(str(tmp_path))
    model = load_hf_clap(tmp_path, tokenizer=roberta_tokenizer_dir)
    assert model.cfg == ClapConfig("HTSAT-tiny", "roberta", text_norm_eps=1e-12)
    waves = 0.1 * torch.randn(2, CLIP_SAMPLES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logmel = model.front_end(waves)
        audio = (model.encode(logmel)[0] - hf.get_audio_features(input_features=logmel[:, None]).pooler_output)
        text = model.encode_text(PROMPTS) - hf.get_text_features(**model.tokenize(PROMPTS)).pooler_output
    assert audio.abs().max().item() <= 1e-4
    assert text.abs().max().item() <= 1e-4
