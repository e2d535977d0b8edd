"""The recipes that built the demo model (recipes/demo, not installed): the build's CLAP losses
and options, and the rebuild chain (rounds in order, each from the one before, resumable)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmaczs_cli import spectral
from lmaczs_cli.audio import N_FRAMES, N_MELS
from lmaczs_cli.clap import load_clap
from lmaczs_cli.demo import world

ROOT = Path(__file__).resolve().parents[1]


def _import_recipe(name: str):
    """recipes/ is not installed: import recipes.<name> from the checkout, without putting the
    checkout's root on sys.path (its top-level folders would shadow installed packages)."""
    for package in ("recipes", "recipes.demo"):
        if package not in sys.modules:
            folder = ROOT.joinpath(*package.split("."))
            spec = importlib.util.spec_from_file_location(package, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[package] = module
            spec.loader.exec_module(module)
    return importlib.import_module(f"recipes.{name}")


build = _import_recipe("demo.build")
chain = _import_recipe("demo.chain")
clap_losses = _import_recipe("demo.clap_losses")
ROUNDS, ChainError, Round, run_chain = chain.ROUNDS, chain.ChainError, chain.Round, chain.run_chain

TINY_CLAP = ("--clap-steps", "1", "--clap-batch", "2", "--scenes", "4", "--singles", "2", "--report-scenes", "2")
TINY_DEC = ("--decoder-scenes", "2", "--report-scenes", "2")
TINY_TRAIN = {"epochs": 1, "batch_size": 2, "levels": 2, "skip_gate": True}


# --------------------------------------------------------------------------- the build: CLAP losses and options


def test_drop_events_masks_the_cells_of_dropped_events_and_clears_their_presence():
    from recipes.demo.clap_losses import drop_events

    E = len(world.EVENTS)
    logmel = torch.full((64, N_FRAMES, N_MELS), -20.0)
    presence = torch.zeros(64, E)
    presence[:, 0] = presence[:, 3] = 1.0
    bits = torch.zeros(64, N_FRAMES, N_MELS, dtype=torch.int16)
    bits[:, :100] = 1 << 0                    # event 0 owns the first 100 frames
    bits[:, 500:600] = 1 << 3                 # event 3 owns frames 500..599
    out, kept = drop_events(logmel, presence, bits, torch.Generator().manual_seed(0))
    floor = float(spectral.to_db(torch.zeros(())))
    assert set(kept.unique().tolist()) <= {0.0, 1.0} and (kept[:, [1, 2, 4]] == 0).all()
    for row in range(64):
        for e, frames in ((0, slice(0, 100)), (3, slice(500, 600))):
            assert (out[row, frames] == (-20.0 if kept[row, e] else floor)).all()
        assert (out[row, 100:500] == -20.0).all() and (out[row, 600:] == -20.0).all()
    dropped = 1 - kept[:, [0, 3]].mean().item()
    assert 0.3 < dropped < 0.7, dropped        # p_drop = 0.5 over 128 draws


def test_drop_events_can_floor_the_background_too():
    from recipes.demo.clap_losses import drop_events

    E = len(world.EVENTS)
    logmel = torch.full((8, N_FRAMES, N_MELS), -20.0)
    presence = torch.zeros(8, E)
    presence[:, 2] = 1.0
    bits = torch.zeros(8, N_FRAMES, N_MELS, dtype=torch.int16)
    bits[:, 200:300, 10:20] = 1 << 2
    out, kept = drop_events(logmel, presence, bits, torch.Generator().manual_seed(1), p_drop=0.0, p_background=1.0)
    floor = float(spectral.to_db(torch.zeros(())))
    assert torch.equal(kept, presence)                         # nothing dropped: the event is still there
    assert (out[:, 200:300, 10:20] == -20.0).all()             # its cells untouched
    outside = torch.ones(N_FRAMES, N_MELS, dtype=torch.bool)
    outside[200:300, 10:20] = False
    assert (out[:, outside] == floor).all()                    # everything else at the floor


def test_soft_removal_attenuates_removed_cells_by_one_drawn_amount_per_clip():
    from recipes.demo.clap_losses import attenuate

    logmel = torch.linspace(-60.0, 0.0, 4 * 20 * 8).reshape(4, 20, 8)
    removed = torch.zeros(4, 20, 8, dtype=torch.bool)
    removed[:, 5:10, 2:6] = True
    logmel[removed] = 0.0                                       # 0 dB: no draw reaches the floor
    hard = attenuate(logmel, removed, torch.Generator().manual_seed(0))
    assert (hard[removed] == spectral.SILENCE_DB).all() and torch.equal(hard[~removed], logmel[~removed])
    soft = attenuate(logmel, removed, torch.Generator().manual_seed(0), soft_db=20.0)
    assert torch.equal(soft[~removed], logmel[~removed])
    drop = (logmel - soft)[:, 5:10, 2:6]
    for b in range(4):
        assert 20.0 <= drop[b].min() and drop[b].max() <= 100.0
        assert torch.allclose(drop[b], drop[b, 0, 0])            # one attenuation per clip
    low = attenuate(torch.full((2, 3, 3), -90.0), torch.ones(2, 3, 3, dtype=torch.bool),
                    torch.Generator().manual_seed(0), soft_db=20.0)
    assert (low == spectral.SILENCE_DB).all()                   # -90 dB less >= 20 dB stops at the floor
    assert len({round(float(drop[b, 0, 0]), 3) for b in range(4)}) > 1


def test_speckle_drops_square_blocks_of_a_drawn_share_per_clip():
    from recipes.demo.clap_losses import SPECKLE_BLOCKS, speckle

    logmel = torch.zeros(64, 1001, 64)              # 1001 frames: the last blocks are cut short
    out = speckle(logmel, torch.Generator().manual_seed(0), max_share=0.6)
    dropped = out == spectral.SILENCE_DB
    assert torch.equal(out[~dropped], logmel[~dropped])
    shares = dropped.float().mean((1, 2))
    assert shares.max() <= 0.7 and shares.min() < 0.1 and shares.max() > 0.4   # U(0, 0.6) per clip
    sizes = set()
    for clip in dropped:                    # each clip's dropped cells tile into blocks of one size
        for size in SPECKLE_BLOCKS[::-1]:
            coarse = clip[::size, ::size]
            tiled = coarse.repeat_interleave(size, 0).repeat_interleave(size, 1)[: clip.shape[0], : clip.shape[1]]
            if clip.any() and torch.equal(tiled, clip):
                sizes.add(size)
                break
    assert sizes == set(SPECKLE_BLOCKS)
    again = speckle(logmel, torch.Generator().manual_seed(0), max_share=0.6)
    assert torch.equal(out, again)
    assert torch.equal(speckle(logmel, torch.Generator().manual_seed(0), max_share=0.0), logmel)


@pytest.mark.parametrize("share", ["-0.1", "1.5"])
def test_build_refuses_a_speckle_share_outside_zero_to_one(tmp_path, share, capsys):
    with pytest.raises(SystemExit):
        build.main(["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--speckle", share])
    assert "--speckle is a share of cells" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_presence_loss_is_zero_on_target_and_weighs_present_and_absent_halves():
    from recipes.demo.clap_losses import ABSENT_COS, PRESENT_COS, presence_loss

    prompts = torch.eye(3)[:2]                                 # two orthonormal prompt embeddings
    rest = (1 - PRESENT_COS**2 - ABSENT_COS**2) ** 0.5
    audio = torch.tensor([[PRESENT_COS, ABSENT_COS, rest]])    # cosines (0.6, 0.1) to the two prompts
    assert presence_loss(audio, prompts, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)
    swapped = presence_loss(audio, prompts, torch.tensor([[0.0, 1.0]])).item()
    assert swapped == pytest.approx((PRESENT_COS - ABSENT_COS) ** 2, rel=1e-5)
    # one present entry among many absent ones still weighs half of the loss
    many = torch.eye(11)[:10]
    clip = torch.zeros(1, 11)
    clip[0, 10] = 1.0                                          # cosine 0 to every prompt
    target = torch.zeros(1, 10)
    target[0, 0] = 1.0
    expected = 0.5 * PRESENT_COS**2 + 0.5 * ABSENT_COS**2
    assert presence_loss(clip, many, target).item() == pytest.approx(expected, rel=1e-5)


def test_prompt_overlap_is_the_mean_squared_cosine_between_different_prompts():
    from recipes.demo.clap_losses import prompt_overlap

    assert prompt_overlap(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-12)      # orthonormal prompts
    same = torch.nn.functional.normalize(torch.ones(3, 5), dim=-1)
    assert prompt_overlap(same).item() == pytest.approx(1.0, rel=1e-6)               # one prompt three times
    c = 0.6                                                    # two prompts at cosine 0.6, one orthogonal
    prompts = torch.tensor([[1.0, 0.0, 0.0], [c, (1 - c * c) ** 0.5, 0.0], [0.0, 0.0, 1.0]])
    # six ordered off-diagonal pairs, two of them at cosine 0.6
    assert prompt_overlap(prompts).item() == pytest.approx(2 * c * c / 6, rel=1e-6)


def test_geometry_loss_compares_audio_and_text_cosines_of_single_event_clips_of_different_kinds():
    from recipes.demo.clap_losses import geometry_loss

    prompts = torch.eye(3)                                    # text-text cosine 0 between kinds
    c = 0.6
    audio = torch.tensor([[1.0, 0.0, 0.0], [c, (1 - c * c) ** 0.5, 0.0],   # kinds 0 and 1 at cosine 0.6
                          [0.0, 0.0, 1.0],                                  # kind 0 again: no pair with clip 0
                          [0.0, 1.0, 0.0]])                                 # two events: skipped
    presence = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 1.0, 1.0]])
    # ordered pairs of different kinds among the three single-event clips: (0,1) and (1,0) at
    # audio cosine 0.6, (2,1) and (1,2) at 0; every text cosine is 0
    expected = (2 * c * c + 0 + 0) / 4
    assert geometry_loss(audio, prompts, presence).item() == pytest.approx(expected, rel=1e-5)
    assert geometry_loss(audio[:1], prompts, presence[:1]).item() == 0.0


