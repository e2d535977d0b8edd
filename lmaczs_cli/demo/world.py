"""A seeded synthetic sound world with ground truth: named events, 10-s scenes, captions and
a time-frequency mask per event.

The event kinds (`EVENTS`, `render_event`) are synthesised in `lmaczs_cli.demo.events` and
re-exported here. A scene (`render_scene`) mixes 1-3 distinct kinds
at random times and levels over quiet pink-ish noise, with a caption from a fixed grammar
(`caption_for`) and, per event, its ground-truth mask on the STFT grid (`Scene.masks`, the
rule is `dominance_mask`) and on the mel grid (`Scene.mel_masks`, via `mask_to_mel`).
`write_world` writes scenes as FLAC files plus the JSONL manifest `lmaczs train` reads.
Backgrounds other than the quiet default (`background_noise`): kinds a decoder may train over
(`TRAIN_BACKGROUNDS`, `write_world(backgrounds=...)`) and kinds kept out of training
(`UNSEEN_BACKGROUNDS`), over which `event_over_background` places one event at a given SNR.

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

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf
import torch

from .events import EVENTS, MIN_SECONDS, kind_seconds, render_event
from .. import spectral
from ..audio import CLIP_SAMPLES, CLIP_SECONDS, HOP, N_FFT, N_FRAMES, N_FREQS, SAMPLE_RATE

__all__ = [
    "BACKGROUNDS", "EVENTS", "MAX_EVENTS", "MIN_SECONDS", "SPLITS", "TRAIN_BACKGROUNDS", "UNSEEN_BACKGROUNDS",
    "Event", "Scene", "background_noise", "caption_for", "dominance_mask", "event_over_background",
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
SPLITS = ("train", "valid", "test")
# Background noise kinds (`background_noise`). A decoder may train over TRAIN_BACKGROUNDS
# (`write_world(backgrounds=...)`); UNSEEN_BACKGROUNDS are kept out of every training recipe so
# that explanations over them (`event_over_background`) measure how the decoder travels.
TRAIN_BACKGROUNDS = ("pink", "blue", "band")
UNSEEN_BACKGROUNDS = ("white", "brown", "traffic")
BACKGROUNDS = TRAIN_BACKGROUNDS + UNSEEN_BACKGROUNDS
SNR_DB = (0.0, 20.0)          # dB: event level over background level, range for noisy scenes

_SCENE_STREAM, _SINGLE_STREAM, _NOISY_STREAM = 2, 3, 4   # seed-sequence streams, disjoint from
                                                         # events.EVENT_STREAM
_ATTEMPTS = 8                 # compositions tried before a scene is refused (see _compose)
_MIN_OWN_SHARE = 0.5          # an event's mask must hold this share of its own energy


# ------------------------------------------------------------------------ ground truth


_MARGIN = -(-(N_FFT // 2) // HOP)   # 2 frames: how far a centred frame's window reaches past its centre


def stft_frames(x: np.ndarray, first: int = 0, stop: int | None = None) -> torch.Tensor:
    """Frames [first, stop) of the front end's STFT (`lmaczs_cli.spectral.stft`) of x.

    x: float32 (n,). Returns complex64 (stop - first, N_FREQS); all n // HOP + 1 frames by
    default. Only the samples those frames' windows see are transformed: the segment
    starts and ends _MARGIN frames beyond them, or at the signal's own ends, where it is
    reflect-padded exactly as the whole signal is.
    """
    total = len(x) // HOP + 1
    stop = total if stop is None else stop
    if not 0 <= first < stop <= total:
        raise ValueError(f"frames [{first}, {stop}) outside the {total} of this signal")
    lo, hi = max(0, first - _MARGIN), stop + _MARGIN
    segment = np.ascontiguousarray(x[lo * HOP: hi * HOP] if hi < total else x[lo * HOP:], np.float32)
    return spectral.stft(torch.from_numpy(segment)[None])[0, first - lo: stop - lo]


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


def mask_to_mel(mask: np.ndarray, power: np.ndarray) -> np.ndarray:
    """Map a linear-grid mask to the mel grid: a band is on where at least half of its
    filterbank-weighted power lies in on-bins.

    mask: bool (T, N_FREQS); power: the mix's STFT power (T, N_FREQS), which weighs the
    bins (a tone owning 3 bins of a 20-bin band still owns the band when it carries its
    power). Returns bool (T, N_MELS). Bins outside every mel filter do not count.
    """
    power = torch.as_tensor(np.asarray(power, np.float64))
    total = spectral.mel_power(power)
    owned = spectral.mel_power(power * torch.as_tensor(np.asarray(mask, bool)))
    return ((total > 0) & (owned >= 0.5 * total)).numpy()


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
    background: str | None = None     # `background_noise` kind, None: the quiet pink-ish default
    snr_db: float | None = None       # dB, events' mean drawn level over the background's (with background)

    @functools.cached_property
    def mel_masks(self) -> dict[str, np.ndarray]:
        """Event name -> bool (N_FRAMES, N_MELS): `masks` mapped by `mask_to_mel` with the
        mix's power."""
        P = spectral.power(stft_frames(self.wave))
        return {name: mask_to_mel(m, P) for name, m in self.masks.items()}


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def prompt_for(name: str) -> str:
    """The zero-shot prompt of an event kind, e.g. "the sound of a rising chirp"; exactly
    the caption of a scene holding that event alone."""
    kind_seconds(name)
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


