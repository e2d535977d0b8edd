"""Audio I/O and the fixed front-end constants of LAION-CLAP (HTSAT / PANN, 48 kHz).

Every other module imports these constants; none re-types a number.

Loading: any file libsndfile reads -> float32 mono at 48 kHz, decoded in blocks, downmixed
per block and resampled as a stream (soxr), so a long file is never held twice in memory.
Bad input raises `AudioError` with a one-line reason and the path; truncated files are
refused unless ``allow_truncated=True``.

Windowing: the model sees 10-s windows. A short clip is repeat-padded into one window
(`pad_clip`); a long one is cut into windows overlapping by half (`windows`,
`iter_windows`), and per-window results are joined back with a raised-cosine crossfade
(`Stitcher`, one window at a time, for waveforms and for anything on the STFT frame grid).
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
from .errors import LmaczsError

SAMPLE_RATE = 48_000          # Hz, LAION-CLAP's input rate
CLIP_SECONDS = 10             # s, one model window
CLIP_SAMPLES = CLIP_SECONDS * SAMPLE_RATE   # 480 000 samples per window
N_FFT = 1024                  # samples, STFT size and Hann window length
HOP = 480                     # samples between STFT frames (10 ms)
N_FREQS = N_FFT // 2 + 1      # 513 linear-frequency bins
N_MELS = 64                   # mel bands (Slaney scale and norm)
F_MIN = 50                    # Hz, lowest mel edge
F_MAX = 14_000                # Hz, highest mel edge
N_FRAMES = CLIP_SAMPLES // HOP + 1          # 1001 frames per window (centre padding)

assert CLIP_SAMPLES % HOP == 0, "a window must hold a whole number of hops"

WINDOW_HOP = CLIP_SAMPLES // 2              # 240 000 samples (5 s) between window starts

assert WINDOW_HOP % HOP == 0, "window starts must sit on the STFT frame grid"

RESAMPLE_QUALITY = "HQ"   # soxr preset: 20-bit precision (~ -120 dB), far below what the
                          # log-mel front end resolves; "VHQ" (28 bit) exceeds float32 itself
_BLOCK_FRAMES = 1 << 16   # frames decoded per read (2 MiB at 8 channels)
_SALVAGE_FRAMES = 64      # frames per read when recovering what precedes a decode error
                          # (libsndfile fails the whole read that meets the damage)
_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4,
                 "FLOAT": 4, "DOUBLE": 8, "ULAW": 1, "ALAW": 1}   # uncompressed subtypes
_KEEP_HINT = "pass allow_truncated=True to keep the readable part"

# Name endings (lower case, no dot) taken as audio when folders are searched; a file named
# directly is read whatever its name, by any format libsndfile knows.
AUDIO_EXTENSIONS = frozenset(
    {"wav", "flac", "ogg", "oga", "opus", "mp3", "aiff", "aif", "au", "caf", "w64", "rf64"})


# ----------------------------------------------------------------------------- loading


class AudioError(LmaczsError):
    """A file that cannot be loaded as audio. ``str(e)`` is one line: reason, then path."""

    def __init__(self, reason: str, path: str | os.PathLike) -> None:
        super().__init__(reason, os.fspath(path))   # both in args, so it pickles
        self.reason = " ".join(reason.split())
        self.path = os.fspath(path)

    def __str__(self) -> str:
        return f"{self.reason}: {self.path}"


def is_audio_name(name: str | os.PathLike) -> bool:
    """Whether a file name ends in one of `AUDIO_EXTENSIONS`, in any case ("a.WAV" is;
    ".wav", a hidden file with no extension, is not)."""
    return os.path.splitext(os.fspath(name))[1][1:].lower() in AUDIO_EXTENSIONS


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says, as libsndfile reads it (nothing is decoded)."""

    samplerate: int    # Hz
    channels: int
    frames: int        # per channel, as libsndfile reports it: clamped to the data present
                       # for WAV-family files, up to the last complete page for Ogg, an
                       # estimate for MP3 without a Xing/Info/VBRI tag
    format: str        # libsndfile major format: "WAV", "FLAC", "OGG", "MP3", ...
    subtype: str       # "PCM_16", "FLOAT", "VORBIS", "OPUS", "MPEG_LAYER_III", ...
    duration_s: float  # frames / samplerate


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Read a file's header. Raises `AudioError` like `load_audio` for unreadable input."""
    p = _checked_path(path)
    with _open(p) as f:
        return _info_of(f)