def test_clip_objective_by_hand():
    from recipes.demo.build import clip_objective

    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])               # orthogonal prompts
    audio = torch.tensor([0.6, 0.8])                             # cosines 0.6 and 0.8 to them
    masked = torch.tensor([[1.0, 0.0], [0.6, 0.8]])              # prompt 1's mask raises it to 1; prompt 2's keeps 0.8
    masks = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])
    got = clip_objective(text, audio, masked, masks, torch.tensor([True, True]), lambda_sparsity=0.1,
                         lambda_diversity=0.5)
    # similarity (|0.6 - 1| + |0.8 - 0.8|) / 2; sparsity 0.5; diversity |0 - 0.6| for both ordered pairs
    assert got["similarity"] == pytest.approx(0.2)
    assert got["sparsity"] == pytest.approx(0.5)
    assert got["diversity"] == pytest.approx(0.6)
    assert got["total"] == pytest.approx(0.2 + 0.05 + 0.3)
    # only matched prompts play the clip's own text in Eq. 7: a third, unmatched prompt adds the
    # pairs (0, 2) and (1, 2) but not (2, 0), (2, 1)
    text3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    masked3 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    got3 = clip_objective(text3, audio, masked3, torch.zeros(3, 1, 2), torch.tensor([True, True, False]), 0.1, 0.5)
    # pairs: (0,1) |0 - 0.6|, (0,2) |0.6 - 1|, (1,0) |0 - 0.6|, (1,2) |0.8 - 0.6|
    assert got3["diversity"] == pytest.approx((0.6 + 0.4 + 0.6 + 0.2) / 4)


