"""The bundled demo model: small enough to ship, a zero-shot classifier that works, and
explanations that are right on held-out scenes of the demo world (where the truth is known).

Effective resolution for localization (metrics.TOKEN_FRAMES/BANDS): one HTSAT stage-1 token
is 8 stretched frames x 8 mel bands, so ground-truth regions are dilated by 4 frames and 4
bands each way; chance is the dilated region's share of the mask grid.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmaczs_cli import metrics, spectral
from lmaczs_cli.clap import demo_dir, load_clap
from lmaczs_cli.demo import scores, world
from lmaczs_cli.demo.scores import localization_report
from lmaczs_cli.audio import N_FRAMES, N_MELS
from lmaczs_cli.explain import Explainer

# Bounds of the tests on a slice of the frozen test split. They were set from the bundled decoder's
# figures on the *selection* split (these tests' own measures run on selection scenes at one thread;
# recipes/demo/demo-model.md, "An operating point for H", lists them), with the margins below,
# before the frozen slice was first run with this model (H at logit bias -2), and were not moved after:
# - unseen backgrounds at 0/10/20 dB: selection mass 0.608 (chance 0.088) and absent / matched 0.306;
#   bounds 0.54 (the margin of the decoders bundled before: 0.066) and the ratio target, 0.4
#   (a margin of 0.094; the ratio bound of the decoders before, 0.60, kept a margin of 0.14 because
#   they missed the target on the selection split).
# - cascading randomisation down to stage 4 (projection and stage 4 re-initialised): selection mass on
#   the event 0.077 against chance 0.144 and 0.576 intact, correlation with the intact masks 0.12;
#   bounds (unchanged since P): mass < 1.6 x chance and < half the intact mass, correlation < 0.4.
#   Down to stage 3 the selection scenes read 0.073, correlation 0.13, under the same bounds. On the
#   frozen slice stage 3 read 1.7 x chance with P when first run, over the bound, so it is asserted on
#   the selection split only and reported (README, frozen report), not hidden.
FROZEN_NOISY = {"mass": 0.54, "ratio": 0.4}
# - the same compositions, counting only those on which CLAP itself ranks the event's prompt first
#   (`scores.background_summary`'s when_heard): the issue's targets, mass >= 0.5 and absent /
#   matched <= 0.4, as the bounds (not tuned: with this model selection read 0.768 / 0.131 over the
#   0/10/20 dB grid; with P, 0.742 / 0.241 over the 0-20 dB grid).
FROZEN_HEARD = {"mass": 0.5, "ratio": 0.4}
FROZEN_CASCADE = {"chance_times": 1.6, "intact_share": 0.5, "corr": 0.4}
FROZEN_SCENES = 8


@pytest.fixture(scope="module")
def demo():
    return Explainer.load("demo", device="cpu")


def test_demo_model_is_safetensors_and_json_and_small():
    files = sorted(p for p in demo_dir().parent.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and p.suffix != ".py")
    names = {p.name for p in files}
    assert {"clap.json", "clap.safetensors", "config.json", "decoder.safetensors"} <= names
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in files)
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


@torch.no_grad()
def test_demo_clap_zero_shot_accuracy_on_held_out_single_events():
    clap = load_clap("demo")
    text = clap.encode_text([world.prompt_for(n) for n in world.EVENTS])
    correct = total = 0
    for c, name in enumerate(world.EVENTS):
        waves = np.stack([world.single_event_scene(name, 8_000_000 + k).wave for k in range(4)])
        pred = (clap.embed_audio(torch.from_numpy(waves)) @ text.T).argmax(1)
        correct += int((pred == c).sum())
        total += len(pred)
    assert correct / total >= 0.9, correct / total


def test_masks_lie_on_present_events_and_absent_prompts_get_small_masks(demo):
    """The bundled model's promise, on 48 selection scenes: more than half of a present prompt's mask
    inside its event's region (dilated to the mask's effective resolution, `scores`), absent-prompt
    masks a fifth of matched ones or less, similarity kept within 0.1, and at most one present prompt
    in ten left with an empty mask. The bundled decoder, H at logit bias -2 (its operating point,
    `recipes/demo/operating_point.py`), reads 0.598 (chance 0.109) / 0.163 / 0.046 / 0.07 at one
    thread; the bounds leave about 0.035 each way, and the empty share is held to the operating
    point's own limit. (H at bias 0 read 0.579 / 0.248 / 0.043 / none; P, the same architecture on
    the CLAP before, 0.590 / 0.202 / 0.057; n5, bundled before the deep-stage decoders, read stage 1
    and the log-mel: 0.622 / 0.261, and failed the randomisation checks below: demo-model.md.)"""
    r = localization_report(demo, n_scenes=48)
    report = (f"mass in region {r['mass']:.3f} (chance {r['chance']:.3f}); mask mean matched {r['matched']:.3f} "
              f"absent {r['absent']:.3f} (ratio {r['ratio']:.3f}); |sim - masked sim| mean {r['gap']:.3f} "
              f"max {r['gap_max']:.3f}; empty masks for present prompts {r['empty']:.2f}")
    print(report)
    assert r["mass"] >= 0.563, report
    assert r["ratio"] <= 0.20, report
    assert r["gap"] <= 0.1, report
    assert r["empty"] <= 0.10, report


def test_localization_report_counts_present_prompts_given_up_on():
    """A stand-in explainer that keeps the whole grid for every prompt but one event's: the share of
    present prompts with an empty mask is that event's share of the present events."""
    from lmaczs_cli.demo import scores
    from lmaczs_cli.explain import Explanation

    scenes = scores.held_out_scenes(6)
    present = [e.name for s in scenes for e in s.events]
    dead = max(set(present), key=present.count)

    class GivesUpOn:
        def explain_prompts(self, wave, prompts):
            keep = [np.random.default_rng(k).random((N_FRAMES, N_MELS), np.float32) for k in range(len(prompts))]
            return [Explanation(p, 0 * m if p == world.prompt_for(dead) else m, np.zeros(1, np.float32), 0.5, 0.5,
                                "mel") for p, m in zip(prompts, keep)]

    r = scores.localization_report(GivesUpOn(), n_scenes=6)
    assert r["empty"] == pytest.approx(present.count(dead) / len(present))
    assert 0 < r["empty"] < 1
    rows = scores.prompt_rows(GivesUpOn(), n_scenes=6)
    assert scores.localization_report(None, rows=rows) == r
    # per event kind: the given-up event is empty with no mass in its region, every other kind keeps
    # a random mask, whose mass in the region is about the region's share of the grid
    per = scores.by_event(rows)
    assert sum(v["n"] for v in per.values()) == len(present)
    assert per[dead]["empty"] == 1.0 and per[dead]["mass"] == 0.0 and per[dead]["mask_mean"] == 0.0
    for name, v in per.items():
        if name != dead:
            assert v["empty"] == 0.0 and v["mass"] == pytest.approx(v["chance"], abs=0.05)


