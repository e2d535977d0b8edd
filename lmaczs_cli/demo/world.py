"""A seeded synthetic sound world with ground truth: named events, 10-s scenes, captions and
a time-frequency mask per event.

Event kinds (`EVENTS`) differ in the log-mel image — band, duration and temporal pattern,
not only pitch — so that a small CLAP can tell them apart; within a kind the parameters
vary over fixed ranges (`render_event`). A scene (`render_scene`) mixes 1-3 distinct kinds
at random times and levels over quiet pink-ish noise, with a caption from a fixed grammar
(`caption_for`) and, per event, its ground-truth mask on the STFT grid (`Scene.masks`, the
rule is `dominance_mask`) and on the mel grid (`Scene.mel_masks`, via `mask_to_mel`).
`write_world` writes scenes as FLAC files plus the JSONL manifest `lmaczs train` reads.

Ground truth: an event owns the STFT cells where its own power (rendered alone, at its
level in the mix) exceeds the power of everything else in the mix, and is no more than
MASK_RANGE_DB under its typical level; a mel band is on where at least half of its
filterbank-weighted mix power lies in owned bins. Masks of one scene are disjoint.

Seeds: everything is a pure function of its seed (the same seed gives the same bytes).
`render_event`, `render_scene` and `single_event_scene` draw from disjoint seed-sequence
streams; `write_world` gives each (seed, split) its own block of 2**32 scene seeds
(`scene_seed`), so splits never share a scene.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.fft
import scipy.signal
import soundfile as sf

from ..audio import CLIP_SAMPLES, CLIP_SECONDS, HOP, N_FFT, N_FRAMES, N_FREQS, SAMPLE_RATE

__all__ = [
    "EVENTS", "MAX_EVENTS", "MIN_SECONDS", "SPLITS", "Event", "Scene", "caption_for", "dominance_mask",
    "mask_to_mel", "prompt_for", "render_event", "render_scene", "scene_seed",
    "single_event_scene", "stft_frames", "write_world",
]

BACKGROUND_DB = -50.0         # dBFS RMS of a scene's pink-ish background noise
LEVEL_DB = (-20.0, -6.0)      # dBFS RMS range of an event over its active span; lowered
                              # where the event's own peak would pass PEAK (click trains),
                              # and lowered with the whole scene when the mix's would
PEAK = 0.99                   # ceiling of a scene's absolute peak
MASK_RANGE_DB = 30.0          # dB: a mask cell is at most this far under the event's typical
                              # level (see dominance_mask)
MAX_EVENTS = 3                # events per scene: 1..MAX_EVENTS distinct kinds
MAX_OVERLAP = 0.5             # placement keeps events' overlap in time under this share
                              # of the shorter one, when 20 tries allow
ACTIVE_DB = -60.0             # an event's active span: from the first to the last sample
                              # whose magnitude is within this of its peak
MIN_SECONDS = 0.1             # shortest event render_event makes
SPLITS = ("train", "valid", "test")

_EVENT_STREAM, _SCENE_STREAM, _SINGLE_STREAM = 1, 2, 3   # disjoint seed-sequence streams
_ATTEMPTS = 8                 # compositions tried before a scene is refused (see _compose)
_MIN_OWN_SHARE = 0.5          # an event's mask must hold this share of its own energy

_T = 1.0 / SAMPLE_RATE        # s per sample


# ------------------------------------------------------------------------ signal helpers


def _time(n: int) -> np.ndarray:
    return np.arange(n) * _T


def _fade(n: int, seconds: float) -> np.ndarray:
    """Envelope (n,): raised-cosine ramps of `seconds` at both ends, 1 in between."""
    env = np.ones(n)
    k = min(int(seconds * SAMPLE_RATE), n // 2)
    if k:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
        env[:k] = ramp
        env[n - k:] = ramp[::-1]
    return env


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _bins(m: int, lo: float, hi: float) -> slice:
    """The rfft bins of an m-point transform that lie in [lo, hi] Hz."""
    return slice(math.ceil(lo * m / SAMPLE_RATE), math.floor(hi * m / SAMPLE_RATE) + 1)


def _band(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """x (n,) with every component outside [lo, hi] Hz removed (brick wall, by FFT)."""
    n = len(x)
    m = scipy.fft.next_fast_len(n, real=True)
    spec = scipy.fft.rfft(x, m)
    keep = _bins(m, lo, hi)
    spec[: keep.start] = 0
    spec[keep.stop:] = 0
    return scipy.fft.irfft(spec, m)[:n]


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """Gaussian noise (n,) limited to [lo, hi] Hz, unit RMS, drawn in the frequency domain."""
    m = scipy.fft.next_fast_len(n, real=True)
    keep = _bins(m, lo, hi)
    spec = np.zeros(m // 2 + 1, np.complex128)
    k = len(range(m // 2 + 1)[keep])
    spec[keep] = rng.standard_normal(k) + 1j * rng.standard_normal(k)
    x = scipy.fft.irfft(spec, m)[:n]
    return x / max(float(np.sqrt(np.mean(x * x))), 1e-12)


def _saw(cycles: np.ndarray) -> np.ndarray:
    """Sawtooth in [-1, 1) from a running cycle count (n,): every harmonic, amplitude 1/k."""
    return 2.0 * (cycles - np.floor(cycles)) - 1.0


def _cycles(freq: np.ndarray) -> np.ndarray:
    """Running cycle count (n,) of an instantaneous frequency (n,) in Hz."""
    return np.cumsum(freq) * _T


def _osc(cycles: np.ndarray) -> np.ndarray:
    """sin(2π·cycles) in float32 (n,), the phase kept exact by wrapping in float64 first."""
    return np.sin(np.float32(2 * np.pi) * (cycles - np.floor(cycles)).astype(np.float32))


def _grains(n: int, onsets: np.ndarray, grains: np.ndarray) -> np.ndarray:
    """Sum of short grains (k, g) placed at sample onsets (k,), cut at n -> (n,)."""
    idx = onsets[:, None] + np.arange(grains.shape[1])
    keep = idx < n
    return np.bincount(idx[keep], weights=grains[keep], minlength=n)


# ------------------------------------------------------------------------ event kinds
# Each renderer takes (rng, n) and returns float64 (n,), any scale; render_event
# normalises. Frequencies in Hz, times in s.


def _steady_tone(rng: np.random.Generator, n: int) -> np.ndarray:
    f = _loguniform(rng, 400, 3000)
    return _osc(f * _time(n) + rng.uniform()) * _fade(n, 0.02)


def _chirp(n: int, f_start: float, f_end: float) -> np.ndarray:
    f = f_start * (f_end / f_start) ** (np.arange(n) / n)          # exponential sweep
    return _osc(_cycles(f)) * _fade(n, 0.01)


def _rising_chirp(rng: np.random.Generator, n: int) -> np.ndarray:
    return _chirp(n, _loguniform(rng, 300, 600), _loguniform(rng, 4000, 8000))


def _falling_chirp(rng: np.random.Generator, n: int) -> np.ndarray:
    return _chirp(n, _loguniform(rng, 4000, 8000), _loguniform(rng, 300, 600))


def _noise_burst(rng: np.random.Generator, n: int) -> np.ndarray:
    fc = _loguniform(rng, 1200, 5000)                               # one-octave band
    decay = np.exp(-2.0 * np.arange(n) / n)                         # -17 dB over the burst
    return _band_noise(rng, n, fc / math.sqrt(2), fc * math.sqrt(2)) * decay * _fade(n, 0.005)


def _click_train(rng: np.random.Generator, n: int) -> np.ndarray:
    rate = rng.uniform(6, 14)                                       # clicks per second
    times = np.arange(0.002, n * _T - 0.006, 1 / rate)
    times = times + rng.uniform(-0.002, 0.002, len(times))          # slight jitter
    g = int(0.005 * SAMPLE_RATE)                                    # 5-ms grains
    grains = rng.standard_normal((len(times), g)) * np.exp(-_time(g) / 0.0007)
    return _grains(n, np.round(times * SAMPLE_RATE).astype(np.int64), grains)


def _harmonic_buzz(rng: np.random.Generator, n: int) -> np.ndarray:
    f0 = _loguniform(rng, 90, 220)
    saw = _saw(f0 * _time(n) + rng.uniform())
    return _band(saw, 20, _loguniform(rng, 3000, 6000)) * _fade(n, 0.015)


def _warble(rng: np.random.Generator, n: int) -> np.ndarray:
    fc, rate, depth = _loguniform(rng, 900, 3000), rng.uniform(5, 9), rng.uniform(0.1, 0.18)
    f = fc * (1 + depth * np.sin(2 * np.pi * rate * _time(n) + rng.uniform(0, 2 * np.pi)))
    return _osc(_cycles(f)) * _fade(n, 0.02)


def _rain_shower(rng: np.random.Generator, n: int) -> np.ndarray:
    k = max(1, rng.poisson(rng.uniform(150, 300) * n * _T))         # droplets
    g = int(0.006 * SAMPLE_RATE)
    tt = _time(g).astype(np.float32)
    freq = np.exp(rng.uniform(np.log(2000), np.log(9000), (k, 1))).astype(np.float32)
    rate = (1 / rng.uniform(0.001, 0.003, (k, 1))).astype(np.float32)   # 1 / decay time
    amp = np.exp(rng.uniform(np.log(0.2), 0.0, (k, 1))).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (k, 1)).astype(np.float32)
    grains = amp * np.exp(-tt * rate) * np.sin(np.float32(2 * np.pi) * freq * tt + phase)
    drops = _grains(n, rng.integers(0, n, k), grains)
    m = scipy.fft.next_fast_len(n, real=True)
    spec = scipy.fft.rfft(drops, m)
    keep = _bins(m, 800, 12000)
    band = spec[keep]
    # a noise bed in the same band, 10 dB under the droplets (Parseval: equal mean |bin|²)
    scale = 0.3 * math.sqrt(float(np.mean(band.real ** 2 + band.imag ** 2)) / 2)
    out = np.zeros_like(spec)
    out[keep] = band + scale * (rng.standard_normal(len(band)) + 1j * rng.standard_normal(len(band)))
    return scipy.fft.irfft(out, m)[:n] * _fade(n, 0.3)


# Vowel formants (F1, F2, F3) in Hz and their bandwidths: a, e, i, o, u.
_VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010],
                    [570, 840, 2410], [300, 870, 2240]], dtype=float)
_FORMANT_BW = np.array([80.0, 100.0, 120.0])


@functools.lru_cache(maxsize=None)
def _vowel_sos(v: int) -> np.ndarray:
    """Cascade of three two-pole resonators at vowel v's formants, as sos (3, 6)."""
    r = np.exp(-np.pi * _FORMANT_BW / SAMPLE_RATE)
    theta = 2 * np.pi * _VOWELS[v] / SAMPLE_RATE
    sos = np.zeros((3, 6))
    sos[:, 0] = 1 - r
    sos[:, 3], sos[:, 4], sos[:, 5] = 1.0, -2 * r * np.cos(theta), r * r
    return sos