def _shaped_noise(rng: np.random.Generator, slope_db_per_octave: float, lo_hz: float = 20.0,
                  hi_hz: float = SAMPLE_RATE / 2) -> np.ndarray:
    """Gaussian noise whose power spectrum has this slope (0 white, -3 pink, -6 brown, +3 blue),
    kept to [lo_hz, hi_hz]; float64 (CLIP_SAMPLES,), unshaped in level."""
    spec = np.fft.rfft(rng.standard_normal(CLIP_SAMPLES))
    f = np.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE)
    gain = np.zeros_like(f)
    keep = (f >= lo_hz) & (f <= hi_hz)
    gain[keep] = (f[keep] / 1000.0) ** (slope_db_per_octave / (20 * math.log10(2)))   # amplitude
    return np.fft.irfft(spec * gain, CLIP_SAMPLES)


def background_noise(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 10-s background of one of `BACKGROUNDS`, float32 (CLIP_SAMPLES,), unit RMS:
    "white", "pink" (-3 dB/octave), "brown" (-6 dB/octave, from 20 Hz), "blue" (+3 dB/octave),
    "band" (white noise in a random band one to three octaves wide between 200 Hz and 12 kHz),
    "traffic" (generated road ambience: -4.5 dB/octave noise under 2 kHz, swelling as 3-6
    vehicles pass, each a Gaussian bump 1-4 s wide over a steady floor)."""
    if kind == "white":
        x = rng.standard_normal(CLIP_SAMPLES)
    elif kind in ("pink", "brown", "blue"):
        x = _shaped_noise(rng, {"pink": -3.0, "brown": -6.0, "blue": 3.0}[kind])
    elif kind == "band":
        octaves = rng.uniform(1.0, 3.0)
        lo = 200.0 * 2 ** rng.uniform(0.0, math.log2(12_000 / 200) - octaves)
        x = _shaped_noise(rng, 0.0, lo, lo * 2 ** octaves)
    elif kind == "traffic":
        t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
        swell = np.full(CLIP_SAMPLES, 0.3)
        for _ in range(int(rng.integers(3, 7))):
            height, centre, width = rng.uniform(0.5, 1.5), rng.uniform(0, CLIP_SECONDS), rng.uniform(0.5, 2.0)
            swell += height * np.exp(-0.5 * ((t - centre) / width) ** 2)
        x = _shaped_noise(rng, -4.5, 30.0, 2000.0) * swell
    else:
        raise ValueError(f"unknown background {kind!r}; use one of {', '.join(BACKGROUNDS)}")
    return (x / np.sqrt(np.mean(x * x))).astype(np.float32)


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


def _compose(rng: np.random.Generator, names: Sequence[str], seed: int,
             noise: str | None = None, snr_db: float = 0.0) -> Scene:
    """Mix the named events at random times and levels over background noise: the quiet
    pink-ish noise at BACKGROUND_DB, or with `noise` that `background_noise` kind, snr_db under
    the events' mean drawn level.

    A composition in which some event's mask holds less than _MIN_OWN_SHARE of its own
    energy (it is buried under another) is drawn again from the same generator.
    """
    for _ in range(_ATTEMPTS):
        durations = [rng.uniform(*kind_seconds(name)) for name in names]
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
        if noise is not None:
            background = background_noise(noise, rng) * np.float32(10 ** ((np.mean(drawn) - snr_db) / 20))
            mix = background + np.sum(placed, axis=0, dtype=np.float32)
        masks = {name: np.zeros((N_FRAMES, N_FREQS), bool) for name in names}
        powers = []
        for name, full, (first, stop) in zip(names, placed, spans):
            X_event = stft_frames(full, first, stop)
            P_event = spectral.power(X_event).numpy()
            P_rest = spectral.power(stft_frames(mix, first, stop) - X_event).numpy()   # the STFT is linear
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


def render_scene(seed: int, n_events: int | None = None, backgrounds: Sequence[str] = (),
                 snr_range: tuple[float, float] = SNR_DB) -> Scene:
    """A 10-s scene of `n_events` distinct event kinds (None: 1..MAX_EVENTS at random).

    Durations come from each kind's range, start times are uniform (overlap limited, see
    MAX_OVERLAP), levels uniform in LEVEL_DB, over pink-ish noise at BACKGROUND_DB; the
    mix is scaled down, sources alike, when its peak would pass PEAK. Deterministic for
    (seed, n_events); seed is a non-negative int. With `backgrounds` (kinds of
    `background_noise`), the background is one of them drawn at random, at an SNR drawn
    uniformly in `snr_range` (dB), raised by 6 dB at a time while the noise buries an event (see
    `_compose`); the scene's ``background`` and ``snr_db`` say which.
    """
    rng = np.random.default_rng([int(seed), _SCENE_STREAM])
    if n_events is None:
        n_events = int(rng.integers(1, MAX_EVENTS + 1))
    if not 1 <= n_events <= MAX_EVENTS:
        raise ValueError(f"n_events must be 1..{MAX_EVENTS} (or None for random), got {n_events}")
    kinds = rng.choice(len(EVENTS), n_events, replace=False)
    if not backgrounds:
        return _compose(rng, [EVENTS[k] for k in kinds], int(seed))
    noise, snr = str(rng.choice(list(backgrounds))), float(rng.uniform(*snr_range))
    while True:
        try:
            scene = _compose(rng, [EVENTS[k] for k in kinds], int(seed), noise, snr)
            return dataclasses.replace(scene, background=noise, snr_db=snr)
        except RuntimeError:
            if snr > 60:
                raise
            snr += 6.0


def single_event_scene(name: str, seed: int) -> Scene:
    """A 10-s scene holding one event of kind `name` at a random time and level (zero-shot
    tests); its caption is `prompt_for(name)`. Its seed stream is disjoint from
    `render_scene`'s."""
    kind_seconds(name)
    rng = np.random.default_rng([int(seed), _SINGLE_STREAM, EVENTS.index(name)])
    return _compose(rng, [name], int(seed))