def test_background_summary_splits_off_the_compositions_clap_hears():
    """A stand-in CLAP that ranks the first event kind's prompt first on every clip "hears" only
    the compositions of that kind; the summary's `when_heard` averages those rows alone."""
    from lmaczs_cli.demo import scores
    from lmaczs_cli.explain import Explanation

    class FirstKindOnly:
        def classify(self, wave, prompts):
            return np.arange(len(prompts), 0, -1, dtype=np.float64)          # prompt 0 always first

        def explain_prompts(self, wave, prompts, check=False):
            rng = np.random.default_rng(int(1e6 * float(np.abs(wave).mean())))
            return [Explanation(p, rng.random((N_FRAMES, N_MELS), np.float32) ** (k + 1), np.zeros(1, np.float32),
                                0.5, None, "mel") for k, p in enumerate(prompts)]

    rows = scores.background_rows(FirstKindOnly(), ("white",), (10.0,))
    assert rows and [r["heard"] for r in rows] == [r["event"] == world.EVENTS[0] for r in rows]
    heard = [r for r in rows if r["heard"]]
    s = scores.background_summary(rows)["all"]
    assert s["heard"] == pytest.approx(len(heard) / len(rows))
    assert s["when_heard"]["n"] == len(heard)
    assert s["when_heard"]["mass"] == pytest.approx(np.mean([r["mass"] for r in heard]))
    assert s["when_heard"]["ratio"] == pytest.approx(np.mean([r["absent"] for r in heard])
                                                     / np.mean([r["matched"] for r in heard]))
    assert scores.background_summary([{**r, "heard": False} for r in rows])["all"]["when_heard"] is None


