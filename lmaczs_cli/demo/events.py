"""The demo world's sound events: fourteen named kinds (`EVENTS`), each a seeded synthesiser
with its own shape in the log-mel image — band, duration and temporal pattern, not only pitch —
so that a small CLAP can tell them apart. Within a kind the parameters vary over fixed ranges.
`render_event` renders one event alone; `lmaczs_cli.demo.world` places events in scenes and
derives their ground-truth masks.

Seeds: `render_event` is a pure function of (name, seconds, seed) and draws from its own
seed-sequence stream (`EVENT_STREAM`), disjoint from the scene streams of `world`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.fft
import scipy.signal

from ..audio import SAMPLE_RATE

__all__ = ["ACTIVE_DB", "EVENTS", "MIN_SECONDS", "active_span", "kind_seconds", "render_event"]

ACTIVE_DB = -60.0             # an event's active span: from the first to the last sample
                              # whose magnitude is within this of its peak
MIN_SECONDS = 0.1             # shortest event render_event makes
EVENT_STREAM = 1              # render_event's seed-sequence stream (world's scenes use others)

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


def kind_seconds(name: str) -> tuple[float, float]:
    """The duration range (s) an event of kind `name` gets in scenes; ValueError for an unknown name."""
    return _kind(name).seconds


def active_span(x: np.ndarray) -> tuple[int, int]:
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
    rng = np.random.default_rng([int(seed), EVENTS.index(name), EVENT_STREAM])
    x = kind.render(rng, n)
    a, b = active_span(x)
    return (x / float(np.sqrt(np.mean(x[a:b] ** 2)))).astype(np.float32)
