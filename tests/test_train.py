"""`lmaczs train`: the loss goes down, checkpoints are exact, resume and DDP are exact, bad rows are skipped."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lmaczs_cli import spectral
from lmaczs_cli import decoder as D
from lmaczs_cli import recipe as R
from lmaczs_cli import train as T
from lmaczs_cli.cli import main
from lmaczs_cli.model import ExplainerModule

REPO = Path(__file__).resolve().parents[1]
FREQS = [300, 800, 2000, 5000]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Eight 2-s tone clips at 16 kHz with captions, one missing file and one corrupt file."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for k in range(8):
        t = np.arange(32_000) / 16_000
        f = FREQS[k % 4]
        sf.write(d / f"clip{k}.wav", 0.3 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(t.size), 16_000)
        rows.append({"audio": f"clip{k}.wav", "caption": f"a tone at {f} hertz"})
    (d / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    rows += [{"audio": "gone.wav", "caption": "missing"}, {"audio": "broken.wav", "caption": "corrupt"}]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "train.jsonl"


def _cfg(dataset, out, **kw):
    base = dict(manifest=str(dataset), out=str(out), clap="random:tiny", batch_size=2, epochs=4,
                log_every=1, val_fraction=0.0, workers=0, device="cpu")
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.fixture(scope="module")
def plain_run(dataset, tmp_path_factory, tiny_clap):
    """Two steps with the default loss: what a run with one option changed is compared against (read only)."""
    run = tmp_path_factory.mktemp("plain") / "run"
    T.train(_cfg(dataset, run, max_steps=2), clap=tiny_clap)
    return run


def _module(clap, domain="mel", decoder=None):
    """The model path training calls: the frozen CLAP's features, the decoder, the masked input."""
    return ExplainerModule(clap, decoder, domain)


def _features(clap, waves, domain="mel"):
    with torch.no_grad():
        return _module(clap, domain).features(waves)


def _weights(run):
    return load_file(str(Path(run) / "decoder.safetensors"))


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_training_lowers_the_similarity_term(dataset, tmp_path):
    """On the demo CLAP: a random tiny CLAP's embeddings barely move under any mask (similarity
    errors ~0.002, noise larger than the trend); the demo CLAP's move (~0.05), so the decrease is
    measurable in 20 steps. Batch-2 steps are noisy: compare 5-step means."""
    from lmaczs_cli.clap import load_clap

    T.train(_cfg(dataset, tmp_path / "run", clap="demo", max_steps=20, epochs=10, lr=1e-3), clap=load_clap("demo"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sim = [x["similarity"] for x in lines if "similarity" in x]
    assert len(sim) == 20
    first, last = np.mean(sim[:5]), np.mean(sim[-5:])
    assert last < 0.7 * first, (first, last)


def test_learning_rate_schedules():
    const = T.TrainConfig(manifest="m", out="o", lr=1e-3)
    assert [T.learning_rate(const, k, 100) for k in (0, 50, 99)] == [1e-3] * 3
    cos = T.TrainConfig(manifest="m", out="o", lr=1e-3, lr_schedule="cosine")
    lrs = [T.learning_rate(cos, k, 1000) for k in range(1000)]
    warm = round(T.WARMUP_SHARE * 1000)
    assert lrs[0] == pytest.approx(1e-3 / warm) and lrs[warm - 1] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))          # rising while warming up
    assert lrs[warm] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[warm:], lrs[warm + 1:]))            # then falling
    assert 0 < lrs[-1] < 1e-3 * 1e-4                                          # towards 0, every step still moves
    assert T.learning_rate(cos, 0, 1) == pytest.approx(1e-3)                  # a one-step run trains at --lr
    with pytest.raises(T.TrainError, match="lr schedule"):
        T.TrainConfig(manifest="m", out="o", lr_schedule="linear")


def test_cosine_schedule_reaches_the_optimizer_and_the_log(dataset, tmp_path, tiny_clap):
    cfg = _cfg(dataset, tmp_path / "run", max_steps=4, lr=1e-3, lr_schedule="cosine")
    T.train(cfg, clap=tiny_clap)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [x["lr"] for x in lines if "lr" in x]
    assert logged == pytest.approx([T.learning_rate(cfg, k, 4) for k in range(4)])
    assert logged[-1] < logged[0]                       # the optimizer really ran on the falling curve