def _speech_like_voice(rng: np.random.Generator, n: int) -> np.ndarray:
    t = _time(n)
    f0 = _loguniform(rng, 100, 200)
    f = f0 * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)) - 0.15 * t / (n * _T))
    source = _band(_saw(_cycles(f)), 20, 4000)                       # glottal-ish pulse train
    mean_syllable = 1 / rng.uniform(3.5, 5.0)                       # s
    lengths = rng.uniform(0.8, 1.2, int(n * _T / mean_syllable) + 2) * mean_syllable
    edges = np.minimum(np.round(np.concatenate([[0], np.cumsum(lengths)]) * SAMPLE_RATE), n).astype(int)
    vowels = rng.integers(0, len(_VOWELS), len(lengths))
    out = np.zeros(n)
    for a, b, v in zip(edges[:-1], edges[1:], vowels):              # one filter per syllable
        if b - a < 8:
            continue
        seg = scipy.signal.sosfilt(_vowel_sos(int(v)), source[a:b])
        pos = np.arange(b - a) / (b - a)
        env = np.sin(np.pi * np.clip(pos / 0.85, 0, 1)) ** 1.5      # 85 % voiced, then a gap
        out[a:b] = seg / max(float(np.sqrt(np.mean(seg * seg))), 1e-12) * env
    return out


