"""The decoder: unfolding HTSAT's grids, text conditioning, shapes, saving and identity checks."""
from __future__ import annotations

import pytest
import torch

from lmaczs_cli import clap as C
from lmaczs_cli import decoder as D
from lmaczs_cli import spectral
from lmaczs_cli.audio import CLIP_SAMPLES, N_FRAMES, N_FREQS, N_MELS


def _inputs(clap, batch=2, seed=0):
    waves = 0.1 * torch.randn(batch, CLIP_SAMPLES, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logmel = clap.front_end(waves)
        _, hidden = clap.encode(logmel)
        log_power = spectral.to_db(spectral.power(spectral.stft(waves)))
    return waves, logmel, hidden, log_power


def test_unfold_inverts_laion_reshape_wav2img(tiny_clap):
    """Cells marked on a log-mel, folded by laion, unfolded by ours, land back on those cells."""
    cells = [(0, 0), (10, 5), (250, 63), (300, 17), (512, 40), (777, 2), (1000, 33)]
    logmel = torch.zeros(1, 1, N_FRAMES, N_MELS)
    for t, m in cells:
        logmel[0, 0, t, m] = 1.0
    with torch.no_grad():
        folded = tiny_clap.branch.reshape_wav2img(logmel)           # (1, 1, 256, 256), laion's code
    assert folded.shape == (1, 1, 256, 256)
    back = D.unstretch_frames(D.unfold_htsat(folded))[0, 0]         # (1001, 64)
    assert back.shape == (N_FRAMES, N_MELS)
    for t, m in cells:
        column = back[:, m]
        assert column.argmax().item() == t, (t, m)
        assert back[t].argmax().item() == m
        assert back[t, m] > 0.5  # bicubic stretch + linear unstretch smear a one-cell mark a little


def test_unfold_is_exact_at_full_resolution_on_1024_frames(tiny_clap):
    x = torch.randn(2, 3, D.HTSAT_FRAMES, N_MELS)
    # laion's reshape without the stretch (T == 1024 already): a pure permutation
    folded = tiny_clap.branch.reshape_wav2img(x)
    assert torch.equal(D.unfold_htsat(folded), x)


def test_lateral_projections_on_folded_grids_equal_those_of_the_unfolded_grids(tiny_clap):
    """The decoder projects each folded HTSAT grid (1x1 conv) before unfolding it, which is
    cheaper to permute; per-position convolutions commute with the unfolding, so the grids are
    those of unfolding first."""
    torch.manual_seed(0)
    dec = D.MaskDecoder(D.DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4))
    _, _, hidden, _ = _inputs(tiny_clap)
    with torch.no_grad():
        got = dec.grids(hidden)
        want = [conv(D.unfold_htsat(h)) for conv, h in zip(dec.lateral, hidden)]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("levels", [2, 3])
def test_a_decoder_of_fewer_levels_reads_only_clap_s_first_stages(tiny_clap, levels):
    torch.manual_seed(0)
    dec = D.MaskDecoder(D.DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4, levels=levels)).eval()
    full = D.MaskDecoder(D.DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4)).eval()
    assert len(dec.lateral) == levels and D.parameter_count(dec) < D.parameter_count(full)
    _, logmel, hidden, _ = _inputs(tiny_clap)
    text = torch.nn.functional.normalize(torch.randn(2, tiny_clap.cfg.joint_dim), dim=-1)
    later = list(hidden[:levels]) + [torch.randn_like(h) for h in hidden[levels:]]   # other deeper stages
    earlier = [torch.randn_like(h) for h in hidden[:levels]] + list(hidden[levels:])  # other read stages
    with torch.no_grad():
        m = dec(list(hidden), text, logmel)
        assert m.shape == (2, N_FRAMES, N_MELS) and 0 <= m.min() and m.max() <= 1
        assert torch.equal(dec(later, text, logmel), m)
        assert (dec(earlier, text, logmel) - m).abs().max() > 1e-4
        assert (full(later, text, logmel) - full(list(hidden), text, logmel)).abs().max() > 1e-4
    with pytest.raises(D.DecoderError, match="levels"):
        D.DecoderConfig.for_clap(tiny_clap, levels=1)


