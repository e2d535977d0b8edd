"""What `lmaczs explain` writes: output names, wav / npz / PNG files, JSONL logs, the HTML report.

Layout under ``--out`` (mirroring the input tree; ``<stem>`` is the input's relative path
without its extension, see `output_stems`):

    <stem>.<slug>.wav            listenable explanation, 16-bit PCM at --sr (default 48 kHz)
    <stem>.<slug>.residual.wav   --save-residual: what the mask removed, x - x'
    <stem>.<slug>.npz            --save-mask: mask (frames, bins), time_s, freq_hz, domain
    <stem>.<slug>.png            spectrogram / mask / masked with axes, colorbars and the prompt
                                 (unless --no-png)
    results.jsonl                one line per (file, prompt, window); ``empty`` and ``level_db``
                                 describe the whole explanation (`is_empty`)
    errors.jsonl                 one line per file that failed: file, reason
    index.html                   the report: players, images, scores; opens without a server
    .lmaczs-outputs.txt          every output path ever written here (so that a rerun with
                                 --out inside the input tree does not take outputs as inputs)

Every file appears whole or not at all (`files.atomic_path`: temp file, fsync, rename).
A results line is appended only after that file's outputs are in place, all lines of one
file in one ``write``, so a killed run leaves valid JSONL and a rerun knows what is done.
Under torchrun each rank appends to ``results.rank<r>.jsonl`` / ``errors.rank<r>.jsonl``
and `merge` joins them.
"""
from __future__ import annotations

import functools
import hashlib
import html
import json
import os
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .audio import F_MAX, F_MIN, HOP, N_FFT, N_FREQS, N_MELS, RESAMPLE_QUALITY, SAMPLE_RATE
from .files import atomic_path

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
INDEX = "index.html"
LEDGER = ".lmaczs-outputs.txt"
_SHARD = re.compile(r"^(results|errors)\.rank(\d+)\.jsonl$")

WAV_SUBTYPE = "PCM_16"   # plays in every browser, half the size of float; clipped to [-1, 1]

# ----------------------------------------------------------------------------- names

SLUG_MAX = 48                          # characters of a slug's readable part
RESERVED_SLUGS = frozenset({"residual"})   # "<x>.residual.wav" is the residual of <x>
_WORD = re.compile(r"[a-z0-9]+")
_SLUG = re.compile(r"[a-z0-9-]+")
_OUTPUT_EXTENSIONS = ("wav", "png", "npz")
_STEM_MAX_BYTES = 160                  # longer stems are cut and hashed: names stay < 255 bytes