def test_prompt_rows_split_the_mask_between_its_event_the_other_events_and_the_background():
    """A stand-in that keeps the whole grid for every prompt: its mass on the prompted event is that
    event's dilated share of the grid, and its share on the other events is exactly the share of
    their dilated regions outside the prompted one's, computed here from the scenes themselves."""
    from lmaczs_cli.demo import scores
    from lmaczs_cli.explain import Explanation

    class KeepsAll:
        def explain_prompts(self, wave, prompts):
            return [Explanation(p, np.ones((N_FRAMES, N_MELS), np.float32), np.zeros(1, np.float32), 0.5, 0.5,
                                "mel") for p in prompts]

    rows = scores.prompt_rows(KeepsAll(), n_scenes=6)
    scenes = scores.held_out_scenes(6)
    checked = 0
    for r in (r for r in rows if r["present"]):
        scene = scenes[r["scene"]]
        regions = {e.name: metrics.dilate(scene.mel_masks[e.name]) for e in scene.events}
        own = regions.pop(r["event"])
        others = np.logical_or.reduce(list(regions.values())) & ~own if regions else np.zeros_like(own)
        assert r["mass"] == pytest.approx(own.mean()) and r["other"] == pytest.approx(others.mean())
        checked += bool(regions)
    assert checked > 0                                  # some held-out scenes hold two or more events
    report = scores.localization_report(None, rows=rows)
    assert report["other"] == pytest.approx(np.mean([r["other"] for r in rows if r["present"]])) and report["other"] > 0
    assert all("other" in v for v in scores.by_event(rows).values())


@pytest.mark.parametrize("name", ["steady tone", "hiss", "low rumble", "rising chirp"])
def test_explanation_wav_holds_the_event_in_its_band_and_time(demo, name):
    scene = world.single_event_scene(name, 7_000_123)
    r = demo.explain(scene.wave, world.prompt_for(name))
    region = metrics.dilate(scene.masks[name], frames=4, bins=8)
    X = spectral.stft(torch.from_numpy(r.audio)[None])[0]
    energy = spectral.power(X).numpy()
    share = energy[region].sum() / energy.sum()
    assert share >= 0.5, share


def test_randomization_report_follows_the_encoder_stages_and_the_demo_masks_fall(demo):
    from lmaczs_cli.demo.scores import randomization_report
    from lmaczs_cli.evaluate import encoder_stages

    before = {k: v.clone() for k, v in demo.clap.clap.state_dict().items()}
    r = randomization_report(demo, n_scenes=8)
    after = demo.clap.clap.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())   # the explainer's own CLAP untouched
    assert list(r) == [name for name, _ in encoder_stages(demo.clap)]
    print({k: round(v, 3) for k, v in r.items()})
    assert r["projection"] < 0.85                  # the decoder reads stage 4 through the projection: 0.84
                                                   # (0.81 at logit bias 0: the bias thins the masks, and
                                                   # thinner masks share more empty background)
    assert r["stage 4"] < 0.85                     # at one thread (the masks all but vanish: their
    assert r["stage 3"] < 0.85                     # shared empty background keeps SSIM up)