def test_plan_objective_scores_the_plans_under_the_demo_clap():
    from recipes.demo.build import PLANS, plan_objective

    plans = plan_objective(load_clap("demo"), n_scenes=2)
    assert set(plans) == set(PLANS)
    for terms in plans.values():
        assert all(np.isfinite(v) for v in terms.values())
        assert terms["total"] == pytest.approx(terms["similarity"] + 0.1 * terms["sparsity"] + 0.5 * terms["diversity"])
    # the plans' masks nest: isolated events within isolated + absent-all within every event for all
    assert plans["isolate"]["sparsity"] < plans["isolate, absent all"]["sparsity"] < plans["all events"]["sparsity"]
    # the soft plan keeps 10^(-30/20) of every cell the hard one drops
    iso, r = plans["isolate"]["sparsity"], 10 ** -1.5
    assert plans["isolate, -30 dB"]["sparsity"] == pytest.approx(iso + r * (1 - iso), rel=1e-5)


def test_isolation_loss_by_hand():
    from recipes.demo.clap_losses import isolation_loss

    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    clip = torch.tensor([[0.6, 0.8]])
    nothing = torch.tensor([0.0, 1.0])
    # one clip holding events 0 and 1 (not 2); its views masked down to event 0 and to event 1
    views = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    got = isolation_loss(clip, views, torch.tensor([0, 0]), torch.tensor([0, 1]), nothing, prompts,
                         torch.tensor([[1.0, 1.0, 0.0]]))
    sim_present = (abs(1.0 - 0.6) + abs(0.8 - 0.8)) / 2           # t_e . view vs t_e . clip
    sim_absent = abs(0.8 - 1.0)                                   # t_2 . nothing vs t_2 . clip
    div_absent = (abs(0.6 - 0.0) + abs(0.8 - 0.8)) / 2            # t_e . t_2 vs view_e . nothing
    div_present = abs(0.0 - 0.6)                                  # t_0 . t_1 vs view_0 . view_1 (both orders)
    assert float(got) == pytest.approx(sim_present + sim_absent + 0.5 * (div_absent + div_present))
    # a clip with one event has no present pair: the diversity is the absent part alone
    got1 = isolation_loss(clip, views[:1], torch.tensor([0]), torch.tensor([0]), nothing, prompts[:2],
                          torch.tensor([[1.0, 0.0]]))
    assert float(got1) == pytest.approx(abs(1.0 - 0.6) + abs(1.0 - 0.8) + abs(0.0 - 0.0))


def test_contrast_loss_by_hand():
    from recipes.demo.clap_losses import contrast_loss

    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    clean = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    masked = torch.tensor([[0.7, 0.6], [0.6, 0.8]])
    nothing = torch.tensor([0.1, 0.5])                     # the empty clip scores prompt 0 at 0.1, prompt 1 at 0.5
    presence = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    after = torch.tensor([[0.0, 1.0], [0.0, 1.0]])        # event 0 masked away from clip 0 only
    got = contrast_loss(clean, masked, nothing, prompts, presence, after, margin=0.2)
    gone = [0.2 - (0.8 - 0.7)]                              # clip 0, event 0: fell 0.1 of 0.2
    empty = [max(0.2 - (0.8 - 0.1), 0.0),                   # clip 0, event 0: 0.7 above the empty clip
             0.2 - (0.6 - 0.5),                             # clip 0, event 1: only 0.1 above it
             max(0.2 - (0.8 - 0.5), 0.0)]                   # clip 1, event 1: 0.3 above it
    assert float(got) == pytest.approx((sum(gone) + sum(empty)) / 4)     # one mean over the four pairs: 0.05
    # kept events and absent ones never count; a fall beyond the margin costs nothing
    far = clean - torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    assert float(contrast_loss(clean, far, nothing, prompts, presence, after, margin=0.2)) == pytest.approx(0.1 / 4)
    # the same clips, pushed further apart from their masked copies, cost less
    assert float(contrast_loss(clean, masked - 0.05, nothing, prompts, presence, after, margin=0.2)) < float(got)


def test_silence_gap_loss_by_hand():
    from recipes.demo.clap_losses import silence_gap_loss

    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    clips = torch.tensor([[0.8, 0.6], [0.3, 0.9]], requires_grad=True)
    nothing = torch.tensor([0.1, 0.5], requires_grad=True)  # silence scores prompt 0 at 0.1, prompt 1 at 0.5
    presence = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    got = silence_gap_loss(clips, nothing, prompts, presence)
    # only clip 0's entries are absent: prompt 0 scores it 0.7 over silence, prompt 1 0.1 over
    assert got.item() == pytest.approx((0.7 ** 2 + 0.1 ** 2) / 2)
    # an absent prompt scoring a clip below silence costs nothing; present entries never count
    assert silence_gap_loss(clips * 0.0, nothing, prompts, presence).item() == 0.0
    assert silence_gap_loss(clips, nothing, prompts, torch.ones(2, 2)).item() == 0.0
    # silence is held fixed: the gradient moves the clip's scores down, never silence's up
    got.backward()
    assert nothing.grad is None
    assert clips.grad[0].tolist() == pytest.approx([0.7, 0.1]) and clips.grad[1].tolist() == [0.0, 0.0]


