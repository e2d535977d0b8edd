"""Masking in both domains, the mel->linear transform and the listenable inverse."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmaczs_cli import spectral
from lmaczs_cli.audio import CLIP_SAMPLES, N_FFT, N_FRAMES, N_FREQS, N_MELS, SAMPLE_RATE
from lmaczs_cli.model import FftSpectral, MatMulSpectral

EDGE = 4 * N_FFT  # samples excluded at each end in SNR checks


def _noise(batch=2, n=CLIP_SAMPLES, seed=0):
    return 0.1 * torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))


def listenable(wave, mask, domain, ops=FftSpectral(), method="linear"):
    """The model's listenable step on whole clips: wave (B, n), mask (B, frames, bins) -> (B, n)."""
    return ops.listen(ops.analyse(wave, False), mask, 1, domain, method, wave.shape[-1])


def _snr_db(ref, est):
    ref, est = ref[..., EDGE:-EDGE], est[..., EDGE:-EDGE]
    return (10 * torch.log10(ref.square().sum() / (ref - est).square().sum())).item()


def test_istft_inverts_stft_and_matches_torch_istft():
    wave = _noise(n=3 * SAMPLE_RATE + 123)
    X = spectral.stft(wave)
    ours = spectral.istft(X, wave.shape[1])
    ref = torch.istft(X.transpose(1, 2), n_fft=N_FFT, hop_length=480, window=spectral.hann_window(),
                      center=True, length=wave.shape[1])
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ours - wave).abs().max().item() <= 1e-4


@pytest.mark.parametrize("domain, bins", [("mel", N_MELS), ("stft", N_FREQS)])
def test_mask_of_ones_is_identity_and_zeros_is_silence(domain, bins):
    wave = _noise()
    ones = torch.ones(2, N_FRAMES, bins)
    assert _snr_db(wave, listenable(wave, ones, domain)) >= 60
    silent = listenable(wave, torch.zeros_like(ones), domain)
    assert silent.abs().max().item() == 0.0


@pytest.mark.parametrize("method", spectral.MEL_TO_LINEAR)
def test_mel_to_linear_keeps_ones_zeros_and_bounds(method):
    assert torch.allclose(spectral.mel_mask_to_linear(torch.ones(1, 3, N_MELS), method), torch.ones(1, 3, N_FREQS), atol=1e-6)
    assert torch.equal(spectral.mel_mask_to_linear(torch.zeros(1, 3, N_MELS), method), torch.zeros(1, 3, N_FREQS))
    rand = spectral.mel_mask_to_linear(torch.rand(2, 5, N_MELS), method)
    assert rand.min() >= 0 and rand.max() <= 1 + 1e-6


def test_uncovered_bins_copy_the_nearest_band():
    fb = spectral.mel_filterbank()
    uncovered = (fb.sum(dim=1) == 0).nonzero().flatten().tolist()
    assert uncovered[0] == 0 and uncovered[-1] == N_FREQS - 1  # DC and the top are uncovered
    mask = torch.zeros(1, 1, N_MELS)
    mask[..., 0], mask[..., -1] = 0.3, 0.8
    lin = spectral.mel_mask_to_linear(mask)[0, 0]
    assert torch.allclose(lin[0], torch.tensor(0.3)) and torch.allclose(lin[-1], torch.tensor(0.8))


@pytest.mark.parametrize("method", spectral.MEL_TO_LINEAR)
@pytest.mark.parametrize("band", [5, 30, 60])
def test_one_mel_band_lands_in_its_frequency_range(method, band):
    mask = torch.zeros(1, 1, N_MELS)
    mask[..., band] = 1.0
    lin = spectral.mel_mask_to_linear(mask, method)[0, 0]
    support = (spectral.mel_filterbank()[:, band] > 0).numpy()
    energy = lin.square().numpy()
    assert energy[support].sum() / energy.sum() >= 0.99


