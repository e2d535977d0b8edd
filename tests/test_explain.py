"""`lmaczs explain`: every file of a mixed folder explained, bad input listed, resumable after
kill -9, torchrun shards equal one process, stitched windows without clicks, safe names."""
from __future__ import annotations

import html.parser
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from lmaczs_cli import report as R
from lmaczs_cli.audio import CLIP_SAMPLES, HOP, N_FRAMES, SAMPLE_RATE, load_audio, window_starts
from lmaczs_cli.cli import main
from lmaczs_cli.decoder import DecoderConfig, MaskDecoder, save_decoder
from lmaczs_cli.explain import Clip, Explainer
from lmaczs_cli.inputs import ExplainError, label_prompt
from lmaczs_cli.runs import is_glibc

REPO = Path(__file__).resolve().parents[1]
XSS = "<img src=x onerror=alert(1)>.wav"
PROMPTS = ["dog barking", "Rain on a roof!"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The model runs on one thread here: the decode worker processes and writer threads of
    `explain` use the other core, and two OpenMP threads on a shared 2-core machine stall on
    every small op (tens of times slower). Subprocesses get OMP_NUM_THREADS=1 (ENV)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory, tiny_clap):
    """A random (seeded) mel decoder for the tiny CLAP, saved as `lmaczs train` would."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("decoder")
    save_decoder(MaskDecoder(DecoderConfig.for_clap(tiny_clap)), d,
                 {"clap": {"identity": tiny_clap.identity(), "source": tiny_clap.source},
                  "domain": "mel", "mel_to_linear": "linear"})
    return d


def _model(decoder_dir) -> list[str]:
    return ["--clap", "random:tiny", "--decoder", str(decoder_dir), "--device", "cpu"]


def _explain(args, decoder_dir):
    return CliRunner().invoke(main, ["explain", *args, *_model(decoder_dir)], catch_exceptions=False)


def _noise(seconds: float, sr: int, channels: int = 1, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    x = amp * np.random.default_rng(seed).standard_normal((max(1, int(round(seconds * sr))), channels))
    return x[:, 0] if channels == 1 else x


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / R.RESULTS).read_text(encoding="utf-8").splitlines()]


def _errors(out: Path) -> dict[str, str]:
    path = out / R.ERRORS
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return {json.loads(x)["file"]: json.loads(x)["reason"] for x in lines}


def _assert_same_results(a: list[dict], b: list[dict]) -> None:
    """The same lines but for timing, floats equal up to batch-composition rounding."""
    assert [R.result_key(r) for r in a] == [R.result_key(r) for r in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in set(x) - {"timing"}:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], abs=1e-5), k
            else:
                assert x[k] == y[k], k


# --------------------------------------------------------------------- a mixed folder


MIXED = {   # name: (seconds, rate, channels, subtype, format)
    "a.wav": (2.0, 16_000, 1, "PCM_16", "WAV"),
    "a.flac": (1.5, 44_100, 2, "PCM_16", "FLAC"),                 # same stem as a.wav
    "long/three_minutes.wav": (180.0, 8_000, 1, "PCM_16", "WAV"),
    "short.wav": (0.3, 22_050, 1, "PCM_16", "WAV"),
    "few_ms.wav": (0.004, 48_000, 1, "PCM_16", "WAV"),
    "eight_channels.wav": (1.0, 48_000, 8, "PCM_16", "WAV"),
    "pcm8.wav": (1.0, 8_000, 1, "PCM_U8", "WAV"),
    "pcm24.wav": (1.0, 96_000, 1, "PCM_24", "WAV"),
    "UPPER.WAV": (0.5, 192_000, 1, "PCM_16", "WAV"),
    "café ñ 雨.ogg": (1.2, 44_100, 1, "VORBIS", "OGG"),
    XSS: (0.8, 48_000, 1, "PCM_16", "WAV"),
    "silence.wav": (1.0, 48_000, 1, "PCM_16", "WAV"),
    "clipped.flac": (1.0, 48_000, 1, "PCM_24", "FLAC"),
}


def _make_mixed(folder: Path) -> dict[str, float]:
    """Write MIXED (plus a hidden and a non-audio file); returns name -> duration (s)."""
    durations = {}
    for i, (name, (seconds, sr, ch, subtype, fmt)) in enumerate(MIXED.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        x = _noise(seconds, sr, ch, seed=i)
        if name == "silence.wav":
            x = np.zeros_like(x)
        if name == "clipped.flac":
            x = np.sign(np.sin(2 * np.pi * 220 * np.arange(x.size) / sr))   # full-scale square wave
        sf.write(path, x, sr, subtype=subtype, format=fmt)
        durations[name] = sf.info(str(path)).frames / sr
    (folder / ".hidden.wav").write_bytes((folder / "a.wav").read_bytes())
    (folder / "notes.txt").write_text("not audio")
    return durations


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, decoder_dir):
    root = tmp_path_factory.mktemp("mixed")
    inp, out = root / "in", root / "out"
    durations = _make_mixed(inp)
    result = _explain([str(inp), "-p", PROMPTS[0], "-p", PROMPTS[1], "--out", str(out), "--workers", "2",
                       "--save-png", "--save-mask", "--save-residual", "--listen-check", "--json"], decoder_dir)
    return inp, out, durations, result


def test_mixed_folder_gets_one_explanation_per_file_and_prompt(mixed_run):
    inp, out, durations, result = mixed_run
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == summary["explained"] == len(MIXED) and summary["failed"] == 0
    assert summary["explanations"] == 2 * len(MIXED)
    assert summary["skipped"]["hidden"] == 1 and summary["skipped"]["not_audio"] == 1
    lines = _results(out)
    stems = R.output_stems(list(MIXED))
    assert stems["a.wav"] == "a.wav" and stems["a.flac"] == "a.flac"   # the clash is disambiguated
    for name, duration in durations.items():
        n48 = load_audio(inp / name).size
        for prompt in PROMPTS:
            names = R.output_names(stems[name], prompt)
            info = sf.info(str(out / names["wav"]))
            assert info.samplerate == SAMPLE_RATE and info.subtype == "PCM_16"
            assert abs(info.frames / SAMPLE_RATE - duration) <= 1e-3 + 1 / SAMPLE_RATE, name
            assert sf.info(str(out / names["residual"])).frames == info.frames
            mine = [r for r in lines if r["file"] == name and r["prompt"] == prompt]
            assert [r["window"] for r in mine] == list(range(len(window_starts(n48))))
            for r in mine:
                for key in ("similarity", "masked_similarity", "listened_similarity", "mask_mean"):
                    assert np.isfinite(r[key]), (name, key)   # digital silence included: no NaN anywhere
                assert 0 <= r["mask_mean"] <= 1 and r["outputs"]["wav"] == names["wav"]
            with np.load(out / names["mask"]) as z:
                assert z["mask"].shape == (n48 // HOP + 1, 64) and str(z["domain"]) == "mel"
                assert z["time_s"].shape == (n48 // HOP + 1,) and np.all(np.diff(z["freq_hz"]) > 0)
                assert 50 < z["freq_hz"][0] < z["freq_hz"][-1] < 14_000
            png = (out / names["png"]).read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len([r for r in lines if r["file"] == "long/three_minutes.wav"]) == 2 * 35   # 35 windows of 10 s
    assert (out / R.INDEX).is_file() and not (out / R.ERRORS).exists()


@pytest.mark.parametrize("seconds", [10.0, 3.7])
def test_fast_png_is_the_figure_matplotlib_saves(seconds):
    """`spectrogram_png` pastes the panels into a kept frame: the same picture as saving
    `spectrogram_figure` (up to which STFT column a pixel column samples)."""
    import io

    from PIL import Image

    n = int(seconds * 48_000)
    t = np.arange(n) / 48_000
    wave = (0.3 * np.sin(2 * np.pi * (400 + 300 * t) * t) * (t > 1) + 0.01 * np.random.default_rng(0).standard_normal(n)).astype(np.float32)
    mask = np.zeros((n // HOP + 1, 64), np.float32)
    mask[100:250, 10:40] = 1.0
    fast = R.spectrogram_png(wave, mask, "mel", "a rising tone", 0.312, 0.287)
    again = R.spectrogram_png(wave, mask, "mel", "a rising tone", 0.312, 0.287)      # from the kept frame
    buf = io.BytesIO()
    R.spectrogram_figure(wave, mask, "mel", "a rising tone", 0.312, 0.287).savefig(buf, format="png", dpi=R.PNG_DPI)
    a = np.asarray(Image.open(io.BytesIO(fast)).convert("RGB")).astype(int)
    b = np.asarray(Image.open(buf).convert("RGB")).astype(int)
    assert fast == again
    assert a.shape == b.shape == (700, 1000, 3)
    differ = np.abs(a - b).max(axis=-1) > 40
    assert differ.mean() < 0.01                       # title, axes, ticks, colorbars and panels agree
    other = np.asarray(Image.open(io.BytesIO(R.spectrogram_png(wave, mask, "mel", "a siren", 0.1, 0.05))).convert("RGB"))
    assert (np.abs(other.astype(int) - a).max(axis=-1) > 40)[:40].any()   # the title is redrawn per picture


def test_png_is_three_labelled_panels_with_colorbars_and_the_prompt_in_the_title(mixed_run):
    import struct

    _, out, _, _ = mixed_run
    name = "long/three_minutes.wav"
    png = (out / R.output_names(R.output_stems(list(MIXED))[name], PROMPTS[1])["png"]).read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (R.PNG_SIZE_IN[0] * R.PNG_DPI, R.PNG_SIZE_IN[1] * R.PNG_DPI)
    assert b"Matplotlib" in png[:200]                     # drawn with matplotlib's fonts, not a bitmap font
    line = next(r for r in _results(out) if r["file"] == name and r["prompt"] == PROMPTS[1])
    wave = load_audio(mixed_run[0] / name)
    fig = R.spectrogram_figure(wave, np.full((wave.size // HOP + 1, 64), 0.5, np.float32), "mel", PROMPTS[1],
                               line["similarity"], line["masked_similarity"])
    panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(panels) == 3 and len(bars) == 3
    assert [a.get_ylabel() for a in panels] == ["frequency (Hz)"] * 3 and panels[-1].get_xlabel() == "time (s)"
    assert [b.get_ylabel() for b in bars] == [R.DB_LABEL, "mask (gain)", R.DB_LABEL] and "dB" in R.DB_LABEL
    assert panels[0].get_xlim() == pytest.approx((0, 180.0))           # the axis is in seconds
    ticks = [t.get_text() for t in panels[0].get_yticklabels()]
    assert "1k" in ticks and "10k" in ticks                            # ... and this one in Hz
    title = fig._suptitle.get_text()
    assert PROMPTS[1] in title and f"similarity {line['similarity']:.3f}" in title
    assert f"masked {line['masked_similarity']:.3f}" in title


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.links += [v for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def _report(out: Path) -> tuple[str, _Links]:
    """index.html parsed; every link in it is relative and points at a file that exists."""
    page = (out / R.INDEX).read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(page)
    assert parser.links
    for link in parser.links:
        assert not urlparse(link).scheme and not link.startswith("/"), link   # relative: opens from disk
        assert (out / unquote(link)).resolve().is_file(), link
    return page, parser


def test_report_links_exist_and_names_are_escaped(mixed_run):
    inp, out, _, _ = mixed_run
    page, parser = _report(out)
    originals = {(out / unquote(v["src"])).resolve() for t, v in parser.tags if t == "audio"}
    assert (inp / XSS).resolve() in originals                                 # the original is linked
    assert sum(t == "audio" for t, _ in parser.tags) == 2 * 2 * len(MIXED)    # original and explanation
    assert sum(t == "img" for t, _ in parser.tags) == 2 * len(MIXED)          # thumbnails ...
    thumbs = [v["src"] for t, v in parser.tags if t == "img"]
    assert all(any(t == "a" and v.get("href") == src for t, v in parser.tags) for src in thumbs)   # ... full size
    prompts = [t for t in parser.text if t in PROMPTS]
    assert prompts == PROMPTS * len(MIXED)            # in the order given ("Rain..." sorts first in ASCII)
    assert not any("onerror" in attrs for _, attrs in parser.tags)            # the file name stayed text
    assert any(XSS in t for t in parser.text)
    assert "&lt;img src=x onerror=alert(1)&gt;.wav" in page


LAYOUT_PROBE = """<script>
window.addEventListener("load", () => {
  const table = document.querySelector("table.results");
  const heads = [...table.querySelectorAll("thead th")].map(th => th.getBoundingClientRect());
  const filled = heads.map(() => false);
  for (const td of table.querySelectorAll("tbody td")) {
    const r = td.getBoundingClientRect();
    const has = td.textContent.trim() !== "" || td.querySelector("audio, img, a");
    heads.forEach((h, i) => { if (has && r.left < h.right - 1 && r.right > h.left + 1) filled[i] = true; });
  }
  const names = [...table.querySelectorAll("td.file")].map(td => {
    const text = td.firstChild, range = document.createRange();
    range.selectNodeContents(text);
    const lines = new Set([...range.getClientRects()].map(r => Math.round(r.top))).size;
    return {name: text.textContent, width: td.getBoundingClientRect().width, lines: lines};
  });
  const lines = el => {
    const range = document.createRange();
    range.selectNodeContents(el);
    return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size;
  };
  const headLines = [...table.querySelectorAll("thead th")].map(th => [th.textContent, lines(th)]);
  document.body.setAttribute("data-layout", JSON.stringify({
    view: document.documentElement.clientWidth, page: document.documentElement.scrollWidth,
    table: table.getBoundingClientRect().right, heads: [...table.querySelectorAll("thead th")].map(th => th.textContent),
    filled: filled, names: names, headLines: headLines,
    thumbs: [...document.images].map(i => [i.naturalWidth, i.getBoundingClientRect().width])}));
});
</script>"""


def _chromium(url: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--window-size=1280,1000", "--virtual-time-budget=5000",
                           *args, url], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium(mixed_run, tmp_path):
    """At 1280 px: the names readable (no letter-by-letter wrapping), the main table inside the
    page, no column empty for the whole run, thumbnails drawn smaller than their full-size PNGs."""
    _, out, _, _ = mixed_run
    shot = _chromium((out / R.INDEX).as_uri(), f"--screenshot={tmp_path / 'shot.png'}", profile=tmp_path / "p1")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert (tmp_path / "shot.png").read_bytes()[16:24] == (1280).to_bytes(4, "big") + (1000).to_bytes(4, "big")
    probe = out / "layout-probe.html"               # the report with a measuring script, beside it
    probe.write_text((out / R.INDEX).read_text(encoding="utf-8").replace("</body>", LAYOUT_PROBE + "</body>"),
                     encoding="utf-8")
    try:
        run = _chromium(probe.as_uri(), "--dump-dom", profile=tmp_path / "p2")
    finally:
        probe.unlink()
    assert run.returncode == 0, run.stderr[-2000:]
    dom = _Links()
    dom.feed(run.stdout)
    layout = json.loads(next(a["data-layout"] for t, a in dom.tags if t == "body" and "data-layout" in a))
    assert layout["view"] == 1280 and layout["page"] <= layout["view"] and layout["table"] <= layout["view"]
    assert all(layout["filled"]), dict(zip(layout["heads"], layout["filled"]))
    assert all(n <= len(text.split()) for text, n in layout["headLines"]), layout["headLines"]   # no word broken
    for n in layout["names"]:
        assert n["width"] >= 150, n
        assert n["lines"] <= 1 + len(n["name"]) // 15, n          # at least 15 characters a line
    assert len(layout["thumbs"]) == 2 * len(MIXED)
    assert all(0 < shown < natural for natural, shown in layout["thumbs"])
    assert not any("onerror" in attrs for _, attrs in dom.tags)
    assert any(XSS in t for t in dom.text)


def test_report_leaves_out_columns_empty_for_the_whole_run(tmp_path):
    lines = [{"file": "a.wav", "input": "/nowhere/a.wav", "prompt": p, "window": 0, "similarity": 0.2,
              "masked_similarity": None, "mask_mean": 0.1, "outputs": {"wav": f"a.{p}.wav"},
              "prompt_order": k} for k, p in enumerate(["siren", "bell"])]
    R.write_index(tmp_path, lines, [])
    page, parser = (tmp_path / R.INDEX).read_text(encoding="utf-8"), _Links()
    parser.feed(page)
    heads = [t for t in parser.text if t in ("similarity", "masked", "heard", "mask mean",
                                              "original | explanation", "spectrogram | mask | masked")]
    assert heads == ["similarity", "mask mean", "original | explanation"]   # no check, no listen, no PNG
    assert [t for t in parser.text if t in ("siren", "bell")] == ["siren", "bell"]


# --------------------------------------------------------------------- bad input


def test_every_bad_input_is_listed_and_the_rest_explained(tmp_path, decoder_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    sf.write(inp / "good.wav", _noise(1.0, 16_000), 16_000)
    sf.write(inp / "truncated.wav", _noise(1.0, 16_000), 16_000)
    data = (inp / "truncated.wav").read_bytes()
    (inp / "truncated.wav").write_bytes(data[: len(data) // 2])
    (inp / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    (inp / "empty.wav").write_bytes(b"")
    sf.write(inp / "zero_frames.wav", np.zeros(0), 16_000)
    (inp / "text.mp3").write_text("this is not audio at all\n" * 20)
    (inp / "folder.wav").mkdir()
    bad = _noise(1.0, 16_000).astype(np.float32)
    bad[100] = np.nan
    sf.write(inp / "nan.wav", bad, 16_000, subtype="FLOAT")
    os.symlink("self.wav", inp / "self.wav")                   # a link that resolves to itself
    os.symlink("missing.wav", inp / "dangling.wav")
    (inp / "sub").mkdir()
    os.symlink("..", inp / "sub" / "up")                       # a folder link back to an ancestor
    os.mkfifo(inp / "pipe.wav")
    sf.write(inp / "locked.wav", _noise(1.0, 16_000), 16_000)
    os.chmod(inp / "locked.wav", 0)
    try:
        result = _explain([str(inp), "-p", "dog", "--out", str(out), "--workers", "2", "--json"], decoder_dir)
    finally:
        os.chmod(inp / "locked.wav", 0o644)
    assert result.exit_code == 1, result.output
    errors = _errors(out)
    expect = {
        "truncated.wav": "truncated", "corrupt.flac": "not readable as audio", "empty.wav": "empty file",
        "zero_frames.wav": "zero", "text.mp3": "not readable as audio", "folder.wav": "is a directory",
        "nan.wav": "non-finite", "self.wav": "symlink loop", "dangling.wav": "broken symlink",
        "sub/up": "symlink loop", "pipe.wav": "not a regular file",
    }
    root = os.geteuid() == 0      # root reads a mode-000 file: then it is simply explained
    if not root:
        expect["locked.wav"] = "Permission denied"
    assert set(errors) == set(expect), errors
    for name, reason in expect.items():
        assert reason in errors[name], (name, errors[name])
    explained = {r["file"] for r in _results(out)}
    assert explained == {"good.wav"} | ({"locked.wav"} if root else set())
    summary = json.loads(result.stdout)
    assert summary["failed"] == len(expect) and {f["file"] for f in summary["failures"]} == set(expect)
    _, parser = _report(out)
    assert set(expect) <= set(parser.text)                     # the failed files are listed in the report


# --------------------------------------------------------------------- unusable models and paths


class _Touch:
    """Unpickling this creates a file: what a malicious checkpoint can do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_clap, decoder_dir):
    """Broken and foreign model files next to a good CLAP folder and decoder."""
    import shutil

    from lmaczs_cli.clap import save_clap

    d = tmp_path_factory.mktemp("models")
    clap = save_clap(tiny_clap, d / "clap")
    sd = {f"module.{k}": v for k, v in tiny_clap.clap.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 1}, d / "good.pt")
    data = (d / "good.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"state_dict": sd, "extra": _Touch(d / "pwned.txt")}, d / "trap.pt")
    for name in ("no_weights", "cut_weights", "bad_config", "no_config", "other_arch"):
        shutil.copytree(decoder_dir, d / name)
    (d / "no_weights" / "decoder.safetensors").unlink()
    cut = (d / "cut_weights" / "decoder.safetensors").read_bytes()
    (d / "cut_weights" / "decoder.safetensors").write_bytes(cut[:100])
    (d / "bad_config" / "config.json").write_text('{"format": "lmaczs-decoder/1", "decoder": ')
    (d / "no_config" / "config.json").unlink()
    (d / "loose").mkdir()
    shutil.copy(decoder_dir / "decoder.safetensors", d / "loose" / "decoder.safetensors")
    cfg = DecoderConfig.for_clap(tiny_clap)                     # a decoder for a CLAP twice as wide
    wide = DecoderConfig(**{**cfg.to_json(), "hidden_channels": [2 * c for c in cfg.hidden_channels]})
    save_decoder(MaskDecoder(wide), d / "other_arch", {"clap": {"identity": "f" * 64, "source": "a wider CLAP"},
                                                        "domain": "mel", "mel_to_linear": "linear"})
    (d / "a_file").write_text("not a folder")
    return d, clap


UNUSABLE = [   # id, extra options ({d}: the model_files folder, {c}: the good CLAP folder), message
               # ({why}: the wording of a third-party library, which changes between its versions)
    ("empty-pt", ["--clap", "{d}/empty.pt"], "{d}/empty.pt: empty file (0 bytes); download the checkpoint again"),
    ("truncated-pt", ["--clap", "{d}/truncated.pt"],
     "{d}/truncated.pt: truncated or corrupt (its zip archive has no central directory, as when a download stops "
     "early); download the checkpoint again"),
    ("random-pt", ["--clap", "{d}/random.pt"],
     "{d}/random.pt: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); pass a LAION .pt "
     "checkpoint such as 630k-audioset-best.pt"),
    ("safetensors-as-clap", ["--clap", "{c}/clap.safetensors"],
     "{c}/clap.safetensors: a safetensors file, not a LAION .pt checkpoint; pass the folder that holds it with its "
     "clap.json (a CLAP saved by lmaczs), or hf:DIR for a transformers ClapModel folder"),
    ("clap-folder-without-files", ["--clap", "{d}/no_config"],
     "{d}/no_config: no clap.json in this folder; pass a folder with clap.json + clap.safetensors (a CLAP saved by "
     "lmaczs), a LAION .pt file, or hf:DIR"),
    ("decoder-without-weights", ["--decoder", "{d}/no_weights"],
     "{d}/no_weights/decoder.safetensors: missing; copy the decoder folder again or re-run `lmaczs train`"),
    ("decoder-cut-weights", ["--decoder", "{d}/cut_weights"],
     "{d}/cut_weights/decoder.safetensors: not a readable safetensors file (SafetensorError: {why}); copy the "
     "decoder folder again or re-run `lmaczs train`"),
    ("decoder-bad-config", ["--decoder", "{d}/bad_config"],
     "--decoder {d}/bad_config/config.json: not readable JSON (JSONDecodeError: Expecting value: line 1 column 43 "
     "(char 42)); copy the decoder folder again or re-run `lmaczs train`"),
    ("decoder-folder-without-config", ["--decoder", "{d}/no_config"],
     "--decoder {d}/no_config: no config.json in this folder; a decoder is the --out folder of `lmaczs train` "
     "(config.json + decoder.safetensors)"),
    ("decoder-file-alone", ["--decoder", "{d}/loose/decoder.safetensors"],
     "--decoder {d}/loose/decoder.safetensors: no config.json beside it; a decoder is the --out folder of "
     "`lmaczs train` (config.json + decoder.safetensors)"),
    ("decoder-of-another-architecture", ["--decoder", "{d}/other_arch", "--force"],
     "{d}/other_arch: this decoder was built for another CLAP architecture (hidden_channels 64x128x256x256 where "
     "this CLAP gives 32x64x128x128); --force cannot make it fit. Pass the CLAP it was trained on, or train a "
     "decoder for this one (`lmaczs train --clap ...`)."),
]


@pytest.mark.parametrize("options, message", [u[1:] for u in UNUSABLE], ids=[u[0] for u in UNUSABLE])
def test_unusable_model_files_exit_2_with_one_line(tmp_path, decoder_dir, model_files, options, message):
    d, clap = model_files
    sf.write(tmp_path / "a.wav", _noise(0.5, 16_000), 16_000)
    fill = {"d": str(d), "c": str(clap)}
    options = [o.format(**fill) for o in options]
    model = ["--clap", "random:tiny", "--decoder", str(decoder_dir), "--device", "cpu"]
    for k in ("--clap", "--decoder"):
        if k in options:
            i = model.index(k)
            del model[i: i + 2]
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "a.wav"), "-p", "dog", "--out",
                                       str(tmp_path / "out"), *model, *options])
    assert result.exit_code == 2, result.output
    expected = re.escape(f"Error: {message.format(why='WHY', **fill)}\n").replace("WHY", "[^()\\n]+")
    assert re.fullmatch(expected, result.stderr), result.stderr
    assert not (tmp_path / "out" / R.RESULTS).exists()


