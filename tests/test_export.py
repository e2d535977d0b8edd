"""`lmaczs export`: ONNX graphs vs torch eager, dynamic batch, op audit, manifest (CPU, ONNX Runtime)."""
from __future__ import annotations

import dataclasses
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


def test_topk_nocheck_graph_omits_the_check_and_explains_the_same_labels(exported, inputs):
    """explainer_topk_nocheck: the outputs of explainer_topk without masked_similarity (nor the
    masked encoder pass behind it), for the same labels, masks and audio; and the runner takes
    it when asked for no check."""
    from lmaczs_cli.backends import OnnxRunner

    folder, manifest = exported
    waves, _ = inputs
    labels = torch.nn.functional.normalize(torch.randn(6, 512, generator=torch.Generator().manual_seed(5)), dim=-1)
    feeds = {"waves": waves[:3].numpy(), "labels": labels.numpy(), "k": np.zeros(3, np.float32)}
    spec = manifest["graphs"]["explainer_topk_nocheck"]
    assert spec["file"] == "explainer_topk_nocheck.onnx"
    assert list(spec["outputs"]) == ["scores", "topk", "masks", "audio", "similarity"]
    full_s, lean_s = session(folder, "explainer_topk.onnx"), session(folder, "explainer_topk_nocheck.onnx")
    assert [o.name for o in lean_s.get_outputs()] == list(spec["outputs"])
    full = dict(zip([o.name for o in full_s.get_outputs()], full_s.run(None, feeds)))
    lean = dict(zip(spec["outputs"], lean_s.run(None, feeds)))
    assert "masked_similarity" in full
    assert np.array_equal(lean["topk"], full["topk"]) and lean["topk"].shape == (3, 3)
    for name in ("scores", "masks", "audio", "similarity"):
        assert np.abs(lean[name] - full[name]).max() <= 1e-5, name
    # one encoder pass, not two: the graph holds half the check graph's attention Softmaxes
    softmax = {g: sum(n.op_type == "Softmax" for n in onnx.load(str(folder / f"{g}.onnx")).graph.node)
               for g in ("explainer_topk", "explainer_topk_nocheck", "explainer_nocheck")}
    assert softmax["explainer_topk_nocheck"] == softmax["explainer_nocheck"] < softmax["explainer_topk"]

    runner = OnnxRunner(folder, device="cpu", threads=1)
    seen = []
    runner.session = lambda graph, _s=runner.session: seen.append(graph) or _s(graph)
    out = runner.explain_topk(waves[:3], labels, 3, check=False)
    assert seen == ["explainer_topk_nocheck"] and set(out) == {"scores", "topk", "masks", "audio", "similarity"}
    assert np.array_equal(out["topk"].numpy(), full["topk"])


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
                                          **{g: [] for g in manifest["graphs"]}}
    assert set(manifest["graphs"]) >= {"audio_encoder", "text_encoder", "explainer"}
    assert manifest["precision"] == "fp32"
    for g in manifest["graphs"].values():
        assert sha256_file(folder / g["file"]) == g["sha256"]
        assert onnx.load(str(folder / g["file"])).opset_import[0].version == 17
        assert g["precision"] == "fp32" and set(g["dtypes"]) == set(g["inputs"]) | set(g["outputs"])
    assert manifest["graphs"]["text_encoder"]["dtypes"] == {"input_ids": "int64", "embedding": "float"}
    assert manifest["graphs"]["explainer"]["dtypes"]["masks"] == "float"


def test_stft_domain_explainer_matches_torch(tiny_clap, inputs, tmp_path):
    """An STFT-grid decoder (1001 x 513 masks, log-power refinement) at an operating point other
    than 0 (its logit_bias is in the graph) exports and runs the same."""
    from lmaczs_cli.export.to_onnx import export_explainer

    torch.manual_seed(1)
    decoder = MaskDecoder(DecoderConfig.for_clap(tiny_clap, domain="stft", width=16, heads=2, text_tokens=4,
                                                 logit_bias=-2.0)).eval()
    export_explainer(tiny_clap, decoder, tmp_path / "explainer.onnx", "stft")
    waves, text = inputs
    names = ["masks", "audio", "similarity", "masked_similarity"]
    got = dict(zip(names, session(tmp_path, "explainer.onnx").run(names, {"waves": waves[3:4].numpy(),
                                                                          "text": text[3:4].numpy()})))
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in ExplainerModule(tiny_clap, decoder, "stft").eval()(waves[3:4], text[3:4]).items()}
    assert got["masks"].shape == (1, K, 1001, 513)
    assert np.abs(got["masks"] - ref["masks"]).max() <= 1e-3
    decoder.cfg = dataclasses.replace(decoder.cfg, logit_bias=0.0)      # the same weights at bias 0
    with torch.no_grad():
        at0 = ExplainerModule(tiny_clap, decoder, "stft").eval()(waves[3:4], text[3:4])["masks"].double()
    shifted = torch.sigmoid(torch.logit(at0) - 2.0).numpy()
    assert np.abs(got["masks"] - shifted).max() <= 1e-3 and np.abs(got["masks"] - at0.numpy()).max() > 0.1
    assert snr_db(got["audio"], ref["audio"]) >= 40
    assert rel_err(got["masked_similarity"], ref["masked_similarity"]) <= 1e-4
    assert audit.audit(tmp_path / "explainer.onnx", EXPLAINER_FORBIDDEN) == []