def test_binarising_noise_spreads_undecided_cells_and_spares_decided_ones():
    g = torch.Generator().manual_seed(0)
    undecided = T.binarising_noise(torch.full((20_000,), 0.5), 1.0, g)
    # sigmoid(Logistic(0, 1)) is uniform on [0, 1]
    assert undecided.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (undecided < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.01)
    decided = T.binarising_noise(torch.full((20_000,), torch.sigmoid(torch.tensor(-8.0)).item()), 1.0, g)
    assert (decided < 0.05).float().mean().item() > 0.95
    again = T.binarising_noise(torch.full((5,), 0.3), 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(again, T.binarising_noise(torch.full((5,), 0.3), 1.0, torch.Generator().manual_seed(3)))


def test_mask_noise_changes_training_but_not_the_saved_decoders_masks(dataset, tmp_path, tiny_clap, plain_run):
    plain, noisy = plain_run, tmp_path / "noisy"
    T.train(_cfg(dataset, noisy, max_steps=2, mask_noise=1.0), clap=tiny_clap)
    assert json.loads((noisy / "config.json").read_text())["train"]["mask_noise"] == 1.0
    assert _max_diff(_weights(plain), _weights(noisy)) > 0       # the noise reached the gradients
    # the noise enters only where asked: the default path gives the decoder's own (saved) masks
    feats = _features(tiny_clap, 0.1 * torch.randn(1, 480_000, generator=torch.Generator().manual_seed(1)))
    dec, _ = D.load_decoder(noisy, clap=tiny_clap)
    pairs = torch.tensor([[0, 0]])
    text = tiny_clap.encode_text(["a tone at 300 hertz"])
    module = _module(tiny_clap, "mel", dec)
    with torch.no_grad():
        clean, masks, _ = T.masked_embeddings(module, feats, text, pairs)
        same = dec(list(feats.hidden), text, feats.logmel, None)
        _, shaken, _ = T.masked_embeddings(module, feats, text, pairs, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(masks, same)
    assert (shaken - masks).abs().max() > 0.1 and 0 <= shaken.min() and shaken.max() <= 1


def test_no_logmel_skip_trains_a_decoder_that_sees_only_the_encoder(dataset, tmp_path, tiny_clap):
    run = tmp_path / "run"
    T.train(_cfg(dataset, run, max_steps=1, logmel_skip=False), clap=tiny_clap)
    dec, _ = D.load_decoder(run, clap=tiny_clap)
    assert dec.cfg.logmel_skip is False
    feats = _features(tiny_clap, 0.1 * torch.randn(1, 480_000, generator=torch.Generator().manual_seed(2)))
    text = tiny_clap.encode_text(["a tone at 300 hertz"])
    with torch.no_grad():
        a = dec(list(feats.hidden), text, feats.logmel, None)
        b = dec(list(feats.hidden), text, feats.logmel.flip(1), None)   # another log-mel, same hidden states
    assert torch.equal(a, b)


def test_checkpoint_round_trip_gives_identical_masks(dataset, tmp_path, tiny_clap):
    run = tmp_path / "run"
    T.train(_cfg(dataset, run, max_steps=2), clap=tiny_clap)
    config = json.loads((run / "config.json").read_text())
    assert config["clap"]["identity"] == tiny_clap.identity()
    assert config["domain"] == "mel" and config["loss"]["lambda_sparsity"] == 0.05
    assert len(config["data"]["manifest_hash"]) == 64
    dec, _ = D.load_decoder(run, clap=tiny_clap)
    fresh = D.MaskDecoder(D.DecoderConfig.from_json(config["decoder"]))
    fresh.load_state_dict(_weights(run))
    waves = 0.1 * torch.randn(1, 480_000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logmel = tiny_clap.front_end(waves)
        _, hidden = tiny_clap.encode(logmel)
        text = tiny_clap.encode_text(["a tone at 300 hertz"])
        assert torch.equal(dec(hidden, text, logmel), fresh.eval()(hidden, text, logmel))


def test_resume_continues_exactly(dataset, tmp_path, tiny_clap):
    T.train(_cfg(dataset, tmp_path / "a", max_steps=3), clap=tiny_clap)
    T.train(_cfg(dataset, tmp_path / "a", max_steps=6), resume=True, clap=tiny_clap)
    T.train(_cfg(dataset, tmp_path / "b", max_steps=6), clap=tiny_clap)
    assert _max_diff(_weights(tmp_path / "a"), _weights(tmp_path / "b")) == 0.0
    steps = [json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_stft_domain_trains_and_records_its_domain(dataset, tmp_path, tiny_clap):
    T.train(_cfg(dataset, tmp_path / "s", max_steps=1, domain="stft", mismatched=1), clap=tiny_clap)
    dec, config = D.load_decoder(tmp_path / "s", clap=tiny_clap)
    assert config["domain"] == "stft" and dec.cfg.mask_bins == 513


def test_group_by_audio_plans_a_clips_texts_together(dataset, tmp_path, tiny_clap, monkeypatch):
    """Two captions per clip: with --group-by-audio each micro-batch of 2 holds one clip's pair."""
    rows = [json.loads(x) for x in dataset.read_text().splitlines()][:4]
    lines = [dict(r, caption=f"{r['caption']} ({k})") for r in rows for k in range(2)]
    manifest = dataset.parent / "two-captions.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    seen = []
    planner = T.data.batches_for_step
    monkeypatch.setattr(T.data, "batches_for_step", lambda *a, **k: seen.append(planner(*a, **k)) or seen[-1])
    T.train(_cfg(manifest, tmp_path / "g", max_steps=4, epochs=1, group_by_audio=True), clap=tiny_clap)
    assert json.loads((tmp_path / "g" / "config.json").read_text())["train"]["group_by_audio"] is True
    audio = [lines[i]["audio"] for mb in seen[0] for i in mb]
    assert all(audio[2 * k] == audio[2 * k + 1] for k in range(4))


def test_bad_manifest_rows_end_up_in_skipped_jsonl(dataset, tmp_path, tiny_clap):
    T.train(_cfg(dataset, tmp_path / "run", max_steps=5, epochs=1), clap=tiny_clap)
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert reasons["gone.wav"] == "missing"
    assert "broken.wav" in reasons and "not" in reasons["broken.wav"].lower()
    assert len(skipped) == 2


def test_strict_stops_at_the_first_bad_row(dataset, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "r"),
                                       "--clap", "random:tiny", "--strict", "--workers", "0"])
    assert result.exit_code == 2
    assert "gone.wav: missing" in result.output and "drop --strict" in result.output


def test_train_needs_data_and_out_or_resume():
    result = CliRunner().invoke(main, ["train", "--clap", "random:tiny"])
    assert result.exit_code == 2 and "--data and --out are required" in result.output


def _torchrun(args, env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_two_process_gloo_run_equals_one_process_with_accumulation(dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["--data", str(dataset), "--clap", "random:tiny", "--batch-size", "2", "--max-steps", "2",
              "--lr", "1e-5", "--workers", "0", "--device", "cpu", "--val-fraction", "0"]
    ddp = _torchrun(["--nproc_per_node", "2", "--master_port", "29533", "-m", "lmaczs_cli", "train",
                     *common, "--out", str(tmp_path / "ddp")], env)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "lmaczs_cli", "train", *common, "--accum", "2",
                             "--out", str(tmp_path / "one")], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    assert _max_diff(a, b) <= 1e-5
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["train"]["world"] == 2 and config["train"]["pairs"] == "rank-local"


def test_straight_through_shows_clap_a_binary_mask_and_passes_the_soft_gradient():
    soft = torch.tensor([0.1, 0.49, 0.51, 0.9], requires_grad=True)
    hard = T.straight_through(soft)
    assert hard.tolist() == [0.0, 0.0, 1.0, 1.0]
    (hard * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert soft.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


class _FixedMask(torch.nn.Module):
    """A stand-in decoder: one mask for every pair, from its own logits (the cells in `on` kept)."""

    def __init__(self, bins: int = 64) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.full((1, 1001, bins), -8.0))
        with torch.no_grad():
            self.logits[:, 300:500, 10:30] = 8.0

    def forward(self, hidden, text, logmel, log_power):
        return torch.sigmoid(self.logits).expand(len(text), -1, -1)


@pytest.mark.parametrize("domain", ["mel", "stft"])
def test_hard_mask_shows_clap_a_binary_mask_and_only_the_kept_cells_get_a_gradient(tiny_clap, domain):
    """A dropped cell is silence in the masked log-mel (clamped at the floor), so its gradient is 0."""
    waves = torch.randn(1, 480_000, generator=torch.Generator().manual_seed(0)) * 0.1
    feats = _features(tiny_clap, waves, domain)
    text = torch.nn.functional.normalize(torch.randn(1, feats.embedding.shape[-1]), dim=-1)
    decoder = _FixedMask(64 if domain == "mel" else 513)
    masked, shown, _ = T.masked_embeddings(_module(tiny_clap, domain, decoder), feats, text, torch.tensor([[0, 0]]),
                                           hard=True)
    assert shown.detach().unique().tolist() == [0.0, 1.0]
    with torch.no_grad():
        binary, _ = tiny_clap.encode(_module(tiny_clap, domain).masked_log_mel(feats, torch.tensor([0]),
                                                                               shown.detach()))
    assert torch.allclose(masked.detach(), binary, atol=1e-6)         # CLAP is shown the thresholded mask
    (text * masked).sum().backward()
    grad = decoder.logits.grad[0]
    kept = torch.zeros_like(grad, dtype=torch.bool)
    kept[300:500, 10:30] = True
    assert grad[kept].abs().sum() > 0 and grad[~kept].abs().sum() == 0


def test_hard_mask_changes_training_and_is_recorded(dataset, tmp_path, tiny_clap):
    plain, hard = tmp_path / "plain", tmp_path / "hard"
    T.train(_cfg(dataset, plain, max_steps=2, mask_noise=1.0), clap=tiny_clap)
    T.train(_cfg(dataset, hard, max_steps=2, mask_noise=1.0, hard_mask=True), clap=tiny_clap)
    assert json.loads((hard / "config.json").read_text())["train"]["hard_mask"] is True
    assert _max_diff(_weights(plain), _weights(hard)) > 0


def test_init_starts_from_a_saved_decoder(dataset, tmp_path, tiny_clap):
    base, tuned, fresh = tmp_path / "base", tmp_path / "tuned", tmp_path / "fresh"
    T.train(_cfg(dataset, base, max_steps=2, text_readout=True), clap=tiny_clap)
    T.train(_cfg(dataset, tuned, max_steps=1, lr=1e-9, text_readout=True, init=str(base), seed=1), clap=tiny_clap)
    T.train(_cfg(dataset, fresh, max_steps=1, lr=1e-9, text_readout=True, seed=1), clap=tiny_clap)
    assert _max_diff(_weights(base), _weights(tuned)) < 1e-6
    assert _max_diff(_weights(base), _weights(fresh)) > 1e-2
    assert json.loads((tuned / "config.json").read_text())["train"]["init"] == str(base)


def test_init_from_a_decoder_at_an_operating_point_trains_the_decoder_as_trained(dataset, tmp_path, tiny_clap):
    """An --init decoder whose config.json carries a logit_bias (recipes.demo.operating_point) starts
    the run from its weights at bias 0: the point was chosen for that decoder, not for its successor."""
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    T.train(_cfg(dataset, base, max_steps=2), clap=tiny_clap)
    config = json.loads((base / "config.json").read_text())
    config["decoder"]["logit_bias"] = -3.0
    (base / "config.json").write_text(json.dumps(config))
    T.train(_cfg(dataset, tuned, max_steps=1, lr=1e-9, init=str(base), seed=1), clap=tiny_clap)
    assert _max_diff(_weights(base), _weights(tuned)) < 1e-6
    assert "logit_bias" not in json.loads((tuned / "config.json").read_text())["decoder"]


def test_init_refuses_a_decoder_of_another_clap_unless_told(dataset, tmp_path, tiny_clap):
    from lmaczs_cli.clap import random_clap
    from lmaczs_cli.decoder import DecoderError

    other = random_clap("tiny", seed=1)
    assert other.identity() != tiny_clap.identity()
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    T.train(_cfg(dataset, base, max_steps=2), clap=tiny_clap)
    with pytest.raises(DecoderError, match="trained on CLAP"):
        T.train(_cfg(dataset, tmp_path / "refused", max_steps=1, init=str(base)), clap=other)
    T.train(_cfg(dataset, tuned, max_steps=1, lr=1e-9, init=str(base), init_any_clap=True), clap=other)
    assert _max_diff(_weights(base), _weights(tuned)) < 1e-6          # started from base's weights
    assert json.loads((tuned / "config.json").read_text())["train"]["init_any_clap"] is True
    with pytest.raises(T.TrainError, match="only applies with init"):
        _cfg(dataset, tmp_path / "x", init_any_clap=True)
    any_clap = _recipe(tmp_path / "any.toml", "[decoder]\ninit_any_clap = true\n")
    alone = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "y"), "--config", any_clap])
    assert alone.exit_code == 2 and "[decoder] init_any_clap needs --init" in alone.output
    resumed = CliRunner().invoke(main, ["train", "--resume", str(tuned), "--config", any_clap])
    assert resumed.exit_code == 2 and "[decoder] init_any_clap goes with --init" in resumed.output
    assert not (tmp_path / "y").exists()