def test_checkpoint_that_would_run_code_is_refused_by_the_command(tmp_path, decoder_dir, model_files):
    d, _ = model_files
    sf.write(tmp_path / "a.wav", _noise(0.5, 16_000), 16_000)
    args = ["explain", str(tmp_path / "a.wav"), "-p", "dog", "--out", str(tmp_path / "out"),
            "--clap", str(d / "trap.pt"), "--decoder", str(decoder_dir), "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"Error: {d}/trap.pt: refused: it pickles io.open, which is neither a tensor nor one of the numpy scalars "
        "LAION's checkpoints hold, and unpickling it could run code. If you trust where it came from, pass "
        "--trust-checkpoint (Python: trust=True).\n")
    assert not (d / "pwned.txt").exists()
    trusted = CliRunner().invoke(main, [*args, "--trust-checkpoint"])       # the opt-in runs the payload
    assert (d / "pwned.txt").exists(), trusted.output
    (d / "pwned.txt").unlink()


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.mark.parametrize("case", ["under-a-file", "name-too-long", "proc", "read-only-folder"])
def test_unusable_out_is_refused_before_any_model_loads(tmp_path, monkeypatch, case):
    import lmaczs_cli.runs as runs

    monkeypatch.setattr(runs, "_load_for_rank", _no_model)
    sf.write(tmp_path / "a.wav", _noise(0.5, 16_000), 16_000)
    if case == "under-a-file":
        (tmp_path / "f").write_text("x")
        out, message = tmp_path / "f" / "out", f"--out {tmp_path}/f/out: {tmp_path}/f is a file, not a folder; " \
                                               "choose another --out"
    elif case == "name-too-long":
        out = tmp_path / ("x" * 300)
        message = f"--out {out}: cannot write there (File name too long); choose a folder you can write to"
    elif case == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        out = Path("/proc/lmaczs-out")
        message = f"--out {out}: cannot write there (No such file or directory); choose a folder you can write to"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "out"
        message = f"--out {out}: cannot write there (Permission denied); choose a folder you can write to"
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "a.wav"), "-p", "dog", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"Error: {message}\n"