_BELL_RATIOS = np.array([1.0, 1.52, 2.76, 3.95, 5.40])               # inharmonic partials
_BELL_AMPS = np.array([1.0, 0.6, 0.5, 0.35, 0.25])


def _bell(rng: np.random.Generator, n: int) -> np.ndarray:
    f0, decay = _loguniform(rng, 350, 1000), rng.uniform(0.35, 0.8)  # Hz, s of the lowest
    keep = f0 * _BELL_RATIOS < 16000
    m = min(n, int(7 * decay * SAMPLE_RATE))                        # past -60 dB: silence
    t = _time(m)[:, None]
    rates = (1 / (decay * _BELL_RATIOS[keep] ** -0.6)).astype(np.float32)   # higher decays faster
    cycles = t * (f0 * _BELL_RATIOS[keep]) + rng.uniform(0, 1, int(keep.sum()))
    partials = np.exp(-t.astype(np.float32) * rates) * _osc(cycles) @ _BELL_AMPS[keep].astype(np.float32)
    out = np.zeros(n)
    out[:m] = partials * (1 - np.exp(-t[:, 0] / 0.001))
    return out * _fade(n, 0.05)


def _dog_like_bark(rng: np.random.Generator, n: int) -> np.ndarray:
    seconds = n * _T
    most = int(np.clip(seconds // 0.35, 1, 3))
    count = int(rng.integers(min(2, most), most + 1))               # 2-3 barks where they fit
    f = np.zeros(n)
    voiced = np.zeros(n)
    noisy = np.zeros(n)
    pos = 0.0
    for _ in range(count):
        a = int(pos * SAMPLE_RATE)
        b = min(n, a + int(rng.uniform(0.12, 0.2) * SAMPLE_RATE))
        if b - a < 16:
            break
        u = np.arange(b - a) / (b - a)
        tau = u * (b - a) * _T
        f[a:b] = rng.uniform(450, 750) * (1 - 0.3 * u)              # falling pitch
        voiced[a:b] = (1 - np.exp(-tau / 0.004)) * np.exp(-3 * u)
        noisy[a:b] = np.exp(-tau / 0.015)                           # noisy onset
        pos = b * _T + rng.uniform(0.12, 0.25)
    harm = _band(_saw(_cycles(f)), 20, 4000)
    return harm * voiced + 0.7 * _band_noise(rng, n, 1000, 6000) * noisy


def _siren(rng: np.random.Generator, n: int) -> np.ndarray:
    f_lo, ratio, period = _loguniform(rng, 500, 800), rng.uniform(1.8, 2.4), rng.uniform(1.2, 2.5)
    lfo = 0.5 - 0.5 * np.cos(2 * np.pi * _time(n) / period + rng.uniform(0, 2 * np.pi))
    c = _cycles(f_lo * ratio ** lfo)
    return (_osc(c) + 0.4 * _osc(2 * c) + 0.2 * _osc(3 * c)) * _fade(n, 0.05)


def _low_rumble(rng: np.random.Generator, n: int) -> np.ndarray:
    x = _band_noise(rng, n, 40, _loguniform(rng, 130, 200))
    am = 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * _time(n) + rng.uniform(0, 2 * np.pi))
    return x * am * _fade(n, 0.2)


def _hiss(rng: np.random.Generator, n: int) -> np.ndarray:
    return _band_noise(rng, n, _loguniform(rng, 6000, 9000), 16000) * _fade(n, 0.05)


class _Kind(NamedTuple):
    render: Callable[[np.random.Generator, int], np.ndarray]   # (rng, n) -> float64 (n,)
    seconds: tuple[float, float]                               # duration range in scenes


_KINDS: dict[str, _Kind] = {
    "steady tone": _Kind(_steady_tone, (1.0, 3.0)),          # one sine, 400-3000 Hz
    "rising chirp": _Kind(_rising_chirp, (0.6, 1.5)),        # sweep ~450 Hz -> ~6 kHz
    "falling chirp": _Kind(_falling_chirp, (0.6, 1.5)),      # sweep ~6 kHz -> ~450 Hz
    "noise burst": _Kind(_noise_burst, (0.15, 0.5)),         # one-octave noise, 0.85-7 kHz
    "click train": _Kind(_click_train, (1.0, 2.5)),          # broadband clicks at 6-14 Hz
    "harmonic buzz": _Kind(_harmonic_buzz, (0.8, 2.5)),      # sawtooth, f0 90-220 Hz
    "warble": _Kind(_warble, (1.0, 2.5)),                    # sine, 5-9 Hz vibrato of ±10-18 %
    "rain shower": _Kind(_rain_shower, (3.0, 6.0)),          # random droplets 2-9 kHz, noise bed
    "speech-like voice": _Kind(_speech_like_voice, (1.5, 3.0)),  # formant syllables, 4 Hz
    "bell": _Kind(_bell, (1.2, 3.0)),                        # inharmonic partials, decaying
    "dog-like bark": _Kind(_dog_like_bark, (0.7, 1.3)),      # 2-3 short falling harmonic barks
    "siren": _Kind(_siren, (2.5, 5.0)),                      # slow sweep up and down, 3 partials
    "low rumble": _Kind(_low_rumble, (2.0, 5.0)),            # noise from 40 Hz to 130-200 Hz
    "hiss": _Kind(_hiss, (1.5, 4.0)),                        # noise above 6-9 kHz
}

EVENTS: tuple[str, ...] = tuple(_KINDS)


def _kind(name: str) -> _Kind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown event {name!r}; use one of {', '.join(EVENTS)}") from None


def _active_span(x: np.ndarray) -> tuple[int, int]:
    """[first, last + 1) of the samples within ACTIVE_DB of x's peak; x must not be silent."""
    a = np.abs(x)
    on = np.flatnonzero(a >= a.max() * 10 ** (ACTIVE_DB / 20))
    return int(on[0]), int(on[-1]) + 1


def render_event(name: str, seconds: float, seed: int) -> np.ndarray:
    """One event of kind `name` alone: float32 (round(seconds * SAMPLE_RATE),) at 48 kHz.

    Normalised to unit RMS over its active span (first to last sample within ACTIVE_DB of
    the peak), so a gain g puts the event at 20·log10(g) dBFS RMS however much of the
    buffer it fills. Sustained kinds fill the whole buffer (with short fades); a bell
    strikes at 0 and decays, and a dog-like bark is 2-3 barks of 0.12-0.2 s from 0 (fewer
    when the buffer is under 0.7 s), so those two leave silence at the end of a long
    buffer. `seconds` >= MIN_SECONDS. Deterministic for (name, seconds, seed); seed is a
    non-negative int.
    """
    kind = _kind(name)
    n = int(round(seconds * SAMPLE_RATE))
    if n < MIN_SECONDS * SAMPLE_RATE:
        raise ValueError(f"an event lasts at least {MIN_SECONDS} s, got seconds={seconds!r}")
    rng = np.random.default_rng([int(seed), EVENTS.index(name), _EVENT_STREAM])
    x = kind.render(rng, n)
    a, b = _active_span(x)
    return (x / float(np.sqrt(np.mean(x[a:b] ** 2)))).astype(np.float32)


# ------------------------------------------------------------------------ ground truth


@functools.lru_cache(maxsize=None)
def _hann() -> np.ndarray:
    # periodic Hann of N_FFT, as the front end (lmaczs_cli.spectral) uses
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def stft_frames(x: np.ndarray, first: int = 0, stop: int | None = None) -> np.ndarray:
    """Frames [first, stop) of the front end's STFT, in numpy (no torch needed).

    x: float (n,). Hann 1024 (periodic), hop 480, centred with reflect padding, as
    `lmaczs_cli.spectral.stft`. Returns complex64 (stop - first, N_FREQS); all
    n // HOP + 1 frames by default.
    """
    total = len(x) // HOP + 1
    stop = total if stop is None else stop
    if not 0 <= first < stop <= total:
        raise ValueError(f"frames [{first}, {stop}) outside the {total} of this signal")
    padded = np.pad(np.asarray(x, np.float32), N_FFT // 2, mode="reflect")
    span = padded[first * HOP: (stop - 1) * HOP + N_FFT]
    frames = np.lib.stride_tricks.sliding_window_view(span, N_FFT)[::HOP]
    return scipy.fft.rfft(frames * _hann(), axis=-1)


def _typical_level(power: np.ndarray) -> float:
    """The level above which an event's cells hold half its energy: an energy-weighted
    median of its cell powers, robust to a few very loud cells (rain's droplets)."""
    v = np.sort(power, axis=None)[::-1]
    c = np.cumsum(v, dtype=np.float64)
    return float(v[min(int(np.searchsorted(c, 0.5 * c[-1])), len(v) - 1)])


def dominance_mask(event_power: np.ndarray, rest_power: np.ndarray,
                   range_db: float = MASK_RANGE_DB) -> np.ndarray:
    """The ground-truth rule: the cells an event owns. Works on any grid.

    event_power: the event's own power, rendered alone at its level in the mix;
    rest_power: the power of everything else in the mix (background and other events).
    A cell is on where the event is louder than the rest *and* no more than `range_db`
    below the event's typical level (the power above which its cells hold half its
    energy), so faint tails and window leakage do not count as the event.
    Returns bool, the shape of the inputs. (In a scene, the rare cell two events both
    claim, where their phases partly cancel, goes to the one with more power there.)
    """
    floor = _typical_level(event_power) * 10 ** (-range_db / 10)
    return (event_power > rest_power) & (event_power >= floor)


@functools.lru_cache(maxsize=None)
def _mel_fb() -> np.ndarray:
    from ..spectral import mel_filterbank   # torch only when mel masks are asked for

    return mel_filterbank().numpy().astype(np.float64)   # (N_FREQS, N_MELS)


def mask_to_mel(mask: np.ndarray, power: np.ndarray) -> np.ndarray:
    """Map a linear-grid mask to the mel grid: a band is on where at least half of its
    filterbank-weighted power lies in on-bins.

    mask: bool (T, N_FREQS); power: the mix's STFT power (T, N_FREQS), which weighs the
    bins (a tone owning 3 bins of a 20-bin band still owns the band when it carries its
    power). Returns bool (T, N_MELS). Bins outside every mel filter do not count.
    """
    fb = _mel_fb()
    power = np.asarray(power, np.float64)
    total = power @ fb
    return (total > 0) & ((power * mask) @ fb >= 0.5 * total)


# ------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class Event:
    """One event in a scene and where its ground-truth mask lies.

    The box is the bounding box of the event's mask (`Scene.masks`): its first and last
    STFT frame with an on-cell (frame t is centred at t * HOP / SAMPLE_RATE s) and its
    lowest and highest on-bin (bin k is k * SAMPLE_RATE / N_FFT Hz).
    """

    name: str         # one of EVENTS
    start_s: float    # s, centre of the mask's first frame
    end_s: float      # s, centre of the mask's last frame
    f_lo: float       # Hz, the mask's lowest bin
    f_hi: float       # Hz, the mask's highest bin
    level_db: float   # dBFS RMS of the event over its active span, as mixed

    def to_json(self) -> dict[str, float | str]:
        return {"name": self.name, "start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3),
                "f_lo": round(self.f_lo, 1), "f_hi": round(self.f_hi, 1),
                "level_db": round(self.level_db, 2)}


@dataclass(eq=False)
class Scene:
    """A 10-s scene with its caption and ground truth."""

    wave: np.ndarray                  # float32 (CLIP_SAMPLES,), the mix; peak <= PEAK
    caption: str                      # `caption_for(events)`
    events: list[Event]               # in start-time order
    masks: dict[str, np.ndarray]      # event name -> bool (N_FRAMES, N_FREQS), see dominance_mask
    sources: dict[str, np.ndarray]    # event name -> float32 (CLIP_SAMPLES,), the event as mixed;
                                      # wave = sum of sources + background (to float32 rounding)
    seed: int                         # what rebuilds it: render_scene or single_event_scene

    @functools.cached_property
    def mel_masks(self) -> dict[str, np.ndarray]:
        """Event name -> bool (N_FRAMES, N_MELS): `masks` mapped by `mask_to_mel` with the
        mix's power."""
        P = np.abs(stft_frames(self.wave)) ** 2
        return {name: mask_to_mel(m, P) for name, m in self.masks.items()}


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def prompt_for(name: str) -> str:
    """The zero-shot prompt of an event kind, e.g. "the sound of a rising chirp"; exactly
    the caption of a scene holding that event alone."""
    _kind(name)
    return "the sound of " + _article(name)


def caption_for(events: Sequence[Event]) -> str:
    """The caption grammar: "the sound of " + events in start-time order, each with its
    article, joined by "then" where an event starts after the previous one has ended and
    by "and" where they overlap: "the sound of a bell then a hiss and a warble"."""
    if not events:
        raise ValueError("a caption needs at least one event")
    ordered = sorted(events, key=lambda e: (e.start_s, e.name))
    words = [_article(ordered[0].name)]
    for prev, ev in zip(ordered, ordered[1:]):
        words.append(("then " if ev.start_s > prev.end_s else "and ") + _article(ev.name))
    return "the sound of " + " ".join(words)


@functools.lru_cache(maxsize=None)
def _pink() -> np.ndarray:
    """One fixed pink-ish noise (-3 dB/octave, Kellet's 3-pole filter), float32 (2**20,),
    unit RMS; backgrounds are excerpts of it (drawing 480 000 normals per scene would
    cost more than the rest of the scene)."""
    b = [0.049922035, -0.095993537, 0.050612699, -0.004408786]
    a = [1.0, -2.494956002, 2.017265875, -0.522189400]
    white = np.random.default_rng(0x91A7).standard_normal(2 ** 20 + 4096)
    x = scipy.signal.lfilter(b, a, white)[4096:]                   # past the filter's start-up
    return (x / np.sqrt(np.mean(x * x))).astype(np.float32)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Pink-ish noise at BACKGROUND_DB, float32 (CLIP_SAMPLES,): a random cyclic excerpt
    of `_pink`, with random polarity."""
    pink = _pink()
    start = int(rng.integers(0, len(pink)))
    x = np.concatenate([pink[start:], pink[: max(0, start + CLIP_SAMPLES - len(pink))]])[:CLIP_SAMPLES]
    return x * np.float32(rng.choice([-1.0, 1.0]) * 10 ** (BACKGROUND_DB / 20))


def _place(rng: np.random.Generator, durations: Sequence[float]) -> list[float]:
    """Start times (s) for events of these durations inside the clip, 0.1 s from its edges,
    overlapping each earlier one by at most MAX_OVERLAP of the shorter when 20 tries allow
    (else the least-overlapping try)."""
    starts: list[float] = []
    for d in durations:
        best, best_overlap = 0.0, math.inf
        for _ in range(20):
            s = rng.uniform(0.1, CLIP_SECONDS - 0.1 - d)
            overlap = max((max(0.0, min(s + d, s2 + d2) - max(s, s2)) / min(d, d2)
                           for s2, d2 in zip(starts, durations)), default=0.0)
            if overlap < best_overlap:
                best, best_overlap = s, overlap
            if overlap <= MAX_OVERLAP:
                break
        starts.append(best)
    return starts


def _frame_range(a: int, b: int) -> tuple[int, int]:
    """STFT frames [first, stop) whose window touches samples [a, b)."""
    first = max(0, (a - N_FFT // 2) // HOP)
    stop = min(N_FRAMES, (b + N_FFT // 2) // HOP + 2)
    return first, stop


def _settle_shared_cells(masks: dict[str, np.ndarray], names: Sequence[str],
                         spans: Sequence[tuple[int, int]], powers: Sequence[np.ndarray]) -> None:
    """Give a cell that two events' masks both claim to the one with more power there.

    Each event can outweigh "everything else" in the same cell where its phase partly
    cancels the other's; this keeps the masks of a scene disjoint. Edits `masks` in place;
    powers[i] covers frames spans[i].
    """
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            lo, hi = max(spans[i][0], spans[j][0]), min(spans[i][1], spans[j][1])
            if lo >= hi:
                continue
            mi, mj = masks[names[i]][lo:hi], masks[names[j]][lo:hi]    # views
            Pi = powers[i][lo - spans[i][0]: hi - spans[i][0]]
            Pj = powers[j][lo - spans[j][0]: hi - spans[j][0]]
            both = mi & mj
            mi &= ~(both & (Pj > Pi))
            mj &= ~(both & (Pi >= Pj))


def _compose(rng: np.random.Generator, names: Sequence[str], seed: int) -> Scene:
    """Mix the named events at random times and levels over background noise.

    A composition in which some event's mask holds less than _MIN_OWN_SHARE of its own
    energy (it is buried under another) is drawn again from the same generator.
    """
    for _ in range(_ATTEMPTS):
        durations = [rng.uniform(*_kind(name).seconds) for name in names]
        starts = _place(rng, durations)
        drawn = rng.uniform(*LEVEL_DB, len(names))
        event_seeds = rng.integers(0, 2 ** 63, len(names))
        background = _background(rng)
        placed, spans, levels = [], [], []
        mix = background.copy()
        for name, d, s, level, es in zip(names, durations, starts, drawn, event_seeds):
            x = render_event(name, d, int(es))
            level = min(level, 20 * math.log10(PEAK / float(np.abs(x).max())))  # own peak <= PEAK
            x *= np.float32(10 ** (level / 20))
            a = int(round(s * SAMPLE_RATE))
            full = np.zeros(CLIP_SAMPLES, np.float32)
            full[a: a + len(x)] = x
            mix += full
            placed.append(full)
            levels.append(level)
            spans.append(_frame_range(a, a + len(x)))
        masks = {name: np.zeros((N_FRAMES, N_FREQS), bool) for name in names}
        powers = []
        for name, full, (first, stop) in zip(names, placed, spans):
            X_event = stft_frames(full, first, stop)
            P_event = np.abs(X_event) ** 2
            P_rest = np.abs(stft_frames(mix, first, stop) - X_event) ** 2     # the STFT is linear
            masks[name][first:stop] = dominance_mask(P_event, P_rest)
            powers.append(P_event)
        _settle_shared_cells(masks, names, spans, powers)
        if all(float(P[masks[name][first:stop]].sum()) >= _MIN_OWN_SHARE * float(P.sum())
               for name, (first, stop), P in zip(names, spans, powers)):
            break
    else:
        raise RuntimeError(f"no composition of {list(names)} kept every event audible in "
                           f"{_ATTEMPTS} tries (seed {seed})")
    gain = min(1.0, PEAK * (1 - 1e-6) / float(np.abs(mix).max()))
    events = []
    for name, full, level in zip(names, placed, levels):
        frames = np.flatnonzero(masks[name].any(axis=1))
        bins = np.flatnonzero(masks[name].any(axis=0))
        events.append(Event(name, frames[0] * HOP / SAMPLE_RATE, frames[-1] * HOP / SAMPLE_RATE,
                            bins[0] * SAMPLE_RATE / N_FFT, bins[-1] * SAMPLE_RATE / N_FFT,
                            float(level) + 20 * math.log10(gain)))
    events.sort(key=lambda e: (e.start_s, e.name))
    return Scene(
        wave=(mix * gain).astype(np.float32),
        caption=caption_for(events),
        events=events,
        masks={e.name: masks[e.name] for e in events},
        sources={name: full * np.float32(gain) for name, full in zip(names, placed)},
        seed=seed,
    )


def render_scene(seed: int, n_events: int | None = None) -> Scene:
    """A 10-s scene of `n_events` distinct event kinds (None: 1..MAX_EVENTS at random).

    Durations come from each kind's range, start times are uniform (overlap limited, see
    MAX_OVERLAP), levels uniform in LEVEL_DB, over pink-ish noise at BACKGROUND_DB; the
    mix is scaled down, sources alike, when its peak would pass PEAK. Deterministic for
    (seed, n_events); seed is a non-negative int.
    """
    rng = np.random.default_rng([int(seed), _SCENE_STREAM])
    if n_events is None:
        n_events = int(rng.integers(1, MAX_EVENTS + 1))
    if not 1 <= n_events <= MAX_EVENTS:
        raise ValueError(f"n_events must be 1..{MAX_EVENTS} (or None for random), got {n_events}")
    kinds = rng.choice(len(EVENTS), n_events, replace=False)
    return _compose(rng, [EVENTS[k] for k in kinds], int(seed))


def single_event_scene(name: str, seed: int) -> Scene:
    """A 10-s scene holding one event of kind `name` at a random time and level (zero-shot
    tests); its caption is `prompt_for(name)`. Its seed stream is disjoint from
    `render_scene`'s."""
    _kind(name)
    rng = np.random.default_rng([int(seed), _SINGLE_STREAM, EVENTS.index(name)])
    return _compose(rng, [name], int(seed))


# ------------------------------------------------------------------------ writing


def scene_seed(seed: int, split: str, index: int) -> int:
    """The `render_scene` seed of scene `index` of `split` in the world of `seed`:
    ``(seed * len(SPLITS) + SPLITS.index(split)) * 2**32 + index``. Each (seed, split) owns
    its own block of 2**32 seeds, so splits never share a scene."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not 0 <= index < 2 ** 32 or seed < 0:
        raise ValueError(f"need seed >= 0 and 0 <= index < 2**32, got seed={seed}, index={index}")
    return (int(seed) * len(SPLITS) + SPLITS.index(split)) * 2 ** 32 + int(index)


WORLD_TEXTS = ("caption", "events", "both")


def write_world(folder: str | os.PathLike, n_scenes: int, seed: int = 0, split: str = "train", *,
                with_masks: bool = False, texts: str = "caption") -> Path:
    """Write `n_scenes` scenes of one split and return the manifest's path.

    Layout under `folder`: ``<split>/scene_00000.flac`` (48 kHz mono, 24-bit FLAC) and the
    manifest ``<split>.jsonl``, one line per scene::

        {"audio": "<split>/scene_00000.flac", "caption": ..., "seed": ...,
         "events": [{"name", "start_s", "end_s", "f_lo", "f_hi", "level_db"}, ...]}

    (paths relative to the manifest's folder, as `lmaczs_cli.data.read_manifest` reads
    them). `texts` picks the lines' texts: "caption" (one line per scene), "events" (one
    line per event of the scene, captioned with that event's zero-shot prompt
    `prompt_for(name)`, plus its "event" name) or "both" (the caption line, then the event
    lines). With ``with_masks=True`` each scene also gets ``<split>/scene_00000.masks.npz``
    holding ``linear/<name>`` bool (N_FRAMES, N_FREQS) and ``mel/<name>`` bool
    (N_FRAMES, N_MELS) per event, named in the line's "masks". Scene i is
    ``render_scene(scene_seed(seed, split, i))``: deterministic, splits disjoint.
    """
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be at least 1, got {n_scenes}")
    if texts not in WORLD_TEXTS:
        raise ValueError(f"texts must be one of {', '.join(WORLD_TEXTS)}, got {texts!r}")
    scene_seed(seed, split, 0)   # validates split and seed before anything is written
    root = Path(folder)
    (root / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_scenes):
        scene = render_scene(scene_seed(seed, split, i))
        stem = f"{split}/scene_{i:05d}"
        sf.write(root / f"{stem}.flac", scene.wave, SAMPLE_RATE, format="FLAC", subtype="PCM_24")
        record = {"audio": f"{stem}.flac", "caption": scene.caption, "seed": scene.seed,
                  "events": [e.to_json() for e in scene.events]}
        if with_masks:
            arrays = {f"linear/{k}": v for k, v in scene.masks.items()}
            arrays.update({f"mel/{k}": v for k, v in scene.mel_masks.items()})
            np.savez_compressed(root / f"{stem}.masks.npz", **arrays)
            record["masks"] = f"{stem}.masks.npz"
        if texts != "events":
            lines.append(json.dumps(record))
        if texts != "caption":
            for name in sorted({e.name for e in scene.events}):
                lines.append(json.dumps({**record, "caption": prompt_for(name), "event": name}))
    manifest = root / f"{split}.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
    return manifest