def test_pair_loss_by_hand():
    from recipes.demo.clap_losses import pair_loss

    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with_event = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.6, 0.8]])
    without = torch.tensor([[0.7, 0.7], [0.6, 0.3], [0.1, 0.8]])
    event = torch.tensor([0, 1, 0])                   # the event each pair's second copy lost
    got = pair_loss(with_event, without, prompts, event, margin=0.2)
    # pair 0: prompt 0 fell 0.1 of 0.2; pair 1: prompt 1 fell 0.5; pair 2: prompt 0 fell 0.5
    assert float(got) == pytest.approx((0.2 - 0.1) / 3)
    # only the removed event's prompt counts: asked about prompt 1, which rose 0.1, the pair falls short by 0.3
    assert float(pair_loss(with_event[:1], without[:1], prompts, torch.tensor([1]), margin=0.2)) == \
        pytest.approx(0.2 + 0.1)
    # a copy that scores higher without the event costs more than the margin
    assert float(pair_loss(without[:1], with_event[:1], prompts, event[:1], margin=0.2)) == pytest.approx(0.3)


def test_separate_prompts_moves_only_the_text_tower_and_pulls_the_prompts_apart():
    from recipes.demo.build import DEMO_CLAP, separate_prompts
    from lmaczs_cli.clap import ClapModel, ClipBpeTokenizer, build_laion_clap

    torch.manual_seed(0)
    model = ClapModel(build_laion_clap(DEMO_CLAP), DEMO_CLAP, ClipBpeTokenizer(DEMO_CLAP.context_length), source="demo")
    prompts = [world.prompt_for(n) for n in world.EVENTS]
    before_text = model.encode_text(prompts)
    before = {n: p.clone() for n, p in model.clap.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.clap.named_parameters()}
    worst_before = float((before_text @ before_text.T - 2 * torch.eye(len(prompts))).max())
    worst = separate_prompts(model, steps=60)
    assert worst < worst_before and worst < 0.5, (worst_before, worst)
    after = model.encode_text(prompts)
    assert float((after @ after.T - 2 * torch.eye(len(prompts))).max()) == pytest.approx(worst, abs=1e-5)
    text_side = ("text_branch.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection.",
                 "text_transform.")
    moved = {n for n, p in model.clap.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(text_side) for n in moved), moved - {n for n in moved if n.startswith(text_side)}
    assert any(n.startswith("text_branch.") for n in moved)     # the text transformer itself, not only embeddings
    assert {n: p.requires_grad for n, p in model.clap.named_parameters()} == flags


@pytest.mark.parametrize("argv, message", [(["--clap-only", "--decoder-recipe", "RECIPE"], "would do nothing"),
                                            (["--decoder-epochs", "1"], "unrecognized arguments"),   # a recipe setting now
                                            (["--decoder-recipe", "CLAP_RECIPE"],
                                             "the build sets [model] clap itself"),
                                            (["--decoder-recipe", "BAD_RECIPE"], "[loss] hard_grad: no such setting"),
                                            (["--text-warmup", "-5"], "0 or more"),
                                            (["--skip-clap", "--pair-weight", "20", "--clap-lr", "5e-4"],
                                             "would do nothing: --clap-lr, --pair-weight"),
                                            (["--skip-clap", "--clap-only"], "train nothing"),
                                            (["--clap-noisy", "1.5"], "between 0 and 1"),
                                            (["--clap-snr", "20", "0"], "LO <= HI"),
                                            (["--skip-clap", "--clap-noisy", "0.5"], "would do nothing: --clap-noisy")])
def test_build_refuses_bad_options_before_any_work(argv, message, tmp_path, capsys):
    recipes = {"RECIPE": "[optimiser]\nepochs = 1\n", "CLAP_RECIPE": "[model]\nclap = \"demo\"\n",
               "BAD_RECIPE": "[loss]\nhard_grad = \"input\"\n"}
    for name, text in recipes.items():
        (tmp_path / f"{name}.toml").write_text(text)
    argv = [str(tmp_path / f"{a}.toml") if a in recipes else a for a in argv]
    with pytest.raises(SystemExit) as stop:
        build.main([*argv, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_label_loss_by_hand():
    from recipes.demo.clap_losses import label_loss

    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    audio = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.6, 0.8]])
    presence = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])   # clip 1 holds two events: left out
    got = label_loss(audio, prompts, presence, scale=10.0)
    # clip 0 is event 0 (logits 8, 6), clip 2 is event 1 (logits 6, 8): -log softmax = log(1 + e^-2) each
    assert float(got) == pytest.approx(math.log1p(math.exp(-2.0)))
    # a clip nearer the wrong prompt costs more; no single-event clip costs nothing
    assert float(label_loss(audio[1:2], prompts, torch.tensor([[1.0, 0.0]]), scale=10.0)) > float(got)
    assert float(label_loss(audio[1:2], prompts, presence[1:2])) == 0.0


@pytest.mark.parametrize("term", ["isolation_weight", "contrast_weight", "pair_weight", "label_weight",
                                  "silence_weight"])