def short_hash(text: str) -> str:
    """8 hex digits of sha256: names a prompt or path in a file name."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def prompt_slug(prompt: str) -> str:
    """The prompt's part of an output name; a pure, injective function of the prompt.

    A prompt of lower-case ASCII words separated by single spaces maps to its words joined
    by "-" ("dog barking" -> "dog-barking"). Any other prompt (capitals, punctuation,
    non-ASCII, longer than SLUG_MAX, or the reserved "residual") keeps its readable words
    and gets 8 hex digits of its hash, so two prompts never share a name
    ("Dog barking!" -> "dog-barking-<hash>"; "犬" -> "<hash>").
    """
    words = _WORD.findall(prompt.lower())
    clean = "-".join(words)
    if clean and prompt == " ".join(words) and len(clean) <= SLUG_MAX and clean not in RESERVED_SLUGS:
        return clean
    head = clean[: SLUG_MAX - 9].rstrip("-")
    return f"{head}-{short_hash(prompt)}" if head else short_hash(prompt)


def safe_rel(rel: str) -> str:
    """A relative POSIX path that cannot leave the folder it is joined to ("..", "." and
    empty parts become "_"; a leading "/" is dropped)."""
    parts = [p if p not in ("", ".", "..") else "_" for p in rel.strip("/").split("/")]
    return "/".join(parts) or "_"


def output_stems(rels: Sequence[str], taken: Iterable[str] = ()) -> dict[str, str]:
    """Map each input's relative path to the stem of its outputs (relative, no extension).

    rels: the inputs (POSIX paths relative to the common input folder); taken: other names
    that exist in the input tree (entries that failed, such as a folder named "x.wav").
    A pure function of these names, so reruns and torchrun shards agree. Per folder:
      1. the name without its extension ("a.wav" -> "a");
      2. the full name ("a.wav", "a.flac") when two inputs share a stem (compared
         case-folded, as a case-insensitive file system would), or when an output of the
         stem could take the name of a file beside it ("a.dog.wav" beside "a.wav"): so an
         output never overwrites an input, even with --out equal to the input folder;
      3. the full name plus a hash of the path when that still clashes, or when the stem
         is too long for a file name.
    """
    by_dir: dict[str, list[str]] = defaultdict(list)
    taken_in: dict[str, list[str]] = defaultdict(list)
    for rel in rels:
        d, _, name = safe_rel(rel).rpartition("/")
        by_dir[d].append(name)
    for rel in taken:
        d, _, name = safe_rel(rel).rpartition("/")
        taken_in[d].append(name)
    stems: dict[str, str] = {}
    for d, names in by_dir.items():   # counted once per folder: linear in the number of files
        bases = Counter(_base(n).casefold() for n in names)
        fulls = Counter(n.casefold() for n in names)
        shadowed = {s for n in names + taken_in[d] for s in _shadowed(n.casefold())}
        for name in names:
            rel = (d + "/" if d else "") + name
            base = _base(name)
            if bases[base.casefold()] == 1 and base.casefold() not in shadowed:
                stem = base
            elif fulls[name.casefold()] == 1 and name.casefold() not in shadowed:
                stem = name
            else:
                stem = f"{name}-{short_hash(rel)}"
            if len(stem.encode("utf-8", "surrogateescape")) > _STEM_MAX_BYTES:
                stem = stem.encode("utf-8", "surrogateescape")[:100].decode("utf-8", "ignore") + "-" + short_hash(rel)
            stems[rel] = (d + "/" if d else "") + stem
    return {rel: stems[_key(rel)] for rel in rels}


def _key(rel: str) -> str:
    d, _, name = safe_rel(rel).rpartition("/")
    return (d + "/" if d else "") + name


def _base(name: str) -> str:
    """The name without its extension (a leading dot does not start one)."""
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def _shadowed(name: str) -> list[str]:
    """The stems S for which an output "S.<slug>.wav" (or .residual.wav / .png / .npz) is `name`."""
    parts = name.split(".")
    out = []
    if len(parts) >= 3 and parts[-1] in _OUTPUT_EXTENSIONS and _SLUG.fullmatch(parts[-2]):
        out.append(".".join(parts[:-2]))
        if parts[-2] == "residual" and len(parts) >= 4 and _SLUG.fullmatch(parts[-3]):
            out.append(".".join(parts[:-3]))
    return [s for s in out if s]


def output_names(stem: str, prompt: str) -> dict[str, str]:
    """Relative paths of every output of one (input, prompt): kind -> path."""
    base = f"{stem}.{prompt_slug(prompt)}"
    return {"wav": base + ".wav", "residual": base + ".residual.wav", "mask": base + ".npz", "png": base + ".png"}


# ----------------------------------------------------------------------------- files


def to_output_rate(wave: np.ndarray, sr: int) -> np.ndarray:
    """float32 (n,) at 48 kHz -> float32 (~n * sr / 48000,) at sr (soxr; at least one sample)."""
    if sr == SAMPLE_RATE or wave.size == 0:
        return wave
    import soxr

    y = soxr.resample(wave, SAMPLE_RATE, sr, quality=RESAMPLE_QUALITY).astype(np.float32)
    return y if y.size else wave[:1]


def write_wav(path: str | os.PathLike, wave: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """Write float32 (n,) at 48 kHz as a 16-bit PCM wav at `sr`, atomically.

    Samples are clipped to [-1, 1] and rounded to the nearest 16-bit step (`pcm16`). Returns
    the peak |x| before clipping, so a caller can record that clipping happened.
    """
    import soundfile as sf

    y = to_output_rate(np.asarray(wave, np.float32), sr)
    peak = float(np.abs(y).max()) if y.size else 0.0
    with atomic_path(path) as tmp:
        sf.write(str(tmp), pcm16(y), sr, subtype=WAV_SUBTYPE, format="WAV")
    return peak


def pcm16(wave: np.ndarray) -> np.ndarray:
    """float32 (n,) -> int16 (n,): x * 32768 rounded to nearest, clipped to [-32768, 32767].

    The inverse of reading 16-bit PCM as float (int16 / 32768), so a written wav reads back
    within half a step; done here, one vectorised pass, rather than by libsndfile's float
    conversion, which cost eight times as much per file. NaN is written as silence."""
    scaled = np.multiply(np.nan_to_num(wave, nan=0.0), np.float32(32768.0), dtype=np.float32)
    np.rint(scaled, out=scaled)
    np.clip(scaled, -32768.0, 32767.0, out=scaled)
    return scaled.astype(np.int16)


@functools.lru_cache(maxsize=None)
def mask_frequencies(domain: str) -> np.ndarray:
    """Frequency in Hz of each mask bin: the 64 Slaney mel band centres (mel) or the 513
    STFT bin frequencies (stft). float64 (bins,)."""
    if domain == "mel":
        import librosa

        return librosa.mel_frequencies(n_mels=N_MELS + 2, fmin=F_MIN, fmax=F_MAX, htk=False)[1:-1]
    return np.arange(N_FREQS) * SAMPLE_RATE / N_FFT


def mask_times(frames: int) -> np.ndarray:
    """Centre time in s of each STFT frame (centred frames, hop HOP): float64 (frames,)."""
    return np.arange(frames) * HOP / SAMPLE_RATE


def write_mask(path: str | os.PathLike, mask: np.ndarray, domain: str, prompt: str, file: str) -> None:
    """Write a mask with its axes as .npz, atomically: mask float32 (frames, bins) in [0, 1],
    time_s (frames,), freq_hz (bins,), domain, prompt, file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, mask=mask.astype(np.float32), time_s=mask_times(mask.shape[0]),
                            freq_hz=mask_frequencies(domain), domain=np.array(domain),
                            prompt=np.array(prompt), source=np.array(file))


