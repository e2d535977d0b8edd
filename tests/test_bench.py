"""bench/run.py --quick: the one benchmark entry point runs and writes valid outputs
(a smoke test; no timing is asserted)."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_run_quick_writes_json_markdown_and_plot(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    [js] = tmp_path.glob("*.json")
    result = json.loads(js.read_text())
    assert result["quick"] and result["machine"]["threads"] >= 1
    rows = result["rows"]
    assert not {k: v for k, v in result["skipped"].items() if k != "trt"}, result["skipped"]
    sections = {(r["section"], r.get("backend", r.get("method"))) for r in rows}
    assert {("embed", "torch"), ("explain", "torch"), ("explain", "onnx"), ("topk", "torch"), ("topk", "onnx"),
            ("folder", "torch")} <= sections
    assert {m for s, m in sections if s == "methods"} == {"lmaczs", "gradcam", "gradcam++", "smoothgrad", "ig"}
    explain = {(r["backend"], r["clips"], r["check"]) for r in rows if r["section"] == "explain"}
    assert {(b, c, k) for b in ("torch", "onnx", "onnx-int8") for c in ("real", "synthetic")
            for k in (True, False)} <= explain
    for r in rows:
        fig = r.get("clips_per_s") or r.get("seconds_per_clip") or r.get("seconds")
        if fig is not None:
            assert fig["min"] <= fig["median"] <= fig["max"] and fig["median"] > 0
    [rss] = [r for r in rows if r["section"] == "rss"]
    assert rss["files"] == 20 and rss["rss_end_mb"] > 0
    assert {r["what"] for r in rows if r["section"] == "startup"} >= {"lmaczs --help", "import lmaczs_cli"}
    assert "trt" in result["skipped"] or ("explain", "trt") in sections
    [ceiling] = [r for r in rows if r["section"] == "ceiling"]       # counted FLOPs beside the GEMM rate
    assert ceiling["gflop_per_clip"] > 0 and all(v > 0 for v in ceiling["gemm_gflops"].values())
    assert ceiling["headroom"] == pytest.approx(max(ceiling["gemm_gflops"].values()) / ceiling["encoder_gflops"])
    assert ceiling["encoder_gflops"] == pytest.approx(ceiling["gflop_per_clip"] * ceiling["encoder_clips_per_s"]["max"])
    assert ceiling["encoder_gflops_median"] <= ceiling["encoder_gflops"]
    ratios = result["ratios"]
    assert any(k.startswith("explain onnx / torch, real, check") for k in ratios)
    assert any(k.startswith("onnx no check / check") for k in ratios)
    assert any(k.startswith("top-3 of 50 cost / one-prompt cost") for k in ratios)
    assert any(k.startswith("explain onnx-int8 / torch, real, check") for k in ratios)
    assert any(k.startswith("explain onnx-int8 / onnx, real, no check") for k in ratios)
    assert any(k.startswith("folder, no pictures / in memory") for k in ratios)
    assert any(k.startswith("fp32 ceiling: best GEMM rate / best torch encoder rate") for k in ratios)
    spectral = {(r["backend"], r["mode"]) for r in rows if r["section"] == "spectral"}
    assert spectral == {("torch (FFT)", "analysis"), ("onnx (MatMul DFT)", "analysis"), ("onnx (STFT op)", "analysis"),
                        ("torch (FFT)", "inverse"), ("onnx (MatMul DFT)", "inverse"),
                        ("onnx (DFT op, no overlap-add)", "inverse")}
    assert "spectral onnx (MatMul DFT) / torch (FFT), inverse, batch 2" in ratios
    for r in (r for r in rows if r["section"] == "folder" and r["mode"] != "in memory"):
        timings = r["where"]["timings"]                 # where the folder run's time went
        assert timings["model_s"] > 0 and timings["decode_s"] > 0 and timings["wav_s"] > 0
        assert ("png_s" in timings) == (r["mode"] == "folder, pictures")
    md = js.with_suffix(".md").read_text()
    assert "| explain | onnx |" in md and "| explain | onnx-int8 |" in md and "| ig |" in md
    assert "Resident memory over 20 short files" in md
    assert re.search(r"Folder run, folder, pictures: 4 files .* model [0-9.]+ s .* pictures [0-9.]+ s", md)
    assert js.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_run_of_the_day_never_overwrites_the_first(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run.free_slug(tmp_path, "2026-12-05-vm-random:HTSAT-tiny") == "2026-12-05-vm-random-HTSAT-tiny"
    (tmp_path / "2026-12-05-vm.png").write_bytes(b"")              # any one of the three outputs counts
    assert run.free_slug(tmp_path, "2026-12-05-vm") == "2026-12-05-vm-2"
    (tmp_path / "2026-12-05-vm-2.json").write_text("{}")
    assert run.free_slug(tmp_path, "2026-12-05-vm") == "2026-12-05-vm-3"
