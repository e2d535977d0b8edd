"""The fast CUDA torch path: half precision with a float32 front end, fixed-shape buckets under
CUDA graphs or torch.compile, pinned copies; and the prepared device check (bench/gpu.sh).

What needs no GPU runs here on the CPU (autocast, bucket padding, the device check's dry run);
tests marked ``requires_cuda`` run on a CUDA machine (``bench/gpu.sh`` runs them) and skip here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmaczs_cli import spectral
from lmaczs_cli.audio import CLIP_SAMPLES, SAMPLE_RATE
from lmaczs_cli.decoder import DecoderConfig, MaskDecoder
from lmaczs_cli.device import (BUCKETS, DeviceError, FixedShapeSteps, bucket_chunks, compile_mode, half_dtype,
                               pad_rows)
from lmaczs_cli.environment import onnxruntime_providers
from lmaczs_cli.model import ExplainerModule

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def square_wave(B: int = 2) -> torch.Tensor:
    """Full-scale square waves (B, 480000): the loudest input there is (bin power ~ 1e5, past float16's 65504)."""
    t = torch.arange(CLIP_SAMPLES) / SAMPLE_RATE
    freqs = 110.0 * (1 + torch.arange(B))[:, None]
    return torch.sign(torch.sin(2 * torch.pi * freqs * t)).float()


def snr_db(test: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / max(((test - ref) ** 2).sum(), 1e-30)))


def tiny_models() -> tuple:
    """The tiny CLAP and a small decoder, seeded: every call gives the same weights (a runner moves
    its models to its device, so each runner of a comparison gets its own)."""
    from lmaczs_cli.clap import random_clap

    clap = random_clap("tiny", seed=0)
    torch.manual_seed(0)
    return clap, MaskDecoder(DecoderConfig.for_clap(clap, width=16, heads=2, text_tokens=4)).eval()


@pytest.fixture(scope="module")
def decoder(tiny_clap):
    torch.manual_seed(0)
    return MaskDecoder(DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4)).eval()


@pytest.fixture(scope="module")
def text():
    return torch.nn.functional.normalize(torch.randn(2, 2, 512, generator=torch.Generator().manual_seed(1)), dim=-1)


@pytest.fixture(scope="module")
def fp32_square(tiny_clap, decoder, text):
    with torch.no_grad():
        return ExplainerModule(tiny_clap, decoder, "mel").eval()(square_wave(), text)


# --------------------------------------------------------------------------- precision (CPU autocast)


def test_a_full_scale_square_wave_overflows_float16_power():
    """Why the front end stays float32: its STFT bin power is past float16's range."""
    power = spectral.power(spectral.stft(square_wave(1)))
    assert float(power.max()) > 65504 and torch.isinf(power.half()).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_front_end_stays_float32_under_autocast(tiny_clap, decoder, dtype):
    model = ExplainerModule(tiny_clap, decoder, "mel").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        feats = model.features(square_wave(1))
    assert feats.mel.dtype == feats.logmel.dtype == torch.float32
    assert torch.isfinite(feats.logmel).all() and float(feats.logmel.max()) > 30     # loud, and finite
    assert torch.isfinite(feats.embedding.float()).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_explains_a_full_scale_square_wave_without_inf_or_nan(tiny_clap, decoder, text,
                                                                             fp32_square, precision):
    """The torch runner's autocast path on the CPU: every output finite and near float32's."""
    from lmaczs_cli.backends import TorchRunner

    runner = TorchRunner(tiny_clap, decoder, {"domain": "mel"}, device="cpu", precision=precision, compile="off")
    assert runner.half == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    out = runner.explain(square_wave(), text)
    for name, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
    # the parity target is 2e-2 (fp16 measures 0.004 here); bf16's 8-bit mantissa misses it (0.034),
    # which is why float16 is the CUDA default
    error = float((out["masks"] - fp32_square["masks"]).abs().max())
    assert error <= (2e-2 if precision == "fp16" else 6e-2)
    assert snr_db(out["audio"].numpy(), fp32_square["audio"].numpy()) >= 30
    assert float((out["similarity"] - fp32_square["similarity"]).abs().max()) <= 2e-2


def test_half_dtype_defaults_float16_on_cuda_and_float32_on_cpu():
    assert half_dtype("auto", torch.device("cuda")) is torch.float16
    assert half_dtype("auto", torch.device("cpu")) is None
    assert half_dtype("fp16", torch.device("cpu")) is torch.float16
    with pytest.raises(DeviceError, match="use one of auto, fp32, bf16, fp16"):
        half_dtype("int8", torch.device("cpu"))