def test_train_clap_step_with_a_loss_term_runs_and_moves_the_weights(term):
    from recipes.demo.build import DEMO_CLAP, train_clap

    torch.manual_seed(0)
    a = train_clap(1, 4, 1e-3, 0, n_scenes=4, n_single=2, presence_weight=0.0, caption_weight=0.0, **{term: 1.0})
    b = train_clap(1, 4, 1e-3, 0, n_scenes=4, n_single=2, presence_weight=0.0, caption_weight=0.0, **{term: 0.0})
    # same seed and start: only this term differs, so it alone moved a's weights away from b's
    assert a.cfg == b.cfg == DEMO_CLAP
    # parameters only: BatchNorm's running statistics differ anyway (the views share its batch)
    sa, sb = dict(a.clap.named_parameters()), dict(b.clap.named_parameters())
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_build_needs_out_and_never_writes_into_the_package_without_it(tmp_path):
    """`python -m recipes.demo.build` with no --out stops before any work: the bundled model and
    examples stay as they are and no scratch folder appears."""
    package = ROOT / "lmaczs_cli" / "demo"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(package.rglob("*")) if p.is_file()
              and "__pycache__" not in p.parts}
    res = subprocess.run([sys.executable, "-m", "recipes.demo.build", "--work", str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "the following arguments are required: --out" in res.stderr, res.stderr
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(package.rglob("*")) if p.is_file()
             and "__pycache__" not in p.parts}
    assert after == before and not (tmp_path / "w").exists()
    with pytest.raises(SystemExit):
        build.parse_args([])
    assert not build.parse_args(["--out", str(tmp_path / "m")]).out.is_relative_to(package)


def test_build_history_carries_the_init_folders_rounds_and_adds_this_one(tmp_path):
    assert build.clap_history(tmp_path) == []
    (tmp_path / "build.json").write_text(json.dumps({"clap_history": ["600 steps from scratch"]}))
    args = argparse.Namespace(clap_init=tmp_path, clap_steps=300, clap_batch=16, clap_lr=2e-3, seed=0,
                              presence_weight=10.0, caption_weight=0.1, text_weight=1.0, geometry_weight=0.0,
                              isolation_weight=2.0, soft_db=20.0, speckle=0.0, contrast_weight=0.0,
                              contrast_margin=0.2, pair_weight=0.0, pair_margin=0.3, label_weight=0.0,
                              text_warmup=0, silence_weight=0.0, clap_noisy=0.0, clap_snr=[0.0, 20.0])
    line = build.clap_round(args)
    assert line.startswith(f"300 steps from {tmp_path}, batch 16, lr 0.002")
    assert "isolation 2" in line and "geometry" not in line and "soft removal 20-100 dB" in line
    assert "speckle" not in line and "contrast" not in line and "pair" not in line
    assert build.clap_round(argparse.Namespace(**{**vars(args), "speckle": 0.6})).endswith(", speckle up to 0.6")
    with_contrast = build.clap_round(argparse.Namespace(**{**vars(args), "contrast_weight": 10.0}))
    assert "contrast 10" in with_contrast and with_contrast.endswith(", contrast margin 0.2")
    with_pairs = build.clap_round(argparse.Namespace(**{**vars(args), "pair_weight": 20.0}))
    assert "pairs 20" in with_pairs and with_pairs.endswith(", pair margin 0.3")
    assert "labels 5" in build.clap_round(argparse.Namespace(**{**vars(args), "label_weight": 5.0}))
    assert "silence" not in line
    assert "silence gap 50" in build.clap_round(argparse.Namespace(**{**vars(args), "silence_weight": 50.0}))
    assert "warm-up" not in line
    assert build.clap_round(argparse.Namespace(**{**vars(args), "text_warmup": 100})).endswith(
        ", 100 text warm-up steps first")
    assert "background" not in line
    assert build.clap_round(argparse.Namespace(**{**vars(args), "clap_noisy": 0.5, "clap_snr": [-5.0, 15.0]})).endswith(
        ", 0.5 of the clips over training backgrounds at -5-15 dB")
    assert build.clap_history(tmp_path) + [line] == ["600 steps from scratch", line]


def test_build_clap_only_writes_the_clap_and_its_history_and_trains_no_decoder(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "zero_shot_accuracy", lambda model, per_class, seed: {"accuracy": 0.5})
    monkeypatch.setattr(build, "presence_report", lambda model: {"scene": 0.0})
    monkeypatch.setattr(build, "plan_objective", lambda model, **kw: {})
    monkeypatch.setattr(build, "oracle_rows", lambda model, n_scenes: [
        {"event": "bell", "events": 2, "scene": 0.25, "alone": 0.25 + n_scenes}])
    out = tmp_path / "model"
    build.main(["--out", str(out), "--work", str(tmp_path / "work"), "--clap-only", "--clap-steps", "1",
                "--clap-batch", "2", "--scenes", "4", "--singles", "2", "--report-scenes", "3"])
    report = json.loads((out / "build.json").read_text())
    assert report["oracle"] == {"signed_gap": 3.0, "gap": 3.0, "gap_2": 3.0}
    assert report["oracle_by_event"] == {"bell": {"n": 1.0, "scene": 0.25, "alone": 3.25, "overshoot": 3.0}}
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "clap.json", "clap.safetensors"]
    assert report["zero_shot"] == {"accuracy": 0.5}
    assert report["clap_history"] == [report["clap_history"][0]] and "1 steps from scratch" in report["clap_history"][0]
    again = tmp_path / "model2"
    build.main(["--out", str(again), "--work", str(tmp_path / "work"), "--clap-only", "--clap-steps", "1",
                "--clap-batch", "2", "--scenes", "4", "--singles", "2", "--clap-init", str(out)])
    history = json.loads((again / "build.json").read_text())["clap_history"]
    assert history[0] == report["clap_history"][0] and history[1].startswith(f"1 steps from {out}")


