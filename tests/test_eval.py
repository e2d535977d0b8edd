"""`lmaczs eval` end to end on the demo world: outputs, localization claims, the randomisation
study; data layouts, contamination and resuming."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from lmaczs_cli import evaluate as E
from lmaczs_cli.cli import main
from lmaczs_cli.demo.speech import main as speech_main

METHODS = ("lmaczs", "gradcam", "gradcam++", "smoothgrad", "ig")
N_CLIPS = 8


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One short eval of every method on 8 demo scenes, with the randomisation study on one clip."""
    out = tmp_path_factory.mktemp("eval") / "demo"
    args = ["eval", "--data", "demo", "--limit", str(N_CLIPS), "--device", "cpu", "--out", str(out),
            "--ig-steps", "4", "--smoothgrad-samples", "2", "--randomization", "--study-clips", "1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def _records(out: Path, method: str) -> list[dict]:
    return [json.loads(x) for x in (out / "clips" / f"{method.replace('+', 'p')}.jsonl").read_text().splitlines()]


def test_eval_writes_every_output(demo_run) -> None:
    out, summary = demo_run
    for name in ("metrics.json", "metrics.csv", "metrics.md", "qualitative.png", "randomization.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "qualitative.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["methods"]) == set(METHODS) and summary["n_clips"] == N_CLIPS
    assert 0 <= summary["accuracy"] <= 100
    assert summary["settings"]["baselines"]["ig_steps"] == 4
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["method"] for r in rows] == list(METHODS) and all(int(r["N"]) == N_CLIPS for r in rows)
    # the settings ride on every row, so CSVs of several runs concatenate into one table
    assert all(r["data"] == "demo" and r["baselines.ig_steps"] == "4" and r["contaminate"] == "" for r in rows)
    assert float(rows[0]["AI"]) == pytest.approx(summary["methods"]["lmaczs"]["AI"])
    md = (out / "metrics.md").read_text()
    assert md.startswith("| method | N | AI ↑ | AD ↓") and "Zero-shot accuracy" in md
    for m, row in summary["methods"].items():
        assert 0 <= row["AI"] <= 100 and 0 <= row["AD"] <= 100 and 0 <= row["Fid-In"] <= 1, m
        assert 0 <= row["SPS"] <= 1 and row["COMP"] > 0 and 0 <= row["MM"] <= 1 and row["time_per_clip_s"] > 0


def _localization(out: Path, method: str) -> tuple[float, float, float, int]:
    recs = [r for r in _records(out, method) if "loc_mass" in r]
    return (float(np.nanmean([r["loc_auc"] for r in recs])), float(np.mean([r["loc_mass"] for r in recs])),
            float(np.mean([r["loc_chance"] for r in recs])), len(recs))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_localizes_demo_events_better_than_chance(demo_run, method: str) -> None:
    auc, mass, chance, n = _localization(demo_run[0], method)
    assert n >= N_CLIPS // 2
    assert auc > 0.5 and mass > chance, (method, auc, mass, chance)


def test_lmaczs_localizes_better_than_every_baseline(demo_run) -> None:
    """Localization as `lmaczs eval` reports it (`loc_mass`): the share of the mask's mass inside the true
    event's (dilated) region. The ROC AUC of mask vs truth is printed beside it but not claimed:
    the bundled decoder's masks are near-binary, so the event cells it drops tie with the
    background and cost it AUC; GradCAM's smooth maps rank them (on these 8 scenes GradCAM's AUC
    is 0.877 against LMAC-ZS's 0.868, while LMAC-ZS's mass is 0.64 against GradCAM's 0.47)."""
    out, summary = demo_run
    ours = summary["methods"]["lmaczs"]
    print({m: (round(v["loc_auc"], 3), round(v["loc_mass"], 3)) for m, v in summary["methods"].items()})
    for m in METHODS[1:]:
        theirs = summary["methods"][m]
        assert ours["loc_mass"] > theirs["loc_mass"], (m, ours["loc_mass"], theirs["loc_mass"])
    assert ours["loc_mass"] > 3 * ours["loc_chance"], ours