def test_half_precision_weights_take_their_inputs_cast(tiny_clap, decoder, text, fp32_square):
    """The export's fp16 variant: encoder and decoder weights in float16 on a float32 front end
    (``to_onnx.half_precision``), weights restored exactly afterwards."""
    from lmaczs_cli.export.to_onnx import half_precision

    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    model = ExplainerModule(tiny_clap, decoder, "mel").eval()
    with half_precision(tiny_clap, decoder), torch.no_grad():
        assert model.encoder_dtype == torch.float16
        out = model(square_wave(), text)
    assert out["masks"].dtype == torch.float16 and out["similarity"].dtype == torch.float32
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    assert float((out["masks"].float() - fp32_square["masks"]).abs().max()) <= 2e-2
    assert model.encoder_dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in decoder.state_dict().items())


# --------------------------------------------------------------------------- fixed shapes


def test_bucket_chunks_cover_the_rows_with_the_fewest_shapes():
    assert bucket_chunks(1) == [(1, 1)] and bucket_chunks(3) == [(3, 4)] and bucket_chunks(64) == [(64, 64)]
    assert bucket_chunks(70) == [(64, 64), (6, 8)] and bucket_chunks(0) == []
    assert bucket_chunks(5, (2, 4)) == [(4, 4), (1, 2)]
    assert all(sum(r for r, _ in bucket_chunks(n)) == n for n in range(200))
    assert {b for n in range(1, 200) for _, b in bucket_chunks(n)} == set(BUCKETS)


def test_pad_rows_repeats_the_first_row():
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(pad_rows(x, 5), torch.tensor([[0., 1], [2, 3], [4, 5], [0, 1], [0, 1]]))
    assert pad_rows(x, 3) is x


def test_padded_buckets_give_the_unpadded_rows(tiny_clap, decoder):
    """5 clips run as a padded bucket of 4 and one of 2 (buckets 2, 4): each row equals the
    clip run alone, so padding never leaks into the real rows."""
    model = ExplainerModule(tiny_clap, decoder, "mel").eval()
    g = torch.Generator().manual_seed(3)
    waves = 0.3 * torch.randn(5, CLIP_SAMPLES, generator=g)
    text = torch.nn.functional.normalize(torch.randn(5, 1, 512, generator=g), dim=-1)
    steps = FixedShapeSteps("eager", torch.device("cpu"), None, buckets=(2, 4))
    seen = []

    def step(w, t):
        seen.append(w.shape[0])
        return model(w, t, check=False, listen=False)

    with torch.no_grad():
        got = steps.run("explain", step, waves, text)
        alone = [model(waves[i:i + 1], text[i:i + 1], check=False, listen=False) for i in (0, 4)]
    assert seen == [4, 2] and got["masks"].shape == (5, 1, 1001, 64)
    for i, ref in zip((0, 4), alone):
        assert float((got["masks"][i] - ref["masks"][0]).abs().max()) <= 1e-5
        assert float((got["similarity"][i] - ref["similarity"][0]).abs().max()) <= 1e-6


@pytest.mark.skipif(CUDA, reason="checks the message given without a GPU")
def test_graphs_and_compile_need_cuda_and_say_so():
    assert compile_mode("auto", torch.device("cpu")) == "off"
    with pytest.raises(DeviceError, match="compile 'graphs' needs a CUDA device .*use compile='off'"):
        compile_mode("graphs", torch.device("cpu"))
    with pytest.raises(DeviceError, match="use one of auto, graphs, inductor, off"):
        compile_mode("fast", torch.device("cpu"))


def test_onnxruntime_providers_name_the_fix_for_two_distributions(monkeypatch):
    from importlib import metadata

    here = onnxruntime_providers()
    assert "CPUExecutionProvider" in here["providers"] and "onnxruntime" in here["distributions"]
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.30.0" if name.startswith("onnxruntime") else real(name))
    both = onnxruntime_providers()
    assert set(both["distributions"]) == {"onnxruntime", "onnxruntime-gpu"}
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in both["problem"]


# --------------------------------------------------------------------------- the device check


def test_device_check_dry_run_writes_json_and_markdown(tmp_path):
    """bench/gpu.sh --dry-run: every section of the device check on the CPU at tiny sizes."""
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                         timeout=900, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["dry_run"] and result["device"] == "cpu" and not result["errors"], result["errors"]
    sections = {r["section"] for r in result["rows"]}
    assert sections >= {"embed", "explain", "folder", "train"}
    explain = [r for r in result["rows"] if r["section"] == "explain"]
    assert {r["check"] for r in explain} == {True, False} and all(r["clips_per_s"] > 0 for r in explain)
    train = next(r for r in result["rows"] if r["section"] == "train")
    assert train["steps"] >= 2 and train["clips_per_s"] > 0 and len(train["losses"]) >= 2
    md = (tmp_path / "gpu.md").read_text()
    assert "| explain |" in md and "## Targets" in md