@pytest.mark.parametrize("first_level", [2, 3, 4])
def test_a_deep_decoder_reads_only_clap_s_deeper_stages_and_no_log_mel(tiny_clap, first_level):
    """first_level = 4 with no log-mel skip: the mask is a function of h4 and the text alone (3: of
    h3, h4), so re-initialising CLAP's earlier stages cannot move it and re-initialising stage 4 must."""
    torch.manual_seed(0)
    cfg = D.DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4, logmel_skip=False,
                                   text_readout=True, first_level=first_level)
    dec = D.MaskDecoder(cfg).eval()
    assert len(dec.lateral) == 5 - first_level
    _, logmel, hidden, _ = _inputs(tiny_clap)
    text = torch.nn.functional.normalize(torch.randn(2, tiny_clap.cfg.joint_dim), dim=-1)
    shallow = [torch.randn_like(h) for h in hidden[: first_level - 1]] + list(hidden[first_level - 1:])
    deepest = list(hidden[:3]) + [torch.randn_like(hidden[3])]
    with torch.no_grad():
        m = dec(list(hidden), text)
        assert m.shape == (2, N_FRAMES, N_MELS) and 0 <= m.min() and m.max() <= 1
        assert torch.equal(dec(shallow, text), m)
        assert torch.equal(dec(list(hidden), text, 100 * torch.randn_like(logmel)), m)   # the log-mel is not read
        assert (dec(deepest, text) - m).abs().max() > 1e-4
    for bad in (0, 5):
        with pytest.raises(D.DecoderError, match="first_level"):
            D.DecoderConfig.for_clap(tiny_clap, first_level=bad)
    with pytest.raises(D.DecoderError, match="first_level"):
        D.DecoderConfig.for_clap(tiny_clap, levels=2, first_level=3)


def test_a_config_saved_before_first_level_existed_reads_from_the_first_stage(tiny_clap):
    saved = D.DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4).to_json()
    del saved["first_level"]
    assert D.DecoderConfig.from_json(saved).first_level == 1


def test_a_skip_gated_mask_is_the_clap_fed_mask_times_a_gate_on_the_log_mel(tiny_clap):
    torch.manual_seed(0)
    dec = D.MaskDecoder(D.DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4, skip_gate=True)).eval()
    assert dec.head[0][0].in_channels == 2          # the head sees no log-mel channel
    for p in dec.gate.parameters():                 # a gate that is not all open
        torch.nn.init.normal_(p, std=0.5)
    _, logmel, hidden, _ = _inputs(tiny_clap)
    text = torch.nn.functional.normalize(torch.randn(2, tiny_clap.cfg.joint_dim), dim=-1)
    with torch.no_grad():
        mask = dec(list(hidden), text, logmel)
        gate = torch.sigmoid(dec.gate.net(D._normalise(logmel.unsqueeze(1))))[:, 0]
        dec.gate.forward = lambda logits, skip: logits   # the same decoder with its gate left out
        ungated = dec(list(hidden), text, logmel)
    assert gate.min() < 0.2 and gate.max() > 0.8
    torch.testing.assert_close(mask, ungated * gate, rtol=1e-4, atol=1e-6)
    with pytest.raises(D.DecoderError, match="skip_gate"):
        D.DecoderConfig.for_clap(tiny_clap, skip_gate=True, logmel_skip=False)


def test_interp_matrix_is_identity_when_sizes_match_and_keeps_constants():
    assert torch.equal(D.interp_matrix(7, 7), torch.eye(7))
    m = D.interp_matrix(1024, 1001)
    assert torch.allclose(m.sum(dim=1), torch.ones(1001))


@pytest.mark.parametrize("domain, bins", [("mel", N_MELS), ("stft", N_FREQS)])
def test_mask_shape_range_and_prompt_dependence(tiny_clap, domain, bins):
    torch.manual_seed(0)
    dec = D.MaskDecoder(D.DecoderConfig.for_clap(tiny_clap, domain=domain)).eval()
    _, logmel, hidden, log_power = _inputs(tiny_clap)
    text = tiny_clap.encode_text(["glass breaking", "glass breaking"])
    other = tiny_clap.encode_text(["a dog barking", "a dog barking"])
    with torch.no_grad():
        m1 = dec(hidden, text, logmel, log_power)
        m2 = dec(hidden, other, logmel, log_power)
    assert m1.shape == (2, N_FRAMES, bins)
    assert m1.min() >= 0 and m1.max() <= 1
    # two prompts give measurably different masks from the same random decoder
    assert (m1 - m2).abs().mean().item() > 1e-3