def test_build_trains_a_decoder_and_scores_it_on_held_out_scenes(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "zero_shot_accuracy", lambda model, per_class, seed: {"accuracy": 0.5})
    monkeypatch.setattr(build, "presence_report", lambda model: {"scene": 0.0})
    monkeypatch.setattr(build, "plan_objective", lambda model, **kw: {})
    out = tmp_path / "model"
    recipe = tmp_path / "decoder.toml"
    recipe.write_text("[decoder]\nlevels = 2\nskip_gate = true\n[optimiser]\nepochs = 1\nbatch_size = 2\n")
    build.main(["--out", str(out), "--work", str(tmp_path / "work"), "--clap-steps", "1", "--clap-batch", "2",
                "--scenes", "4", "--singles", "2", "--decoder-scenes", "2", "--decoder-recipe", str(recipe),
                "--report-scenes", "2"])
    report = json.loads((out / "build.json").read_text())
    assert {"decoder.safetensors", "config.json", "clap.safetensors"} <= {p.name for p in out.iterdir()}
    assert report["decoder"]["levels"] == 2 and report["decoder"]["skip_gate"] is True
    assert report["decoder"]["epochs"] == 1 and report["decoder"]["lr"] == build.DECODER_DEFAULTS["lr"]
    from lmaczs_cli.recipe import load_recipe

    run = load_recipe(tmp_path / "work" / "decoder" / "recipe.toml")    # the train run's own, resolved
    assert run["clap"] == str(out) and run["levels"] == 2 and run["batch_size"] == 2
    loc = report["localization"]
    assert loc["scenes"] == 2 and 0 <= loc["chance"] < 1 and 0 <= loc["mass"] <= 1 and loc["matched"] > 0
    per = report["localization_by_event"]
    assert set(per) <= set(world.EVENTS) and all(0 <= v["mass"] <= 1 and v["n"] >= 1 for v in per.values())
    assert list(report["randomization"])[0] == "projection" and all(-1 <= v <= 1 for v in report["randomization"].values())
    assert len(json.loads((tmp_path / "examples" / "examples.json").read_text())) == build.EXAMPLES


