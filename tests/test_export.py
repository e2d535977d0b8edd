"""`lmaczs export`: ONNX graphs vs torch eager, dynamic batch, op audit, manifest (CPU, ONNX Runtime)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lmaczs_cli import spectral  # noqa: E402
from lmaczs_cli.audio import CLIP_SAMPLES  # noqa: E402
from lmaczs_cli.backends import session_options  # noqa: E402
from lmaczs_cli.decoder import DecoderConfig, MaskDecoder  # noqa: E402
from lmaczs_cli.model import ExplainerModule  # noqa: E402
from lmaczs_cli.export import audit, ops  # noqa: E402
from lmaczs_cli.export.graphs import export_patches  # noqa: E402
from lmaczs_cli.export.to_onnx import export_onnx, read_manifest  # noqa: E402
from lmaczs_cli.files import sha256_file  # noqa: E402

BATCHES = (1, 3, 8)
K = 2
EXPLAINER_FORBIDDEN = audit.EXPLAINER_FORBIDDEN


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Worst per-row relative error ||a - b|| / ||b|| (rows on axis 0)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def snr_db(test: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / max(((test - ref) ** 2).sum(), 1e-30)))


@pytest.fixture(scope="module")
def model(tiny_clap):
    torch.manual_seed(0)
    # with the text readout here; the STFT-domain test below exports a decoder without it
    decoder = MaskDecoder(DecoderConfig.for_clap(tiny_clap, width=16, heads=2, text_tokens=4,
                                                 text_readout=True)).eval()
    return tiny_clap, decoder


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """One export of the tiny CLAP + a small decoder, shared by the module."""
    clap, decoder = model
    out = tmp_path_factory.mktemp("export")
    manifest = export_onnx(clap, decoder, out, domain="mel", opset=17, max_batch=8)
    return out, manifest


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    t = torch.arange(CLIP_SAMPLES) / 48_000
    waves = 0.05 * torch.randn(8, CLIP_SAMPLES, generator=g)
    waves += 0.3 * torch.sin(2 * torch.pi * (300 + 200 * torch.arange(8)[:, None]) * t)   # distinct clips
    text = torch.nn.functional.normalize(torch.randn(8, K, 512, generator=g), dim=-1)
    return waves, text


def session(folder, name):
    return ort.InferenceSession(str(folder / name), session_options(threads=2), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def eager_explainer(model, inputs):
    """ExplainerModule with torch FFT spectral ops, eager, for the 8 clips (computed once): what the
    exported graph (the same module traced with MatMul-DFT ops) must reproduce."""
    clap, decoder = model
    waves, text = inputs
    with torch.no_grad():
        out = ExplainerModule(clap, decoder, "mel").eval()(waves, text)
    return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def onnx_explainer(exported, inputs):
    """ONNX Runtime explainer outputs at batch 1, 3 and 8 (rows 0..B-1) from the one export."""
    folder, _ = exported
    waves, text = inputs
    s = session(folder, "explainer.onnx")
    names = ["masks", "audio", "similarity", "masked_similarity"]
    return {B: dict(zip(names, s.run(names, {"waves": waves[:B].numpy(), "text": text[:B].numpy()})))
            for B in BATCHES}


# --------------------------------------------------------------------------- matmul front end / inverse


def test_matmul_stft_equals_torch_stft():
    wave = torch.randn(2, CLIP_SAMPLES, generator=torch.Generator().manual_seed(0))
    X = spectral.stft(wave)
    re, im = ops.stft_matmul(wave)
    scale = X.abs().max()
    assert float((re - X.real).abs().max() / scale) <= 1e-5
    assert float((im - X.imag).abs().max() / scale) <= 1e-5


def test_matmul_istft_equals_torch_istft():
    g = torch.Generator().manual_seed(2)
    X = spectral.stft(torch.randn(2, CLIP_SAMPLES, generator=g)) * torch.rand(2, 1001, 513, generator=g)
    ref = torch.istft(X.transpose(1, 2), n_fft=1024, hop_length=480, window=spectral.hann_window(),
                      center=True, length=CLIP_SAMPLES)
    ours = ops.istft_matmul(X.real, X.imag)
    assert float((ours - ref).abs().max()) <= 1e-4
    assert snr_db(ours.numpy(), ref.numpy()) > 100


@pytest.mark.parametrize("method", ["linear", "power"])
def test_gains_in_dft_order_equal_the_natural_gains(method):
    """mel_gain_dft_order (one MatMul with permuted weights) = spectral.mel_mask_to_linear then
    gain_dft_order (a Gather); a bin past Nyquist takes its mirror's gain."""
    masks = torch.rand(2, 1001, 64, generator=torch.Generator().manual_seed(5))
    natural = spectral.mel_mask_to_linear(masks, method)
    ours = ops.mel_gain_dft_order(masks, method)
    assert ours.shape == (2, 1001, 32, 1, 32)
    assert float((ours - ops.gain_dft_order(natural)).abs().max()) <= 1e-5
    flat = ours.flatten(-3)                                   # bin k1 + 32 k2 at k1 * 32 + k2
    for k in (0, 1, 100, 511, 512, 513, 1000):
        src = k if k <= 512 else 1024 - k
        assert float((flat[..., (k % 32) * 32 + k // 32] - natural[..., src]).abs().max()) <= 1e-5, k


def test_bicubic_matrix_equals_torch_interpolate():
    x = torch.randn(3, 1, 1001, 64, generator=torch.Generator().manual_seed(3))
    ref = torch.nn.functional.interpolate(x, (1024, 64), mode="bicubic", align_corners=True)
    assert float((ops.bicubic_matrix(1001, 1024) @ x - ref).abs().max()) <= 1e-5


def test_export_patches_keep_eager_results(tiny_clap, inputs):
    waves, _ = inputs
    logmel = spectral.log_mel(waves[:3])
    with torch.no_grad():
        ref, ref_h = tiny_clap.encode(logmel)
        with export_patches(tiny_clap):
            got, got_h = tiny_clap.encode(logmel)
        again, _ = tiny_clap.encode(logmel)
    assert float((got - ref).abs().max()) <= 1e-5
    assert all(float((a - b).abs().max()) <= 1e-4 for a, b in zip(got_h, ref_h))
    assert torch.equal(again, ref)            # patches are undone on exit
    assert "reshape_wav2img" not in vars(tiny_clap.branch)


# --------------------------------------------------------------------------- ORT vs torch


@pytest.mark.parametrize("B", BATCHES)
def test_audio_encoder_matches_torch(exported, tiny_clap, inputs, B):
    folder, _ = exported
    waves, _ = inputs
    emb, *hidden = session(folder, "audio_encoder.onnx").run(None, {"waves": waves[:B].numpy()})
    with torch.no_grad():
        ref, ref_h = tiny_clap.encode(spectral.log_mel(waves[:B]))
    assert emb.shape == (B, 512)
    assert rel_err(emb, ref.numpy()) <= 1e-4       # relative, per row: cosine would hide a frozen batch
    for h, r in zip(hidden, ref_h):
        assert rel_err(h, r.numpy()) <= 1e-4


@pytest.mark.parametrize("B", BATCHES)
def test_text_encoder_matches_torch(exported, tiny_clap, B):
    folder, _ = exported
    prompts = ["dog barking", "rain on a tin roof", "a car horn", "birdsong at dawn", "a kettle whistling",
               "footsteps", "applause", "a siren far away"][:B]
    ids = tiny_clap.tokenize(prompts).numpy().astype(np.int64)
    (emb,) = session(folder, "text_encoder.onnx").run(None, {"input_ids": ids})
    with torch.no_grad():
        ref = tiny_clap.encode_text(prompts).numpy()
    assert rel_err(emb, ref) <= 1e-4


@pytest.mark.parametrize("B", BATCHES)
def test_explainer_graph_matches_torch(onnx_explainer, eager_explainer, B):
    got, ref = onnx_explainer[B], eager_explainer
    assert got["masks"].shape == (B, K, 1001, 64) and got["audio"].shape == (B, K, CLIP_SAMPLES)
    assert np.abs(got["masks"] - ref["masks"][:B]).max() <= 1e-3
    assert snr_db(got["audio"], ref["audio"][:B]) >= 40
    assert rel_err(got["similarity"], ref["similarity"][:B]) <= 1e-4
    assert rel_err(got["masked_similarity"], ref["masked_similarity"][:B]) <= 1e-4


def test_explainer_rows_are_batch_independent(exported, onnx_explainer, inputs):
    """Row i of a batch of 8 equals clip i run alone (a frozen-batch graph fails this)."""
    folder, _ = exported
    waves, text = inputs
    s = session(folder, "explainer.onnx")
    batch = onnx_explainer[8]
    for i in (0, 5, 7):
        alone = dict(zip(batch, s.run(list(batch), {"waves": waves[i: i + 1].numpy(), "text": text[i: i + 1].numpy()})))
        assert np.abs(alone["masks"][0] - batch["masks"][i]).max() <= 1e-5
        assert snr_db(alone["audio"][0], batch["audio"][i]) >= 80
        assert np.abs(alone["similarity"][0] - batch["similarity"][i]).max() <= 1e-6
    # the clips differ, so equal rows are not a broadcast of row 0
    assert np.abs(batch["similarity"][0] - batch["similarity"][7]).max() > 1e-4


def test_explainer_takes_any_prompt_count(exported, inputs, model):
    folder, _ = exported
    waves, text = inputs
    text5 = torch.nn.functional.normalize(torch.randn(2, 5, 512, generator=torch.Generator().manual_seed(4)), dim=-1)
    masks, audio, sim = session(folder, "explainer.onnx").run(["masks", "audio", "similarity"],
                                                               {"waves": waves[:2].numpy(), "text": text5.numpy()})
    assert masks.shape == (2, 5, 1001, 64) and audio.shape == (2, 5, CLIP_SAMPLES) and sim.shape == (2, 5)
    with torch.no_grad():
        ref = ExplainerModule(*model, "mel").eval()(waves[:2], text5, check=False)
    assert np.abs(masks - ref["masks"].numpy()).max() <= 1e-3
    # the mask gain is broadcast over the prompts: each (clip, prompt) wav is its own
    for b in range(2):
        for k in range(5):
            assert snr_db(audio[b, k], ref["audio"][b, k].numpy()) >= 40, (b, k)


# --------------------------------------------------------------------------- graph audit and manifest


def test_graphs_pass_onnx_full_check(exported):
    folder, manifest = exported
    for g in manifest["graphs"].values():
        onnx.checker.check_model(str(folder / g["file"]), full_check=True)


def test_graphs_pass_the_tensorrt_op_audit(exported):
    folder, manifest = exported
    for name, g in manifest["graphs"].items():
        forbidden = EXPLAINER_FORBIDDEN if name == "explainer" else ()
        assert audit.audit(folder / g["file"], forbidden) == [], name


def test_explainer_graph_has_no_resize_stft_or_reflect_pad(exported):
    folder, _ = exported
    model = onnx.load(str(folder / "explainer.onnx"))
    types = {n.op_type for n in model.graph.node}
    assert not types & {"Resize", "STFT", "DFT", "Loop", "If", "Scan"}
    assert {"MatMul", "Slice", "Concat"} <= types
    pad_modes = {audit._attribute(n, "mode") for n in model.graph.node if n.op_type == "Pad"}
    assert pad_modes <= {"constant"}


def _one_node_model(op: str, **attrs) -> "onnx.ModelProto":
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inputs = ["x", "", "scales"] if op == "Resize" else ["x", "pads"]
    init = ([helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])] if op == "Resize"
            else [helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])])
    node = helper.make_node(op, inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [x], [y], initializer=init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_audit_rejects_cubic_resize_and_reflect_pad():
    assert any("mode='cubic'" in p for p in audit.audit(_one_node_model("Resize", mode="cubic")))
    assert audit.audit(_one_node_model("Resize", mode="linear")) == []
    assert any("Resize" in p for p in audit.audit(_one_node_model("Resize", mode="linear"), ("Resize",)))
    assert any("mode='reflect'" in p for p in audit.audit(_one_node_model("Pad", mode="reflect")))
    assert audit.audit(_one_node_model("Pad")) == []            # constant is Pad's default mode


def test_trt_table_is_pinned_with_its_source():
    table = audit.trt_table()
    assert table["source"].startswith("https://github.com/onnx/onnx-tensorrt")
    assert table["tensorrt_version"].startswith("10.")
    assert "STFT" in table["supported"] or "DFT" not in table["supported"]
    assert "LayerNormalization" in table["supported"] and "DFT" not in table["supported"]
    assert set(table["attribute_rules"]["Resize"]["mode"]) == {"nearest", "linear"}


def test_manifest_describes_the_graphs(exported, model):
    folder, manifest = exported
    clap, decoder = model
    assert read_manifest(folder) == json.loads((folder / "manifest.json").read_text()) == manifest
    ex = manifest["graphs"]["explainer"]
    assert ex["inputs"] == {"waves": ["batch", CLIP_SAMPLES], "text": ["batch", "prompts", 512]}
    assert ex["outputs"]["masks"] == ["batch", "prompts", 1001, 64]
    assert ex["outputs"]["audio"] == ["batch", "prompts", CLIP_SAMPLES]
    assert ex["dynamic_axes"]["text"] == {"0": "batch", "1": "prompts"}
    assert manifest["graphs"]["audio_encoder"]["outputs"]["embedding"] == ["batch", 512]
    assert manifest["graphs"]["text_encoder"]["inputs"] == {"input_ids": ["batch", 77]}
    assert manifest["opset"] == 17 and manifest["domain"] == "mel" and manifest["mel_to_linear"] == "linear"
    assert manifest["sources"]["clap"]["identity"] == clap.identity()
    assert set(manifest["versions"]) >= {"lmaczs", "torch", "onnx"}
    assert manifest["tensorrt_audit"] == {"tensorrt": "10.15", "source": audit.trt_table()["source"],
                                          "audio_encoder": [], "text_encoder": [], "explainer": []}
    for g in manifest["graphs"].values():
        assert sha256_file(folder / g["file"]) == g["sha256"]
        assert onnx.load(str(folder / g["file"])).opset_import[0].version == 17


def test_stft_domain_explainer_matches_torch(tiny_clap, inputs, tmp_path):
    """An STFT-grid decoder (1001 x 513 masks, log-power refinement) exports and runs the same."""
    from lmaczs_cli.export.to_onnx import export_explainer

    torch.manual_seed(1)
    decoder = MaskDecoder(DecoderConfig.for_clap(tiny_clap, domain="stft", width=16, heads=2, text_tokens=4)).eval()
    export_explainer(tiny_clap, decoder, tmp_path / "explainer.onnx", "stft")
    waves, text = inputs
    names = ["masks", "audio", "similarity", "masked_similarity"]
    got = dict(zip(names, session(tmp_path, "explainer.onnx").run(names, {"waves": waves[3:4].numpy(),
                                                                          "text": text[3:4].numpy()})))
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in ExplainerModule(tiny_clap, decoder, "stft").eval()(waves[3:4], text[3:4]).items()}
    assert got["masks"].shape == (1, K, 1001, 513)
    assert np.abs(got["masks"] - ref["masks"]).max() <= 1e-3
    assert snr_db(got["audio"], ref["audio"]) >= 40
    assert rel_err(got["masked_similarity"], ref["masked_similarity"]) <= 1e-4
    assert audit.audit(tmp_path / "explainer.onnx", EXPLAINER_FORBIDDEN) == []