def test_film_starts_as_identity_and_trains_to_gate_by_text(tiny_clap):
    """A FiLM decoder at initialisation equals the same decoder without FiLM; after a few steps on
    'mask the first half for prompt A, the second half for prompt B' its FiLM is no longer zero and
    the two prompts' masks differ."""
    torch.manual_seed(0)
    cfg = D.DecoderConfig.for_clap(tiny_clap)
    assert cfg.film
    with_film = D.MaskDecoder(cfg).eval()
    plain = D.MaskDecoder(D.DecoderConfig(**{**cfg.to_json(), "film": False})).eval()
    missing = plain.load_state_dict(with_film.state_dict(), strict=False)
    assert not missing.missing_keys and all(k.startswith("film.") for k in missing.unexpected_keys)
    _, logmel, hidden, _ = _inputs(tiny_clap, batch=1)
    text = tiny_clap.encode_text(["glass breaking", "a dog barking"])
    hidden2 = [h.expand(2, *h.shape[1:]) for h in hidden]
    with torch.no_grad():
        torch.testing.assert_close(with_film(hidden2, text, logmel.expand(2, -1, -1)),
                                   plain(hidden2, text, logmel.expand(2, -1, -1)))
    target = torch.zeros(2, N_FRAMES, N_MELS)
    target[0, : N_FRAMES // 2] = 1.0
    target[1, N_FRAMES // 2:] = 1.0
    with_film.train()
    opt = torch.optim.Adam(with_film.parameters(), lr=3e-3)
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy(with_film(hidden2, text, logmel.expand(2, -1, -1)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(f.proj.weight.abs().sum() > 0 for f in with_film.film)
    with torch.no_grad():
        m = with_film.eval()(hidden2, text, logmel.expand(2, -1, -1))
    assert m[0, : N_FRAMES // 2].mean() > m[1, : N_FRAMES // 2].mean() + 0.2


def test_configs_saved_before_film_load_without_it():
    cfg = D.DecoderConfig("htsat", (8, 16, 32, 32), (128, 64, 32, 32), (8, 4, 2, 2), text_dim=16, width=16)
    old = {k: v for k, v in cfg.to_json().items() if k != "film"}
    assert D.DecoderConfig.from_json(old).film is False
    assert D.DecoderConfig.from_json(cfg.to_json()).film is True


def test_text_readout_adds_a_prompt_feature_dot_product_and_nothing_when_its_query_is_zero(tiny_clap):
    torch.manual_seed(0)
    cfg = D.DecoderConfig.for_clap(tiny_clap, text_readout=True)
    with_readout = D.MaskDecoder(cfg).eval()
    plain = D.MaskDecoder(D.DecoderConfig(**{**cfg.to_json(), "text_readout": False})).eval()
    extra = plain.load_state_dict(with_readout.state_dict(), strict=False).unexpected_keys
    assert extra and all(k.startswith("readout.") for k in extra)
    _, logmel, hidden, _ = _inputs(tiny_clap)
    text = tiny_clap.encode_text(["glass breaking", "a dog barking"])
    # the readout by hand on a small map: <W t + b, K x_cell + c> / sqrt(d)
    r = with_readout.readout
    x = torch.randn(2, r.key.in_channels, 3, 2)
    q = text @ r.query.weight.T + r.query.bias
    k = torch.einsum("oc,bctf->botf", r.key.weight[:, :, 0, 0], x) + r.key.bias[:, None, None]
    want = torch.einsum("bo,botf->btf", q, k)[:, None] / r.query.out_features ** 0.5
    torch.testing.assert_close(r(x, text), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        with_mask = with_readout(hidden, text, logmel)
        assert (with_mask - plain(hidden, text, logmel)).abs().max() > 1e-3
        r.query.weight.zero_()
        r.query.bias.zero_()
        torch.testing.assert_close(with_readout(hidden, text, logmel), plain(hidden, text, logmel))


def test_configs_saved_before_text_readout_load_without_it():
    cfg = D.DecoderConfig("htsat", (8, 16, 32, 32), (128, 64, 32, 32), (8, 4, 2, 2), text_dim=16, width=16,
                          text_readout=True)
    old = {k: v for k, v in cfg.to_json().items() if k != "text_readout"}
    assert D.DecoderConfig.from_json(old).text_readout is False
    assert D.DecoderConfig.from_json(cfg.to_json()).text_readout is True


def test_decoder_needs_at_least_four_text_tokens(tiny_clap):
    with pytest.raises(D.DecoderError, match="single key is a constant bias"):
        D.DecoderConfig.for_clap(tiny_clap, text_tokens=1)


@pytest.mark.slow
def test_decoder_runs_on_pann14_hidden_states():
    pann = C.random_clap("PANN-14", seed=0)
    dec = D.MaskDecoder(D.DecoderConfig.for_clap(pann)).eval()
    assert dec.cfg.backbone == "pann" and dec.cfg.hidden_time == (125, 62, 31, 31)
    _, logmel, hidden, _ = _inputs(pann, batch=1)
    with torch.no_grad():
        mask = dec(hidden, pann.encode_text(["rain"]), logmel)
    assert mask.shape == (1, N_FRAMES, N_MELS) and torch.isfinite(mask).all()


def test_save_load_round_trip_and_clap_identity_check(tmp_path, tiny_clap):
    dec = D.MaskDecoder(D.DecoderConfig.for_clap(tiny_clap)).eval()
    meta = {"clap": {"identity": tiny_clap.identity(), "source": tiny_clap.source}}
    D.save_decoder(dec, tmp_path / "run", meta)
    loaded, config = D.load_decoder(tmp_path / "run", clap=tiny_clap)
    _, logmel, hidden, _ = _inputs(tiny_clap, batch=1)
    text = tiny_clap.encode_text(["rain"])
    with torch.no_grad():
        assert torch.equal(loaded(hidden, text, logmel), dec(hidden, text, logmel))
    other = C.random_clap("tiny", seed=99)
    with pytest.raises(D.DecoderError, match="trained on CLAP .* --force"):
        D.load_decoder(tmp_path / "run", clap=other)
    forced, _ = D.load_decoder(tmp_path / "run", clap=other, force=True)
    assert isinstance(forced, D.MaskDecoder)


@pytest.mark.parametrize("domain", ["mel", "stft"])
def test_an_operating_point_shifts_the_logits_and_leaves_the_weights(tmp_path, tiny_clap, domain):
    """logit_bias b: the same weights give sigmoid(logit(m) + b); 0 (the default) leaves config.json
    and decoder_hash as they were before the field existed; a saved point loads back."""
    import dataclasses

    torch.manual_seed(0)
    cfg = D.DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4, domain=domain)
    dec = D.MaskDecoder(cfg).eval()
    assert "logit_bias" not in cfg.to_json()
    before = D.decoder_hash(dec)
    _, logmel, hidden, log_power = _inputs(tiny_clap)
    text = torch.nn.functional.normalize(torch.randn(2, tiny_clap.cfg.joint_dim), dim=-1)
    with torch.no_grad():
        m0 = dec(list(hidden), text, logmel, log_power).double()
        dec.cfg = dataclasses.replace(cfg, logit_bias=-3.0)
        m3 = dec(list(hidden), text, logmel, log_power).double()
    torch.testing.assert_close(m3, torch.sigmoid(torch.logit(m0) - 3.0), rtol=1e-3, atol=1e-6)
    assert m3.mean() < 0.2 * m0.mean()                      # random weights: masks near 0.5, shrunk by about e^-3
    assert D.decoder_hash(dec) != before
    D.save_decoder(dec, tmp_path / "run", {"clap": {"identity": tiny_clap.identity()}})
    loaded, config = D.load_decoder(tmp_path / "run", clap=tiny_clap)
    assert config["decoder"]["logit_bias"] == -3.0 and loaded.cfg == dec.cfg
    dec.cfg = cfg
    assert D.decoder_hash(dec) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "-3", True])
def test_an_operating_point_must_be_a_finite_number(tiny_clap, bad):
    saved = D.DecoderConfig.for_clap(tiny_clap).to_json()
    with pytest.raises(D.DecoderError, match="logit_bias must be a finite number"):
        D.DecoderConfig.from_json({**saved, "logit_bias": bad})