def test_randomization_lowers_lmaczs_ssim(demo_run) -> None:
    study = demo_run[1]["studies"]["randomization"]
    ssim = study["ssim"]["lmaczs"]
    assert study["stages"][0] == "projection" and len(ssim) == len(study["stages"])
    print(dict(zip(study["stages"], [round(v, 3) for v in ssim])))
    assert min(ssim) < ssim[0] - 0.2 and min(ssim) < 0.8            # the masks do fall
    # They need not keep falling: with every stage random the decoder still sees the log-mel
    # skip and draws much of the same energy map (the demo decoder's masks rise again after
    # stage 1; reported in the README) — a finding of the study, not a failure of it.


def test_prompt_sensitivity_study_scores_every_label_prompt(tmp_path: Path) -> None:
    out = tmp_path / "ps"
    result = CliRunner().invoke(main, ["eval", "--data", "demo", "--limit", "4", "--device", "cpu", "--out", str(out),
                                       "--methods", "lmaczs,gradcam++", "--prompt-sensitivity", "--study-clips", "4",
                                       "--json"])
    assert result.exit_code == 0, result.output
    study = json.loads(result.stdout)["studies"]["prompt_sensitivity"]
    assert (out / "prompt_sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    for m in ("lmaczs", "gradcam++"):
        assert 0 <= study[m]["mask_mean_matched"] <= 1 and 0 <= study[m]["mask_mean_mismatched"] <= 1
        assert -1 <= study[m]["pearson_r"] <= 1
    # LMAC-ZS's masks follow the prompt: the present events' prompts get more mask than the
    # absent ones (on these 4 scenes 2.0x, r 0.20). Baselines are min-max normalised per map,
    # so their mask mean has no such scale and only LMAC-ZS is held to it.
    ours = study["lmaczs"]
    print({m: {k: round(v, 4) for k, v in s.items()} for m, s in study.items()})
    assert ours["mask_mean_matched"] > 1.5 * ours["mask_mean_mismatched"] and ours["pearson_r"] > 0.1, ours


def test_rerun_resumes_and_refuses_other_settings(demo_run) -> None:
    out, summary = demo_run
    again = CliRunner().invoke(main, ["eval", "--data", "demo", "--limit", str(N_CLIPS), "--device", "cpu",
                                      "--out", str(out), "--ig-steps", "4", "--smoothgrad-samples", "2",
                                      "--methods", "lmaczs", "--study-clips", "1", "--json"])
    assert again.exit_code == 0, again.output
    assert "0 clip explanations to compute" in again.stderr
    assert json.loads(again.stdout)["methods"]["lmaczs"] == summary["methods"]["lmaczs"]
    other = CliRunner().invoke(main, ["eval", "--data", "demo", "--limit", "3", "--out", str(out)])
    assert other.exit_code == 1 and "holds an eval run with other settings (" in other.stderr
    assert "limit" in other.stderr and "use another --out" in other.stderr


# ----------------------------------------------------------------------------- data and studies


def _write(path: Path, seconds: float = 0.5, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(seed).standard_normal(int(48_000 * seconds)).astype(np.float32) * 0.1, 48_000)


def test_esc50_layout_and_fold(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    rows = [("1-1-A-0.wav", 1, 0, "dog"), ("2-1-A-1.wav", 2, 1, "chirping_birds"), ("1-2-A-1.wav", 1, 1, "chirping_birds")]
    with open(tmp_path / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for name, fold, target, cat in rows:
            w.writerow([name, fold, target, cat, False, "x", "A"])
            _write(tmp_path / "audio" / name)
    ds = E.load_dataset(str(tmp_path), fold=1)
    assert ds.layout == "esc50" and ds.classes == ["chirping_birds", "dog"]
    assert ds.prompts == ["this is the sound of chirping birds", "this is the sound of dog"]
    assert [c.key for c in ds.clips] == ["audio/1-1-A-0.wav", "audio/1-2-A-1.wav"] and ds.clips[0].labels == (1,)
    assert ds.clips[0].wave().shape == (480_000,)


def test_urbansound8k_layout(tmp_path: Path) -> None:
    (tmp_path / "metadata").mkdir()
    with open(tmp_path / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"])
        w.writerow(["100-1.wav", 100, 0, 1, 1, 3, 3, "dog_bark"])
        w.writerow(["101-1.wav", 101, 0, 1, 1, 5, 8, "siren"])
    _write(tmp_path / "audio" / "fold3" / "100-1.wav")
    _write(tmp_path / "audio" / "fold5" / "101-1.wav")
    ds = E.load_dataset(str(tmp_path), fold=5)
    assert ds.layout == "urbansound8k" and [c.key for c in ds.clips] == ["audio/fold5/101-1.wav"]
    assert ds.clips[0].labels == (ds.classes.index("siren"),)


def test_labelled_folder_and_bad_data(tmp_path: Path) -> None:
    _write(tmp_path / "dog" / "a.wav")
    _write(tmp_path / "rain" / "b.flac")
    ds = E.load_dataset(str(tmp_path))
    assert ds.classes == ["dog", "rain"] and [c.labels for c in ds.clips] == [(0,), (1,)]
    with pytest.raises(E.EvalError, match="--fold applies to ESC-50"):
        E.load_dataset(str(tmp_path), fold=1)
    with pytest.raises(E.EvalError, match="use demo, a labelled folder"):
        E.load_dataset(str(tmp_path / "nope"))


def test_contamination_is_mixed_at_the_asked_snr(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    wave = rng.standard_normal(480_000).astype(np.float32) * 0.3
    noise = rng.standard_normal(480_000).astype(np.float32)
    mixed = E.mix_at_snr(wave, noise, 3.0)
    added = mixed - wave
    assert 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean(added.astype(np.float64) ** 2)) == pytest.approx(3.0, abs=1e-3)
    _write(tmp_path / "speech" / "s.wav", seconds=1.0)
    ds = E.load_dataset("demo", limit=2)
    speech = E.Contaminator("speech", 3.0, ds.clips, str(tmp_path / "speech"), 0)
    assert speech.noise(0).shape == (480_000,)
    mix = E.Contaminator("mix", 3.0, ds.clips, None, 0)
    assert np.array_equal(mix.noise(0), ds.clips[1].wave())
    with pytest.raises(E.EvalError, match="needs --speech DIR"):
        E.EvalConfig(data="demo", out=str(tmp_path), contaminate="speech")


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory) -> Path:
    """Speech for the speech study: espeak-ng's when installed, else formant-synthesised."""
    folder = tmp_path_factory.mktemp("speech")
    speech_main([str(folder), "-n", "2"])                  # python -m lmaczs_cli.demo.speech DIR -n 2
    assert len(list(folder.iterdir())) == 2
    return folder


@pytest.mark.parametrize("kind", ["white-noise", "mix", "speech"])
def test_contaminated_eval_runs_end_to_end(demo_run, speech_dir: Path, tmp_path: Path, kind: str) -> None:
    """`lmaczs eval --contaminate KIND --snr 3`: the run records its contamination, and CLAP
    sees other audio than in the clean run (every clip's predicted probability moves)."""
    out = tmp_path / kind
    args = ["eval", "--data", "demo", "--limit", "2", "--device", "cpu", "--methods", "lmaczs,gradcam",
            "--contaminate", kind, "--snr", "3", "--out", str(out), "--json"]
    result = CliRunner().invoke(main, args + (["--speech", str(speech_dir)] if kind == "speech" else []))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["settings"]["contaminate"] == kind and summary["settings"]["snr"] == 3.0
    assert f"contaminated by {kind} at 3.0 dB SNR" in (out / "metrics.md").read_text()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["method"] for r in rows] == ["lmaczs", "gradcam"] and all(r["contaminate"] == kind for r in rows)
    clean = {r["key"]: r for r in _records(demo_run[0], "lmaczs")}
    dirty = _records(out, "lmaczs")
    assert len(dirty) == 2 and all(r["key"] in clean for r in dirty)
    for r in dirty:
        assert abs(r["p_pred"] - clean[r["key"]]["p_pred"]) > 1e-3 or r["pred"] != clean[r["key"]]["pred"], r


def test_stage_reinitialisation_changes_only_the_named_stages(tiny_clap) -> None:
    import copy

    import torch

    clap = copy.deepcopy(tiny_clap.clap)
    model = type(tiny_clap)(clap, tiny_clap.cfg, tiny_clap.tokenizer, "copy")
    stages = E.encoder_stages(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    E.reinitialise_(stages[1][1], seed=0)                              # stage 4 + final norm
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("clap.audio_branch.layers.3.", "clap.audio_branch.norm.")) for k in changed)
