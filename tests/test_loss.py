"""The LMAC-ZS objective on hand-computed cases, and where its gradients go."""
from __future__ import annotations


import pytest
import torch

from lmaczs_cli import loss as L


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_similarity_term_is_zero_when_masked_audio_equals_original():
    g = torch.Generator().manual_seed(0)
    text, audio = _unit(torch.randn(3, 8, generator=g)), _unit(torch.randn(3, 8, generator=g))
    pairs = L.all_pairs(3)
    masked = audio[pairs[:, 1]]          # a mask of ones leaves every embedding unchanged
    terms = L.lmac_zs_loss(text, audio, pairs, masked, torch.ones(9, 4, 4), 0.0, 0.0)
    assert terms.similarity.item() == pytest.approx(0.0, abs=1e-7)


def test_perturbing_one_off_diagonal_similarity_moves_the_mean_by_delta_over_b_squared():
    g = torch.Generator().manual_seed(1)
    B, delta = 3, 0.05
    original = torch.randn(B * B, generator=g)
    masked = original.clone()
    base = L.similarity_term(original, masked)
    k = 1 * B + 2                        # pair (text 1, audio 2): off the diagonal
    masked[k] += delta
    assert (L.similarity_term(original, masked) - base).item() == pytest.approx(delta / 9, abs=1e-7)


def test_diversity_term_hand_computed():
    # two clips, two texts; text-text similarity 0.6
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    pairs = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]])
    # masked embeddings: pair rows in the order above
    masked = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.8, 0.6]])
    # clip 0: |t0·t1 - ã00·ã10| = |0.6 - 0| = 0.6 ; clip 1: |t1·t0 - ã11·ã01| = |0.6 - 0.6| = 0
    assert L.diversity_term(t, pairs, masked).item() == pytest.approx(0.3, abs=1e-6)


def test_diversity_term_needs_matched_and_mismatched_pairs():
    t = _unit(torch.randn(2, 4))
    only_matched = torch.tensor([[0, 0], [1, 1]])
    assert L.diversity_term(t, only_matched, torch.randn(2, 4)).item() == 0.0


def test_total_combines_terms_with_their_weights():
    g = torch.Generator().manual_seed(2)
    text, audio = _unit(torch.randn(2, 6, generator=g)), _unit(torch.randn(2, 6, generator=g))
    pairs = L.all_pairs(2)
    masked = _unit(torch.randn(4, 6, generator=g))
    masks = torch.rand(4, 5, 5, generator=g)
    t = L.lmac_zs_loss(text, audio, pairs, masked, masks, 0.5, 2.0)
    assert t.sparsity.item() == pytest.approx(masks.mean().item())
    assert t.total.item() == pytest.approx(t.similarity.item() + 0.5 * t.sparsity.item() + 2.0 * t.diversity.item(), rel=1e-6)


def test_pair_sampling_keeps_every_matched_pair():
    g = torch.Generator().manual_seed(0)
    pairs = L.sample_pairs(5, 2, g)
    assert pairs.shape == (15, 2)
    as_set = {tuple(p) for p in pairs.tolist()}
    assert all((j, j) in as_set for j in range(5))
    assert len(as_set) == 15
    assert L.sample_pairs(4, 10, g).shape == (16, 2)   # m >= B-1 is every pair
    assert {tuple(p) for p in L.all_pairs(3).tolist()} == {(i, j) for i in range(3) for j in range(3)}