def _recipe(path, text):
    path.write_text(text)
    return str(path)


def test_init_refuses_another_architecture_with_the_message_the_cli_shows(dataset, tmp_path, tiny_clap):
    T.train(_cfg(dataset, tmp_path / "base", max_steps=1), clap=tiny_clap)
    message = "[decoder] width 16 differs from the --init decoder's 64: fine-tuning keeps its architecture"
    with pytest.raises(T.TrainError) as refused:
        T.train(_cfg(dataset, tmp_path / "b", max_steps=1, width=16, init=str(tmp_path / "base")), clap=tiny_clap)
    assert str(refused.value) == message and not (tmp_path / "b").exists()
    cli = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "c"), "--init",
                                    str(tmp_path / "base"), "--config", _recipe(tmp_path / "w.toml", "[decoder]\nwidth = 16\n")])
    assert cli.exit_code == 2 and message in cli.output
    # what the CLI does for a fine-tuning run, a library caller can do too: the init decoder's architecture
    cfg = R.resolve_config({"manifest": str(dataset), "out": str(tmp_path / "d"), "init": str(tmp_path / "base"),
                            "domain": "mel"})
    assert (cfg.width, cfg.levels, cfg.text_readout) == (64, 4, False) and cfg.init == str(tmp_path / "base")