def test_interrupted_run_exits_130_and_keeps_finished_work(tmp_path, decoder_dir):
    """Ctrl-C once the first file's results are in: exit 130, the finished files kept. The run starts
    with SIGINT at its default, as from a terminal: a test suite started as a background job (`cmd &`
    in a script) hands its children SIGINT ignored, and Python then installs no Ctrl-C handler."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for k in range(20):
        sf.write(inp / f"clip{k:02d}.wav", _noise(1.0, 24_000, seed=k), 24_000)
    cmd = [sys.executable, "-m", "lmaczs_cli", "explain", str(inp), "-p", "dog barking", "--out", str(out),
           "--batch-size", "1", "--workers", "0", "--no-png", *_model(decoder_dir)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    results = out / R.RESULTS
    deadline = time.monotonic() + 120
    while not (results.exists() and results.stat().st_size > 0):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no results line within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert err.decode().endswith("interrupted; what finished is kept\n") and "Traceback" not in err.decode()
    assert 1 <= len({r["file"] for r in _results(out)}) < 20


def test_progress_counts_windows_within_a_long_file(tmp_path, decoder_dir):
    from lmaczs_cli.runs import ExplainJob, run_explain

    sf.write(tmp_path / "long.wav", _noise(25.0, 16_000), 16_000)          # 4 windows
    sf.write(tmp_path / "short.wav", _noise(1.0, 16_000), 16_000)
    events = []
    ex = Explainer.load(clap="random:tiny", decoder=decoder_dir, device="cpu", batch_size=1)
    run_explain(ExplainJob(paths=(str(tmp_path),), out=str(tmp_path / "out"), prompts=("dog",), batch_size=1,
                           workers=0), explainer=ex, on_event=events.append)
    assert events[0] == {"event": "start", "files": 2, "windows": 5, "seconds": pytest.approx(26.0)}
    kinds = [e["event"] for e in events[1:]]
    first_file = kinds.index("file")
    assert kinds[:first_file] == ["windows"] * 4          # the bar moves while the long file is explained
    assert sum(e["n"] for e in events if e["event"] == "windows") == 5


def test_rerun_with_nothing_left_loads_no_model(tmp_path, decoder_dir, monkeypatch):
    import lmaczs_cli.runs as runs

    sf.write(tmp_path / "a.wav", _noise(1.0, 16_000), 16_000)
    first = _explain([str(tmp_path / "a.wav"), "-p", "dog", "--out", str(tmp_path / "out"), "--no-png"], decoder_dir)
    assert first.exit_code == 0, first.output
    monkeypatch.setattr(runs, "_load_for_rank", _no_model)
    again = _explain([str(tmp_path / "a.wav"), "-p", "dog", "--out", str(tmp_path / "out"), "--no-png", "--json"],
                     decoder_dir)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["already_done"] == 1


class _NoMask(torch.nn.Module):
    """A decoder stub whose mask keeps nothing."""

    def forward(self, hidden, text, logmel, log_power=None):
        return torch.zeros(logmel.shape[0], logmel.shape[1], 64)


def test_empty_explanations_are_marked_counted_and_shown(tmp_path, tiny_clap, capsys):
    from lmaczs_cli.cli import _explain_report
    from lmaczs_cli.runs import ExplainJob, run_explain

    sf.write(tmp_path / "a.wav", _noise(1.0, 16_000), 16_000)
    ex = Explainer.from_models(tiny_clap, _NoMask(), {"domain": "mel"}, device="cpu")
    summary = run_explain(ExplainJob(paths=(str(tmp_path / "a.wav"),), out=str(tmp_path / "out"),
                                     prompts=("dog", "siren"), workers=0), explainer=ex)
    lines = _results(tmp_path / "out")
    assert [(r["prompt"], r["empty"], r["level_db"]) for r in lines] == [("dog", True, R.LEVEL_FLOOR_DB),
                                                                        ("siren", True, R.LEVEL_FLOOR_DB)]
    assert summary["empty"] == 2
    _explain_report(summary, as_json=False)
    assert "(2 explanations, 2 empty: the model finds nothing of their prompt there)" in capsys.readouterr().out
    page = (tmp_path / "out" / R.INDEX).read_text(encoding="utf-8")
    assert page.count("Empty: the model finds nothing of this prompt here.") == 2
    assert "2 empty: the model finds nothing of this prompt here" in page


def test_empty_threshold_is_mask_mean_or_level():
    assert R.is_empty(R.EMPTY_MASK_MEAN / 2, None) and not R.is_empty(2 * R.EMPTY_MASK_MEAN, None)
    assert R.is_empty(0.5, R.EMPTY_LEVEL_DB - 1) and not R.is_empty(0.5, R.EMPTY_LEVEL_DB + 1)
    x = _noise(1.0, 48_000).astype(np.float32)
    assert R.relative_level_db(x * 1e-3, x) == pytest.approx(-60.0, abs=1e-3)
    assert R.relative_level_db(x, np.zeros_like(x)) is None and R.relative_level_db(0 * x, x) == R.LEVEL_FLOOR_DB


def test_level_sums_a_long_file_block_by_block_in_float64(monkeypatch):
    def no_blas(*args, **kwargs):
        raise AssertionError("np.dot: OpenBLAS's threads would spin beside the model's")

    monkeypatch.setattr(np, "dot", no_blas)
    loud = np.concatenate([np.full(200_001, 0.5, np.float32), np.zeros(100_000, np.float32)])   # several blocks, ragged end
    expected = np.sqrt(200_001 * 0.25 / loud.size)
    assert R._rms(loud) == pytest.approx(expected, rel=1e-12)
    assert R._rms(np.zeros(0, np.float32)) == 0.0


# --------------------------------------------------------------------- resume


def test_killed_run_resumes_without_redoing_or_duplicating(tmp_path, decoder_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for k in range(20):
        sf.write(inp / f"clip{k:02d}.wav", _noise(1.0, 24_000, seed=k), 24_000)
    cmd = [sys.executable, "-m", "lmaczs_cli", "explain", str(inp), "-p", "dog barking", "--out", str(out),
           "--batch-size", "1", "--workers", "0", "--save-png", *_model(decoder_dir)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / R.RESULTS
    deadline = time.monotonic() + 120
    while not (results.exists() and results.stat().st_size > 0):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no results line within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    first = [json.loads(x) for x in results.read_text().splitlines()]      # valid JSONL after kill -9
    finished = {r["file"] for r in first}
    assert 1 <= len(finished) < 20, "the run ended before it could be killed mid-way"
    for wav in out.glob("*.wav"):                                         # nothing truncated
        assert sf.read(wav)[0].size == SAMPLE_RATE
    mtimes = {f: (out / R.output_names(Path(f).stem, "dog barking")["wav"]).stat().st_mtime_ns for f in finished}

    result = _explain([str(inp), "-p", "dog barking", "--out", str(out), "--batch-size", "1", "--save-png",
                       "--json"], decoder_dir)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["already_done"] == len(finished) and summary["explained"] == 20 - len(finished)
    lines = _results(out)
    assert len(lines) == 20 and len({(r["file"], r["prompt"], r["window"]) for r in lines}) == 20
    assert [r["file"] for r in lines] == sorted(r["file"] for r in lines)
    for f, mtime in mtimes.items():                                      # finished work not redone
        assert (out / R.output_names(Path(f).stem, "dog barking")["wav"]).stat().st_mtime_ns == mtime
    for wav in out.glob("*.wav"):
        assert sf.read(wav)[0].size == SAMPLE_RATE
    assert not list(out.rglob("*.part"))
    again = _explain([str(inp), "-p", "dog barking", "--out", str(out), "--save-png", "--json"], decoder_dir)
    assert json.loads(again.stdout)["explained"] == 0 and _results(out) == lines
    redo = _explain([str(inp), "-p", "dog barking", "--out", str(out), "--save-png", "--overwrite", "--json"],
                    decoder_dir)
    assert json.loads(redo.stdout)["explained"] == 20 and len(_results(out)) == 20


# --------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_torchrun_and_merge_equal_one_process(tmp_path, decoder_dir):
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    for k in range(5):
        sf.write(inp / ("sub" if k % 2 else "") / f"c{k}.wav", _noise(1.0 + k, 16_000, seed=k), 16_000)
    sf.write(inp / "long.flac", _noise(12.0, 16_000, seed=9), 16_000)
    (inp / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    args = [str(inp), "-p", "dog barking", "-p", "siren", "--workers", "0", *_model(decoder_dir)]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "lmaczs_cli", "explain", *args,
                          "--out", str(tmp_path / "two"), "--json"],
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]                       # broken.wav failed on one rank
    one = CliRunner().invoke(main, ["explain", *args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 1, one.output
    two_lines, one_lines = _results(tmp_path / "two"), _results(tmp_path / "one")
    assert len(one_lines) == 2 * (5 + 2)                                 # long.flac: 2 windows
    _assert_same_results(two_lines, one_lines)
    assert _errors(tmp_path / "two") == _errors(tmp_path / "one") and list(_errors(tmp_path / "one")) == ["broken.wav"]
    assert not list((tmp_path / "two").glob("*.rank*.jsonl"))            # rank 0 merged the shards
    assert json.loads(run.stdout)["explained"] == 6                      # rank 0 reports every rank

    # `lmaczs merge` joins shards left by ranks later: split the joined file back into two shards
    two = tmp_path / "two"
    for k in range(2):
        R.write_jsonl(two / f"results.rank{k}.jsonl", two_lines[k::2])
    (two / R.RESULTS).unlink()
    merged = CliRunner().invoke(main, ["merge", str(two), "--json"])
    assert merged.exit_code == 0, merged.output
    assert json.loads(merged.stdout)["results"] == len(two_lines)
    assert _results(two) == two_lines and not list(two.glob("*.rank*.jsonl"))


# --------------------------------------------------------------------- windows and seams


class _ConstantMask(torch.nn.Module):
    """A decoder stub: mask of ones (so the listenable output must give back the input)."""

    def forward(self, hidden, text, logmel, log_power=None):
        return torch.ones(logmel.shape[0], logmel.shape[1], 64)


class _LoudMask(torch.nn.Module):
    """A decoder stub that keeps the loud time-frequency cells: 1 where log-mel > -30 dB.
    (A random decoder cannot localise anything; this one shows that stitched masks keep
    each event at its own time across the window seams.)"""

    def forward(self, hidden, text, logmel, log_power=None):
        return (logmel > -30).float()


BURSTS = [(2.0, 2.5, 500), (9.8, 10.4, 1000), (14.9, 15.3, 3000), (21.0, 22.0, 6000)]   # s, s, Hz


def _bursts(seconds: float = 25.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = 1e-4 * np.random.default_rng(0).standard_normal(t.size)
    for a, b, f in BURSTS:
        on = (t >= a) & (t < b)
        x[on] += 0.5 * np.sin(2 * np.pi * f * t[on])
    return x.astype(np.float32)


def test_windowed_explanation_stitches_without_clicks(tiny_clap, decoder_dir, tmp_path):
    x = _bursts()
    assert window_starts(x.size) == [0, 240_000, 480_000, 720_000]    # seams at 5, 10, 15, 20 s
    max_jump = np.abs(np.diff(x)).max()

    ones = Explainer.from_models(tiny_clap, _ConstantMask(), {"domain": "mel"}, device="cpu", batch_size=3).explain(x, "tone")
    assert ones.audio.shape == x.shape and ones.mask.shape == (x.size // HOP + 1, 64)
    assert np.abs(ones.audio - x).max() < 1e-4                          # identity across every seam
    assert np.abs(np.diff(ones.audio)).max() <= max_jump * (1 + 1e-3)

    loud = Explainer.from_models(tiny_clap, _LoudMask(), {"domain": "mel"}, device="cpu", batch_size=3).explain(x, "tone")
    kept = loud.mask.mean(axis=1)                                       # per frame
    frame_t = np.arange(kept.size) * HOP / SAMPLE_RATE
    for a, b, _ in BURSTS:                                              # the events stay where they are
        inside = (frame_t > a + 0.05) & (frame_t < b - 0.05)
        assert kept[inside].min() > 0, (a, b)
    quiet = np.ones(kept.size, bool)
    for a, b, _ in BURSTS:
        quiet &= (frame_t < a - 0.05) | (frame_t > b + 0.05)
    assert kept[quiet].max() == 0

    # the same file through the CLI and the random decoder: full length, no click at any seam
    sf.write(tmp_path / "bursts.wav", x, SAMPLE_RATE, subtype="FLOAT")
    result = _explain([str(tmp_path / "bursts.wav"), "-p", "tone", "--out", str(tmp_path / "out"),
                       "--batch-size", "3", "--workers", "0"], decoder_dir)
    assert result.exit_code == 0, result.output
    y, sr = sf.read(tmp_path / "out" / "bursts.tone.wav", dtype="float32")
    assert sr == SAMPLE_RATE and y.size == x.size
    assert np.abs(np.diff(y)).max() <= max_jump + 2 / 32768            # 16-bit rounding allowed


def _reference(ex: Explainer, wave: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One clip the plain way: all its windows in one batch, then stitched."""
    from lmaczs_cli import audio

    windows = [audio.pad_clip(wave)] if wave.size <= CLIP_SAMPLES else list(audio.windows(wave))
    out = {k: v.numpy() for k, v in ex.run_windows(torch.from_numpy(np.stack(windows)), prompts).items()}
    sound = audio.Stitcher(wave.size, window_starts(wave.size), CLIP_SAMPLES, (len(prompts),))       # (n, K)
    masks = audio.Stitcher(audio.num_frames(wave.size), audio.frame_starts(wave.size), N_FRAMES,
                           (len(prompts), out["masks"].shape[-1]))                              # (frames, K, bins)
    for a, m in zip(out["audio"], out["masks"]):
        sound.add(a.T)
        masks.add(m.transpose(1, 0, 2))
    return sound.out, masks.out, out["masked_similarity"].mean(0)