@pytest.mark.parametrize("split, stages", [("test", ("stage 4",)), ("selection", ("stage 4", "stage 3"))])
def test_masks_fall_to_chance_once_the_projection_and_stage_4_are_re_initialised(demo, split, stages):
    """The model-randomisation check, on a slice of the frozen test split and on the selection
    split (bounds: FROZEN_CASCADE, set on the selection split): with CLAP's audio projection and
    stage 4 re-initialised, the bundled decoder's masks for the scenes' first events keep about
    chance of their mass on the event and no longer follow the intact masks; on the selection
    scenes, with stage 3 re-initialised too, the same. (What SSIM understates for sparse masks:
    their shared empty background scores as alike.)"""
    import copy

    from lmaczs_cli.baselines import BaselineSettings
    from lmaczs_cli.evaluate import MaskMethods, encoder_stages, reinitialise_

    scenes = scores.held_out_scenes(FROZEN_SCENES, split=split)
    clap = demo.clap
    text = clap.encode_text([world.prompt_for(s.events[0].name) for s in scenes])
    waves = torch.from_numpy(np.stack([s.wave for s in scenes]))
    target = torch.arange(len(scenes))

    def masks(model):
        return MaskMethods(model, demo.decoder, demo.domain, text, BaselineSettings())("lmaczs", waves, target)

    def mass(ms):
        return float(np.mean([metrics.mass_in_region(m, metrics.dilate(sc.mel_masks[sc.events[0].name]))
                              for m, sc in zip(ms, scenes)]))

    chance = float(np.mean([metrics.dilate(sc.mel_masks[sc.events[0].name]).mean() for sc in scenes]))
    intact = masks(clap)
    broken = type(clap)(copy.deepcopy(clap.clap), clap.cfg, clap.tokenizer, "randomised")
    seen = []
    for s, (name, modules) in enumerate(encoder_stages(broken)):
        reinitialise_(modules, s)
        if name not in stages:
            continue
        randomised = masks(broken)
        corr = float(np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] if b.std() > 0 else 0.0
                              for a, b in zip(intact, randomised)]))
        print(f"down to {name}: mass on the event {mass(intact):.3f} -> {mass(randomised):.3f} "
              f"(chance {chance:.3f}); correlation {corr:.2f}")
        assert mass(randomised) < FROZEN_CASCADE["chance_times"] * chance, name
        assert mass(randomised) < FROZEN_CASCADE["intact_share"] * mass(intact), name
        assert corr < FROZEN_CASCADE["corr"], name
        seen.append(name)
        if len(seen) == len(stages):
            break
    assert tuple(seen) == stages


def _over_noise(explainer, backgrounds, snrs, split="selection"):
    """`scores.background_rows` averaged: n, mass, chance and absent / matched."""
    return scores.background_summary(scores.background_rows(explainer, tuple(backgrounds), tuple(snrs), split))["all"]


def test_on_frozen_scenes_masks_travel_to_backgrounds_the_decoder_never_heard(demo):
    """Single events of every kind over white, brown and traffic noise (`world.UNSEEN_BACKGROUNDS`,
    kinds no training recipe used) at 0, 10 and 20 dB SNR, on frozen test seeds: the mask's mass on
    the event stays well above chance and absent prompts get smaller masks than matched ones
    (FROZEN_NOISY, set on the selection split), and white noise at 3 dB SNR keeps the mass above
    twice chance. Over the compositions CLAP itself hears (ranks the event's prompt first), the
    issue's targets hold (FROZEN_HEARD)."""
    grid = _over_noise(demo, world.UNSEEN_BACKGROUNDS, (0.0, 10.0, 20.0), split="test")
    white3 = _over_noise(demo, ("white",), (3.0,), split="test")
    print(grid, white3)
    assert grid["mass"] >= FROZEN_NOISY["mass"] and grid["mass"] >= 3 * grid["chance"], grid
    assert grid["ratio"] <= FROZEN_NOISY["ratio"], grid
    assert white3["mass"] >= 2 * white3["chance"], white3
    heard = grid["when_heard"]            # where CLAP itself ranks the event first: the targets
    assert heard is not None and heard["n"] >= 10, grid
    assert heard["mass"] >= FROZEN_HEARD["mass"] and heard["ratio"] <= FROZEN_HEARD["ratio"], heard