def load_audio(path: str | os.PathLike, sr: int = SAMPLE_RATE, *,
               allow_truncated: bool = False) -> np.ndarray:
    """Decode any file libsndfile reads into mono float32 at `sr` Hz.

    Returns ``np.ndarray``, float32, shape (n,): the channel mean, resampled with soxr
    (quality `RESAMPLE_QUALITY`) unless the file is already at `sr`. The file is sniffed,
    never judged by its extension. Every non-empty clip is returned, however short.

    Raises `AudioError` (reason first, then the path) for a missing path, a directory,
    an empty or non-audio file, zero frames, NaN/Inf samples, a decode error mid-stream,
    and a truncated file: one whose header (WAV-family data chunk, FLAC STREAMINFO,
    MP3 Xing/Info tag) promises more frames than the file holds, or an Ogg stream
    without its end-of-stream page. ``allow_truncated=True`` returns the readable part
    of such a file instead (everything decoded before the cut or the damage).
    """
    if int(sr) != sr or sr <= 0:
        raise ValueError(f"sr must be a positive whole number of Hz, got {sr!r}")
    p = _checked_path(path)
    with _open(p) as f:
        info = _info_of(f)
        if not allow_truncated:
            cut = _container_cut(p, info)
            if cut is not None:
                raise AudioError(f"truncated: {cut}; {_KEEP_HINT}", p)
        sink = _MonoStream(info.samplerate, int(sr), expected_frames=info.frames)
        failure: sf.LibsndfileError | None = None
        try:
            _pump(f, sink, p, _BLOCK_FRAMES)
        except sf.LibsndfileError as e:
            failure = e
    if failure is not None and info.format != "MP3":   # MP3 seeking is not sample-exact
        _salvage(p, sink)
    promised = info.frames if _frames_are_promised(p, info) else None
    short = _short_read(failure, sink.frames_in, promised)
    if short is not None and not allow_truncated:
        raise AudioError(f"{short}; {_KEEP_HINT}", p) from failure
    wave = sink.finish()
    if wave.size == 0:
        raise AudioError("no audio: the file holds zero readable frames", p)
    return wave


def _short_read(failure: sf.LibsndfileError | None, held: int,
                promised: int | None) -> str | None:
    """Why decoding `held` frames shows a cut or damaged file, or None.

    promised: the header's frame count where it is a promise (`_frames_are_promised`).
    A decode error after every promised frame (trailing junk) is no loss and passes.
    """
    if failure is not None and (promised is None or held < promised):
        said = f"header promises {promised} frames, " if promised else ""
        return (f"truncated or corrupt: {said}decoding failed after {held} frames "
                f"(libsndfile: {_why(failure)})")
    if promised is not None and held < promised:
        return f"truncated: header promises {promised} frames, file holds {held}"
    return None


def _checked_path(path: str | os.PathLike) -> str:
    p = os.fspath(path)
    if not os.path.exists(p):
        raise AudioError("file not found", p)
    if os.path.isdir(p):
        raise AudioError("is a directory, not an audio file", p)
    if os.path.getsize(p) == 0:
        raise AudioError("empty file (0 bytes)", p)
    return p


def _open(p: str) -> sf.SoundFile:
    try:
        return sf.SoundFile(p)
    except sf.LibsndfileError as e:
        raise AudioError(f"not readable as audio ({_why(e)})", p) from e


def _why(e: sf.LibsndfileError) -> str:
    return " ".join(e.error_string.split()).rstrip(".") or f"libsndfile error {e.code}"


