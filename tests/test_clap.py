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
    training loop's ``epoch``, ``name`` and ``optimizer`` entries; the optimizer's learning rate
    is a numpy float64, as laion's cosine schedule computes it."""
    import numpy as np

    sd = {f"module.{k}": v.clone() for k, v in model.clap.state_dict().items()}
    sd["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)])
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = np.float64(0.5 * (1 + np.cos(np.pi * 0.3)) * 1e-4)
    torch.save({"epoch": 45, "name": "630k-audioset", "state_dict": sd, "optimizer": state}, path)


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


# --------------------------------------------------------------------------- untrusted files


def test_laion_format_with_numpy_scalars_loads_with_weights_only(tmp_path, tiny_clap):
    path = tmp_path / "630k-like.pt"
    _laion_style_checkpoint(tiny_clap, path)
    with pytest.raises(Exception, match="numpy.core.multiarray.scalar"):    # what torch alone refuses
        torch.load(path, weights_only=True)
    loaded = C.load_clap(str(path))
    waves = _waves(1, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded.embed_audio(waves), tiny_clap.embed_audio(waves))


class _Touch:
    """Unpickling this creates a file: what a malicious checkpoint can do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _booby_trapped(tmp_path, tiny_clap):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "trap.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_clap.clap.state_dict().items()},
                "extra": _Touch(target)}, path)
    return path, target


def test_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path, tiny_clap):
    path, target = _booby_trapped(tmp_path, tiny_clap)
    with pytest.raises(C.ClapError) as e:
        C.load_clap(str(path))
    assert str(e.value) == (
        f"{path}: refused: it pickles io.open, which is neither a tensor nor one of the numpy scalars "
        "LAION's checkpoints hold, and unpickling it could run code. If you trust where it came from, "
        "pass --trust-checkpoint (Python: trust=True).")
    assert not target.exists()
    with C.trusting_checkpoints():                     # the opt-in: the payload runs (why it is refused)
        loaded = C.load_clap(str(path))
    waves = _waves(1, seed=7)
    with torch.no_grad():
        assert target.exists() and torch.equal(loaded.embed_audio(waves), tiny_clap.embed_audio(waves))
    target.unlink()
    C.load_clap(str(path), trust=True)
    assert target.exists()


def _clap_folder(tmp_path, tiny_clap):
    return C.save_clap(tiny_clap, tmp_path / "clap")


@pytest.mark.parametrize("case, message", [
    ("empty", "{p}: empty file (0 bytes); download the checkpoint again"),
    ("truncated", "{p}: truncated or corrupt (its zip archive has no central directory, as when a download "
                  "stops early); download the checkpoint again"),
    ("random", "{p}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); pass a LAION .pt "
               "checkpoint such as 630k-audioset-best.pt"),
    ("text", "{p}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); pass a LAION .pt "
             "checkpoint such as 630k-audioset-best.pt"),
    ("safetensors", "{p}: a safetensors file, not a LAION .pt checkpoint; pass the folder that holds it with "
                    "its clap.json (a CLAP saved by lmaczs), or hf:DIR for a transformers ClapModel folder"),
    ("not-clap", "{p}: not a LAION-CLAP checkpoint: no RoBERTa or transformer text branch keys; pass a "
                 "LAION-CLAP .pt such as 630k-audioset-best.pt"),
    ("bad-member", "{p}: corrupt checkpoint ("),
])
def test_unusable_checkpoint_files_say_what_is_wrong(tmp_path, tiny_clap, case, message):
    import os
    import zipfile

    good = tmp_path / "good.pt"
    _laion_style_checkpoint(tiny_clap, good)
    p = tmp_path / f"{case}.pt"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "truncated":
        p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "random":
        p.write_bytes(os.urandom(4096))
    elif case == "text":
        p.write_text("<html>404 not found</html>\n")
    elif case == "safetensors":
        p.write_bytes((_clap_folder(tmp_path, tiny_clap) / "clap.safetensors").read_bytes())
    elif case == "not-clap":
        torch.save({"state_dict": {"weight": torch.zeros(3)}}, p)
    else:                                             # a zip whose tensor data is cut out
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(p, "w") as dst:
            for item in src.infolist():
                if "/data/" not in item.filename:
                    dst.writestr(item, src.read(item))
    with pytest.raises(C.ClapError) as e:
        C.load_clap(str(p))
    assert str(e.value).startswith(message.format(p=p)), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case, message", [
    ("no-json", "{d}: no clap.json in this folder; pass a folder with clap.json + clap.safetensors (a CLAP "
                "saved by lmaczs), a LAION .pt file, or hf:DIR"),
    ("bad-json", "{d}/clap.json: not readable JSON (JSONDecodeError: "),
    ("wrong-json", "{d}/clap.json: not an lmaczs CLAP config (no \"config\" object); copy the CLAP folder again"),
    ("unknown-field", "{d}/clap.json: unknown CLAP config fields ['colour']: written by a newer lmaczs?"),
    ("no-weights", "{d}/clap.safetensors: missing; copy the CLAP folder again"),
    ("cut-weights", "{d}/clap.safetensors: not a readable safetensors file (SafetensorError: "),
    ("other-weights", "{d}/clap.safetensors: weights do not match the architecture (missing "),
])
def test_unusable_clap_folders_say_what_is_wrong(tmp_path, tiny_clap, case, message):
    import json

    d = _clap_folder(tmp_path, tiny_clap)
    meta = json.loads((d / "clap.json").read_text())
    if case == "no-json":
        (d / "clap.json").unlink()
    elif case == "bad-json":
        (d / "clap.json").write_text('{"config": ')
    elif case == "wrong-json":
        (d / "clap.json").write_text("[1, 2]")
    elif case == "unknown-field":
        (d / "clap.json").write_text(json.dumps({**meta, "config": {**meta["config"], "colour": "red"}}))
    elif case == "no-weights":
        (d / "clap.safetensors").unlink()
    elif case == "cut-weights":
        data = (d / "clap.safetensors").read_bytes()
        (d / "clap.safetensors").write_bytes(data[: len(data) // 3])
    else:
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(2)}, str(d / "clap.safetensors"))
    with pytest.raises(C.ClapError) as e:
        C.load_clap(str(d))
    assert str(e.value).startswith(message.format(d=d)), str(e.value)


def test_offline_laion_name_fails_at_once_without_asking_the_hub(monkeypatch, tmp_path):
    import socket
    import time

    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("LMACZS_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*a, **k):
        raise AssertionError("the hub was asked although it is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(C.ClapError, match=r"hub is not reachable \(HF_HUB_OFFLINE is set\)"):
        C.laion_checkpoint_path("630k-audioset-best")

    def no_network(address, timeout=None):
        assert timeout is not None and timeout <= 5
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    t0 = time.perf_counter()
    with pytest.raises(C.ClapError) as e:
        C.load_clap("laion:630k-audioset-best")
    assert time.perf_counter() - t0 < 1.0
    assert str(e.value) == (
        f"laion:630k-audioset-best: 630k-audioset-best.pt is not in {tmp_path} or {tmp_path / 'torch' / 'hub'} "
        "and the Hugging Face hub is not reachable (no connection to huggingface.co: Name or service not "
        "known). Download 630k-audioset-best.pt yourself and pass --clap PATH/630k-audioset-best.pt, or put "
        f"it in {tmp_path}.")


def test_building_laion_clap_prints_no_warning():
    import subprocess
    import sys

    code = "from lmaczs_cli.clap import random_clap; random_clap('tiny')"
    run = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr == ""


def test_loaded_model_has_laions_own_front_end_weights(tmp_path, tiny_clap):
    """Loading skips torchlibrosa's STFT / mel computation (the checkpoint replaces it): the
    loaded parameters, and so the embeddings, equal those of a fully built model."""
    C.save_clap(tiny_clap, tmp_path / "clap")
    loaded = C.load_clap_dir(tmp_path / "clap")
    fresh = C.build_laion_clap(tiny_clap.cfg)       # computed by torchlibrosa / librosa
    ours, real = loaded.clap.state_dict(), fresh.state_dict()
    front = [k for k in real if "spectrogram_extractor" in k or "logmel_extractor" in k]
    assert len(front) == 3
    for k in front:
        assert torch.equal(ours[k], real[k]), k
    waves = _waves(2)
    with torch.no_grad():
        assert torch.equal(loaded.embed_audio(waves), tiny_clap.embed_audio(waves))
    assert C.build_laion_clap(tiny_clap.cfg).state_dict()[front[0]].abs().sum() > 0   # the shortcut is undone


def test_loading_the_demo_model_imports_no_unused_heavy_packages():
    import subprocess
    import sys

    code = ("import sys; from lmaczs_cli.clap import load_clap; load_clap('demo'); "
            "print(' '.join(m for m in ('transformers', 'torchvision', 'scipy.signal', 'numba', 'laion_clap') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}).stdout
    assert out.strip() == ""


def test_deferred_laion_names_resolve_to_the_real_objects():
    model = C.laion_module("model")
    from transformers import RobertaModel

    assert model.RobertaModel.from_pretrained == RobertaModel.from_pretrained
    assert C.laion_module().CLAP is model.CLAP          # the package itself, its __init__ run on demand