def test_a_noisy_pool_lays_that_share_of_its_clips_over_training_backgrounds_and_keeps_the_rest(tmp_path):
    """--clap-noisy 0.5: every second scene and single-event clip lies over a training background
    (its log-mel floor some 30 dB above the quiet pool's), the others are the quiet pool's clips
    unchanged, presence and event bits are kept for every clip, and the cache tells the pools
    apart. The unseen kinds never enter: each noisy clip's background is a TRAIN_BACKGROUNDS kind."""
    from recipes.demo import build as b

    quiet = b.load_pool(2, 2, 0, cache=tmp_path)
    noisy = b.load_pool(2, 2, 0, cache=tmp_path, noisy_share=0.5, snr_range=(0.0, 10.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool-0-2-2-noisy0.5-0-10.pt", "pool-0-2-2.pt"]
    floor = lambda m: float(m.float().flatten(1).median(1).values.mean())  # noqa: E731
    for k in range(4):
        if k % 2 == 0:
            assert torch.equal(quiet[0][k], noisy[0][k]) and quiet[1][k] == noisy[1][k]
        else:
            assert floor(noisy[0][k]) > floor(quiet[0][k]) + 20, k
        assert torch.equal(quiet[2][k], noisy[2][k])                    # same events in the clip
        assert noisy[3][k].any()                                        # events still own cells
    kinds = []
    real = world.background_noise
    try:
        world.background_noise = lambda kind, rng: kinds.append(kind) or real(kind, rng)
        b.render_pool(2, 2, 0, noisy_share=0.5)
    finally:
        world.background_noise = real
    assert len(kinds) == 2 and set(kinds) <= set(world.TRAIN_BACKGROUNDS)


def test_train_clap_with_the_label_term_lowers_that_loss_on_its_clips():
    """Not only do the weights move: the same steps with and without the label term (nothing else
    weighted, so both runs draw the same batches and views and differ by that gradient alone) leave the
    single-event clips of the pool nearer their own prompt than the other 13 only with it (2.5 ->
    2.1 here). Ten steps is also the count whose one-step warm-up once made the schedule divide by
    zero."""
    from recipes.demo.build import load_pool, train_clap
    from recipes.demo.clap_losses import label_loss

    mels, _, presence, _ = load_pool(2, 6, 0)
    assert int((presence.sum(1) == 1).sum()) >= 6

    def loss_on_pool(model):
        with torch.no_grad():
            audio, _ = model.encode(mels.float())
            prompts = model.encode_text([world.prompt_for(n) for n in world.EVENTS])
        return float(label_loss(audio, prompts, presence))

    runs = {w: train_clap(10, 8, 3e-3, 0, n_scenes=2, n_single=6, presence_weight=0.0, caption_weight=0.0,
                          label_weight=w) for w in (0.0, 1.0)}
    without, with_term = loss_on_pool(runs[0.0]), loss_on_pool(runs[1.0])
    assert with_term < without - 0.2, (without, with_term)


# --------------------------------------------------------------------------- the chain


class _FakeBuild:
    """Stands in for build.main: records each argv and writes what the round would."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv):
        self.calls.append(argv)
        out = argv[argv.index("--out") + 1]
        if self.fail_on and out.endswith(self.fail_on):
            raise RuntimeError("stopped")
        from pathlib import Path

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if "--clap-only" in argv:
            (folder / "clap.safetensors").write_text(out)
            (folder / "clap.json").write_text("{}")
        else:
            assert (folder / "clap.safetensors").is_file()         # the decoder round runs in a copy of its CLAP
            (folder / "decoder.safetensors").write_text(out)
            (folder / "config.json").write_text("{}")
        (folder / "build.json").write_text("{}")


SMALL = (
    Round("a", "clap", ("--x",), 1.0),
    Round("b", "clap", ("--y",), 1.0, start="a"),
    Round("d", "decoder", ("--z",), 1.0, clap="a", train={"lr": 0.01}),
    Round("e", "decoder", (), 1.0, clap="b", start="d", any_clap=True),
)


def test_rounds_run_in_order_each_from_the_one_before_and_the_last_model_is_copied_out(tmp_path):
    build = _FakeBuild()
    last = run_chain(tmp_path / "w", tmp_path / "model", SMALL, build=build, log=lambda s: None)
    w = tmp_path / "w"
    assert last == w / "e"
    assert build.calls[0] == ["--out", str(w / "a"), "--work", str(w / "w-clap"), "--clap-only", "--x"]
    assert build.calls[1][-3:] == ["--clap-init", str(w / "a"), "--y"]
    assert build.calls[2] == ["--out", str(w / "d"), "--work", str(w / "w-d"), "--skip-clap",
                              "--decoder-recipe", str(w / "d" / chain.RECIPE), "--z"]
    from lmaczs_cli.recipe import load_recipe

    assert load_recipe(w / "d" / chain.RECIPE) == {"lr": 0.01}
    assert load_recipe(w / "e" / chain.RECIPE) == {"init": str(w / "d"), "init_any_clap": True}
    model = tmp_path / "model"
    assert (model / "clap.safetensors").read_text() == str(w / "b")      # e ran in a copy of CLAP b
    assert (model / "decoder.safetensors").read_text() == str(w / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "w"]          # no staging folder left
    record = json.loads((w / "e" / chain.DONE).read_text())
    assert record["argv"] == build.calls[3] and record["recipe"] == {"init": str(w / "d"), "init_any_clap": True}


def test_a_stopped_chain_resumes_at_the_round_it_stopped_in(tmp_path):
    w = tmp_path / "w"
    with pytest.raises(RuntimeError, match="stopped"):
        run_chain(w, None, SMALL, build=_FakeBuild(fail_on="/d"), log=lambda s: None)
    (w / "d" / "half-written.bin").write_text("x")
    again = _FakeBuild()
    run_chain(w, None, SMALL, build=again, log=lambda s: None, threads=2)
    assert [c[1].rsplit("/", 1)[1] for c in again.calls] == ["d", "e"]
    assert not (w / "d" / "half-written.bin").exists()            # the stopped round started over
    assert not (w / "d" / chain.STARTED).exists() and json.loads((w / "d" / chain.DONE).read_text())["threads"] == 2
    nothing = _FakeBuild()
    run_chain(w, None, SMALL, build=nothing, log=lambda s: None)
    assert nothing.calls == []


def test_nothing_the_chain_did_not_make_is_deleted_and_changed_rounds_are_not_reused(tmp_path):
    w = tmp_path / "w"
    (w / "b").mkdir(parents=True)
    (w / "b" / "mine.txt").write_text("keep")                     # a folder of the user's, named like a round
    with pytest.raises(ChainError, match="not a round of this chain"):
        run_chain(w, None, SMALL, build=_FakeBuild(), log=lambda s: None)
    assert (w / "b" / "mine.txt").read_text() == "keep" and not (w / "a").exists()
    (w / "b" / "mine.txt").unlink()
    (w / "b").rmdir()
    run_chain(w, None, SMALL, build=_FakeBuild(), log=lambda s: None)
    changed = (SMALL[0], Round("b", "clap", ("--other",), 1.0, start="a"), *SMALL[2:])
    with pytest.raises(ChainError, match="other options"):
        run_chain(w, None, changed, build=_FakeBuild(), log=lambda s: None)
    retrained = (*SMALL[:2], Round("d", "decoder", ("--z",), 1.0, clap="a", train={"lr": 0.02}), SMALL[3])
    with pytest.raises(ChainError, match="other options"):
        run_chain(w, None, retrained, build=_FakeBuild(), log=lambda s: None)


def test_until_stops_after_the_round_and_bad_chains_and_outputs_are_refused(tmp_path):
    build = _FakeBuild()
    assert run_chain(tmp_path / "w", None, SMALL, until="b", build=build, log=lambda s: None) == tmp_path / "w" / "b"
    assert len(build.calls) == 2
    with pytest.raises(ChainError, match="no round 'z'"):
        run_chain(tmp_path / "w", None, SMALL, until="z", build=build)
    with pytest.raises(ChainError, match="needs an earlier CLAP round"):
        run_chain(tmp_path / "w", None, (Round("d", "decoder", (), 1.0, clap="a"),), build=build)
    with pytest.raises(ChainError, match="not an earlier decoder round"):
        run_chain(tmp_path / "w", None, (SMALL[0], Round("d", "decoder", (), 1.0, clap="a", start="a")), build=build)
    with pytest.raises(ChainError, match="listed twice"):
        run_chain(tmp_path / "w", None, (SMALL[0], SMALL[0]), build=build)
    with pytest.raises(ChainError, match="set any_clap"):
        run_chain(tmp_path / "w", None, (*SMALL[:3], Round("e", "decoder", (), 1.0, clap="b", start="d")), build=build)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(ChainError, match="not an empty folder"):
        run_chain(tmp_path / "w", taken, SMALL, build=build)
    assert (taken / "mine.txt").read_text() == "keep"
    a_file = tmp_path / "model.bin"
    a_file.write_text("keep")
    with pytest.raises(ChainError, match="not an empty folder"):
        run_chain(tmp_path / "w", a_file, SMALL, build=build)
    assert a_file.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    run_chain(tmp_path / "w", empty, SMALL, build=build, log=lambda s: None)
    assert (empty / "decoder.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model.bin", "taken", "w"]   # no staging left


def test_the_bundled_recipe_is_a_valid_chain_whose_options_build_and_train_accept(tmp_path):
    from lmaczs_cli.recipe import TrainConfig, load_recipe, recipe_text

    chain.check(ROUNDS)
    parser_errors = []
    for r in ROUNDS:
        if r.kind == "decoder":                                   # what the chain writes for the round
            (tmp_path / r.name).mkdir()
            (tmp_path / r.name / chain.RECIPE).write_text(recipe_text(r.recipe(tmp_path)))
        try:
            build.parse_args(r.argv(tmp_path))
        except SystemExit as e:
            parser_errors.append((r.name, e.code))
    assert parser_errors == []
    assert ROUNDS[0].start is None and ROUNDS[-1].kind == "decoder"
    last = ROUNDS[-1]                       # the chain's last round: n5, the bundled decoder's teacher
    shipped = json.loads((ROOT / "lmaczs_cli" / "demo" / "model" / "build.json").read_text())["decoder"]
    assert shipped["init"] == last.start
    args = build.parse_args(last.argv(tmp_path))
    settings = TrainConfig(manifest="m", out="o", **{**build.DECODER_DEFAULTS, **load_recipe(
        tmp_path / last.name / chain.RECIPE), "init": last.start}).to_json()
    recipe = {"texts": args.decoder_texts, "events": args.decoder_events,
              **{k: settings[k] for k in build.DECODER_REPORTED}}
    # the bundled decoder was trained before hard_grad and hard_floor_db were removed, at the values
    # that are today's only behaviour (the gradient at the mask, dropped cells to silence)
    assert (shipped.pop("hard_grad"), shipped.pop("hard_floor_db")) == ("mask", 0.0)
    assert shipped == recipe                                      # every recorded setting compared


def test_a_tiny_chain_runs_with_the_real_build(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "zero_shot_accuracy", lambda model, per_class, seed: {"accuracy": 0.5})
    monkeypatch.setattr(build, "presence_report", lambda model: {"scene": 0.0})
    monkeypatch.setattr(build, "plan_objective", lambda model, **kw: {})
    rounds = (Round("c", "clap", TINY_CLAP, 1.0), Round("c2", "clap", TINY_CLAP, 1.0, start="c"),
              Round("d", "decoder", TINY_DEC, 1.0, clap="c2", train=TINY_TRAIN))
    run_chain(tmp_path / "w", tmp_path / "model", rounds, log=lambda s: None)
    model = tmp_path / "model"
    assert {"clap.safetensors", "clap.json", "decoder.safetensors", "config.json", "build.json"} <= {
        p.name for p in model.iterdir()}
    history = json.loads((model / "build.json").read_text())["clap_history"]
    assert len(history) == 2 and history[1].startswith(f"1 steps from {tmp_path / 'w' / 'c'}")


def _study_result(run, bias, mass, ratio, gap, unseen_mass, unseen_ratio, st4_mass, empty=0.0):
    return {"run": run, "logit_bias": bias,
            "localization": {"mass": mass, "ratio": ratio, "gap": gap, "empty": empty},
            "randomization": {"intact": {"mask_mean": 0.02}, "stage 4": {"mass": st4_mass, "chance": 0.1}},
            "generalisation": {"all": {"mass": unseen_mass, "ratio": unseen_ratio}}}


def test_operating_point_takes_the_eligible_point_of_the_largest_smallest_margin(tmp_path):
    op = _import_recipe("demo.operating_point")
    run = tmp_path / "run"
    run.mkdir()
    (run / "decoder.safetensors").write_bytes(b"weights")
    (run / "config.json").write_text(json.dumps({"format": "lmaczs-decoder/1", "decoder": {"width": 8}}))
    sweep = [_study_result(str(run), 0.0, 0.58, 0.25, 0.043, 0.60, 0.41, 0.11),    # margin -0.02
             _study_result(str(run), -2.0, 0.61, 0.16, 0.046, 0.61, 0.26, 0.11),   # margin +0.01: chosen
             _study_result(str(run), -3.0, 0.62, 0.12, 0.049, 0.62, 0.19, 0.14),   # stage 4 at 1.4x: not eligible
             _study_result(str(run), -4.0, 0.63, 0.09, 0.057, 0.62, 0.15, 0.11),   # gap over 0.05: not eligible
             _study_result(str(run), -5.0, 0.64, 0.08, 0.045, 0.63, 0.12, 0.11, empty=0.14)]   # too many empty
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    assert op.main([str(tmp_path / "sweep.json"), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["decoder"] == {"width": 8, "logit_bias": -2.0}
    assert [p["logit_bias"] for p in config["operating_point"]["points"]] == [0.0, -2.0, -3.0, -4.0, -5.0]
    assert (tmp_path / "out" / "decoder.safetensors").read_bytes() == b"weights"
    with pytest.raises(SystemExit, match="exists"):
        op.main([str(tmp_path / "sweep.json"), "--out", str(tmp_path / "out")])
    (tmp_path / "none.json").write_text(json.dumps(sweep[2:]))
    with pytest.raises(SystemExit, match="no operating point is eligible"):
        op.main([str(tmp_path / "none.json"), "--out", str(tmp_path / "out2")])


def test_decoder_study_scores_each_run_at_each_operating_point_asked(monkeypatch, tmp_path):
    """--logit-bias B ...: every point is the run's decoder with that bias in its config (what the
    scores see), recorded in the result; without it, the run's own point."""
    study = _import_recipe("demo.decoder_study")
    seen = []

    def scored(explainer, *args, **kwargs):
        seen.append(explainer.decoder.cfg.logit_bias)
        return {"mass": 0.5}

    monkeypatch.setattr(study.scores, "localization_report", scored)
    monkeypatch.setattr(study, "randomization_rows", scored)
    monkeypatch.setattr(study.scores, "background_rows", lambda *a, **k: [])
    monkeypatch.setattr(study.scores, "background_summary", lambda rows: {"all": {}})
    monkeypatch.setattr(study, "table", lambda res: "")
    out = tmp_path / "sweep.json"
    assert study.main([str(ROOT / "lmaczs_cli/demo/model"), "--logit-bias", "0", "-2", "--json", str(out)]) == 0
    assert seen == [0.0, 0.0, -2.0, -2.0]
    assert [r["logit_bias"] for r in json.loads(out.read_text())] == [0.0, -2.0]
    seen.clear()
    assert study.main([str(ROOT / "lmaczs_cli/demo/model")]) == 0
    assert seen == [-2.0, -2.0]                                   # the bundled decoder's own point