def test_explain_many_batches_across_files_like_one_file_at_a_time(tiny_clap, decoder_dir):
    ex = Explainer.load(clap="random:tiny", decoder=decoder_dir, device="cpu", batch_size=3)
    rng = np.random.default_rng(1)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (5_000, 600_000, 48_000, 720_000)]
    clips = [Clip(key=i, wave=w, prompts=["dog", "rain"] if i != 2 else ["siren"]) for i, w in enumerate(waves)]
    got = {r.key: r for r in ex.explain_many(clips)}      # batches of 3 windows mixing files and Ks
    assert sorted(got) == [0, 1, 2, 3]
    for i, w in enumerate(waves):
        sound, masks, masked = _reference(ex, w, clips[i].prompts)
        for j, e in enumerate(got[i].explanations):
            assert e.prompt == clips[i].prompts[j] and e.audio.shape == w.shape
            assert np.allclose(e.audio, sound[:, j], atol=1e-5) and np.allclose(e.mask, masks[:, j], atol=1e-5)
            assert e.masked_similarity == pytest.approx(masked[j], abs=1e-5)
    bad = list(ex.explain_many([np.full(10, np.nan, np.float32)], ["dog"]))
    assert bad[0].error == "the waveform holds NaN or Inf samples"


# --------------------------------------------------------------------- names and modes