def _info_of(f: sf.SoundFile) -> AudioInfo:
    return AudioInfo(samplerate=f.samplerate, channels=f.channels, frames=f.frames,
                     format=f.format, subtype=f.subtype, duration_s=f.frames / f.samplerate)


class _MonoStream:
    """Takes mono float32 blocks at `rate`, writes them resampled to `sr` into one buffer.

    The buffer is sized from the header's frame count and grown only if the file holds
    more, so the decoded signal exists once, at the output rate.
    """

    def __init__(self, rate: int, sr: int, expected_frames: int) -> None:
        self.frames_in = 0
        self._resampler = None if rate == sr else soxr.ResampleStream(
            rate, sr, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        self._out = np.empty(max(expected_frames, 0) * sr // rate + 1, np.float32)
        self._n = 0
        self._head = np.zeros(0, np.float32)   # first input samples, for sub-sample clips

    def push(self, mono: np.ndarray) -> None:
        """mono: float32 (k,) at the input rate."""
        if self.frames_in == 0:
            self._head = mono[:64].copy()
        self.frames_in += len(mono)
        if self._resampler is None:
            self._append(mono)
        else:
            self._append(self._resampler.resample_chunk(mono))

    def finish(self) -> np.ndarray:
        """Flush the resampler; returns float32 (n,)."""
        if self._resampler is not None:
            self._append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        if self._n == 0 and self.frames_in > 0:
            # shorter than half an output sample (1 sample at 192 kHz): keep its mean
            self._append(np.array([self._head[: self.frames_in].mean()], np.float32))
        self._out.resize(self._n, refcheck=False)   # in place: no second copy
        return self._out

    def _append(self, y: np.ndarray) -> None:
        end = self._n + len(y)
        if end > self._out.size:
            self._out.resize(max(end, self._out.size * 3 // 2), refcheck=False)
        self._out[self._n:end] = y
        self._n = end


def _pump(f: sf.SoundFile, sink: _MonoStream, p: str, block: int) -> None:
    """Decode `f` from its position to the end in blocks of (block, channels) float32."""
    buf = np.empty((block, f.channels), np.float32)
    while True:
        data = f.read(dtype="float32", always_2d=True, out=buf)
        if len(data) == 0:
            return
        finite = np.isfinite(data)
        if not finite.all():
            bad = sink.frames_in + int(np.flatnonzero(~finite.all(axis=1))[0])
            raise AudioError(f"non-finite samples (NaN or Inf), first at frame {bad}", p)
        sink.push(data[:, 0] if f.channels == 1 else data.mean(axis=1))


def _salvage(p: str, sink: _MonoStream) -> None:
    """After a decode error, re-read from the last good block in small reads."""
    try:
        with sf.SoundFile(p) as f:
            f.seek(sink.frames_in)
            _pump(f, sink, p, _SALVAGE_FRAMES)
    except sf.LibsndfileError:
        pass   # the damaged point again: all that precedes it is in `sink`


# ------------------------------------------------------------------ truncation evidence


def _frames_are_promised(p: str, info: AudioInfo) -> bool:
    """Whether `info.frames` is a promise the decoded length must meet.

    True for every format libsndfile reads a length from, except MP3 without a
    Xing/Info/VBRI tag, whose length libsndfile only estimates from the file size.
    """
    if info.frames <= 0:
        return False
    return info.format != "MP3" or _mp3_has_length_tag(p)


def _container_cut(p: str, info: AudioInfo) -> str | None:
    """Why the container shows the file was cut short, or None.

    libsndfile clamps the frame count of a WAV/AIFF-family file to the bytes present and
    counts Ogg frames up to the last complete page, so both read a cut file silently;
    the container itself tells: a data chunk that runs past the end of the file, or an
    Ogg stream whose last page is incomplete or lacks the end-of-stream flag.
    """
    size = os.path.getsize(p)
    with open(p, "rb") as fh:
        extent = _data_chunk(fh, size)
        if extent is not None:
            start, declared = extent
            available = max(size - start, 0)
            if declared <= available:
                return None
            bytes_per_sample = _SAMPLE_BYTES.get(info.subtype)
            if bytes_per_sample is None:   # compressed (ADPCM, GSM, ...): count bytes
                return (f"header promises {declared} bytes of audio data, "
                        f"file holds {available}")
            promised = declared // (bytes_per_sample * info.channels)
            return f"header promises {promised} frames, file holds {info.frames}"
        if info.format == "OGG" and not _ogg_ends_with_eos(fh, size):
            return (f"Ogg stream ends without its end-of-stream page, "
                    f"file holds {info.frames} frames")
    return None


def _data_chunk(fh: BinaryIO, size: int) -> tuple[int, int] | None:
    """(offset, declared bytes) of the audio data in a WAV/WAVEX/RF64/BW64, Wave64,
    AIFF/AIFC or AU file, else None.

    None also where the writer left the size unset (0 or 0xFFFFFFFF, as streaming
    writers do): such a header promises nothing.
    """
    head = fh.read(40)
    if head[:4] in (b".snd", b"dns.") and len(head) >= 12:   # AU: big- or little-endian
        offset, declared = struct.unpack(">II" if head[0] == 0x2E else "<II", head[4:12])
        return None if declared in (0, 0xFFFFFFFF) else (offset, declared)
    if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return _riff_data(fh, size, ">I" if head[:4] == b"RIFX" else "<I")
    if head[:4] == b"riff" and head[24:28] == b"wave":   # Sony Wave64: GUID chunk ids
        return _w64_data(fh, size)
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return _aiff_data(fh, size)
    return None


def _riff_data(fh: BinaryIO, size: int, u32: str) -> tuple[int, int] | None:
    pos, ds64_size = 12, None
    while pos + 8 <= size:
        fh.seek(pos)
        chunk_id, chunk_size = fh.read(4), struct.unpack(u32, fh.read(4))[0]
        if chunk_id == b"ds64":          # RF64/BW64: 64-bit sizes; data size at offset 8
            ds64_size = struct.unpack("<Q", fh.read(16)[8:16])[0]
        if chunk_id == b"data":
            if chunk_size == 0xFFFFFFFF and ds64_size is not None:
                chunk_size = ds64_size
            return None if chunk_size in (0, 0xFFFFFFFF) else (pos + 8, chunk_size)
        pos += 8 + chunk_size + (chunk_size & 1)
    return None


def _w64_data(fh: BinaryIO, size: int) -> tuple[int, int] | None:
    pos = 40
    while pos + 24 <= size:
        fh.seek(pos)
        guid, chunk_size = fh.read(16), struct.unpack("<Q", fh.read(8))[0]   # size incl. header
        if guid[:4] == b"data":
            return None if chunk_size <= 24 else (pos + 24, chunk_size - 24)
        if chunk_size < 24:
            return None
        pos += (chunk_size + 7) // 8 * 8
    return None


def _aiff_data(fh: BinaryIO, size: int) -> tuple[int, int] | None:
    pos = 12
    while pos + 8 <= size:
        fh.seek(pos)
        chunk_id, chunk_size = fh.read(4), struct.unpack(">I", fh.read(4))[0]
        if chunk_id == b"SSND":          # offset, block size, then the samples
            fields = fh.read(8)
            if len(fields) < 8:
                return (pos + 16, chunk_size - 8)
            offset = struct.unpack(">I", fields[:4])[0]
            return (pos + 16 + offset, chunk_size - 8 - offset)
        pos += 8 + chunk_size + (chunk_size & 1)
    return None


_OGG_MAX_PAGE = 27 + 255 + 255 * 255   # bytes: header, 255 lacing values, 255 full segments


def _ogg_ends_with_eos(fh: BinaryIO, size: int) -> bool:
    """True if the file ends exactly at the end of an Ogg page flagged end-of-stream."""
    fh.seek(max(0, size - _OGG_MAX_PAGE))
    tail = fh.read()
    i = tail.rfind(b"OggS")
    while i >= 0:
        if len(tail) - i >= 27 and tail[i + 4] == 0:        # stream structure version 0
            n_seg = tail[i + 26]
            lacing = tail[i + 27: i + 27 + n_seg]
            if len(lacing) == n_seg and i + 27 + n_seg + sum(lacing) == len(tail):
                return bool(tail[i + 5] & 0x04)
        i = tail.rfind(b"OggS", 0, i)
    return False


def _mp3_has_length_tag(p: str) -> bool:
    """Whether the first MPEG frame carries a Xing/Info/VBRI tag (an exact frame count)."""
    with open(p, "rb") as fh:
        head = fh.read(10)
        start = 0
        if head[:3] == b"ID3" and len(head) == 10:   # ID3v2: skip it (syncsafe size)
            start = 10 + (head[6] << 21 | head[7] << 14 | head[8] << 7 | head[9])
            start += 10 if head[5] & 0x10 else 0      # footer
        fh.seek(start)
        first = fh.read(4096)
    return any(tag in first for tag in (b"Xing", b"Info", b"VBRI"))


# ---------------------------------------------------------------------------- windowing


def pad_clip(x: np.ndarray) -> np.ndarray:
    """Fill one model window from a clip of at most CLIP_SAMPLES samples.

    x: (n,) with 0 < n <= CLIP_SAMPLES. Returns float32 (CLIP_SAMPLES,): the clip repeated
    ``CLIP_SAMPLES // n`` times, then zero-padded. This is laion_clap's "repeatpad"
    (``get_audio_features(..., data_filling="repeatpad")``), the filling LAION's
    non-fusion checkpoints were trained with and ``CLAP_Module`` applies at inference.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1 or not 0 < len(x) <= CLIP_SAMPLES:
        raise ValueError(f"pad_clip takes a 1-D clip of 1..{CLIP_SAMPLES} samples, got shape "
                         f"{x.shape}; cut longer signals with windows()")
    out = np.zeros(CLIP_SAMPLES, np.float32)
    repeated = np.tile(x, CLIP_SAMPLES // len(x))
    out[: len(repeated)] = repeated
    return out


def window_starts(n: int, win: int = CLIP_SAMPLES, hop: int = WINDOW_HOP,
                  align: int = HOP) -> list[int]:
    """Start offsets of the windows that cover [0, n).

    Starts are 0, hop, 2*hop, ... and a last one placed as late as the `align` grid
    allows while still reaching n: the smallest multiple of `align` >= n - win. With
    `align` = HOP every start lies on the STFT frame grid, so per-window frame data
    stitches exactly; the last window then overhangs n by ``(-n) % HOP`` < HOP samples
    (none when n is a multiple of HOP, i.e. a whole number of 10-ms steps). n <= win
    gives [0]. Use ``align=1`` for units other than samples.
    """
    if win <= 0 or not 0 < hop <= win or hop % align:
        raise ValueError(f"need 0 < hop <= win and hop a multiple of align, got win={win}, "
                         f"hop={hop}, align={align}")
    if n <= win:
        return [0]
    last = -(-(n - win) // align) * align
    return list(range(0, last, hop)) + [last]


def iter_windows(x: np.ndarray, hop: int = WINDOW_HOP) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, window) over a signal, window float32 (CLIP_SAMPLES,).

    x: (n,) float32 at SAMPLE_RATE. Starts are `window_starts(n, hop=hop)`; a clip shorter
    than a window gives one repeat-padded window (`pad_clip`); the last window of a long
    signal is zero-padded past n by < HOP samples. Full windows are views of x.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty 1-D signal, got shape {x.shape}")
    if len(x) <= CLIP_SAMPLES:
        yield 0, pad_clip(x)
        return
    for start in window_starts(len(x), CLIP_SAMPLES, hop):
        window = x[start: start + CLIP_SAMPLES]
        if len(window) < CLIP_SAMPLES:
            window = np.concatenate([window, np.zeros(CLIP_SAMPLES - len(window), np.float32)])
        yield start, window


def windows(x: np.ndarray, hop: int = WINDOW_HOP) -> np.ndarray:
    """All windows of a signal at once: float32 (n_windows, CLIP_SAMPLES). See `iter_windows`."""
    starts = window_starts(len(x), CLIP_SAMPLES, hop)
    out = np.empty((len(starts), CLIP_SAMPLES), np.float32)
    for i, (_, window) in enumerate(iter_windows(x, hop)):
        out[i] = window
    return out


def crossfade_weights(length: int, overlap: int) -> np.ndarray:
    """Weight of each position of a window when overlapping windows are blended.

    Returns float64 (length,): a raised-cosine ramp over the first and last `overlap`
    positions, 1 in between; strictly positive, so every covered position is defined.
    """
    w = np.ones(length)
    k = min(overlap, length)
    if k > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)   # (0, 1), rising
        w[:k] = np.minimum(w[:k], ramp)
        w[length - k:] = np.minimum(w[length - k:], ramp[::-1])
    return w


class Stitcher:
    """Join per-window results back into one signal, fed one window at a time, in order:
    the inverse of `windows`.

    length: positions of the joined signal, in the units of `starts` and `win` (samples
    for waveforms; STFT frames for masks and scores, with ``num_frames(n)`` positions,
    `frame_starts(n)` and N_FRAMES). starts: where each window begins, as
    `window_starts` gives them. rest: the trailing shape of each part. After the last
    `add`, ``out`` (length, *rest) float32 holds, where windows overlap, the weighted mean
    of the parts under `crossfade_weights` (ramps as long as the smallest overlap). Equal
    parts come back unchanged, bit for bit, so the stitched ``windows(x)`` is x and
    stitching a constant gives that constant.

    Only the output is held: the summed crossfade weight under a new window is rebuilt
    from the earlier windows that overlap it, so no second full-length array is kept.
    """

    def __init__(self, length: int, starts: Sequence[int], win: int, rest: tuple[int, ...] = ()) -> None:
        starts = [int(s) for s in starts]
        gaps = np.diff(starts)
        if not starts or starts[0] != 0 or (gaps <= 0).any() or (gaps > win).any() or starts[-1] + win < length:
            raise ValueError(f"windows of {win} at starts {starts[:3]}...{starts[-2:]} do not "
                             f"cover [0, {length}) in order; use window_starts()")
        self.weights = crossfade_weights(win, win - int(gaps.max()) if len(gaps) else 0)
        self.out = np.zeros((length, *rest), np.float32)
        self.starts, self.win, self.length, self.i = starts, win, length, 0

    def add(self, part: np.ndarray) -> None:
        """part: (win, *rest), the next window's values."""
        if self.i == len(self.starts):
            raise ValueError(f"all {len(self.starts)} windows were already added")
        if part.shape != (self.win, *self.out.shape[1:]):
            raise ValueError(f"a part of shape {part.shape}; expected {(self.win, *self.out.shape[1:])}")
        s = self.starts[self.i]
        end = min(s + self.win, self.length)
        if self.i == 0:                               # nothing under it yet: its share is w / w = 1
            self.out[:end] = part[:end]
            self.i += 1
            return
        total = np.zeros(end - s)
        for j in range(self.i - 1, -1, -1):           # earlier windows reaching into [s, end)
            sj = self.starts[j]
            if sj + self.win <= s:
                break
            hi = min(sj + self.win, end)
            total[: hi - s] += self.weights[s - sj: hi - sj]
        w = self.weights[: end - s]
        share = (w / (total + w)).astype(np.float32).reshape((-1,) + (1,) * (self.out.ndim - 1))
        seg = self.out[s:end]
        seg += (part[: end - s] - seg) * share       # running weighted mean
        self.i += 1

    @property
    def done(self) -> bool:
        """Whether every window has been added."""
        return self.i == len(self.starts)


def num_frames(n_samples: int) -> int:
    """STFT frames (centre padding, hop HOP) of a signal of `n_samples` samples."""
    return n_samples // HOP + 1


def frame_starts(n_samples: int) -> list[int]:
    """Window starts in STFT frames for a signal of `n_samples` samples (see `window_starts`)."""
    return [s // HOP for s in window_starts(n_samples)]