def test_fp16_engines_keep_the_spectral_nodes_fp32(exported):
    """The TensorRT fp16 build pins `spectral_node`s to fp32: every Log, every DFT/iDFT stage
    MatMul and the mel MatMul are such nodes; no convolution or attention node is."""
    from onnx import numpy_helper

    from lmaczs_cli.export.to_trt import spectral_node

    folder, _ = exported
    model = onnx.load(str(folder / "explainer.onnx"))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts.update({o: numpy_helper.to_array(n.attribute[0].t) for o in n.output})
    fwd, inv = ops._fft_np(), ops._ifft_np()
    stages = [fwd[0], fwd[3], inv[0], inv[3]]

    def is_stage(name: str) -> bool:
        a = consts.get(name)
        return a is not None and any(a.shape == s.shape and np.array_equal(a, s) for s in stages)

    stage_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and any(is_stage(x) for x in n.input)]
    mel_matmuls = [n for n in model.graph.node
                   if n.op_type == "MatMul" and getattr(consts.get(n.input[1]), "shape", None) == (1024, 64)]
    assert len(stage_matmuls) == 4 and mel_matmuls             # DFT stages 1, 2; iDFT stages 1, 2; mel
    assert all(spectral_node(n.name) for n in stage_matmuls + mel_matmuls)
    assert all(spectral_node(n.name) for n in model.graph.node if n.op_type == "Log")
    model_ops = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Softmax", "LayerNormalization")]
    assert model_ops and not any(spectral_node(n.name) for n in model_ops)