def test_train_init_cli_reuses_the_architecture(dataset, tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    common = ["--data", str(dataset), "--clap", "random:tiny", "--workers", "0", "--max-steps", "1",
              "--val-fraction", "0", "--device", "cpu"]
    narrow = _recipe(tmp_path / "narrow.toml", "[decoder]\ntext_readout = true\nwidth = 16\n")
    assert CliRunner().invoke(main, ["train", *common, "--out", str(base), "--config", narrow]).exit_code == 0
    result = CliRunner().invoke(main, ["train", *common, "--out", str(tuned), "--init", str(base)])
    assert result.exit_code == 0, result.output
    stored = json.loads((tuned / "config.json").read_text())
    assert stored["decoder"]["width"] == 16 and stored["decoder"]["text_readout"] is True
    clash = CliRunner().invoke(main, ["train", *common, "--out", str(tmp_path / "x"), "--init", str(base),
                                      "--config", _recipe(tmp_path / "wide.toml", "[decoder]\nwidth = 32\n")])
    assert clash.exit_code == 2 and "[decoder] width 32 differs from the --init decoder's 16" in clash.output
    both = CliRunner().invoke(main, ["train", "--resume", str(tuned), "--init", str(base)])
    assert both.exit_code == 2 and "--init starts a new run" in both.output
    assert not (tmp_path / "x").exists()


def test_reach_penalty_lifts_only_the_strongest_cells_of_a_sunk_mask():
    masks = torch.full((2, 1001, 64), 1e-3)
    masks[1, :10, :40] = 0.9                                    # 400 cells kept: more than the top 0.5 %
    floor = math.log(1e-3 / (1 - 1e-3))
    assert T.reach_penalty(masks).item() == pytest.approx(floor**2 / 2, rel=1e-4)   # the kept mask pays nothing
    masks.requires_grad_(True)
    T.reach_penalty(masks).backward()
    lifted = (masks.grad[0] < 0).sum().item()                   # descent raises them
    assert lifted == round(T.REACH_SHARE * 1001 * 64) and masks.grad[1].abs().sum() == 0


def test_reach_counts_only_the_matched_pairs(tiny_clap):
    waves = torch.randn(2, 480_000, generator=torch.Generator().manual_seed(0)) * 0.1
    feats = _features(tiny_clap, waves)
    text = torch.nn.functional.normalize(torch.randn(2, feats.embedding.shape[-1]), dim=-1)
    decoder = _FixedMask()
    with torch.no_grad():
        decoder.logits.fill_(-6.0)
    module = _module(tiny_clap, "mel", decoder)
    plain = T.masked_embeddings(module, feats, text, torch.tensor([[0, 1], [1, 0]]), reach=1.0)[2]
    matched = T.masked_embeddings(module, feats, text, torch.tensor([[0, 0], [1, 0]]), reach=1.0)[2]
    assert plain.item() == 0.0 and matched.item() == pytest.approx(36.0, rel=1e-3)


def test_logit_penalty_is_zero_inside_the_bound_and_pulls_sunk_logits_back():
    logits = torch.tensor([-30.0, -7.0, 0.0, 7.0, 12.0], requires_grad=True)
    masks = torch.sigmoid(logits)
    assert T.logit_penalty(masks[1:4], 8.0).item() == 0.0
    penalty = T.logit_penalty(masks, 8.0)
    assert penalty.item() == pytest.approx((22.0**2 + 4.0**2) / 5, rel=1e-3)
    penalty.backward()
    assert logits.grad[0] < 0 and logits.grad[4] > 0          # a descent step raises -30, lowers 12
    assert logits.grad[1:4].abs().max() == 0


def test_logit_bound_changes_training_and_is_recorded(dataset, tmp_path, tiny_clap, plain_run):
    plain, bounded = plain_run, tmp_path / "bounded"
    T.train(_cfg(dataset, bounded, max_steps=2, logit_bound=0.5), clap=tiny_clap)
    assert json.loads((bounded / "config.json").read_text())["train"]["logit_bound"] == 0.5
    assert _max_diff(_weights(plain), _weights(bounded)) > 0


@pytest.mark.parametrize("option, term", [("lambda_out", "removal"), ("lambda_overlap", "overlap")])
def test_an_extra_term_changes_training_is_recorded_and_logged(dataset, tmp_path, tiny_clap, plain_run, option, term):
    plain, run = plain_run, tmp_path / option
    T.train(_cfg(dataset, run, max_steps=2, **{option: 1.0}), clap=tiny_clap)
    stored = json.loads((run / "config.json").read_text())
    assert stored["train"][option] == 1.0 and stored["loss"][option] == 1.0
    assert _max_diff(_weights(plain), _weights(run)) > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r[term] >= 0 for r in rows) and any(r[term] > 0 for r in rows)
    assert term not in json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])