def test_out_equal_to_the_input_folder_never_overwrites_inputs(tmp_path, decoder_dir):
    names = ["a.wav", "a.dog-barking.wav", "b.flac"]    # a.wav's natural output name is an input
    for k, name in enumerate(names):
        sf.write(tmp_path / name, _noise(1.0, 16_000, seed=k), 16_000)
    before = {n: (tmp_path / n).read_bytes() for n in names}
    for _ in range(2):                                   # the rerun must not take outputs as inputs
        result = _explain([str(tmp_path), "-p", "dog barking", "--out", str(tmp_path), "--json"], decoder_dir)
        assert result.exit_code == 0, result.output
    assert {n: (tmp_path / n).read_bytes() for n in names} == before
    assert {r["file"] for r in _results(tmp_path)} == set(names)
    assert (tmp_path / "a.wav.dog-barking.wav").is_file() and (tmp_path / "b.dog-barking.wav").is_file()
    summary = json.loads(result.stdout)
    assert summary["already_done"] == 3 and summary["explained"] == 0
    assert summary["skipped"]["outputs"] == 3 + 3 + 2   # our wavs and PNGs, results.jsonl and index.html


def test_output_names_are_pure_safe_and_distinct():
    assert R.prompt_slug("dog barking") == "dog-barking"
    tricky = ["Dog barking", "dog  barking", "dog-barking", "dog barking!", "犬の鳴き声", "residual",
              "../../etc/passwd", "a" * 80, ""]
    slugs = [R.prompt_slug(p) for p in tricky]
    assert len(set(slugs)) == len(tricky) and all(s and set(s) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
                                                  for s in slugs)
    assert R.prompt_slug("Dog barking") == R.prompt_slug("Dog barking")   # a pure function
    stems = R.output_stems(["x/A.WAV", "x/a.wav", "x/b.mp3", "../up.wav", "c.wav"], taken=["c.tone.wav"])
    assert stems["x/b.mp3"] == "x/b" and stems["x/A.WAV"] != stems["x/a.wav"]
    assert stems["../up.wav"] == "_/up" and stems["c.wav"] == "c.wav"


