"""`lmaczs explain --backend onnx|trt` through one Runner interface, from `lmaczs export`'s folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from lmaczs_cli.cli import main  # noqa: E402
from lmaczs_cli.decoder import DecoderConfig, MaskDecoder, save_decoder  # noqa: E402

PROMPTS = ("dog barking", "rain")


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def decoder_dir(tiny_clap, tmp_path_factory):
    """A (random) decoder saved as `lmaczs train` saves one, for --clap random:tiny."""
    torch.manual_seed(0)
    decoder = MaskDecoder(DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4))
    out = tmp_path_factory.mktemp("decoder")
    save_decoder(decoder, out, {"clap": {"identity": tiny_clap.identity(), "source": "random:tiny"}, "domain": "mel"})
    return out


@pytest.fixture(scope="module")
def engines(decoder_dir, tmp_path_factory):
    """`lmaczs export` of the tiny CLAP + decoder (the CLI, end to end)."""
    out = tmp_path_factory.mktemp("engines")
    result = _invoke("export", "--clap", "random:tiny", "--decoder", str(decoder_dir), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "TensorRT 10.15 operator audit: ok" in result.output
    assert {p.name for p in out.iterdir()} >= {"audio_encoder.onnx", "text_encoder.onnx", "explainer.onnx",
                                               "manifest.json"}
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 3-s clip (repeat-padded to one window) and a 14-s one (two stitched windows)."""
    d = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for name, seconds, f in (("short.wav", 3, 440), ("long.wav", 14, 1500)):
        t = np.arange(seconds * 48_000) / 48_000
        sf.write(d / name, (0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32),
                 48_000)
    return d


