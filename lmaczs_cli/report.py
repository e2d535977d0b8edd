"""What `lmaczs explain` writes: output names, wav / npz / PNG files, JSONL logs, the HTML report.

Layout under ``--out`` (mirroring the input tree; ``<stem>`` is the input's relative path
without its extension, see `output_stems`):

    <stem>.<slug>.wav            listenable explanation, 16-bit PCM at --sr (default 48 kHz)
    <stem>.<slug>.residual.wav   --save-residual: what the mask removed, x - x'
    <stem>.<slug>.npz            --save-mask: mask (frames, bins), time_s, freq_hz, domain
    <stem>.<slug>.png            --save-png: spectrogram / mask / masked, with axes
    results.jsonl                one line per (file, prompt, window)
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
import struct
import threading
import zlib
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

    Samples are clipped to [-1, 1] (libsndfile would wrap them). Returns the peak |x| before
    clipping, so a caller can record that clipping happened.
    """
    import soundfile as sf

    y = to_output_rate(np.asarray(wave, np.float32), sr)
    peak = float(np.abs(y).max()) if y.size else 0.0
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(y, -1.0, 1.0), sr, subtype=WAV_SUBTYPE, format="WAV")
    return peak


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
# Written by hand (numpy + zlib) while matplotlib was not a dependency: a PNG is a header,
# filtered rows through zlib and CRCs, and the few labels need only the 5x7 bitmap glyphs
# below. `lmaczs eval` now depends on matplotlib; drawing these panels with it instead is
# a known follow-up (it would drop this writer and its glyph table).

_GLYPHS = {   # 5 x 7 bitmaps, rows separated by "/"
    "0": ".###./#...#/#..##/#.#.#/##..#/#...#/.###.", "1": "..#../.##../..#../..#../..#../..#../.###.",
    "2": ".###./#...#/....#/...#./..#../.#.../#####", "3": "#####/...#./..#../...#./....#/#...#/.###.",
    "4": "...#./..##./.#.#./#..#./#####/...#./...#.", "5": "#####/#..../####./....#/....#/#...#/.###.",
    "6": "..##./.#.../#..../####./#...#/#...#/.###.", "7": "#####/....#/...#./..#../.#.../.#.../.#...",
    "8": ".###./#...#/#...#/.###./#...#/#...#/.###.", "9": ".###./#...#/#...#/.####/....#/...#./.##..",
    ".": "...../...../...../...../...../.##../.##..", "-": "...../...../...../.###./...../...../.....",
    "(": "...#./..#../.#.../.#.../.#.../..#../...#.", ")": ".#.../..#../...#./...#./...#./..#../.#...",
    " ": "...../...../...../...../...../...../.....",
    "a": "...../...../.###./....#/.####/#...#/.####", "c": "...../...../.###./#..../#..../#...#/.###.",
    "d": "....#/....#/.##.#/#..##/#...#/#...#/.####", "e": "...../...../.###./#...#/#####/#..../.###.",
    "g": "...../.####/#...#/#...#/.####/....#/.###.", "i": "..#../...../.##../..#../..#../..#../.###.",
    "k": "#..../#..../#..#./#.#../##.../#.#../#..#.", "m": "...../...../##.#./#.#.#/#.#.#/#...#/#...#",
    "o": "...../...../.###./#...#/#...#/#...#/.###.", "p": "...../####./#...#/#...#/####./#..../#....",
    "r": "...../...../#.##./##..#/#..../#..../#....", "s": "...../...../.####/#..../.###./....#/####.",
    "t": ".#.../.#.../###../.#.../.#.../.#..#/..##.", "z": "...../...../#####/...#./..#../.#.../#####",
    "B": "####./#...#/#...#/####./#...#/#...#/####.", "H": "#...#/#...#/#...#/#####/#...#/#...#/#...#",
}
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
_PANEL_H = 128
_LEFT, _RIGHT, _TITLE, _BOTTOM = 44, 10, 14, 26


@functools.lru_cache(maxsize=None)
def _glyph(ch: str) -> np.ndarray:
    """bool (7, 5) bitmap of a character (unknown characters draw as a space)."""
    rows = _GLYPHS.get(ch, _GLYPHS[" "]).split("/")
    return np.array([[c == "#" for c in row] for row in rows], bool)