def test_listenable_mel_band_keeps_only_that_band():
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    wave = torch.from_numpy((0.3 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32))[None]
    fb = spectral.mel_filterbank()
    bin_6k = round(6000 * N_FFT / SAMPLE_RATE)
    mask = torch.zeros(1, N_FRAMES, N_MELS)
    mask[..., fb[bin_6k].argmax()] = 1.0
    out = listenable(wave, mask, "mel")[0].numpy()
    spec = np.abs(np.fft.rfft(out[EDGE:-EDGE]))
    freqs = np.fft.rfftfreq(len(out) - 2 * EDGE, 1 / SAMPLE_RATE)
    assert abs(freqs[spec.argmax()] - 6000) < 5
    low = spec[np.abs(freqs - 440) < 20].max()
    assert low < 1e-3 * spec.max()


def test_masks_multiply_power_before_the_log():
    wave = _noise(batch=1)
    P = spectral.power(spectral.stft(wave))
    mel = spectral.mel_power(P)
    half = torch.full((1, N_FRAMES, N_MELS), 0.5)
    # a magnitude gain of 1/2 is a power gain of 1/4: -6.02 dB everywhere
    diff = spectral.masked_log_mel_from_mel(mel, half) - spectral.to_db(mel)
    assert torch.allclose(diff, torch.full_like(diff, -6.0206), atol=1e-3)
    diff = spectral.masked_log_mel_from_power(P, torch.full((1, N_FRAMES, N_FREQS), 0.5)) - spectral.to_db(mel)
    assert torch.allclose(diff, torch.full_like(diff, -6.0206), atol=1e-3)
    # zero mask -> the floor (silence), not 0 dB
    floor = spectral.masked_log_mel_from_mel(mel, torch.zeros_like(half))
    assert torch.all(floor == 10 * np.log10(spectral.AMIN))


@pytest.mark.parametrize("domain, bins", [("mel", N_MELS), ("stft", N_FREQS)])
@pytest.mark.parametrize("method", spectral.MEL_TO_LINEAR)
def test_listenable_fft_and_matmul_implementations_agree(domain, bins, method):
    """The two CPU implementations of the one listenable operation: torch FFT and MatMul-DFT."""
    wave = _noise(batch=2, seed=3)
    mask = torch.rand(2, N_FRAMES, bins, generator=torch.Generator().manual_seed(4))
    fft = listenable(wave, mask, domain, FftSpectral(), method)
    matmul = listenable(wave, mask, domain, MatMulSpectral(), method)
    assert float((fft - matmul).abs().max()) <= 2e-4


def test_analysis_fft_and_matmul_implementations_agree():
    wave = _noise(batch=2, seed=5)
    a, b = FftSpectral().analyse(wave, True), MatMulSpectral().analyse(wave, True)
    assert torch.allclose(a.mel, b.mel, rtol=1e-3, atol=1e-6)
    assert torch.allclose(a.power, b.power, rtol=1e-3, atol=1e-6)


def test_many_prompts_run_the_per_pair_steps_in_groups_with_the_same_results(tiny_clap, monkeypatch):
    """On the CPU, K prompts a clip run the decoder, the listenable inverse and the masked check
    in groups of about B pairs (`model.clip_groups`); the outputs are those of one pass over
    all B x K pairs."""
    from lmaczs_cli import model as M
    from lmaczs_cli.decoder import DecoderConfig, MaskDecoder

    torch.manual_seed(0)
    decoder = MaskDecoder(DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4)).eval()
    module = M.ExplainerModule(tiny_clap, decoder, "mel").eval()
    waves = _noise(batch=3)
    text = torch.nn.functional.normalize(torch.randn(3, 2, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert M.clip_groups(3, 2, waves) == [slice(0, 2), slice(2, 3)]
    assert M.clip_groups(3, 1, waves) == [slice(0, 3)]
    with torch.no_grad():
        grouped = module(waves, text)
        monkeypatch.setattr(M, "clip_groups", lambda B, K, masks: [slice(0, B)])
        whole = module(waves, text)
    for name in ("masks", "audio", "similarity", "masked_similarity"):
        torch.testing.assert_close(grouped[name], whole[name], rtol=1e-5, atol=1e-6)