def test_removal_loss_is_zero_when_the_mask_keeps_everything_and_the_clip_above_silence_when_it_keeps_nothing(
        tiny_clap):
    rng = np.random.default_rng(1)
    waves = torch.from_numpy(0.3 * rng.standard_normal((3, 48_000 * 2)).astype(np.float32))
    module = _module(tiny_clap)
    feats = _features(tiny_clap, waves)
    text = torch.nn.functional.normalize(torch.randn(3, feats.embedding.shape[1]), dim=-1)
    pairs = torch.tensor([[1, 0], [0, 0], [2, 2], [1, 1], [2, 1]])     # matched rows not first, not in order
    shape = (len(pairs), *feats.logmel.shape[1:])
    with torch.no_grad():
        assert T.removal_loss(module, feats, text, pairs, torch.ones(shape)).item() < 1e-6
        silence, _ = tiny_clap.encode(module.masked_log_mel(feats, torch.tensor([0]), torch.zeros(1, *shape[1:])))
        expected = torch.relu((text * feats.embedding).sum(-1) - text @ silence[0]).mean()
        got = T.removal_loss(module, feats, text, pairs, torch.zeros(shape))
    assert expected.item() > 1e-4 and got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_lambda_reach_adds_the_reach_penalty_of_the_matched_masks_to_the_loss(dataset, tmp_path, tiny_clap):
    waves = torch.randn(2, 480_000, generator=torch.Generator().manual_seed(0)) * 0.1
    width = tiny_clap.encode(spectral.log_mel(waves[:1]))[0].shape[-1]
    prompts = torch.nn.functional.normalize(torch.randn(2, width, generator=torch.Generator().manual_seed(1)), dim=-1)
    texts = {"a": prompts[0], "b": prompts[1]}

    def loss(weight):
        decoder = _FixedMask()
        with torch.no_grad():
            decoder.logits.fill_(-6.0)                              # every cell sunk: top-cell logit -6
        cfg = _cfg(dataset, tmp_path / "run", lambda_reach=weight)
        terms, _ = T.micro_batch_loss(_module(tiny_clap, "mel", decoder), lambda caps: torch.stack([texts[c] for c in caps]),
                                      waves, ["a", "b"], cfg, torch.Generator().manual_seed(0))
        return float(terms.total.detach())

    assert loss(0.5) - loss(0.0) == pytest.approx(0.5 * 36.0, rel=1e-3)