# ------------------------------------------------------------------------ writing


def event_over_background(name: str, seed: int, background: str, snr_db: float) -> Scene:
    """A 10-s scene holding one event of kind `name` at a random time and level over a
    `background_noise` of kind `background`, snr_db under the event's level (its RMS over its
    active span). Ground truth as for every scene: the cells where the event's power exceeds the
    background's. Its seed stream is disjoint from `render_scene`'s and `single_event_scene`'s."""
    kind_seconds(name)
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; use one of {', '.join(BACKGROUNDS)}")
    rng = np.random.default_rng([int(seed), _NOISY_STREAM, EVENTS.index(name), BACKGROUNDS.index(background)])
    scene = _compose(rng, [name], int(seed), background, float(snr_db))
    return dataclasses.replace(scene, background=background, snr_db=float(snr_db))


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
                with_masks: bool = False, texts: str = "caption", n_events: int | None = None,
                backgrounds: Sequence[str] = (), snr_range: tuple[float, float] = SNR_DB) -> Path:
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
    ``render_scene(scene_seed(seed, split, i), n_events)``: deterministic, splits disjoint;
    `n_events` fixes every scene's number of events (None: 1..MAX_EVENTS at random).
    With `backgrounds`, each scene is over one of those noise kinds at an SNR in `snr_range`
    (`render_scene`), and its lines say which (``background``, ``snr_db``).
    """
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be at least 1, got {n_scenes}")
    if texts not in WORLD_TEXTS:
        raise ValueError(f"texts must be one of {', '.join(WORLD_TEXTS)}, got {texts!r}")
    scene_seed(seed, split, 0)   # validates split and seed before anything is written
    if n_events is not None and not 1 <= n_events <= MAX_EVENTS:
        raise ValueError(f"n_events must be 1..{MAX_EVENTS} (or None for random), got {n_events}")
    unknown = [b for b in backgrounds if b not in BACKGROUNDS]
    if unknown:
        raise ValueError(f"unknown backgrounds {unknown}; use some of {', '.join(BACKGROUNDS)}")
    root = Path(folder)
    (root / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_scenes):
        scene = render_scene(scene_seed(seed, split, i), n_events, backgrounds, snr_range)
        stem = f"{split}/scene_{i:05d}"
        sf.write(root / f"{stem}.flac", scene.wave, SAMPLE_RATE, format="FLAC", subtype="PCM_24")
        record = {"audio": f"{stem}.flac", "caption": scene.caption, "seed": scene.seed,
                  "events": [e.to_json() for e in scene.events]}
        if scene.background is not None:
            record.update(background=scene.background, snr_db=scene.snr_db)
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
