"""Faithfulness metrics of the LMAC-ZS paper on hand-computed cases, and localization against truth."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lmaczs_cli import metrics as M


def test_class_probabilities_are_a_softmax_of_raw_similarities() -> None:
    sim = np.array([[0.5, 0.1, -0.2]])
    p = M.class_probabilities(sim)
    expected = np.exp(sim) / np.exp(sim).sum()
    assert np.allclose(p, expected) and math.isclose(p.sum(), 1.0)
    sharp = M.class_probabilities(sim, logit_scale=30.0)
    assert sharp[0, 0] > 0.99


def test_a_mask_that_raises_the_predicted_probability_counts_in_ai_and_ag() -> None:
    p = np.array([0.5, 0.5, 0.8])
    pm = np.array([0.75, 0.4, 0.8])          # up, down, equal (not an increase)
    assert M.increase(p, pm).tolist() == [1.0, 0.0, 0.0]
    assert np.allclose(M.gain(p, pm), [0.5, 0.0, 0.0])           # (0.75-0.5)/(1-0.5)
    assert np.allclose(M.drop(p, pm), [0.0, 0.2, 0.0])           # (0.5-0.4)/0.5


def test_ad_is_zero_when_nothing_drops() -> None:
    p = np.array([0.2, 0.6])
    assert np.all(M.drop(p, p + 0.1) == 0) and np.all(M.drop(p, p) == 0)


def test_ff_is_the_probability_lost_when_the_explanation_is_removed() -> None:
    assert np.allclose(M.faithfulness_removal([0.7, 0.3], [0.2, 0.4]), [0.5, -0.1])


def test_fid_in_counts_kept_top_classes() -> None:
    assert M.fidelity_in([1, 2, 0], [1, 0, 0]).tolist() == [1.0, 0.0, 1.0]


def test_per_clip_metrics_use_the_original_top_class() -> None:
    prob = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    masked = np.array([[0.7, 0.2, 0.1], [0.4, 0.25, 0.35]])       # clip 2's top class changes
    removed = np.array([[0.1, 0.8, 0.1], [0.3, 0.4, 0.3]])
    masks = np.stack([np.eye(4), np.full((4, 4), 0.5)])
    v = M.per_clip_metrics(prob, masked, removed, masks)
    assert v["AI"].tolist() == [1.0, 0.0]
    assert np.allclose(v["AD"], [0.0, 0.5]) and np.allclose(v["AG"], [0.25, 0.0])
    assert np.allclose(v["FF"], [0.5, 0.1]) and v["Fid-In"].tolist() == [1.0, 0.0]
    assert np.allclose(v["MM"], [0.25, 0.5])
    s = M.summarise(v)
    assert math.isclose(s["AI"], 50.0) and math.isclose(s["AD"], 25.0) and math.isclose(s["FF"], 0.3)


def test_sps_of_one_hot_is_near_one_and_of_constant_is_zero() -> None:
    one_hot = np.zeros((1, 1001, 64))
    one_hot[0, 10, 3] = 1.0
    n = one_hot.size
    assert math.isclose(M.sparseness(one_hot)[0], (n - 1) / n)
    assert abs(M.sparseness(np.full((1, 1001, 64), 0.3))[0]) < 1e-12


def test_sps_of_two_values_by_hand() -> None:
    # a = [0, 0, 1, 3] sorted: Σ(2i-n-1)a_i = (-3*0) + (-1*0) + (1*1) + (3*3) = 10; n Σa = 16
    assert math.isclose(M.sparseness(np.array([[3.0, 0.0, 1.0, 0.0]]))[0], 10 / 16)


def test_comp_is_log_n_for_a_constant_mask_and_zero_for_one_hot() -> None:
    assert math.isclose(M.complexity(np.full((1, 8, 4), 0.2))[0], math.log(32))
    one_hot = np.zeros((1, 8, 4))
    one_hot[0, 2, 1] = 0.9
    assert M.complexity(one_hot)[0] == 0.0


def test_sps_and_comp_match_quantus_on_random_masks() -> None:
    # Not in the test extra: quantus requires opencv-python, whose cv2 would overwrite the
    # opencv-python-headless that grad-cam uses (and needs libGL). `pip install quantus` to run it.
    quantus = pytest.importorskip("quantus", reason="Quantus is an optional cross-check (pip install quantus)")
    masks = np.random.default_rng(0).uniform(size=(5, 1, 100, 16)).astype(np.float64)
    x = np.zeros_like(masks)
    theirs_sps = quantus.Sparseness(abs=True, normalise=False, disable_warnings=True).evaluate_batch(x, masks.copy())
    theirs_comp = quantus.Complexity(abs=True, normalise=False, disable_warnings=True).evaluate_batch(x, masks.copy())
    assert np.allclose(M.sparseness(masks), theirs_sps, atol=1e-5)
    assert np.allclose(M.complexity(masks), theirs_comp, atol=1e-5)


def test_localization_of_a_mask_on_the_region_beats_chance() -> None:
    region = np.zeros((1001, 64), bool)
    region[100:200, 10:20] = True
    perfect = region.astype(np.float32)
    loc = M.localization(perfect, region)
    assert loc["loc_mass"] == 1.0 and loc["loc_auc"] == 1.0
    flat = M.localization(np.ones((1001, 64)), region)
    assert math.isclose(flat["loc_mass"], flat["loc_chance"]) and flat["loc_auc"] == 0.5
    assert 0 < loc["loc_chance"] < 0.05


def test_speechbrain_ad_softmaxes_the_probabilities_again() -> None:
    """SpeechBrain's L-MAC AD re-applies a softmax to class probabilities. By hand, for
    p = [0.7, 0.2, 0.1] and p(M⊙X) = [0.4, 0.4, 0.2]: the paper's AD is (0.7 - 0.4) / 0.7 = 3/7;
    softmaxed again, ĉ's entries are e^.7 / (e^.7 + e^.2 + e^.1) and e^.4 / (2e^.4 + e^.2), and
    their relative drop is 0.2353."""
    prob = np.array([[0.7, 0.2, 0.1]])
    masked = np.array([[0.4, 0.4, 0.2]])
    e = math.exp
    twice, twice_masked = e(.7) / (e(.7) + e(.2) + e(.1)), e(.4) / (2 * e(.4) + e(.2))
    assert M.AD_CONVENTIONS["paper"](prob, masked)[0] == pytest.approx(3 / 7)
    sb = M.drop_softmaxed_twice(prob, masked)[0]
    assert sb == pytest.approx((twice - twice_masked) / twice) and sb == pytest.approx(0.2353, abs=1e-4)
    assert M.drop_softmaxed_twice(masked, masked)[0] == 0.0                           # nothing dropped
    values = M.per_clip_metrics(prob, masked, prob, np.ones((1, 4, 2)), ad="speechbrain")
    assert values["AD"][0] == pytest.approx(sb)
    assert M.per_clip_metrics(prob, masked, prob, np.ones((1, 4, 2)))["AD"][0] == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="use one of paper, speechbrain"):
        M.per_clip_metrics(prob, masked, prob, np.ones((1, 4, 2)), ad="quantus")


def test_speechbrain_ad_is_the_paper_formula_on_softmaxed_probabilities_and_bounded() -> None:
    rng = np.random.default_rng(3)
    prob = M.class_probabilities(rng.normal(size=(50, 14)) * 4)
    masked = M.class_probabilities(rng.normal(size=(50, 14)) * 4)
    pred = prob.argmax(axis=1)
    expected = M.drop_of_top_class(M.class_probabilities(prob), M.class_probabilities(masked), pred)
    assert np.allclose(M.drop_softmaxed_twice(prob, masked), expected)
    # 14 classes: softmaxed probabilities lie within [1/(e+13), e/(e+13)], so no drop passes 1 - 1/e,
    # where the paper's reach 1
    assert M.drop_of_top_class(prob, masked).max() > 0.9
    assert M.drop_softmaxed_twice(prob, masked).max() < 1 - 1 / math.e


def test_top_cells_keep_exact_budgets_nested_and_largest_first() -> None:
    mask = np.arange(20, dtype=float).reshape(1, 4, 5) / 20          # cell i has value i / 20
    kept = M.top_cells(mask, (0.1, 0.25, 0.5))
    assert kept.shape == (3, 1, 4, 5) and kept.dtype == bool
    assert [int(k.sum()) for k in kept] == [2, 5, 10]
    assert np.array_equal(np.flatnonzero(kept[0].ravel()), [18, 19])
    assert np.array_equal(np.flatnonzero(kept[2].ravel()), np.arange(10, 20))
    assert np.all(kept[1] <= kept[2]) and np.all(kept[0] <= kept[1])  # larger budgets keep a superset


def test_top_cells_break_ties_in_a_fixed_spread_order() -> None:
    flat = np.full((2, 100, 8), 0.5)
    a, b = M.top_cells(flat, (0.1,)), M.top_cells(flat, (0.1,))
    assert np.array_equal(a, b) and int(a[0, 0].sum()) == 80
    assert np.array_equal(a[0, 0], a[0, 1])                                # the same order for every clip
    frames = np.flatnonzero(a[0, 0].any(axis=1))
    assert frames.min() < 20 and frames.max() > 80                         # spread, not the first frames
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        M.top_cells(flat, (0.1, 1.5))


def test_curve_area_is_the_trapezoid_over_the_budget_span() -> None:
    budgets = (0.1, 0.2, 0.5)
    # constant p -> p; a line from 0 to 0.4 over [0.1, 0.5] -> its mean 0.2
    values = np.array([[0.3, 0.3, 0.3], [0.0, 0.1, 0.4]])
    assert np.allclose(M.curve_area(values, budgets), [0.3, 0.2])
    # by hand: ((0.2 + 0.6) / 2 * 0.1 + (0.6 + 0.9) / 2 * 0.3) / 0.4 = (0.04 + 0.225) / 0.4
    assert M.curve_area(np.array([[0.2, 0.6, 0.9]]), budgets)[0] == pytest.approx(0.6625)
    with pytest.raises(ValueError, match="increasing"):
        M.curve_area(values, (0.2, 0.1, 0.5))