def test_gradients_reach_the_decoder_and_not_the_clap(tiny_clap):
    from lmaczs_cli import decoder as D
    from lmaczs_cli import spectral
    from lmaczs_cli.audio import CLIP_SAMPLES

    dec = D.MaskDecoder(D.DecoderConfig.for_clap(tiny_clap))
    waves = 0.1 * torch.randn(2, CLIP_SAMPLES, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logmel = tiny_clap.front_end(waves)
        mel = spectral.mel_power(spectral.power(spectral.stft(waves)))
        audio, hidden = tiny_clap.encode(logmel)
        text = tiny_clap.encode_text(["a", "b"])
    pairs = L.all_pairs(2)
    ti, aj = pairs[:, 0], pairs[:, 1]
    masks = dec([h[aj] for h in hidden], text[ti], logmel[aj])
    masked, _ = tiny_clap.encode(spectral.masked_log_mel_from_mel(mel[aj], masks))
    L.lmac_zs_loss(text, audio, pairs, masked, masks, 0.1, 0.1).total.backward()
    grads = [p.grad for p in dec.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in tiny_clap.parameters())


def test_removal_term_charges_only_what_the_rest_holds_above_silence():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    silence = torch.tensor([0.6, 0.8])
    removed = torch.tensor([[0.8, 0.6], [0.8, 0.6]])   # t·removed 0.8 and 0.6; t·silence 0.6 and 0.8
    assert L.removal_term(t, removed, silence).item() == pytest.approx(0.1, abs=1e-6)   # (0.2 + 0) / 2
    assert L.removal_term(t, silence.expand(2, 2), silence).item() == 0.0


def test_overlap_term_charges_shared_cells_of_different_texts_on_one_clip_by_how_much_the_texts_differ():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    pairs = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 1]])          # texts 0, 1, 2 on clip 0; text 0 on clip 1
    masks = torch.zeros(4, 2, 2)
    masks[0, 0] = 1.0                      # text 0 keeps row 0 of clip 0
    masks[1] = 1.0                         # text 1 keeps all of clip 0
    masks[2, 1] = 0.5                      # text 2 keeps half of row 1
    masks[3] = 1.0                         # clip 1 has one text: nothing to compare
    # (0,1): weight 1 x shared 0.5; (0,2): weight 0.4 x 0; (1,2): weight 0.2 x 0.25; mean of three
    assert L.overlap_term(t, pairs, masks).item() == pytest.approx((0.5 + 0.0 + 0.05) / 3, abs=1e-6)
    disjoint = masks.clone()
    disjoint[1, 0] = 0.0
    disjoint[1, 1] = 0.0
    assert L.overlap_term(t, pairs, disjoint).item() == 0.0
    assert L.overlap_term(t, torch.tensor([[0, 0], [1, 1]]), masks[:2]).item() == 0.0   # no clip with two texts
    repeated = torch.cat([t, t[:1]])                                # text 3 is text 0's caption again
    again = torch.cat([pairs, torch.tensor([[3, 0]])])
    same = torch.cat([masks, masks[:1]])
    # (3,1) and (3,2) repeat (0,1) and (0,2); (0,3) is not compared: mean of five
    assert L.overlap_term(repeated, again, same).item() == pytest.approx((0.5 + 0.0 + 0.05 + 0.5 + 0.0) / 5, abs=1e-6)


def test_absent_term_charges_mismatched_masks_by_how_far_clap_scores_the_text_below_the_clips_own_caption():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    a = torch.tensor([[0.8, 0.6], [0.0, 1.0]])                  # C_00 0.8; C_10 0.6; C_20 0.96; C_11 1; C_01 0
    pairs = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 1]])
    masks = torch.zeros(4, 2, 2)
    masks[0] = 1.0                         # matched: never charged
    masks[1] = 0.5                         # text 1 on clip 0: weight 1 - 0.6 / 0.8 = 0.25, mean 0.5
    masks[2] = 1.0                         # text 2 scores above clip 0's own caption: weight 0
    masks[3, 0] = 1.0                      # text 0 on clip 1: weight 1 (scores 0), mean 0.5
    assert L.absent_term(t, a, pairs, masks).item() == pytest.approx((0.25 * 0.5 + 0.0 + 0.5) / 3, abs=1e-6)
    assert L.absent_term(t, a, torch.tensor([[0, 0], [1, 1]]), masks[:2]).item() == 0.0   # nothing mismatched
    grad = masks.clone().requires_grad_()
    L.absent_term(t, a, pairs, grad).backward()
    assert grad.grad[0].abs().sum() == 0 and grad.grad[2].abs().sum() == 0 and grad.grad[3].abs().sum() > 0
    # clip 0 again at position 1 (two captions of one clip): text 1 on it is its own caption, never charged
    twice = torch.stack([a[0], a[0]])
    assert L.absent_term(t[:2], twice, torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]]), masks).item() == 0.0
    # a clip whose own caption scores 0 or lower gives no measure: its mismatched masks are not charged
    low = torch.tensor([[-0.8, -0.6], [0.0, 1.0]])                   # C_00 -0.8, C_10 -0.6
    assert L.absent_term(t[:2], low, torch.tensor([[0, 0], [1, 0]]), masks[:2]).item() == 0.0