@pytest.fixture(scope="module")
def torch_run(clips, decoder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_out")
    args = [a for p in PROMPTS for a in ("-p", p)]
    result = _invoke("explain", str(clips), *args, "--clap", "random:tiny", "--decoder", str(decoder_dir),
                     "--out", str(out), "--save-mask")
    assert result.exit_code == 0, result.output
    return out


def _results(out) -> dict[tuple, dict]:
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {(r["file"], r["prompt"], r["window"]): r for r in lines}


def test_explain_backend_onnx_matches_torch_from_the_export_folder_alone(clips, engines, torch_run, tmp_path,
                                                                          monkeypatch):
    import lmaczs_cli.clap as clap_mod
    import lmaczs_cli.decoder as decoder_mod

    def no_torch_weights(*a, **k):
        raise AssertionError("--backend onnx loaded torch weights")

    for mod, name in ((clap_mod, "build_laion_clap"), (clap_mod, "load_clap"), (decoder_mod, "load_decoder")):
        monkeypatch.setattr(mod, name, no_torch_weights)
    out = tmp_path / "onnx_out"
    args = [a for p in PROMPTS for a in ("-p", p)]
    result = _invoke("explain", str(clips), *args, "--backend", "onnx", "--engines", str(engines),
                     "--out", str(out), "--save-mask")
    assert result.exit_code == 0, result.output
    ours, ref = _results(out), _results(torch_run)
    assert set(ours) == set(ref) and len(ref) == 2 * 1 + 2 * 2    # short: 1 window, long: 2, x 2 prompts
    for key, r in ref.items():
        assert abs(ours[key]["similarity"] - r["similarity"]) <= 1e-4 * max(1.0, abs(r["similarity"]))
        assert abs(ours[key]["masked_similarity"] - r["masked_similarity"]) <= 1e-4
        assert abs(ours[key]["mask_mean"] - r["mask_mean"]) <= 1e-4
    wavs = sorted(p.relative_to(torch_run) for p in torch_run.rglob("*.wav"))
    assert len(wavs) == 4
    for rel in wavs:
        a, _ = sf.read(out / rel, dtype="float32")
        b, _ = sf.read(torch_run / rel, dtype="float32")
        snr = 10 * np.log10((b ** 2).sum() / max(((a - b) ** 2).sum(), 1e-30))
        assert snr >= 40, rel
    for mask in torch_run.rglob("*.npz"):
        m_ours = np.load(out / mask.relative_to(torch_run))["mask"]
        assert np.abs(m_ours - np.load(mask)["mask"]).max() <= 1e-3


def test_runner_explainer_explain_prompts_matches_torch(engines, decoder_dir):
    from lmaczs_cli.explain import Explainer

    wave = (0.2 * np.sin(2 * np.pi * 700 * np.arange(5 * 48_000) / 48_000)).astype(np.float32)
    ref = Explainer.load(clap="random:tiny", decoder=decoder_dir, device="cpu").explain_prompts(wave, PROMPTS)
    got = Explainer.load(backend="onnx", engines=engines, device="cpu").explain_prompts(wave, PROMPTS)
    for a, b in zip(got, ref):
        assert a.prompt == b.prompt and a.mask.shape == b.mask.shape == (5 * 100 + 1, 64)
        assert np.abs(a.mask - b.mask).max() <= 1e-3
        assert abs(a.similarity - b.similarity) <= 1e-5
        assert 10 * np.log10((b.audio ** 2).sum() / ((a.audio - b.audio) ** 2).sum()) >= 40


def test_onnx_backend_refuses_a_changed_graph(engines, tmp_path):
    import shutil

    from lmaczs_cli.backends import BackendError, OnnxRunner

    copy = tmp_path / "copy"
    shutil.copytree(engines, copy)
    with open(copy / "text_encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BackendError, match="does not match its manifest"):
        OnnxRunner(copy)


def test_backend_onnx_needs_engines(clips, tmp_path):
    result = _invoke("explain", str(clips), "-p", "dog", "--backend", "onnx", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "--backend onnx needs --engines DIR" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_trt_without_a_gpu_exits_2_saying_so(clips, engines, tmp_path):
    result = _invoke("export", "--clap", "random:tiny", "--trt", "--out", str(tmp_path / "e"))
    assert result.exit_code == 2
    assert "--trt: TensorRT engines need a CUDA GPU, and none is visible here" in result.output
    assert not (tmp_path / "e").exists()
    result = _invoke("explain", str(clips), "-p", "dog", "--backend", "trt", "--engines", str(engines),
                     "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "--backend trt: TensorRT engines need a CUDA GPU" in result.output


@pytest.mark.requires_trt
def test_trt_engines_match_onnx_runtime(engines):
    """TensorRT build + run (GPU with tensorrt only): fp32 engines vs ONNX Runtime, batch 1 and 3."""
    pytest.importorskip("tensorrt", reason="tensorrt is not installed")
    if not torch.cuda.is_available():
        pytest.skip("requires a CUDA GPU")
    from lmaczs_cli.backends import OnnxRunner, TrtRunner
    from lmaczs_cli.export.to_trt import engine_key, export_engines

    keys = export_engines(engines, fp16=False, max_batch=4, max_prompts=4)
    assert engine_key(engines / "explainer.engine") == keys["explainer"]
    trt_runner, ort_runner = TrtRunner(engines), OnnxRunner(engines, device="cpu")
    g = torch.Generator().manual_seed(0)
    for B in (1, 3):
        waves = 0.1 * torch.randn(B, 480_000, generator=g)
        text = torch.nn.functional.normalize(torch.randn(B, 2, 512, generator=g), dim=-1)
        a, b = trt_runner.explain(waves, text), ort_runner.explain(waves, text)
        assert (a["masks"].cpu() - b["masks"]).abs().max() <= 1e-3
        assert (a["similarity"].cpu() - b["similarity"]).abs().max() <= 1e-4
    again = export_engines(engines, fp16=False, max_batch=4, max_prompts=4)   # keys match: kept, not rebuilt
    assert again == keys


def test_backend_onnx_refuses_a_model_option_it_would_ignore(clips, engines, decoder_dir, tmp_path):
    result = _invoke("explain", str(clips), "-p", "dog", "--backend", "onnx", "--engines", str(engines),
                     "--decoder", str(decoder_dir), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "--backend onnx runs the model exported in --engines; drop --clap/--decoder" in result.output


def test_onnx_runner_calls_flush_denormals_on_every_thread():
    """HTSAT's shifted-window softmax leaves denormal weights that make ORT's MatMul ~18x slower;
    the runner's ORT calls run where denormals are flushed: ORT's pool threads (its session
    option) and the calling worker thread (`DenormalFreeCaller`)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from lmaczs_cli.backends import DenormalFreeCaller, session_options

    caller = DenormalFreeCaller()
    if not caller.flushes:
        pytest.skip("this CPU has no flush-to-zero mode (torch.set_flush_denormal returned False)")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "one"], ["y"])], "times_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.full(100_000, 1e-40, np.float32)                    # denormal in float32
    plain = ort.InferenceSession(model.SerializeToString(), ort.SessionOptions(), providers=["CPUExecutionProvider"])
    assert (plain.run(None, {"x": x})[0] == x).all()          # by default ORT keeps them
    ours = ort.InferenceSession(model.SerializeToString(), session_options(threads=2),
                                providers=["CPUExecutionProvider"])
    assert (caller(ours.run, None, {"x": x})[0] == 0).all()   # split over both threads, all flushed
    assert (caller(ours.run, None, {"x": x[:4]})[0] == 0).all()   # small: the calling thread alone


def test_onnx_sessions_leave_the_cores_idle_between_runs():
    """ORT's pool threads spin after a run by default (~40 ms of CPU in the next 100 ms idle on 2
    threads), taking the cores from whatever runs beside them (decode and writer threads, torch);
    our sessions' threads block instead."""
    import time

    import onnxruntime as ort
    from onnx import TensorProto, helper

    from lmaczs_cli.backends import session_options

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "square",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 256])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    s = ort.InferenceSession(model.SerializeToString(), session_options(threads=2), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((256, 256), np.float32)
    burned = []
    for _ in range(3):
        s.run(None, {"x": x})
        c0 = time.process_time()
        time.sleep(0.1)
        burned.append(time.process_time() - c0)
    assert min(burned) < 0.01, burned


def test_onnx_no_check_and_one_pass_top_k_graphs_match_torch(engines, decoder_dir):
    """The export folder's explainer_nocheck graph leaves out the masked similarity (and its encoder
    pass) and otherwise equals the full graph; explainer_topk picks each window's labels from the
    same forward that explains them, as torch's one-pass top-k does."""
    from lmaczs_cli.backends import OnnxRunner, load_runner

    assert {"explainer_nocheck", "explainer_topk"} <= set(json.loads((engines / "manifest.json").read_text())["graphs"])
    onnx = OnnxRunner(engines, device="cpu", threads=2)
    ref = load_runner("torch", clap="random:tiny", decoder=decoder_dir, device="cpu")
    g = torch.Generator().manual_seed(3)
    waves = 0.2 * torch.randn(3, 480_000, generator=g)
    text = torch.nn.functional.normalize(torch.randn(3, 2, 512, generator=g), dim=-1)
    full, lean = onnx.explain(waves, text, check=True), onnx.explain(waves, text, check=False)
    assert "masked_similarity" in full and set(lean) == {"masks", "audio", "similarity"}
    assert np.abs(full["masks"].numpy() - lean["masks"].numpy()).max() <= 1e-6
    labels = ref.embed_text([f"label {i}" for i in range(7)])
    got, want = onnx.explain_topk(waves, labels, 3), ref.explain_topk(waves, labels, 3)
    assert np.array_equal(got["topk"].numpy(), want["topk"].numpy())
    assert np.abs(got["scores"].numpy() - want["scores"].numpy()).max() <= 1e-5
    assert np.abs(got["masks"].numpy() - want["masks"].numpy()).max() <= 1e-3
    assert "masked_similarity" not in onnx.explain_topk(waves, labels, 3, check=False)


def test_torch_runner_on_the_cpu_runs_the_decoder_channels_last_with_the_same_masks(tiny_clap, decoder_dir):
    """On the CPU the decoder's convolution weights are laid out channels-last (faster oneDNN
    kernels for its few-channel full-resolution maps); the masks are those of the contiguous
    layout, and the saved weights and hash do not change."""
    from lmaczs_cli.backends import TorchRunner
    from lmaczs_cli.decoder import decoder_hash, load_decoder

    decoder, config = load_decoder(decoder_dir)
    before = decoder_hash(decoder)
    waves = torch.from_numpy((0.2 * np.random.default_rng(0).standard_normal((2, 480_000))).astype(np.float32))
    text = torch.nn.functional.normalize(torch.randn(2, 2, tiny_clap.cfg.joint_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    runner = TorchRunner(tiny_clap, decoder, config, device="cpu")
    convs = [m.weight for m in runner.decoder.modules()
             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert decoder_hash(decoder) == before
    fast = runner.explain(waves, text, check=False)["masks"]
    runner.decoder.to(memory_format=torch.contiguous_format)
    plain = runner.explain(waves, text, check=False)["masks"]
    assert (fast - plain).abs().max() <= 1e-4