class _StandInClap:
    """A CLAP stand-in on the log-mel grid: every prompt embeds as (1, 0); a clip as its share of
    cells above -60 dB, against a constant second axis (or as (1, 0) whatever it holds)."""

    def __init__(self, constant: bool) -> None:
        self.constant = constant

    def encode(self, logmel):
        loud = (logmel > -60).float().mean((1, 2))
        v = torch.stack([torch.ones_like(loud) if self.constant else loud, 0.1 * torch.ones_like(loud)], -1)
        return torch.nn.functional.normalize(v, dim=-1), []

    def encode_text(self, prompts):
        return torch.tensor([[1.0, 0.0]]).expand(len(prompts), -1)


def test_oracle_report_measures_the_ground_truth_masks_gap():
    """A CLAP that ignores what it hears leaves the perfect explanation no gap; one that scores a
    clip by how much of it is loud scores each event alone below its scene, so the signed gap
    (masked - original) is negative and its size is `gap`."""
    from lmaczs_cli.demo import scores

    deaf = scores.oracle_report(_StandInClap(constant=True), n_scenes=3)
    assert deaf["gap"] == pytest.approx(0.0, abs=1e-6) and deaf["signed_gap"] == pytest.approx(0.0, abs=1e-6)
    loud = scores.oracle_report(_StandInClap(constant=False), n_scenes=3)
    assert loud["signed_gap"] < -0.01
    assert loud["gap"] == pytest.approx(-loud["signed_gap"])
    by_count = {k: v for k, v in loud.items() if k.startswith("gap_")}
    assert by_count and set(by_count) <= {"gap_1", "gap_2", "gap_3"}
    assert min(by_count.values()) - 1e-9 <= loud["gap"] <= max(by_count.values()) + 1e-9


def test_oracle_by_event_splits_the_perfect_explanations_gap_per_event_kind():
    """Per event kind: each event alone is quieter than its scene, so under the loudness stand-in
    every kind's overshoot is negative, and the kinds' overshoots, weighted by their counts, give
    back `oracle_report`'s signed gap; the deaf stand-in overshoots nowhere."""
    from lmaczs_cli.demo import scores

    rows = scores.oracle_rows(_StandInClap(constant=False), n_scenes=4)
    per = scores.oracle_by_event(rows)
    assert set(per) == {r["event"] for r in rows} and sum(v["n"] for v in per.values()) == len(rows)
    assert all(v["overshoot"] < 0 and v["overshoot"] == pytest.approx(v["alone"] - v["scene"]) for v in per.values())
    weighted = sum(v["n"] * v["overshoot"] for v in per.values()) / len(rows)
    assert weighted == pytest.approx(scores.oracle_report(None, rows=rows)["signed_gap"])
    deaf = scores.oracle_by_event(scores.oracle_rows(_StandInClap(constant=True), n_scenes=4))
    assert all(v["overshoot"] == pytest.approx(0.0, abs=1e-6) for v in deaf.values())




def test_core_modules_import_no_demo_code_and_eval_finds_the_demo_set_by_name():
    """The demo package is data and a world generator beside the core: importing every core module
    loads none of it; `lmaczs eval --data demo` reaches it through evaluate.NAMED_DATASETS."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, lmaczs_cli\n"
            "for m in pkgutil.iter_modules(lmaczs_cli.__path__):\n"
            "    if m.name not in ('demo', '__main__'): importlib.import_module('lmaczs_cli.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('lmaczs_cli.demo')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
    from lmaczs_cli.evaluate import load_dataset

    ds = load_dataset("demo", limit=3, seed=1)
    assert ds.classes == list(world.EVENTS) and ds.layout == "demo" and len(ds.clips) == 3
    scene = world.render_scene(world.scene_seed(1, "test", 2))
    clip = ds.clips[2]
    assert np.array_equal(clip.wave(), scene.wave)
    assert clip.labels == tuple(world.EVENTS.index(e.name) for e in scene.events)
    regions = clip.regions(ds.classes)
    assert {ds.classes[k] for k in regions} == set(scene.mel_masks)
    assert all(np.array_equal(regions[world.EVENTS.index(n)], m) for n, m in scene.mel_masks.items())