def test_top_k_mode_explains_the_best_labels_with_their_scores(tmp_path, decoder_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(2):
        sf.write(inp / f"c{k}.wav", _noise(1.5, 16_000, seed=k), 16_000)
    labels = ["dog", "rain_on_roof", "a car horn honking loudly", "Siren."]
    (tmp_path / "labels.txt").write_text("# label set\n" + "\n".join(labels) + "\n")
    result = _explain([str(inp), "--labels", str(tmp_path / "labels.txt"), "--top-k", "2",
                       "--out", str(tmp_path / "out"), "--json"], decoder_dir)
    assert result.exit_code == 0, result.output
    assert label_prompt("rain_on_roof") == "this is the sound of rain on roof"
    assert label_prompt("a car horn honking loudly") == "a car horn honking loudly"
    assert label_prompt("Siren.") == "Siren."
    ex = Explainer.load(clap="random:tiny", decoder=decoder_dir, device="cpu")
    prompts = [label_prompt(x) for x in labels]
    for k in range(2):
        lines = [r for r in _results(tmp_path / "out") if r["file"] == f"c{k}.wav"]
        topk = lines[0]["topk"]
        scores = ex.classify(load_audio(inp / f"c{k}.wav"), prompts)
        best = np.argsort(-scores)[:2]
        assert [t["label"] for t in topk] == [labels[i] for i in best]
        assert [t["score"] for t in topk] == pytest.approx(scores[best].tolist(), abs=1e-5)
        assert sorted((r["rank"], r["prompt"]) for r in lines) == [(0, prompts[best[0]]), (1, prompts[best[1]])]
        for r in lines:
            assert (tmp_path / "out" / r["outputs"]["wav"]).is_file() and r["top_k"] == 2
    again = _explain([str(inp), "--labels", str(tmp_path / "labels.txt"), "--top-k", "2",
                      "--out", str(tmp_path / "out"), "--json"], decoder_dir)
    assert json.loads(again.stdout)["already_done"] == 2


def test_prompts_csv_and_prompts_file_resume_per_prompt_at_another_rate(tmp_path, decoder_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    for k, name in enumerate(["a.wav", "b.wav", "c.wav"]):
        sf.write(inp / name, _noise(0.5, 16_000, seed=k), 16_000)
    (tmp_path / "prompts.csv").write_text('path,prompt\nin/a.wav,dog\nin/a.wav,"siren, far away"\nin/b.wav,rain\n')
    (tmp_path / "prompts.txt").write_text("# for every file\nwind\n\n")
    common = [str(inp), "--out", str(tmp_path / "out"), "--sr", "16000", "--prompts-csv", str(tmp_path / "prompts.csv")]
    first = _explain([*common, "--json"], decoder_dir)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["explanations"] == 3 and summary["skipped"]["no_prompt"] == 1      # c.wav has no prompt
    pairs = {(r["file"], r["prompt"]) for r in _results(tmp_path / "out")}
    assert pairs == {("a.wav", "dog"), ("a.wav", "siren, far away"), ("b.wav", "rain")}
    second = _explain([*common, "--prompts-file", str(tmp_path / "prompts.txt"), "--json"], decoder_dir)
    summary = json.loads(second.stdout)
    assert summary["explained"] == 3 and summary["explanations"] == 3                # only the new prompt
    lines = _results(tmp_path / "out")
    assert {(r["file"], r["prompt"]) for r in lines} == pairs | {(f, "wind") for f in ("a.wav", "b.wav", "c.wav")}
    for r in lines:
        info = sf.info(str(tmp_path / "out" / r["outputs"]["wav"]))
        assert info.samplerate == 16_000 and info.frames == 8_000 and r["sr"] == 16_000


@pytest.mark.parametrize("args, message", [
    ([], "Missing option '--prompt' / '-p'. Give one, or --prompts-file, --prompts-csv or --labels."),
    (["-p", "dog", "--top-k", "2"], "--top-k needs --labels FILE (the label set to rank)"),
    (["-p", "dog", "--labels", "LABELS"], "--labels (top-k mode) chooses the prompts itself; do not combine "
                                          "it with --prompt, --prompts-file or --prompts-csv"),
    (["--labels", "LABELS", "--top-k", "3"], "--top-k 3 exceeds the 2 labels in LABELS"),
    (["-p", "dog", "--backend", "onnx"], "--backend onnx needs --engines DIR (a folder written by `lmaczs export`)"),
    (["-p", "dog", "--backend", "trt"], "--backend trt needs --engines DIR (a folder written by `lmaczs export`)"),
    (["-p", " "], "empty prompt: give a text such as --prompt 'dog barking'"),
    (["-p", "dog", "--clap", "random:tiny"], "--clap random:tiny needs --decoder DIR (a folder written by `lmaczs train`)"),
])
def test_usage_errors_exit_2_with_their_message(tmp_path, args, message):
    (tmp_path / "labels.txt").write_text("dog\nrain\n")
    args = [str(tmp_path / "labels.txt") if a == "LABELS" else a for a in args]
    message = message.replace("LABELS", str(tmp_path / "labels.txt"))
    result = CliRunner().invoke(main, ["explain", str(tmp_path), *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"Error: {message}\n" in result.stderr
    assert not (tmp_path / "out").exists()


def test_merge_refuses_a_folder_without_results(tmp_path):
    result = CliRunner().invoke(main, ["merge", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == (f"Error: {tmp_path}: no results.jsonl and no results.rank<r>.jsonl shards; "
                             "pass an `lmaczs explain --out` folder\n")


def test_missing_paths_and_out_are_usage_errors(tmp_path):
    result = CliRunner().invoke(main, ["explain", "-p", "dog", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Error: Missing argument 'PATHS...'." in result.stderr
    result = CliRunner().invoke(main, ["explain", str(tmp_path), "-p", "dog"])
    assert result.exit_code == 2 and "Error: Missing option '--out' / '-o'." in result.stderr


def test_default_model_is_the_bundled_demo(tmp_path):
    sf.write(tmp_path / "a.wav", _noise(0.5, 16_000), 16_000)
    result = CliRunner().invoke(main, ["explain", str(tmp_path), "-p", "the sound of a hiss",
                                       "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    wavs = list((tmp_path / "o").rglob("*.wav"))
    assert len(wavs) == 1 and abs(sf.info(str(wavs[0])).duration - 0.5) < 1e-3


# --------------------------------------------------------------------- the Python API


def test_library_explanation_carries_rate_axes_and_saves_without_overwriting(tiny_clap, decoder_dir, tmp_path):
    ex = Explainer.load(clap="random:tiny", decoder=decoder_dir, device="cpu")
    r = ex.explain(_noise(3.0, 48_000), "dog barking")
    assert r.sample_rate == 48_000 and r.mask.shape == (301, 64)
    assert r.times.shape == (301,) and r.times[1] == pytest.approx(0.01) and r.times[-1] == pytest.approx(3.0)
    assert r.freqs.shape == (64,) and 50 < r.freqs[0] < r.freqs[-1] < 14_000
    path = r.save(tmp_path / "x.wav")
    assert sf.info(str(path)).samplerate == 48_000 and sf.info(str(path)).frames == 3 * 48_000
    before = path.read_bytes()
    with pytest.raises(ExplainError, match="exists: not overwritten"):
        r.save(path)
    assert path.read_bytes() == before


def test_library_converts_integer_pcm_and_refuses_wrong_types(decoder_dir):
    ex = Explainer.load(clap="random:tiny", decoder=decoder_dir, device="cpu")
    wave = _noise(2.0, 48_000)
    pcm = np.round(wave * 32767).astype(np.int16)
    a, b = ex.explain(pcm / np.float32(32768), "dog barking"), ex.explain(pcm, "dog barking")   # int16 / 32768
    assert np.array_equal(a.mask, b.mask) and a.similarity == b.similarity
    u8 = ex.explain(np.full(48_000, 128, np.uint8), "dog barking")            # unsigned: 128 is silence
    assert np.abs(u8.audio).max() == 0.0
    with pytest.raises(ExplainError, match="use explain_prompts"):
        ex.explain(wave, ["dog barking", "siren"])
    with pytest.raises(ExplainError, match="for one prompt use explain"):
        ex.explain_prompts(wave, "dog barking")
    with pytest.raises(ExplainError, match="explain_many takes a list of prompts"):
        list(ex.explain_many([wave], "dog barking"))
    with pytest.raises(ExplainError, match="numpy array"):
        ex.explain([0.0, 0.1, 0.2], "dog barking")
    with pytest.raises(ExplainError, match="dtype"):
        ex.explain(np.array(["a", "b"]), "dog barking")


def test_package_exports_the_public_api():
    import lmaczs_cli

    from lmaczs_cli import AudioError, Explainer as Ex, load_audio   # noqa: F401  (they import)
    assert Ex is Explainer and {"Explainer", "load_audio", "AudioError"} <= set(lmaczs_cli.__all__)


def test_one_pass_top_k_picks_what_scoring_then_explaining_picks(decoder_dir):
    """Top-k mode scores and explains a one-window clip in one encoder pass (longer clips: scored
    over their windows first); either way the labels are those `classify` ranks first and the
    explanations those of `explain_prompts` for them."""
    ex = Explainer.load(clap="random:tiny", decoder=decoder_dir, device="cpu", batch_size=3)
    rng = np.random.default_rng(7)
    waves = [(0.2 * rng.standard_normal(int(s * 48_000))).astype(np.float32) for s in (3.0, 10.0, 7.5, 25.0)]
    labels = [f"label {i}" for i in range(12)]
    prompts = [label_prompt(x) for x in labels]
    got = {r.key: r for r in ex.explain_many(waves, labels=labels, top_k=3)}
    for i, w in enumerate(waves):
        scores = ex.classify(w, prompts)
        best = np.argsort(-scores, kind="stable")[:3]
        assert [t["label"] for t in got[i].topk] == [labels[j] for j in best]
        assert [t["score"] for t in got[i].topk] == pytest.approx(scores[best].tolist(), abs=1e-5)
        ref = ex.explain_prompts(w, [prompts[j] for j in best])
        for a, b in zip(got[i].explanations, ref):
            assert a.prompt == b.prompt and np.abs(a.mask - b.mask).max() <= 1e-5
            assert a.masked_similarity == pytest.approx(b.masked_similarity, abs=1e-5)


def test_folder_pipeline_writes_the_same_files_with_zero_and_four_decode_workers(tmp_path, decoder_dir):
    """Decoding in this process (a prefetch thread) or in 4 worker processes changes nothing written."""
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(6):
        sf.write(inp / f"c{k}.wav", _noise(0.5 + 2.5 * k, 22_050 if k % 2 else 48_000, seed=k), 22_050 if k % 2 else 48_000)
    (inp / "broken.wav").write_bytes(b"RIFF but not audio")
    outs = {}
    for workers in (0, 4):
        out = tmp_path / f"out{workers}"
        result = _explain([str(inp), "-p", "dog barking", "--out", str(out), "--batch-size", "3",
                           "--workers", str(workers), "--no-png", "--json"], decoder_dir)
        assert result.exit_code == 1, result.output          # the broken file is listed, the rest explained
        outs[workers] = out
    wavs = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.wav"))
    assert len(wavs) == 6 and wavs == sorted(p.relative_to(outs[4]) for p in outs[4].rglob("*.wav"))
    for rel in wavs:
        assert (outs[0] / rel).read_bytes() == (outs[4] / rel).read_bytes()
    assert _errors(outs[0]).keys() == _errors(outs[4]).keys() == {"broken.wav"}
    _assert_same_results(_results(outs[0]), _results(outs[4]))


def test_folder_run_keeps_freed_memory_and_draws_pictures_on_one_torch_thread(tmp_path, decoder_dir, monkeypatch):
    """A picture's spectrogram (torch ops in a writer thread) runs on that thread alone, so
    writer threads open no OpenMP teams of their own beside the model; the model's thread
    keeps the count it had."""
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(3):
        sf.write(inp / f"c{k}.wav", _noise(1.0, 48_000, seed=k), 48_000)
    seen, draw = [], R.spectrogram_png

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return draw(*args, **kwargs)

    monkeypatch.setattr(R, "spectrogram_png", spy)
    from lmaczs_cli import runs

    kept, keep = [], runs.keep_freed_memory
    monkeypatch.setattr(runs, "keep_freed_memory", lambda: kept.append(keep()))
    fresh = []
    torch.set_num_threads(2)
    try:
        result = _explain([str(inp), "-p", "dog barking", "--out", str(tmp_path / "out"), "--batch-size", "3"], decoder_dir)
        after = torch.get_num_threads()
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
    finally:
        torch.set_num_threads(1)
    assert result.exit_code == 0, result.output
    assert seen == [1, 1, 1] and after == 2 and fresh == [2]     # a thread started after the run gets the default back
    assert len(kept) == 1                                   # the run kept freed memory (keep_freed_memory)
    assert len(list((tmp_path / "out").rglob("*.png"))) == 3


CHURN = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from lmaczs_cli.runs import keep_freed_memory
    assert keep_freed_memory()
def batch():                   # a model batch's pattern: temporaries of several MB, freed out of order
    a, b = np.ones(4 << 20, np.float32), np.ones(2 << 20, np.float32)
    del a
    c, d = np.ones(1 << 20, np.float32), np.ones(6 << 20, np.float32)
    del b, c
    return d
for _ in range(3):
    batch()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not is_glibc(), reason="keep_freed_memory tunes glibc's malloc; elsewhere it is a no-op")
def test_folder_runs_keep_freed_memory_so_batches_stop_faulting_pages_in():
    """After `keep_freed_memory` (what a folder run calls first), allocating a batch's
    temporaries again reuses the process's memory: no page faults, where glibc's default
    faults tens of thousands of pages back in over the same 20 batches."""
    faults = {}
    for mode in ("default", "keep"):
        env = {**ENV, "NUMPY_MADVISE_HUGEPAGE": "0"}       # faults counted in 4-KiB pages whatever the host's THP
        run = subprocess.run([sys.executable, "-c", CHURN, mode], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        faults[mode] = int(run.stdout.split()[-1])
    assert faults["default"] > 10_000 and faults["keep"] < faults["default"] / 20, faults


def test_folder_run_reports_where_its_time_goes(tmp_path, decoder_dir):
    """The summary's timings split the model thread's time into its stages and time the
    stages of the other threads (decode, wav, pictures), each with its CPU seconds."""
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(3):
        sf.write(inp / f"c{k}.wav", _noise(1.0 + k, 48_000, seed=k), 48_000)
    result = _explain([str(inp), "-p", "dog barking", "--out", str(tmp_path / "out"), "--batch-size", "2", "--json"],
                      decoder_dir)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    t = summary["timings"]
    for key in ("model_s", "model_cpu_s", "decode_s", "wav_s", "wav_cpu_s", "png_s", "png_cpu_s", "log_s", "cpu_s"):
        assert t[key] > 0, key
    assert "mask_s" not in t                                   # no --save-mask: no mask stage
    main_thread = sum(t.get(k, 0.0) for k in ("model_s", "input_wait_s", "batching_s", "writers_wait_s", "drain_s"))
    assert main_thread == pytest.approx(t["wall_s"], abs=0.01)
    assert t["wall_s"] <= summary["seconds"] + 0.01
    assert t["png_cpu_s"] <= t["png_s"] + 0.01


def test_wav_is_16_bit_rounded_to_the_nearest_step_and_reports_its_peak(tmp_path):
    x = np.array([0.0, 0.5 / 32768, 1.5 / 32768, -0.49 / 32768, -1.6 / 32768, 0.25, -0.999, 1.0, -1.0, 1.7, -3.0],
                 np.float32)
    assert R.write_wav(tmp_path / "a.wav", x) == pytest.approx(3.0)          # the peak before clipping
    back, sr = sf.read(tmp_path / "a.wav", dtype="int16")
    assert sr == SAMPLE_RATE and sf.info(str(tmp_path / "a.wav")).subtype == "PCM_16"
    assert back.tolist() == [0, 0, 2, 0, -2, 8192, -32735, 32767, -32768, 32767, -32768]
    y = np.clip(0.3 * np.random.default_rng(0).standard_normal(48_000), -0.99, 0.99).astype(np.float32)
    R.write_wav(tmp_path / "b.wav", y)
    assert np.abs(sf.read(tmp_path / "b.wav", dtype="float32")[0] - y).max() <= 0.5 / 32768


def test_png_is_a_standard_rgb_png_of_the_drawn_pixels():
    """`_encode_png` writes the pixels it is given, RGB, readable by Pillow and matplotlib."""
    import io

    import matplotlib.image as mpimg
    from PIL import Image

    rgba = np.random.default_rng(0).integers(0, 256, (70, 100, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    png = R._encode_png(rgba)
    img = Image.open(io.BytesIO(png))
    assert img.mode == "RGB" and img.size == (100, 70) and "Matplotlib" in img.info["Software"]
    assert (np.asarray(img) == rgba[..., :3]).all()
    assert (np.round(mpimg.imread(io.BytesIO(png)) * 255).astype(np.uint8) == rgba[..., :3]).all()


def test_writer_threads_wanting_a_new_frame_draw_it_once(monkeypatch):
    """Writers asking at once for the frame of a length not seen yet share one drawing."""
    import threading

    drawn = []
    release = threading.Event()

    class Frame:
        def __init__(self, domain, n_samples):
            drawn.append((domain, n_samples))
            release.wait(10)

    monkeypatch.setattr(R, "_Frame", Frame)
    monkeypatch.setattr(R, "_FRAMES", {})         # no frame of this length left from elsewhere, none left behind
    monkeypatch.setattr(R, "_DRAWING", {})
    start = threading.Barrier(5)
    got = []

    def want():
        start.wait()
        got.append(R._frame("mel", 123_457))

    threads = [threading.Thread(target=want) for _ in range(4)]
    for th in threads:
        th.start()
    start.wait()
    for _ in range(10_000):             # the first thread is drawing; the others queue behind it
        if drawn:
            break
        threading.Event().wait(0.001)
    release.set()
    for th in threads:
        th.join()
    assert drawn == [("mel", 123_457)] and len(got) == 4 and all(g is got[0] for g in got)