# --------------------------------------------------------------------------- on a CUDA GPU


@pytest.mark.requires_cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("domain", ["mel", "stft"])
def test_triton_kernel_matches_torch_reference_on_the_gpu(domain):
    """Full-size windows (1001 frames), 2 clips x 3 prompts, compiled for the GPU (not the interpreter)."""
    from lmaczs_cli.kernels import istft

    g = torch.Generator().manual_seed(0)
    X = spectral.stft(torch.randn(2, CLIP_SAMPLES, generator=g)).cuda()
    bins = 64 if domain == "mel" else 513
    masks = torch.rand(6, 1001, bins, generator=g).cuda()
    W = spectral.mel_to_linear_weights("cuda") if domain == "mel" else None
    got = istft.masked_istft(X.real, X.imag, masks, 3, W, CLIP_SAMPLES)
    ref = istft.masked_istft_reference(X.real, X.imag, masks, 3, W, CLIP_SAMPLES)
    assert snr_db(got.cpu().numpy(), ref.cpu().numpy()) >= 60


@pytest.mark.requires_cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_explain_matches_cpu_explain():
    """The default CUDA path (fp16, Triton listenable step, CUDA graphs) vs CPU float32:
    masks within 2e-2, listenable audio SNR >= 40 dB, similarities within 1e-2."""
    from lmaczs_cli.backends import TorchRunner

    g = torch.Generator().manual_seed(5)
    waves = 0.3 * torch.randn(3, CLIP_SAMPLES, generator=g)
    text = torch.nn.functional.normalize(torch.randn(3, 2, 512, generator=g), dim=-1)
    cpu = TorchRunner(*tiny_models(), {"domain": "mel"}, device="cpu").explain(waves, text)
    gpu_runner = TorchRunner(*tiny_models(), {"domain": "mel"}, device="cuda")
    assert gpu_runner.compile == "graphs" and gpu_runner.half is torch.float16
    gpu = gpu_runner.to_host(gpu_runner.explain(waves, text))
    assert float((gpu["masks"] - cpu["masks"]).abs().max()) <= 2e-2
    assert snr_db(gpu["audio"].numpy(), cpu["audio"].numpy()) >= 40
    assert float((gpu["similarity"] - cpu["similarity"]).abs().max()) <= 1e-2
    assert float((gpu["masked_similarity"] - cpu["masked_similarity"]).abs().max()) <= 2e-2


@pytest.mark.requires_cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["graphs", "inductor"])
def test_graphed_and_compiled_steps_match_eager(mode):
    """Same precision, fixed-shape step vs eager: 3 clips padded to a bucket of 4, twice (the
    second call replays), rows unchanged. (inductor: one shape only, compiling takes a while.)"""
    from lmaczs_cli.backends import TorchRunner

    g = torch.Generator().manual_seed(6)
    waves = 0.3 * torch.randn(3, CLIP_SAMPLES, generator=g)
    text = torch.nn.functional.normalize(torch.randn(3, 2, 512, generator=g), dim=-1)
    eager = TorchRunner(*tiny_models(), {"domain": "mel"}, device="cuda", compile="off").explain(waves, text)
    runner = TorchRunner(*tiny_models(), {"domain": "mel"}, device="cuda", compile=mode)
    for _ in range(2):
        fast = runner.explain(waves, text)
        assert float((fast["masks"] - eager["masks"]).abs().max()) <= 2e-3
        assert snr_db(fast["audio"].cpu().numpy(), eager["audio"].cpu().numpy()) >= 50
    if mode == "graphs":
        other = runner.explain(waves[:1], text[:1])            # another bucket does not disturb the first
        assert float((other["masks"][0] - eager["masks"][0]).abs().max()) <= 2e-3
        assert float((runner.explain(waves, text)["masks"] - eager["masks"]).abs().max()) <= 2e-3
        emb = runner.embed_audio(waves)
        assert emb.shape == (3, 512) and torch.isfinite(emb).all()


@pytest.mark.requires_cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_constants_are_copied_to_the_gpu_once_and_outputs_come_back_pinned():
    from lmaczs_cli.device import to_host

    a, b = spectral.hann_window("cuda"), spectral.hann_window("cuda")
    assert a.is_cuda and a.data_ptr() == b.data_ptr()
    host = to_host({"x": a * 2, "n": torch.arange(3)})
    assert host["x"].is_pinned() and torch.equal(host["x"], spectral.hann_window() * 2)