# ----------------------------------------------------------------------------- PNG

PNG_SIZE_IN = (10.0, 7.0)   # inches at PNG_DPI: 1000 x 700 px; index.html shows it as a thumbnail
PNG_DPI = 100
PNG_MAX_COLUMNS = 2000      # time columns drawn at most: a long file is averaged down to this
DB_RANGE = 80.0             # dB shown below the loudest cell of the input
DB_LABEL = "dB (0 = loudest)"  # colorbar label of the input and masked panels


def _resize_time(x: np.ndarray, width: int) -> np.ndarray:
    """(T, F) -> (width, F): mean over groups of frames, or nearest frame when T < width."""
    t = x.shape[0]
    if t == width:
        return x
    if t > width:
        edges = np.linspace(0, t, width + 1).astype(int)
        return np.add.reduceat(x, edges[:-1], axis=0) / np.diff(edges)[:, None]
    return x[np.minimum((np.arange(width) * t) // width, t - 1)]


def log_spectrogram(wave: np.ndarray, domain: str) -> np.ndarray:
    """dB power of a whole signal on the mask's grid: (n // HOP + 1, 64 or 513) float32.

    Computed in 10-s pieces on the frame grid, each with 3 hops of context on both sides
    (more than half an FFT), so an hours-long file is never held as a whole complex STFT
    and the frames match a whole-file STFT away from the file's own ends.
    """
    import torch

    from . import spectral
    from .audio import CLIP_SAMPLES

    n, margin = wave.size, 3 * HOP
    frames = n // HOP + 1
    out = []
    for start in range(0, frames * HOP, CLIP_SAMPLES):
        lo = max(0, start - margin)
        piece = torch.from_numpy(np.ascontiguousarray(wave[lo: start + CLIP_SAMPLES + margin]))
        if piece.numel() <= N_FFT // 2:   # reflect padding needs more: zeros (a few-ms clip)
            piece = torch.nn.functional.pad(piece, (0, N_FFT - piece.numel()))
        P = spectral.power(spectral.stft(piece[None]))[0]
        db = spectral.to_db(spectral.mel_power(P) if domain == "mel" else P).numpy()
        first = (start - lo) // HOP
        out.append(db[first: first + min(CLIP_SAMPLES // HOP, frames - start // HOP)])
    return np.concatenate(out)


def spectrogram_png(wave: np.ndarray, mask: np.ndarray, domain: str, prompt: str | None = None,
                    similarity: float | None = None, masked_similarity: float | None = None) -> bytes:
    """`spectrogram_figure` as PNG bytes (PNG_SIZE_IN at PNG_DPI), drawn fast.

    The figure's frame (axes, ticks, colorbars, labels) depends only on the domain and the
    duration, so it is drawn once and kept (`_Frame`); each picture pastes its
    three colour-mapped panels into the frame's pixel boxes and draws its title. Same
    picture as saving `spectrogram_figure`, at a few hundredths of the cost.
    """
    spec, mask, masked = _panels(wave, mask, domain)
    frame = _frame(domain, wave.size)
    width = min(spec.shape[0], PNG_MAX_COLUMNS)
    pictures = []
    for (x0, x1, y0, y1), (_, values, cmap, (lo, hi), _) in zip(frame.boxes, _panel_specs(spec, mask, masked)):
        tile = _resize_time(np.nan_to_num(values, nan=lo), width) if spec.shape[0] else np.full((1, values.shape[1]), lo)
        rows = ((np.arange(y1 - y0) + 0.5) * tile.shape[1] / (y1 - y0)).astype(int)[::-1]   # low frequencies at the bottom
        cols = ((np.arange(x1 - x0) + 0.5) * tile.shape[0] / (x1 - x0)).astype(int)
        level = np.clip((tile - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8).T         # (bins, width)
        rgba = np.take(_lut(cmap).view(np.uint32).ravel(), level[rows][:, cols])          # (y, x): 4 bytes a pixel
        pictures.append(rgba.view(np.uint8).reshape(*rgba.shape, 4))
    return _encode_png(frame.draw(_title(prompt, similarity, masked_similarity), pictures))


def _encode_png(rgba: np.ndarray) -> bytes:
    """(H, W, 4) uint8 -> PNG bytes: 8-bit RGB (the figure is opaque), rows unfiltered and
    deflated at level 1, tagged as matplotlib tags its own PNGs. On these pictures
    unfiltered rows deflate smaller than adaptively filtered ones, at a third of the cost
    of Pillow's encoder (which took most of a picture's time)."""
    import struct
    import zlib

    import matplotlib

    h, w, _ = rgba.shape
    rows = np.empty((h, 1 + 3 * w), np.uint8)
    rows[:, 0] = 0                                     # each row's filter type: None
    rgb = rows[:, 1:].reshape(h, w, 3)
    for c in range(3):                                 # channel by channel: a strided (.., :3) copy is slower
        rgb[..., c] = rgba[..., c]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    software = f"Matplotlib version{matplotlib.__version__}, https://matplotlib.org/"
    return b"".join([b"\x89PNG\r\n\x1a\n",
                     chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),   # 8-bit RGB, no interlace
                     chunk(b"tEXt", b"Software\0" + software.encode("latin-1")),
                     chunk(b"IDAT", zlib.compress(rows, 1)),
                     chunk(b"IEND", b"")])


@functools.lru_cache(maxsize=None)
def _lut(cmap: str) -> np.ndarray:
    """A matplotlib colormap as a (256, 4) uint8 table."""
    from matplotlib import colormaps

    return colormaps[cmap](np.linspace(0.0, 1.0, 256), bytes=True)


def _panels(wave: np.ndarray, mask: np.ndarray, domain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input dB, mask, masked input dB), each (frames, bins); dB relative to the input's loudest cell."""
    spec = log_spectrogram(wave, domain)
    frames = min(spec.shape[0], mask.shape[0])
    spec, mask = spec[:frames], mask[:frames].astype(np.float64)
    top = float(spec.max()) if frames and np.isfinite(spec).all() else 0.0
    spec = spec - top
    masked = spec + 20 * np.log10(np.maximum(mask, 1e-5))    # a gain on magnitude: power sees M²
    return spec, mask, masked


def _panel_specs(spec: np.ndarray, mask: np.ndarray, masked: np.ndarray) -> list[tuple[Any, ...]]:
    """(name, values, colormap, (vmin, vmax), colorbar label) of the three panels."""
    db = (-DB_RANGE, 0.0)
    return [("input", spec, "magma", db, DB_LABEL),
            ("mask", mask, "viridis", (0.0, 1.0), "mask (gain)"),
            ("masked input: what the model kept", masked, "magma", db, DB_LABEL)]


def _title(prompt: str | None, similarity: float | None, masked_similarity: float | None) -> str:
    import textwrap

    if prompt is None:
        return ""
    title = f"\u201c{prompt}\u201d"
    if similarity is not None:
        title += f"  similarity {similarity:.3f}"
    if masked_similarity is not None:
        title += f", masked {masked_similarity:.3f}"
    return textwrap.shorten(title, 140, placeholder=" ...").replace("$", r"\$")


def spectrogram_figure(wave: np.ndarray, mask: np.ndarray, domain: str, prompt: str | None = None,
                       similarity: float | None = None, masked_similarity: float | None = None) -> Any:
    """Three stacked panels sharing a time axis: spectrogram (dB below the input's loudest
    cell), mask, masked spectrogram (same dB scale), each with a colorbar; time in s,
    frequency in Hz (low at the bottom); the title names the prompt and the similarities
    before and after masking. Returns a matplotlib Figure.

    wave: float32 (n,) at 48 kHz; mask: (n // HOP + 1, bins) in [0, 1] on the `domain` grid.
    Drawn with matplotlib's object API (no pyplot state), so writer threads can draw at once.
    """
    spec, mask, masked = _panels(wave, mask, domain)
    return _figure(_panel_specs(spec, mask, masked), min(spec.shape[0], PNG_MAX_COLUMNS), wave.size / SAMPLE_RATE,
                   mask_frequencies(domain), _title(prompt, similarity, masked_similarity))


def _figure(panels: list[tuple[Any, ...]], width: int, duration: float, freqs: np.ndarray, title: str) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=PNG_SIZE_IN, dpi=PNG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    for ax, (name, values, cmap, (lo, hi), unit) in zip(axes, panels):
        tile = _resize_time(np.nan_to_num(values, nan=lo), max(width, 1)).T if values.shape[0] else np.full((1, 1), lo)
        im = ax.imshow(tile, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
                       extent=(0.0, max(duration, 1e-3), -0.5, len(freqs) - 0.5), interpolation="nearest")
        fig.colorbar(im, ax=ax, label=unit, pad=0.01)
        ax.set_ylabel("frequency (Hz)")
        ax.set_title(name, fontsize=9, loc="left")
        _frequency_ticks(ax, freqs)
    axes[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


class _Frame:
    """A drawn spectrogram figure without its panels' pictures or its title: the canvas to
    restore, the title to redraw (one thread at a time), each panel's pixel box (x0, x1, y0,
    y1; rows from the top)."""

    def __init__(self, domain: str, n_samples: int) -> None:
        import warnings

        # A prompt in a script the font lacks (CJK in DejaVu Sans) draws boxes; matplotlib would
        # also warn once per glyph. A process-wide filter: catch_warnings is not thread-safe.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from", category=UserWarning)
        freqs = mask_frequencies(domain)
        blank = np.zeros((1, len(freqs)))
        fig = _figure(_panel_specs(blank, blank, blank), 1, n_samples / SAMPLE_RATE, freqs,
                      "\u201cTitle\u201d  similarity 0.000, masked 0.000")     # room for a title
        fig.canvas.draw()                          # lays it out once ...
        fig.set_layout_engine("none")              # ... and keeps that layout
        for ax in fig.axes:                        # panels left blank (transparent): pasted per picture
            for im in ax.images:
                if ax.get_label() != "<colorbar>":
                    im.set_data(np.full((1, 1), np.nan))
        self.title = fig._suptitle
        self.title.set_text("")
        fig.canvas.draw()
        self.fig, self.background = fig, fig.canvas.copy_from_bbox(fig.bbox)
        self.lock = threading.Lock()
        height = int(fig.bbox.height)
        self.panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
        self.boxes = []
        for ax in self.panels:
            b = ax.get_window_extent()
            self.boxes.append((int(round(b.x0)), int(round(b.x1)), height - int(round(b.y1)), height - int(round(b.y0))))

    def draw(self, title: str, panels: list[np.ndarray]) -> np.ndarray:
        """The frame with `title` and the panels' RGBA pictures (each the size of its box;
        the spines are drawn over them), as a fresh (H, W, 4) uint8 array."""
        with self.lock:
            canvas = self.fig.canvas
            canvas.restore_region(self.background)
            pixels = np.asarray(canvas.buffer_rgba())
            for (x0, x1, y0, y1), picture in zip(self.boxes, panels):
                pixels[y0:y1, x0:x1] = picture
            for ax in self.panels:
                for spine in ax.spines.values():
                    self.fig.draw_artist(spine)
            self.title.set_text(title)
            if title:
                self.fig.draw_artist(self.title)
            return np.array(pixels)


_FRAMES: dict[tuple[str, int], _Frame] = {}
_FRAMES_KEPT = 8            # one per (domain, length) seen recently
_FRAMES_LOCK = threading.Lock()
_DRAWING: dict[tuple[str, int], threading.Lock] = {}   # (domain, length) -> held while its frame is drawn


def _frame(domain: str, n_samples: int) -> _Frame:
    """The frame for (domain, length), shared by the writer threads (`_Frame.draw` locks).
    A new one is drawn by one thread (a third of a second); the others wanting the same
    one wait for it instead of drawing it again, while other lengths draw at once."""
    key = (domain, n_samples)
    with _FRAMES_LOCK:
        frame = _FRAMES.pop(key, None)
        if frame is not None:
            _FRAMES[key] = frame           # most recently used last
            return frame
        drawing = _DRAWING.setdefault(key, threading.Lock())
    with drawing:
        with _FRAMES_LOCK:
            frame = _FRAMES.get(key)       # drawn while this thread waited
        if frame is None:
            frame = _Frame(domain, n_samples)
        with _FRAMES_LOCK:
            _FRAMES[key] = _FRAMES.pop(key, frame)
            while len(_FRAMES) > _FRAMES_KEPT:
                _FRAMES.pop(next(iter(_FRAMES)))
            _DRAWING.pop(key, None)
            return frame


def _frequency_ticks(ax: Any, freqs: np.ndarray) -> None:
    """Label the bin axis in Hz at round frequencies (bins are mel-spaced or linear)."""
    ticks = [hz for hz in (100, 200, 500, 1000, 2000, 5000, 10_000, 20_000) if freqs[0] <= hz <= freqs[-1]]
    ax.set_yticks([float(np.interp(hz, freqs, np.arange(len(freqs)))) for hz in ticks],
                  [f"{hz // 1000}k" if hz >= 1000 else str(hz) for hz in ticks])


def write_png(path: str | os.PathLike, wave: np.ndarray, mask: np.ndarray, domain: str, prompt: str | None = None,
              similarity: float | None = None, masked_similarity: float | None = None) -> None:
    data = spectrogram_png(wave, mask, domain, prompt, similarity, masked_similarity)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ----------------------------------------------------------------------------- empty explanations

EMPTY_MASK_MEAN = 1e-3   # a mask keeping less than 0.1 % of the time-frequency grid keeps (next to) nothing
EMPTY_LEVEL_DB = -60.0   # an explanation this far below its input (RMS) is silence to a listener
LEVEL_FLOOR_DB = -200.0  # the level recorded for a silent explanation


def relative_level_db(explanation: np.ndarray, original: np.ndarray | None) -> float | None:
    """RMS level of an explanation relative to its input, in dB (0: as loud), floored at
    LEVEL_FLOOR_DB (a silent explanation); None when the input is digital silence or not at hand."""
    if original is None:
        return None
    ref = _rms(original)
    if ref == 0.0:
        return None
    rms = _rms(explanation)
    return max(20.0 * float(np.log10(rms / ref)), LEVEL_FLOOR_DB) if rms > 0 else LEVEL_FLOOR_DB


def _rms(x: np.ndarray, block: int = 1 << 16) -> float:
    """Root mean square, summed in float64 a block at a time (an hours-long file needs no copy).
    Squares and sums are numpy ufuncs, never BLAS (``np.dot``): this runs in the writer threads
    beside the model, and OpenBLAS's own thread pool, spinning after each call, took the cores
    from the model's threads (a folder run lost ~20 ms a file to it)."""
    if not x.size:
        return 0.0
    total = sum(float(np.square(x[i: i + block], dtype=np.float64).sum()) for i in range(0, x.size, block))
    return float(np.sqrt(total / x.size))


def is_empty(mask_mean: float, level_db: float | None) -> bool:
    """Whether an explanation keeps (next to) nothing: its mask mean is below EMPTY_MASK_MEAN, or
    the explanation is EMPTY_LEVEL_DB or more below its input. It says the model finds nothing of
    the prompt in the clip; such a wav is no explanation of anything."""
    return mask_mean < EMPTY_MASK_MEAN or (level_db is not None and level_db <= EMPTY_LEVEL_DB)


# ----------------------------------------------------------------------------- JSONL


def dumps(record: Any) -> str:
    """One JSON line: UTF-8 text where it can be, ASCII escapes for undecodable file names."""
    s = json.dumps(record, ensure_ascii=False, allow_nan=False)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:   # lone surrogates from undecodable bytes in a file name
        s = json.dumps(record, allow_nan=False)
    return s


class JsonlLog:
    """Appends groups of records to a JSONL file: each group in one write (O_APPEND), so a
    killed process leaves whole lines only. Thread-safe."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def append(self, records: Sequence[Any]) -> None:
        if not records:
            return
        data = "".join(dumps(r) + "\n" for r in records).encode("utf-8")
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file; lines that do not parse (a cut last line) are left out."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Replace a JSONL file atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(dumps(r) + "\n")


def result_key(r: dict[str, Any]) -> tuple[str, str, int]:
    return (r.get("file", ""), r.get("prompt", ""), int(r.get("window", 0)))


def error_key(r: dict[str, Any]) -> str:
    return r.get("file", "")


class Ledger:
    """Append-only list of the output paths written under an out folder (relative, one a line).

    A path is listed before its file is renamed into place, so every output that exists is
    listed; discovery leaves listed files out when --out lies inside the input tree.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self._log = JsonlLog(Path(out) / LEDGER)
        self._seen: set[str] = set(read_ledger(out))
        self._lock = threading.Lock()

    def add(self, rels: Iterable[str]) -> None:
        with self._lock:
            new = [r for r in dict.fromkeys(rels) if r not in self._seen]
            self._seen.update(new)
        self._log.append(new)

    def close(self) -> None:
        self._log.close()


def read_ledger(out: str | os.PathLike) -> list[str]:
    """Output paths (relative to `out`) listed in its ledger."""
    try:
        lines = (Path(out) / LEDGER).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    rels = []
    for line in lines:
        try:
            rels.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rels if isinstance(r, str)]


# ----------------------------------------------------------------------------- shards


def shard_paths(out: str | os.PathLike) -> dict[str, list[Path]]:
    """The results / errors shards under `out`, each list in rank order."""
    found: dict[str, list[tuple[int, Path]]] = {"results": [], "errors": []}
    with os.scandir(out) as it:
        for e in it:
            m = _SHARD.match(e.name)
            if m and e.is_file():
                found[m.group(1)].append((int(m.group(2)), Path(e.path)))
    return {k: [p for _, p in sorted(v)] for k, v in found.items()}


def merge(out: str | os.PathLike, *, drop_result: Callable[[dict[str, Any]], bool] | None = None,
          drop_error: Callable[[dict[str, Any]], bool] | None = None, index: bool = True) -> dict[str, int]:
    """Join results.jsonl / errors.jsonl with every rank shard into one sorted file each.

    Lines are keyed by (file, prompt, window) and errors by file; a later source (shards,
    in rank order, after the joined file) replaces an earlier line with the same key, so
    merging twice changes nothing. `drop_result` / `drop_error` leave lines out (a rerun
    uses them to drop what it will redo). The shards are removed once the joined files are
    in place; then index.html is rewritten. Returns line counts.
    """
    out = Path(out)
    shards = shard_paths(out)
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in [out / RESULTS, *shards["results"]]:
        for r in read_jsonl(path):
            results[result_key(r)] = r
    errors: dict[str, dict[str, Any]] = {}
    for path in [out / ERRORS, *shards["errors"]]:
        for r in read_jsonl(path):
            errors[error_key(r)] = r
    res = [r for _, r in sorted(results.items()) if not (drop_result and drop_result(r))]
    err = [r for _, r in sorted(errors.items()) if not (drop_error and drop_error(r))]
    if res or (out / RESULTS).exists():
        write_jsonl(out / RESULTS, res)
    if err or (out / ERRORS).exists():
        write_jsonl(out / ERRORS, err)
    for path in shards["results"] + shards["errors"]:
        path.unlink(missing_ok=True)
    if index:
        write_index(out, res, err)
    return {"results": len(res), "errors": len(err),
            "files": len({r["file"] for r in res}), "shards": len(shards["results"]) + len(shards["errors"])}


_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.part$")   # files.atomic_path's temporaries


def remove_temporaries(out: str | os.PathLike) -> int:
    """Remove temp files a killed run left under `out` (never whole outputs). Returns the count."""
    n = 0
    for root, _, files in os.walk(out):
        for name in files:
            if _TEMP.match(name):
                with_path = os.path.join(root, name)
                try:
                    os.unlink(with_path)
                    n += 1
                except OSError:
                    pass
    return n


# ----------------------------------------------------------------------------- HTML

# Laid out for a 1280-px window and narrower: the table takes the page's width with fixed
# column shares (table-layout: fixed), long names wrap anywhere, players and pictures fit
# their cells; nothing is wider than the page.
_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;margin:1em 0;width:100%;table-layout:fixed}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;overflow-wrap:anywhere}
th{background:#f3f3f3;text-align:left;font-weight:600;font-size:13px;overflow-wrap:normal}td.n{text-align:right;font-variant-numeric:tabular-nums}
.file{font-family:ui-monospace,monospace;font-size:13px}.small,.note{color:#666;font-size:12px}
.pair{display:flex;gap:6px}.pair>figure{flex:1 1 0;min-width:0;margin:0}
figcaption{font-size:12px;color:#555}audio{width:100%;min-width:0;display:block}
img.thumb{width:100%;height:auto;display:block;border:1px solid #ddd}
tr.empty td{background:#fafafa}.nothing{color:#a33;font-size:12px;margin:0 0 4px}
col.file{width:16%}col.prompt{width:15%}col.n{width:8%}col.listen{width:26%}col.picture{width:22%}
table.errors col.file{width:30%}"""

EMPTY_NOTE = "the model finds nothing of this prompt here"


def _href(target: str, base: Path) -> str | None:
    """A relative, percent-encoded link from folder `base` to `target`, or None if it does not exist."""
    if not os.path.exists(target):
        return None
    try:
        rel = os.path.relpath(target, base)
    except ValueError:   # another drive (Windows): only an absolute URL reaches it
        return Path(target).resolve().as_uri()
    return quote(os.fsencode(rel).replace(os.sep.encode(), b"/"))


def _esc(x: Any) -> str:
    text = str(x)
    return html.escape(text.encode("utf-8", "replace").decode("utf-8") if _has_surrogates(text) else text)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _num(x: Any) -> str:
    return "" if x is None else f"{x:.3f}"


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds >= 1 else f"{1000 * seconds:.0f} ms"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _group_order(lines: list[dict[str, Any]]) -> tuple[int, str]:
    """Prompts in the order given (top-k: best first); lines written before that was recorded
    fall back to alphabetical order after them."""
    first = lines[0]
    order = first.get("prompt_order", first.get("rank"))
    return (order if isinstance(order, int) else 1 << 30, first.get("prompt", ""))


def write_index(out: str | os.PathLike, results: Sequence[dict[str, Any]], errors: Sequence[dict[str, Any]]) -> None:
    """index.html: per file, one row per prompt (in the order given) with the similarities,
    the original and the explanation players side by side and the picture as a thumbnail
    (click for full size); then the files that failed. Columns with nothing in them for the
    whole run are left out; an empty explanation says so.

    Every name and prompt is HTML-escaped; every link is relative (percent-encoded) and
    only made when its file exists, so the page opens from disk without a server.
    The original audio is linked where it lies, not copied.
    """
    out = Path(out)
    by_file: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_file[r["file"]][r["prompt"]].append(r)
    cols = {"heard": any(r.get("listened_similarity") is not None for r in results),
            "masked": any(r.get("masked_similarity") is not None for r in results),
            "picture": any((r.get("outputs") or {}).get("png") for r in results)}
    rows: list[str] = []
    missing_originals = n_groups = n_empty = 0
    for file in sorted(by_file):
        groups = sorted(by_file[file].values(), key=_group_order)
        first = groups[0][0]
        original = _href(first.get("input", ""), out)
        missing_originals += original is None
        windows = max(len(g) for g in groups)
        file_cell = (f'<td class="file" rowspan="{len(groups)}">{_esc(file)}<div class="small">'
                     f'{_duration(first.get("duration_s"))}'
                     + (f", {windows} windows of 10 s" if windows > 1 else "") + "</div></td>")
        for i, lines in enumerate(groups):
            n_groups += 1
            rows.append(_index_row(out, lines, original, cols, file_cell if i == 0 else ""))
            n_empty += bool(lines[0].get("empty"))
    heads = [("file", "file"), ("prompt", "prompt"), ("n", "similarity")]
    heads += [("n", "masked")] * cols["masked"] + [("n", "heard")] * cols["heard"] + [("n", "mask mean")]
    heads += [("listen", "original | explanation")] + [("picture", "spectrogram | mask | masked")] * cols["picture"]
    summary = (f"{len(by_file)} files, {n_groups} explanations"
               + (f" ({n_empty} empty: {EMPTY_NOTE})" if n_empty else "") + f", {len(errors)} failed"
               + "".join(f', <a href="{name}">{name}</a>' for name in (RESULTS, ERRORS) if (out / name).exists()) + ".")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>lmaczs explanations</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>lmaczs explanations</h1>", f"<p>{summary}</p>",
        '<p class="note">Similarities are cosines between the CLAP audio and text embeddings: of the '
        "input, of the masked input the model saw" + (", of the explanation wav re-encoded (heard)" if cols["heard"] else "")
        + "; means over the 10-s windows. An explanation is marked empty when its mask keeps less than "
        f"{100 * EMPTY_MASK_MEAN:g} % of the time-frequency grid or its wav is {-EMPTY_LEVEL_DB:g} dB or more below "
        "the input. Original audio is linked where it lies, not copied; browsers play wav, flac, ogg and mp3 "
        "but not every format libsndfile reads.</p>",
        "<table class=\"results\"><colgroup>" + "".join(f'<col class="{c}">' for c, _ in heads) + "</colgroup>",
        "<thead><tr>" + "".join(f"<th>{h}</th>" for _, h in heads) + "</tr></thead><tbody>",
        *rows, "</tbody></table>",
    ]
    if missing_originals:
        parts.append(f'<p class="note">{missing_originals} originals are no longer where they were read.</p>')
    if errors:
        parts += ["<h2>Failed files</h2>", '<table class="errors"><colgroup><col class="file"><col></colgroup>',
                  "<thead><tr><th>file</th><th>reason</th></tr></thead><tbody>",
                  *(f'<tr><td class="file">{_esc(e.get("file", ""))}</td><td>{_esc(e.get("reason", ""))}</td></tr>'
                    for e in errors), "</tbody></table>"]
    parts.append("</body></html>")
    with atomic_path(out / INDEX) as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")


def _index_row(out: Path, lines: list[dict[str, Any]], original: str | None, cols: dict[str, bool],
               file_cell: str) -> str:
    """One (file, prompt) row of index.html."""
    first = lines[0]
    prompt = first["prompt"]
    links = {k: _href(str(out / v), out) for k, v in (first.get("outputs") or {}).items()}
    extra = []
    for t in first.get("topk") or []:
        if t.get("prompt") == prompt:
            extra.append(f"top-{first.get('rank', 0) + 1} label {_esc(t['label'])}, score {t['score']:.3f}")
    if links.get("mask"):
        extra.append(f'<a href="{html.escape(links["mask"])}">mask .npz</a>')
    if links.get("residual"):
        extra.append(f'<a href="{html.escape(links["residual"])}">residual .wav</a>')
    cells = [file_cell, f'<td>{_esc(prompt)}' + "".join(f'<div class="small">{x}</div>' for x in extra) + "</td>",
             f'<td class="n">{_num(_mean([x.get("similarity") for x in lines]))}</td>']
    if cols["masked"]:
        cells.append(f'<td class="n">{_num(_mean([x.get("masked_similarity") for x in lines]))}</td>')
    if cols["heard"]:
        cells.append(f'<td class="n">{_num(_mean([x.get("listened_similarity") for x in lines]))}</td>')
    cells.append(f'<td class="n">{_num(_mean([x.get("mask_mean") for x in lines]))}</td>')
    empty = bool(first.get("empty"))
    note = ""
    if empty:
        level = first.get("level_db")
        note = (f'<p class="nothing">Empty: {EMPTY_NOTE}' + (f" (its wav is {-level:.0f} dB below the input)"
                if isinstance(level, (int, float)) and level > LEVEL_FLOOR_DB else "") + ".</p>")
    cells.append("<td>" + note + '<div class="pair">' + _player(original, "original", "original not found")
                 + _player(links.get("wav"), "explanation", "not written") + "</div></td>")
    if cols["picture"]:
        png = links.get("png")
        cells.append(f'<td><a href="{html.escape(png)}"><img class="thumb" src="{html.escape(png)}" '
                     f'alt="spectrogram, mask and masked spectrogram for {_esc(prompt)}" loading="lazy"></a></td>'
                     if png else '<td class="note">no picture</td>')
    return ('<tr class="empty">' if empty else "<tr>") + "".join(cells) + "</tr>"


def _player(href: str | None, caption: str, missing: str) -> str:
    if href is None:
        return f'<figure><figcaption>{caption}</figcaption><span class="note">{missing}</span></figure>'
    h = html.escape(href)
    return (f'<figure><figcaption><a href="{h}">{caption}</a></figcaption>'
            f'<audio controls preload="none" src="{h}"></audio></figure>')