def _text(img: np.ndarray, x: int, y: int, text: str, color=(0, 0, 0), align: str = "left") -> None:
    """Draw `text` with its top-left (or top-right for align="right") at (x, y)."""
    width = 6 * len(text) - 1
    if align == "right":
        x -= width
    elif align == "center":
        x -= width // 2
    for i, ch in enumerate(text):
        g = _glyph(ch)
        x0 = x + 6 * i
        ys, xs = np.nonzero(g)
        ok = (y + ys >= 0) & (y + ys < img.shape[0]) & (x0 + xs >= 0) & (x0 + xs < img.shape[1])
        img[y + ys[ok], x0 + xs[ok]] = color


def _colormap(v: np.ndarray) -> np.ndarray:
    """v in [0, 1], any shape -> uint8 RGB (..., 3) on a viridis ramp."""
    pos = np.clip(v, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(pos.astype(int), len(_VIRIDIS) - 2)
    f = (pos - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes (8-bit RGB, no interlace, filter 0 on every row)."""
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _resize_time(x: np.ndarray, width: int) -> np.ndarray:
    """(T, F) -> (width, F): mean over groups of frames, or nearest frame when T < width."""
    t = x.shape[0]
    if t >= width:
        edges = np.linspace(0, t, width + 1).astype(int)
        return np.add.reduceat(x, edges[:-1], axis=0) / np.diff(edges)[:, None]
    return x[np.minimum((np.arange(width) * t) // width, t - 1)]


def _resize_freq(x: np.ndarray, height: int) -> np.ndarray:
    """(W, F) -> (W, height) by nearest bin (F >= 1)."""
    f = x.shape[1]
    return x[:, np.minimum((np.arange(height) * f) // height, f - 1)]


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


def spectrogram_png(wave: np.ndarray, mask: np.ndarray, domain: str, width: int | None = None) -> bytes:
    """Three stacked panels sharing a time axis: spectrogram (dB), mask, masked spectrogram.

    wave: float32 (n,) at 48 kHz; mask: (n // HOP + 1, bins) in [0, 1] on the `domain` grid.
    Low frequencies at the bottom; frequency ticks in Hz, time ticks in s.
    """
    spec = log_spectrogram(wave, domain)
    frames = min(spec.shape[0], mask.shape[0])
    spec, mask = spec[:frames], mask[:frames].astype(np.float64)
    masked = spec + 20 * np.log10(np.maximum(mask, 1e-5))    # power sees M²
    top = float(spec.max()) if np.isfinite(spec).all() else 0.0
    lo = top - 80.0
    w = width or int(np.clip(frames, 480, 960))
    panels = [("spectrogram (dB)", (spec - lo) / 80.0), ("mask", mask), ("masked (dB)", (masked - lo) / 80.0)]
    H = 3 * (_TITLE + _PANEL_H) + _BOTTOM
    W = _LEFT + w + _RIGHT
    img = np.full((H, W, 3), 255, np.uint8)
    freqs = mask_frequencies(domain)
    ticks_hz = [100, 1000, 5000, 10000] if domain == "mel" else [0, 5000, 10000, 15000, 20000]
    for p, (title, values) in enumerate(panels):
        y0 = p * (_TITLE + _PANEL_H) + _TITLE
        _text(img, _LEFT, y0 - 10, title)
        tile = _resize_freq(_resize_time(np.nan_to_num(values, nan=0.0), w), _PANEL_H)   # (w, 128)
        img[y0: y0 + _PANEL_H, _LEFT: _LEFT + w] = _colormap(tile.T[::-1])
        for hz in ticks_hz:
            row = int(np.argmin(np.abs(freqs - hz))) * _PANEL_H // len(freqs)
            y = y0 + _PANEL_H - 1 - row
            img[y, _LEFT - 3: _LEFT] = 0
            label = f"{hz // 1000}k" if hz >= 1000 else str(hz)
            _text(img, _LEFT - 5, y - 3, label, align="right")
        _text(img, 2, y0, "Hz")
    duration = wave.size / SAMPLE_RATE
    y_axis = 3 * (_TITLE + _PANEL_H)
    step = next((s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
                 if duration / s <= 8), 7200)
    for k in range(int(duration / step + 1e-9) + 1):
        t = k * step
        x = _LEFT + min(int(round(t / max(duration, 1e-9) * (w - 1))), w - 1)
        img[y_axis: y_axis + 3, x] = 0
        _text(img, x, y_axis + 5, f"{t:g}", align="center")
    _text(img, W - 2, y_axis + 15, "time (s)", align="right")
    return encode_png(img)


def write_png(path: str | os.PathLike, wave: np.ndarray, mask: np.ndarray, domain: str) -> None:
    data = spectrogram_png(wave, mask, domain)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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

_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:480px;display:block}audio{width:220px}.file{font-family:monospace;word-break:break-all}
.note{color:#666}"""


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


def write_index(out: str | os.PathLike, results: Sequence[dict[str, Any]], errors: Sequence[dict[str, Any]]) -> None:
    """index.html: one row per (file, prompt) with players, image and scores; then the errors.

    Every name and prompt is HTML-escaped; every link is relative (percent-encoded) and
    only made when its file exists, so the page opens from disk without a server.
    The original audio is linked where it lies, not copied.
    """
    out = Path(out)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["file"], r["prompt"])].append(r)
    rows = []
    missing_originals = 0
    for (file, prompt), lines in groups.items():
        first = lines[0]
        outs = first.get("outputs", {})
        links = {k: _href(str(out / v), out) for k, v in outs.items()}
        original = _href(first.get("input", ""), out)
        missing_originals += original is None
        topk = first.get("topk")
        score = "" if not topk else "<br>".join(
            f"{'<b>' if t['prompt'] == prompt else ''}{_esc(t['label'])} {t['score']:.3f}"
            f"{'</b>' if t['prompt'] == prompt else ''}" for t in topk)
        cells = [
            f'<td class="file">{_esc(file)}</td>',
            f"<td>{_esc(prompt)}</td>",
            f'<td class="n">{_num(_mean([x.get("similarity") for x in lines]))}</td>',
            f'<td class="n">{_num(_mean([x.get("masked_similarity") for x in lines]))}</td>',
            f'<td class="n">{_num(_mean([x.get("listened_similarity") for x in lines]))}</td>',
            f'<td class="n">{_num(_mean([x.get("mask_mean") for x in lines]))}</td>',
            f'<td class="n">{len(lines)}</td>',
            _audio_cell(original, "original not found"),
            _audio_cell(links.get("wav"), ""),
            _audio_cell(links.get("residual"), ""),
            (f'<td><a href="{html.escape(links["png"])}"><img src="{html.escape(links["png"])}" '
             f'alt="spectrogram, mask and masked spectrogram" loading="lazy"></a></td>'
             if links.get("png") else "<td></td>"),
            f'<td><a href="{html.escape(links["mask"])}">npz</a></td>' if links.get("mask") else "<td></td>",
            f"<td>{score}</td>",
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    err_rows = [f'<tr><td class="file">{_esc(e.get("file", ""))}</td><td>{_esc(e.get("reason", ""))}</td></tr>'
                for e in errors]
    n_files = len({f for f, _ in groups})
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>lmaczs explanations</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>lmaczs explanations</h1>",
        f"<p>{n_files} files, {len(groups)} explanations, {len(errors)} failed"
        + "".join(f', <a href="{name}">{name}</a>' for name in (RESULTS, ERRORS) if (out / name).exists()) + ".</p>",
        '<p class="note">Similarities are cosines between the CLAP audio and text embeddings: of the '
        "input, of the masked input the model saw, and (listened) of the explanation wav re-encoded; "
        "means over the 10-s windows. Original audio is linked where it lies, not copied; browsers "
        "play wav, flac, ogg and mp3 but not every format libsndfile reads.</p>",
        "<table><thead><tr><th>file</th><th>prompt</th><th>similarity</th><th>masked</th><th>listened</th>"
        "<th>mask mean</th><th>windows</th><th>original</th><th>explanation</th><th>residual</th>"
        "<th>spectrogram | mask | masked</th><th>mask</th><th>top-k</th></tr></thead><tbody>",
        *rows, "</tbody></table>",
    ]
    if missing_originals:
        parts.append(f'<p class="note">{missing_originals} originals are no longer where they were read.</p>')
    if err_rows:
        parts += ["<h2>Failed files</h2>", "<table><thead><tr><th>file</th><th>reason</th></tr></thead><tbody>",
                  *err_rows, "</tbody></table>"]
    parts.append("</body></html>")
    with atomic_path(out / INDEX) as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")


def _audio_cell(href: str | None, missing: str) -> str:
    if href is None:
        return f'<td class="note">{missing}</td>'
    h = html.escape(href)
    return f'<td><audio controls preload="none" src="{h}"></audio><br><a href="{h}">file</a></td>'