# --------------------------------------------------------------------------- the fp16 variant


@pytest.fixture(scope="module")
def fp16_explainer(model, tmp_path_factory):
    """explainer.onnx traced with float16 encoder and decoder weights (`lmaczs export --fp16`)."""
    from lmaczs_cli.export.to_onnx import export_explainer, half_precision

    clap, decoder = model
    path = tmp_path_factory.mktemp("fp16") / "explainer.onnx"
    with half_precision(clap, decoder):
        spec = export_explainer(clap, decoder, path, "mel")
    return path, spec


def _input_types(model: "onnx.ModelProto") -> dict[str, int]:
    """Element type of every tensor of a graph (ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def test_fp16_graph_keeps_the_spectral_nodes_float32(fp16_explainer):
    """Precision is written into the graph: the DFT / inverse-DFT stage MatMuls, the mel MatMul
    and every Log take float32; convolution, attention and normalisation layers take float16;
    every float input and output stays float32."""
    from onnx import TensorProto, numpy_helper

    path, spec = fp16_explainer
    model = onnx.load(str(path))
    types = _input_types(model)
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
    logs = [n for n in model.graph.node if n.op_type == "Log"]
    assert len(stage_matmuls) == 4 and mel_matmuls and logs
    for n in stage_matmuls + mel_matmuls + logs:
        assert all(types[x] == TensorProto.FLOAT for x in n.input if x in types), n.name
    half_ops = [n for n in model.graph.node if n.op_type in ("Conv", "Softmax", "LayerNormalization")]
    assert half_ops and all(types[n.input[0]] == TensorProto.FLOAT16 for n in half_ops)
    assert spec.precision == "fp16" and set(spec.dtypes.values()) == {"float"}
    assert audit.audit(path, EXPLAINER_FORBIDDEN) == []


def test_fp16_graph_matches_float32_torch(fp16_explainer, eager_explainer, inputs):
    path, _ = fp16_explainer
    waves, text = inputs
    names = ["masks", "audio", "similarity", "masked_similarity"]
    got = dict(zip(names, session(path.parent, path.name).run(names, {"waves": waves[:2].numpy(),
                                                                      "text": text[:2].numpy()})))
    ref = {k: v[:2] for k, v in eager_explainer.items()}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in got.values())
    assert np.abs(got["masks"] - ref["masks"]).max() <= 2e-2
    assert snr_db(got["audio"], ref["audio"]) >= 40
    assert np.abs(got["similarity"] - ref["similarity"]).max() <= 1e-3
    assert np.abs(got["masked_similarity"] - ref["masked_similarity"]).max() <= 1e-2


def test_half_precision_restores_the_float32_weights_exactly(model):
    from lmaczs_cli.export.to_onnx import half_precision

    clap, decoder = model
    before = {k: v.clone() for k, v in clap.state_dict().items()}
    with half_precision(clap, decoder):
        assert clap.clap.audio_branch.patch_embed.proj.weight.dtype == torch.float16
        text = [p for n, p in clap.clap.named_parameters() if not n.startswith(("audio_branch.", "audio_projection."))]
        assert text and all(p.dtype == torch.float32 for p in text)          # the text tower stays float32
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in clap.state_dict().items())


# --------------------------------------------------------------------------- tokenizer files


PROMPTS = ["a dog barking", "rain on a tin roof, then thunder", "Ünïcödé birdsong!"]


def test_export_folder_carries_its_clip_bpe_tokenizer(exported, tiny_clap):
    from lmaczs_cli.backends import _tokenizer

    folder, manifest = exported
    tok = manifest["tokenizer"]
    assert tok["kind"] == "clip-bpe" and tok["dir"] == "tokenizer" and tok["context_length"] == 77
    assert {n: sha256_file(folder / "tokenizer" / n) for n in tok["files"]} == tok["files"] != {}
    assert torch.equal(_tokenizer(manifest, None, folder)(PROMPTS), tiny_clap.tokenize(PROMPTS))


def test_export_folder_carries_a_roberta_tokenizer(roberta_tokenizer_dir, tmp_path):
    """RoBERTa towers: the tokenizer's saved files are copied; tokens from the copy are the original's."""
    from lmaczs_cli.backends import _tokenizer
    from lmaczs_cli.clap import ClapConfig, ClapModel, RobertaTokenizerWrapper
    from lmaczs_cli.export.to_onnx import copy_tokenizer

    original = RobertaTokenizerWrapper(roberta_tokenizer_dir)
    clap = ClapModel(torch.nn.Linear(1, 1), ClapConfig("HTSAT-tiny", "roberta"), original, "test")
    tok = copy_tokenizer(clap, tmp_path)
    assert tok["kind"] == "roberta" and ({"vocab.json", "merges.txt"} <= set(tok["files"]) or "tokenizer.json" in tok["files"])
    copied = _tokenizer({"tokenizer": tok}, None, tmp_path)(PROMPTS)
    want = original(PROMPTS)
    assert all(torch.equal(copied[k], want[k]) for k in ("input_ids", "attention_mask"))


# --------------------------------------------------------------------------- types TensorRT lacks


def _typed_model(nodes, inputs, outputs, init=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(init))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_audit_names_double_tensors_and_integer_math():
    from onnx import TensorProto, helper

    f = helper.make_tensor_value_info
    double_cast = _typed_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE, name="/model/Cast_7"),
                                helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT, name="/model/Cast_8")],
                               [f("x", TensorProto.FLOAT, [2])], [f("z", TensorProto.FLOAT, [2])])
    problems = audit.audit(double_cast)
    assert any("Cast '/model/Cast_7': to double, a type TensorRT lacks" in p for p in problems)
    double_io = _typed_model([helper.make_node("Identity", ["x"], ["y"], name="id")],
                             [f("x", TensorProto.DOUBLE, [2])], [f("y", TensorProto.DOUBLE, [2])])
    assert any("graph input 'x': double" in p for p in audit.audit(double_io))
    int_matmul = _typed_model([helper.make_node("MatMul", ["a", "b"], ["c"], name="/decoder/MatMul_2")],
                              [f("a", TensorProto.INT64, [2, 2]), f("b", TensorProto.INT64, [2, 2])],
                              [f("c", TensorProto.INT64, [2, 2])])
    assert any("MatMul '/decoder/MatMul_2': input 'a' is int64; TensorRT runs MatMul on floating types only" in p
               for p in audit.audit(int_matmul))
    index_math = _typed_model([helper.make_node("Gather", ["x", "i"], ["y"], name="g"),
                               helper.make_node("Add", ["i", "i"], ["j"], name="add")],
                              [f("x", TensorProto.FLOAT, [4]), f("i", TensorProto.INT64, [2])],
                              [f("y", TensorProto.FLOAT, [2]), f("j", TensorProto.INT64, [2])])
    assert audit.audit(index_math) == []            # int64 indices and index arithmetic are fine


# --------------------------------------------------------------------------- int8 variants


@pytest.fixture(scope="module")
def int8_folder(exported, model, tmp_path_factory):
    """A copy of the export with its int8 variants added (`lmaczs export --int8`)."""
    import shutil

    from lmaczs_cli.export.quantize import add_int8

    folder = tmp_path_factory.mktemp("int8") / "export"
    shutil.copytree(exported[0], folder)
    return folder, add_int8(folder, *model, graphs=("audio_encoder", "explainer_nocheck", "explainer_topk"))


def test_int8_variants_quantise_only_the_encoder_and_pass_their_audit(int8_folder, inputs):
    from lmaczs_cli.backends import OnnxRunner
    from lmaczs_cli.export import quantize

    folder, manifest = int8_folder
    specs, figures = manifest["int8"]["graphs"], manifest["int8"]["audit"]
    assert set(specs) == {"audio_encoder", "explainer_nocheck", "explainer_topk"}
    assert specs["explainer_nocheck"]["file"] == "explainer_nocheck_int8.onnx"
    for graph, spec in specs.items():
        assert sha256_file(folder / spec["file"]) == spec["sha256"] and spec["precision"] == "int8"
        fp32, int8 = (onnx.load(str(folder / f)) for f in (manifest["graphs"][graph]["file"], spec["file"]))
        # a graph with the check runs the encoder twice: its second pass's MatMuls are quantised too
        passes = 2 if graph == "explainer_topk" else 1
        assert figures[graph]["quantized_matmuls"] == passes * len(quantize.quantized_nodes(fp32)) > 0
        ops_int8 = [n for n in int8.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear")]
        assert ops_int8 and all("/layers." in n.name for n in ops_int8)
    # the audio encoder's front end stays float MatMuls; the int8 explainer has no STFT ends at all:
    # mel power in, no audio out (the runner computes both with torch's FFT)
    a8, a32 = (onnx.load(str(folder / f)) for f in (specs["audio_encoder"]["file"], "audio_encoder.onnx"))
    assert sum(n.op_type == "MatMul" and "/layers." not in n.name for n in a8.graph.node) >= \
        sum(n.op_type == "MatMul" and "/layers." not in n.name for n in a32.graph.node) > 0
    assert list(specs["explainer_nocheck"]["inputs"]) == ["mel", "text"]
    assert list(specs["explainer_nocheck"]["outputs"]) == ["masks", "similarity"]
    assert figures["audio_encoder"]["embedding_cosine_min"] >= quantize.MIN_EMBEDDING_COSINE
    assert figures["explainer_nocheck"]["mask_mean_abs_diff"] <= quantize.MAX_MASK_MEAN_DIFF
    assert list(specs["explainer_topk"]["inputs"]) == ["mel", "labels", "k"]
    # the audio the runner makes of the int8 masks, against the fused graph's: recorded, and close
    assert figures["explainer_topk"]["audio_snr_db"] >= 20 and figures["explainer_topk"]["topk_agreement"] == 1
    assert not [p for p in folder.iterdir() if p.name.startswith(".int8-")]      # its work folder is gone

    waves, text = inputs
    fp32_runner = OnnxRunner(folder, device="cpu", threads=1)
    int8_runner = OnnxRunner(folder, device="cpu", threads=1, precision="int8")
    assert int8_runner._files["explainer_nocheck"] == "explainer_nocheck_int8.onnx"
    assert int8_runner._files["explainer"] == "explainer.onnx"            # no variant: float32
    assert fp32_runner._files["explainer_nocheck"] == "explainer_nocheck.onnx"
    a, b = fp32_runner.explain(waves[:2], text[:2], check=False), int8_runner.explain(waves[:2], text[:2], check=False)
    assert list(a) == list(b) == ["masks", "audio", "similarity"] and b["audio"].shape == a["audio"].shape
    diff = np.abs(a["masks"].numpy() - b["masks"].numpy())
    assert 0 < diff.max() and diff.mean() <= quantize.MAX_MASK_MEAN_DIFF    # a different graph ran, close
    e8, e32 = int8_runner.embed_audio(waves[:2]).numpy(), fp32_runner.embed_audio(waves[:2]).numpy()
    cosine = (e8 * e32).sum(-1) / (np.linalg.norm(e8, axis=-1) * np.linalg.norm(e32, axis=-1))
    assert cosine.min() >= quantize.MIN_EMBEDDING_COSINE and not np.array_equal(e8, e32)


def test_int8_runner_refuses_a_variant_changed_after_its_audit(int8_folder, tmp_path):
    """The runner runs only the int8 files the export audited: a variant whose bytes no longer
    match the manifest's sha256 (or that is gone) stops it, naming the file and the fix, and the
    float32 graphs of the same folder still run."""
    import shutil

    from lmaczs_cli.backends import BackendError, OnnxRunner

    folder = tmp_path / "export"
    shutil.copytree(int8_folder[0], folder)
    variant = folder / "explainer_nocheck_int8.onnx"
    variant.write_bytes(variant.read_bytes() + b"\0")
    with pytest.raises(BackendError, match="explainer_nocheck_int8.onnx.*sha256.*--int8"):
        OnnxRunner(folder, device="cpu", threads=1, precision="int8")
    variant.unlink()
    with pytest.raises(BackendError, match="missing"):
        OnnxRunner(folder, device="cpu", threads=1, precision="int8")
    assert OnnxRunner(folder, device="cpu", threads=1)._files["explainer_nocheck"] == "explainer_nocheck.onnx"


def test_int8_variant_that_drifts_is_refused_and_removed(exported, model, tmp_path, monkeypatch):
    import shutil

    from lmaczs_cli.backends import BackendError, OnnxRunner
    from lmaczs_cli.export import quantize

    folder = tmp_path / "export"
    shutil.copytree(exported[0], folder)
    before = (folder / "manifest.json").read_text()
    monkeypatch.setattr(quantize, "MIN_EMBEDDING_COSINE", 1.5)         # no variant can pass
    with pytest.raises(quantize.QuantizationError, match="embedding_cosine_min"):
        quantize.add_int8(folder, *model, graphs=("audio_encoder",))
    assert not list(folder.glob("*_int8.onnx")) and not list(folder.glob(".int8-*"))
    assert (folder / "manifest.json").read_text() == before
    with pytest.raises(BackendError, match="lmaczs export --int8"):
        OnnxRunner(folder, device="cpu", precision="int8")


def test_int8_refuses_fp16_graphs_before_writing_anything(tmp_path):
    """int8 variants quantise the float32 graphs for ONNX Runtime; asked together with --fp16 the
    export stops at once, naming both, and leaves no folder behind."""
    from lmaczs_cli.export import export_explainer_folder
    from lmaczs_cli.export.to_onnx import ExportError

    with pytest.raises(ExportError, match="--int8.*--fp16"):
        export_explainer_folder(tmp_path / "out", clap="demo", fp16=True, int8=True)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def stft_exported(tiny_clap, tmp_path_factory):
    """An STFT-grid decoder (1001 x 513 masks) and its export, shared by the tests of such masks."""
    torch.manual_seed(1)
    decoder = MaskDecoder(DecoderConfig.for_clap(tiny_clap, domain="stft", width=16, heads=2, text_tokens=4)).eval()
    folder = tmp_path_factory.mktemp("stft") / "export"
    export_onnx(tiny_clap, decoder, folder, domain="stft", opset=17)
    return folder, decoder


@pytest.mark.parametrize("domain", ["mel", "stft"])
def test_spectrum_graphs_with_torch_ends_explain_as_torch_does(tiny_clap, model, exported, stft_exported, inputs,
                                                                tmp_path, domain):
    """The int8 explainers' form, in float32: the graph from the mel power on (and the linear
    power, for STFT masks), the runner computing the STFT and the inverse with torch's FFT around
    it. Through `OnnxRunner` it gives what the eager module gives: masks, audio, similarities,
    top-k labels, for every clip and prompt in order."""
    import shutil

    from lmaczs_cli.backends import OnnxRunner
    from lmaczs_cli.export.to_onnx import export_spectrum_explainer

    source, decoder = (exported[0], model[1]) if domain == "mel" else stft_exported
    folder = tmp_path / "export"
    shutil.copytree(source, folder)
    manifest = read_manifest(folder)
    slots = {}
    for graph, topk, check in (("explainer", False, True), ("explainer_topk_nocheck", True, False)):
        spec = export_spectrum_explainer(tiny_clap, decoder, folder / f"{graph}_spectrum.onnx", domain,
                                         check=check, topk=topk).to_json()
        slots[graph] = {**spec, "precision": "int8"}     # run as the int8 variants are, in float32
        assert list(spec["inputs"])[0] == "mel" and ("power" in spec["inputs"]) == (domain == "stft")
        assert "audio" not in spec["outputs"]
        assert not [n.op_type for n in onnx.load(str(folder / spec["file"])).graph.node if n.op_type in ("STFT", "DFT")]
    manifest["int8"] = {"graphs": slots}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    runner = OnnxRunner(folder, device="cpu", threads=1, precision="int8")
    waves, text = inputs
    module = ExplainerModule(tiny_clap, decoder, domain).eval()
    got = runner.explain(waves[:3], text[:3])
    with torch.no_grad():
        ref = module(waves[:3], text[:3])
    assert list(got) == ["masks", "audio", "similarity", "masked_similarity"]
    assert got["audio"].shape == (3, K, CLIP_SAMPLES)
    assert np.abs(got["masks"].numpy() - ref["masks"].numpy()).max() <= 1e-3
    for b in range(3):
        for k in range(K):
            assert snr_db(got["audio"][b, k].numpy(), ref["audio"][b, k].numpy()) >= 40, (b, k)
    for name in ("similarity", "masked_similarity"):
        assert rel_err(got[name].numpy(), ref[name].numpy()) <= 1e-4, name
    labels = torch.nn.functional.normalize(torch.randn(6, 512, generator=torch.Generator().manual_seed(5)), dim=-1)
    top = runner.explain_topk(waves[:3], labels, 3, check=False)
    with torch.no_grad():
        ref_top = module.forward_topk(waves[:3], labels, torch.empty(3), check=False)
    assert set(top) == {"scores", "topk", "masks", "audio", "similarity"}
    assert np.array_equal(top["topk"].numpy(), ref_top["topk"].numpy())
    assert np.abs(top["masks"].numpy() - ref_top["masks"].numpy()).max() <= 1e-3
    assert snr_db(top["audio"][2, 1].numpy(), ref_top["audio"][2, 1].numpy()) >= 40
    shutil.rmtree(folder)


def test_onnx_runner_leaves_the_calling_threads_floating_point_mode(exported, inputs):
    """ONNX Runtime runs (and its sessions are made) on the runner's flushing worker: the caller's
    thread, and the threads it starts later (a folder run's writers), keep denormals."""
    import threading

    from lmaczs_cli.backends import OnnxRunner

    waves, text = inputs
    seen: dict[str, bool] = {}

    def keeps_denormals() -> bool:
        return bool(np.array([1e-39], np.float32)[0] * np.float32(1.0) > 0)

    def caller() -> None:
        torch.set_flush_denormal(False)            # this thread's own mode, whatever the test process set
        runner = OnnxRunner(exported[0], device="cpu", threads=1)
        runner.explain(waves[:1], text[:1], check=False)
        runner.embed_audio(waves[:1])
        seen["caller"] = keeps_denormals()
        child = threading.Thread(target=lambda: seen.__setitem__("started later", keeps_denormals()))
        child.start()
        child.join()

    t = threading.Thread(target=caller)
    t.start()
    t.join()
    assert seen == {"caller": True, "started later": True}


def test_int8_refuses_models_the_folder_was_not_exported_from(exported, model, tmp_path):
    """The int8 explainers are traced from the models given: a decoder with other weights than the
    export's is refused before anything is written."""
    import shutil

    from lmaczs_cli.export.quantize import add_int8
    from lmaczs_cli.export.to_onnx import ExportError

    folder = tmp_path / "export"
    shutil.copytree(exported[0], folder)
    before = sorted(p.name for p in folder.iterdir()), (folder / "manifest.json").read_text()
    clap, decoder = model
    torch.manual_seed(7)
    other = MaskDecoder(decoder.cfg).eval()
    with pytest.raises(ExportError, match="another CLAP or decoder"):
        add_int8(folder, clap, other, graphs=("explainer_nocheck",))
    assert (sorted(p.name for p in folder.iterdir()), (folder / "manifest.json").read_text()) == before


def test_int8_stft_mask_explainers_take_the_linear_power_and_pass_their_audit(tiny_clap, stft_exported, inputs,
                                                                              tmp_path):
    """STFT-grid masks: the int8 top-k explainer (with the check) takes the linear power after
    the labels, passes its audit, and through the runner picks the float32 graph's labels."""
    from lmaczs_cli.backends import OnnxRunner
    from lmaczs_cli.export import quantize

    import shutil

    folder, decoder = tmp_path / "export", stft_exported[1]
    shutil.copytree(stft_exported[0], folder)
    manifest = quantize.add_int8(folder, tiny_clap, decoder, graphs=("explainer_topk",))
    spec, figures = manifest["int8"]["graphs"]["explainer_topk"], manifest["int8"]["audit"]["explainer_topk"]
    assert list(spec["inputs"]) == ["mel", "labels", "k", "power"] and "audio" not in spec["outputs"]
    assert figures["mask_mean_abs_diff"] <= quantize.MAX_MASK_MEAN_DIFF and figures["audio_snr_db"] >= 20
    waves, _ = inputs
    labels = torch.nn.functional.normalize(torch.randn(6, 512, generator=torch.Generator().manual_seed(5)), dim=-1)
    a = OnnxRunner(folder, device="cpu", threads=1).explain_topk(waves[:2], labels, 2)
    b = OnnxRunner(folder, device="cpu", threads=1, precision="int8").explain_topk(waves[:2], labels, 2)
    assert list(a) == list(b) and np.array_equal(a["topk"].numpy(), b["topk"].numpy())
    assert b["masks"].shape == (2, 2, 1001, 513) and b["audio"].shape == (2, 2, CLIP_SAMPLES)
    assert snr_db(b["audio"].numpy(), a["audio"].numpy()) >= 20