def test_lambda_reach_is_recorded_and_leaves_masks_that_reach_the_threshold_alone(dataset, tmp_path, tiny_clap,
                                                                                 plain_run):
    plain, reached = plain_run, tmp_path / "reached"
    T.train(_cfg(dataset, reached, max_steps=2, lambda_reach=1.0), clap=tiny_clap)
    assert json.loads((reached / "config.json").read_text())["train"]["lambda_reach"] == 1.0
    # a fresh decoder's masks sit around 0.5, their strongest cells above it: the penalty is 0
    assert _max_diff(_weights(plain), _weights(reached)) == 0


def test_lambda_absent_adds_the_absent_term_of_the_mismatched_masks_and_is_recorded(dataset, tmp_path, tiny_clap):
    from lmaczs_cli.loss import absent_term

    waves = torch.randn(2, 480_000, generator=torch.Generator().manual_seed(0)) * 0.1
    feats = _features(tiny_clap, waves)
    prompts = torch.nn.functional.normalize(feats.embedding.float(), dim=-1)   # each clip's caption scores it highest
    texts = {"a": prompts[0], "b": prompts[1]}

    def terms(weight):
        cfg = _cfg(dataset, tmp_path / "run", lambda_absent=weight)
        out, _ = T.micro_batch_loss(_module(tiny_clap, "mel", _FixedMask()),
                                    lambda caps: torch.stack([texts[c] for c in caps]), waves, ["a", "b"], cfg,
                                    torch.Generator().manual_seed(0))
        return out

    on, off = terms(2.0), terms(0.0)
    assert off.absent is None and on.absent is not None
    masks = torch.sigmoid(_FixedMask().logits).expand(4, -1, -1)
    expected = absent_term(prompts, feats.embedding, T.all_pairs(2), masks)
    assert float(expected.detach()) > 0
    assert float(on.absent.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    assert float((on.total - off.total).detach()) == pytest.approx(2.0 * float(expected.detach()), rel=1e-3)
    run = tmp_path / "absent"
    T.train(_cfg(dataset, run, max_steps=2, lambda_absent=1.0), clap=tiny_clap)
    assert json.loads((run / "config.json").read_text())["train"]["lambda_absent"] == 1.0
    assert json.loads((run / "config.json").read_text())["loss"]["lambda_absent"] == 1.0


# --------------------------------------------------------------------------- recipes and the command line


def test_train_help_fits_one_screen_and_keeps_research_settings_in_the_recipe():
    train = main.commands["train"]
    options = [p for p in train.get_params(click_context(train)) if p.opts[0].startswith("-")]
    assert len(options) <= 30
    names = {o for p in options for o in p.opts + p.secondary_opts}
    for gone in ("--hard-grad", "--hard-floor-db", "--mask-noise", "--hard-mask", "--logit-bound", "--lambda-out",
                 "--lambda-overlap", "--lambda-absent", "--lambda-reach", "--lr-schedule", "--init-any-clap",
                 "--width", "--group-by-audio"):
        assert gone not in names, gone
    for kept in ("--config", "--data", "--out", "--clap", "--epochs", "--max-steps", "--batch-size", "--lr",
                 "--resume", "--init", "--device", "--amp", "--workers", "--domain", "--lambda-sparsity",
                 "--lambda-diversity", "--seed", "--log-every", "--tokenizer"):
        assert kept in names, kept


def click_context(command):
    import click

    return click.Context(command)


def test_every_train_option_is_a_config_field_with_the_same_default():
    """The command line's options are TrainConfig fields (R.COMMAND_LINE), shown with its defaults
    (--trust-checkpoint is a permission to load a file, not part of the recipe)."""
    import dataclasses

    from lmaczs_cli.cli import TRAIN_FIELD_OF

    train = main.commands["train"]
    defaults = {f.name: f.default for f in dataclasses.fields(T.TrainConfig)}
    fields = {}
    for p in train.params:
        if p.name in ("config", "resume", "help", "trust_checkpoint"):
            continue
        field = TRAIN_FIELD_OF.get(p.name, p.name)
        fields[field] = p.default
        if field not in ("manifest", "out"):
            assert p.default == defaults[field], (p.name, p.default, defaults[field])
    assert set(fields) == set(R.COMMAND_LINE)


def test_every_config_field_has_one_recipe_section():
    import dataclasses

    placed = [name for names in R.RECIPE_SECTIONS.values() for name in names]
    assert sorted(placed) == sorted(f.name for f in dataclasses.fields(T.TrainConfig))
    assert not {"hard_grad", "hard_floor_db"} & set(placed)


def test_a_saved_recipe_round_trips_to_the_same_config(dataset, tmp_path, plain_run, monkeypatch):
    """The recipe a run writes reproduces its config: through the library and through --config."""
    saved = plain_run / R.RECIPE_NAME
    stored = R.stored_config(plain_run)
    assert R.resolve_config(R.load_recipe(saved)) == stored
    seen = []
    monkeypatch.setattr(T, "train", lambda cfg, **kw: seen.append((cfg, kw)) or {"out": cfg.out, "steps": 0,
                                                                                   "skipped": 0})
    result = CliRunner().invoke(main, ["train", "--config", str(saved)])
    assert result.exit_code == 0, result.output
    assert seen[0][0] == stored and seen[0][1]["resume"] is False
    # every field, strings with quotes, backslashes and non-ASCII characters included
    odd = dataclasses_replace(stored, manifest=str(tmp_path / 'dé"jà\\vu.jsonl'), tokenizer="tok\tdir\x7f",
                              mismatched=1, lr=3.3e-07, amp=True, val_fraction=0.0, lr_schedule="cosine",
                              mask_noise=2.0, hard_mask=True, logit_bound=8.0, lambda_reach=0.03, lambda_out=3.0,
                              lambda_overlap=1.0, lambda_absent=3.0, group_by_audio=True, text_readout=True,
                              skip_gate=True, levels=3, first_level=2, max_steps=7)
    R.write_recipe(odd, tmp_path / "odd.toml")
    assert T.TrainConfig(**R.load_recipe(tmp_path / "odd.toml")) == odd


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_options_on_the_command_line_override_the_recipe_and_defaults_do_not(dataset, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path / "r.toml", f"""
[data]
manifest = "{dataset}"
workers = 0
[decoder]
width = 16
text_readout = true
[optimiser]
lr = 1e-3
epochs = 3
lr_schedule = "cosine"
[loss]
lambda_sparsity = 0.2
mask_noise = 1
[run]
out = "{tmp_path / 'from-recipe'}"
device = "cpu"
""")
    seen = []
    monkeypatch.setattr(T, "train", lambda cfg, **kw: seen.append(cfg) or {"out": cfg.out, "steps": 0, "skipped": 0})
    assert CliRunner().invoke(main, ["train", "--config", recipe]).exit_code == 0
    assert CliRunner().invoke(main, ["train", "--config", recipe, "--lr", "5e-5", "--out", str(tmp_path / "o"),
                                     "--epochs", "2"]).exit_code == 0
    first, second = seen
    assert (first.lr, first.epochs, first.width, first.text_readout, first.lambda_sparsity) == (1e-3, 3, 16, True, 0.2)
    assert first.mask_noise == 1.0 and first.lr_schedule == "cosine" and first.workers == 0
    assert first.out == str(tmp_path / "from-recipe") and first.lambda_diversity == 1.0   # not set: the default
    assert (second.lr, second.epochs, second.out) == (5e-5, 2, str(tmp_path / "o"))
    assert (second.width, second.lambda_sparsity) == (16, 0.2)


@pytest.mark.parametrize("text, message", [
    ("[decoder]\nhard_grad = \"input\"\n", "[decoder] hard_grad: no such setting"),
    ("[optimiser]\nwidth = 16\n", "width belongs in [decoder], not [optimiser]"),
    ("[training]\nlr = 1e-3\n", "unknown section [training]"),
    ("[optimiser]\nepochs = \"two\"\n", "[optimiser] epochs = 'two' must be an integer"),
    ("[run]\namp = 1\n", "[run] amp = 1 must be true or false"),
    ("[optimiser]\nepochs = 0\n", "epochs must be 1 or more (got 0)"),
    ("[loss]\nlambda_out = -1\n", "lambda_out must be 0 or more"),
    ("lr = 1e-3\n", "lr belongs in [optimiser]"),
    ("data = 1\n", "data must be a table"),
    ("[optimiser\n", "not a TOML file"),
])
def test_a_bad_recipe_is_refused_with_what_to_fix(dataset, tmp_path, text, message):
    recipe = _recipe(tmp_path / "bad.toml", text)
    result = CliRunner().invoke(main, ["train", "--config", recipe, "--data", str(dataset), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_resume_rules_live_in_the_library_with_the_messages_the_cli_shows(dataset, tmp_path, plain_run):
    """train(cfg, resume=True) refuses what `lmaczs train --resume` refuses, word for word."""
    import dataclasses

    stored = R.stored_config(plain_run)
    cases = [
        (dataclasses.replace(stored, group_by_audio=True), "[data] group_by_audio = true",
         "[data] group_by_audio cannot change on --resume: it would re-plan the epoch in progress"),
        (dataclasses.replace(stored, domain="stft"), None,
         "--domain cannot change on --resume: the checkpoint holds a decoder of the stored shape"),
        (dataclasses.replace(stored, width=16), "[decoder] width = 16",
         "[decoder] width cannot change on --resume"),
        (dataclasses.replace(stored, init=str(plain_run)), None, "--init starts a new run"),
    ]
    for cfg, recipe, message in cases:
        with pytest.raises(T.TrainError, match=re_escape(message)):
            T.train(cfg, resume=True)
        args = ["train", "--resume", str(plain_run)]
        if recipe:
            section, line = recipe.split(" ", 1)
            args += ["--config", _recipe(tmp_path / "r.toml", f"{section}\n{line}\n")]
        elif cfg.domain != stored.domain:
            args += ["--domain", cfg.domain]
        else:
            args += ["--init", str(plain_run)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and message in result.output, (message, result.output)
    with pytest.raises(T.TrainError, match="no config.json there"):
        T.train(dataclasses.replace(stored, out=str(tmp_path)), resume=True)
    assert R.resolve_config({"epochs": 5}, resume=plain_run) == dataclasses.replace(stored, epochs=5)


def re_escape(text):
    import re

    return re.escape(text)


def test_config_values_are_checked_for_library_callers_too():
    with pytest.raises(T.TrainError, match="batch_size must be 1 or more"):
        T.TrainConfig(manifest="m", out="o", batch_size=0)
    with pytest.raises(T.TrainError, match="unknown mask domain 'linear'"):
        T.TrainConfig(manifest="m", out="o", domain="linear")
    with pytest.raises(T.TrainError, match="needs a manifest and an out folder"):
        T.TrainConfig(manifest="m")
    with pytest.raises(T.TrainError, match="--data and --out are required"):
        R.resolve_config({"manifest": "m"})


def test_the_readme_recipe_example_is_a_valid_recipe(tmp_path):
    import re

    text = (REPO / "README.md").read_text()
    [block] = re.findall(r"```toml\n(.+?)```", text, re.S)
    fields = R.load_recipe(Path(_recipe(tmp_path / "readme.toml", block)))
    cfg = T.TrainConfig(manifest="m", out="o", **fields)
    assert cfg.hard_mask is True and cfg.lr_schedule == "cosine" and cfg.lambda_out == 3.0


def test_a_recipe_sets_the_first_clap_stage_the_decoder_reads(dataset, tmp_path):
    """[decoder] first_level = 3 with logmel_skip = false trains a decoder of CLAP's deep stages
    alone; the level is part of the architecture a fine-tune keeps, and out of range is refused."""
    recipe = _recipe(tmp_path / "deep.toml", f"""
[data]
manifest = "{dataset}"
workers = 0
[decoder]
width = 16
first_level = 3
logmel_skip = false
[optimiser]
max_steps = 1
[run]
out = "{tmp_path / 'deep'}"
device = "cpu"
""")
    cfg = R.resolve_config(R.load_recipe(recipe))
    assert (cfg.first_level, cfg.logmel_skip) == (3, False)
    assert "first_level" in R.ARCHITECTURE
    with pytest.raises(T.TrainError, match="first_level"):
        dataclasses_replace(cfg, first_level=5)
    with pytest.raises(T.TrainError, match="first_level"):
        dataclasses_replace(cfg, levels=2, first_level=3)
