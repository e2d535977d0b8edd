"""The demo world: seeded scenes of named events, captions, and ground-truth masks."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from lmaczs_cli import spectral
from lmaczs_cli.audio import CLIP_SAMPLES, HOP, N_FFT, N_FRAMES, N_FREQS, N_MELS, SAMPLE_RATE
from lmaczs_cli.data import read_manifest
from lmaczs_cli.demo import events, world
from lmaczs_cli.demo.world import EVENTS, Event


def _power(x: np.ndarray) -> np.ndarray:
    """|STFT|² (frames, 513) by the front end's own (torch) STFT: an independent check."""
    return spectral.power(spectral.stft(torch.from_numpy(np.ascontiguousarray(x))[None]))[0].double().numpy()


# ------------------------------------------------------------------------ event kinds


def test_there_are_at_least_twelve_plainly_named_kinds():
    assert len(EVENTS) >= 12
    assert len(set(EVENTS)) == len(EVENTS)
    for name in EVENTS:
        assert name == name.lower().strip() and name.isascii()
        others = set(EVENTS) - {name}
        assert not set(name.split()) & others, f"{name!r} contains another event's whole name"


def test_prompt_is_the_caption_of_a_scene_with_that_event_alone():
    assert world.prompt_for("rising chirp") == "the sound of a rising chirp"
    for name in EVENTS:
        assert world.single_event_scene(name, 3).caption == world.prompt_for(name)
    with pytest.raises(ValueError, match="unknown event 'trumpet'; use one of steady tone"):
        world.prompt_for("trumpet")


@pytest.mark.parametrize("name", EVENTS)
def test_render_event_is_deterministic_float32_unit_rms(name):
    x = world.render_event(name, 1.5, seed=7)
    assert x.dtype == np.float32 and x.shape == (int(1.5 * SAMPLE_RATE),)
    assert np.isfinite(x).all()
    a, b = events.active_span(x)
    assert np.sqrt(np.mean(x[a:b].astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)
    assert world.render_event(name, 1.5, seed=7).tobytes() == x.tobytes()
    assert not np.array_equal(world.render_event(name, 1.5, seed=8), x)


@pytest.mark.parametrize("name", ["bell", "dog-like bark"])
def test_short_kinds_leave_a_long_buffer_silent_at_its_end(name):
    x = world.render_event(name, 5.0, seed=1)
    tail = x[-SAMPLE_RATE:].astype(np.float64)
    assert np.sqrt(np.mean(tail ** 2)) < 1e-3 * np.abs(x).max()


def test_render_event_refuses_unknown_kinds_and_empty_buffers():
    with pytest.raises(ValueError, match="unknown event 'dog bark'"):
        world.render_event("dog bark", 1.0, 0)
    with pytest.raises(ValueError, match="an event lasts at least 0.1 s, got seconds=0.01"):
        world.render_event("bell", 0.01, 0)


def _features(log_mel: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Pitch-agnostic shape statistics of an event's frames of a log-mel (T, 64): duration,
    mean band, how far and how fast the spectral centroid moves and in which direction,
    spectral spread, and the loudness envelope's trend and fluctuation."""
    A = log_mel[active]
    P = 10 ** ((A - A.max()) / 10)
    share = P / P.sum(1, keepdims=True)
    bands = np.arange(A.shape[1])
    centroid = share @ bands
    spread = np.sqrt((share * (bands - centroid[:, None]) ** 2).sum(1))
    loud = 10 * np.log10(P.sum(1))
    t = np.arange(len(A))

    def corr(u, v):
        return 0.0 if u.std() < 1e-9 or v.std() < 1e-9 else float(np.corrcoef(u, v)[0, 1])

    def step(u):
        return float(np.abs(np.diff(u)).mean()) if len(u) > 1 else 0.0

    log = lambda v: np.log(v + 0.1)   # noqa: E731
    return np.array([np.log(len(A)), centroid.mean() / 16, log(centroid.std()), corr(t, centroid),
                     log(spread.mean()), corr(t, loud), log(loud.std()), log(step(centroid)),
                     log(step(loud))])


def test_kinds_are_separable_by_log_mel_shape():
    """A sanity check of the world, not of a model: nearest-centroid on a few log-mel shape
    statistics, leave-one-out over held-out seeds, tells the kinds apart."""
    seeds = 5
    feats = np.zeros((len(EVENTS), seeds, 9))
    for i, name in enumerate(EVENTS):
        for j in range(seeds):
            scene = world.single_event_scene(name, 1000 + j)
            S = spectral.log_mel(torch.from_numpy(scene.wave)[None])[0].numpy()
            feats[i, j] = _features(S, scene.mel_masks[name].any(axis=1))
    flat = feats.reshape(-1, feats.shape[-1])
    z = (feats - flat.mean(0)) / flat.std(0)
    correct = 0
    for i in range(len(EVENTS)):
        for j in range(seeds):
            centroids = z.mean(axis=1)
            centroids[i] = np.delete(z[i], j, axis=0).mean(axis=0)
            correct += int(np.argmin(((centroids - z[i, j]) ** 2).sum(axis=1)) == i)
    assert correct / feats[..., 0].size >= 0.9


# ------------------------------------------------------------------------ ground truth


@pytest.mark.parametrize("n", [CLIP_SAMPLES, CLIP_SAMPLES - 7])
def test_stft_frames_are_those_of_the_whole_signal(n):
    """A frame range transformed alone equals those frames of the front end's STFT of the
    whole signal, bit for bit, at the signal's ends (reflect padding) and inside it."""
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    whole = spectral.stft(torch.from_numpy(x)[None])[0]
    total = n // HOP + 1
    assert torch.equal(world.stft_frames(x), whole) and whole.shape == (total, N_FREQS)
    for first, stop in [(0, 1), (0, 3), (1, 5), (2, 3), (400, 420), (total - 3, total), (total - 1, total)]:
        assert torch.equal(world.stft_frames(x, first, stop), whole[first:stop]), (first, stop)
    with pytest.raises(ValueError, match="outside"):
        world.stft_frames(x, 5, 5)


def test_dominance_mask_keeps_cells_the_event_owns_within_range():
    event = np.array([[1.0, 1e-2, 1e-4, 1.0]])
    rest = np.array([[0.1, 1e-3, 1e-5, 2.0]])
    # cell 2 is owned but 40 dB under the event's level; cell 3 is louder in the rest
    np.testing.assert_array_equal(world.dominance_mask(event, rest), [[True, True, False, False]])


@pytest.mark.parametrize("name", EVENTS)
def test_each_kind_energy_lies_in_its_mask(name):
    for seed in (0, 1):
        scene = world.single_event_scene(name, seed)
        (ev,) = scene.events
        mask, mel = scene.masks[name], scene.mel_masks[name]
        assert mask.dtype == bool and mask.shape == (N_FRAMES, N_FREQS)
        assert mel.dtype == bool and mel.shape == (N_FRAMES, N_MELS)
        P = _power(scene.sources[name])
        assert P[mask].sum() >= 0.8 * P.sum()
        P_mel = P @ spectral.mel_filterbank().double().numpy()
        assert P_mel[mel].sum() >= 0.8 * P_mel.sum()
        # the event's box is its mask's bounding box, and the mask stays by the source
        frames, bins = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert (ev.start_s, ev.end_s) == (frames[0] * HOP / SAMPLE_RATE, frames[-1] * HOP / SAMPLE_RATE)
        assert (ev.f_lo, ev.f_hi) == (bins[0] * SAMPLE_RATE / N_FFT, bins[-1] * SAMPLE_RATE / N_FFT)
        support = np.flatnonzero(scene.sources[name])
        assert frames[0] * HOP >= support[0] - N_FFT and frames[-1] * HOP <= support[-1] + N_FFT


def test_masks_of_a_mixture_are_disjoint_and_hold_their_events():
    for seed in range(6):
        scene = world.render_scene(seed, n_events=3)
        owned = sum(m.astype(int) for m in scene.masks.values())
        assert owned.max() == 1, "a cell belongs to at most one event"
        for name, m in scene.masks.items():
            P = _power(scene.sources[name])
            assert P[m].sum() >= 0.5 * P.sum(), (seed, name)


# ------------------------------------------------------------------------ scenes


def test_scene_is_deterministic_in_its_seed():
    a, b, c = world.render_scene(11), world.render_scene(11), world.render_scene(12)
    assert a.wave.tobytes() == b.wave.tobytes() and a.caption == b.caption
    assert a.events == b.events and a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert all(np.array_equal(a.mel_masks[k], b.mel_masks[k]) for k in a.masks)
    assert not np.array_equal(a.wave, c.wave)


def test_scene_holds_distinct_events_in_start_order_under_the_peak():
    counts = set()
    for seed in range(12):
        scene = world.render_scene(seed)
        assert scene.wave.dtype == np.float32 and scene.wave.shape == (CLIP_SAMPLES,)
        assert np.abs(scene.wave).max() <= world.PEAK
        names = [e.name for e in scene.events]
        counts.add(len(names))
        assert 1 <= len(names) <= world.MAX_EVENTS and len(set(names)) == len(names)
        assert [e.start_s for e in scene.events] == sorted(e.start_s for e in scene.events)
        assert set(scene.masks) == set(scene.sources) == set(names)
        positions = [scene.caption.index(f" {n}") for n in names]
        assert positions == sorted(positions), scene.caption
        assert scene.caption == world.caption_for(scene.events)
        background = (scene.wave - sum(scene.sources.values())).astype(np.float64)
        rms = np.sqrt(np.mean(background ** 2))
        assert 0 < rms <= 10 ** (world.BACKGROUND_DB / 20) * 1.01   # lower when scaled to PEAK
    assert counts == {1, 2, 3}
    assert len(world.render_scene(5, n_events=2).events) == 2
    with pytest.raises(ValueError, match="n_events must be 1..3"):
        world.render_scene(0, n_events=4)


def test_caption_grammar_joins_by_then_or_and():
    bell = Event("bell", 1.0, 2.0, 400.0, 6000.0, -12.0)
    hiss = Event("hiss", 3.0, 5.0, 6000.0, 16000.0, -12.0)
    warble = Event("warble", 4.0, 6.0, 900.0, 3000.0, -12.0)
    assert world.caption_for([warble, hiss, bell]) == "the sound of a bell then a hiss and a warble"
    assert world.caption_for([hiss]) == "the sound of a hiss"


def test_a_scene_renders_fast():
    world.render_scene(0)   # warm caches
    times = []
    for seed in range(5):
        t0 = time.perf_counter()
        world.render_scene(seed)
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 0.2


# ------------------------------------------------------------------------ writing


def test_scene_seeds_give_each_split_its_own_block():
    assert world.scene_seed(0, "train", 5) == 5
    blocks = {world.scene_seed(s, split, 0) >> 32 for s in range(3) for split in world.SPLITS}
    assert len(blocks) == 3 * len(world.SPLITS)
    with pytest.raises(ValueError, match="unknown split 'dev'; use one of train, valid, test"):
        world.scene_seed(0, "dev", 0)


def test_write_world_writes_flac_and_a_manifest_training_reads(tmp_path):
    train = world.write_world(tmp_path, 3, seed=1, split="train", with_masks=True)
    valid = world.write_world(tmp_path, 2, seed=1, split="valid")
    assert train == tmp_path / "train.jsonl" and valid == tmp_path / "valid.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert [r["audio"] for r in rows] == [f"train/scene_{i:05d}.flac" for i in range(3)]
    for i, row in enumerate(rows):
        scene = world.render_scene(world.scene_seed(1, "train", i))
        wave, sr = sf.read(tmp_path / row["audio"], dtype="float32")
        assert sr == SAMPLE_RATE and sf.info(tmp_path / row["audio"]).subtype == "PCM_24"
        np.testing.assert_allclose(wave, scene.wave, atol=2.0 ** -23)
        assert row["caption"] == scene.caption and row["seed"] == scene.seed
        assert [e["name"] for e in row["events"]] == [e.name for e in scene.events]
        assert set(row["events"][0]) == {"name", "start_s", "end_s", "f_lo", "f_hi", "level_db"}
        with np.load(tmp_path / row["masks"]) as masks:
            for name in scene.masks:
                np.testing.assert_array_equal(masks[f"linear/{name}"], scene.masks[name])
                np.testing.assert_array_equal(masks[f"mel/{name}"], scene.mel_masks[name])
    items, skips = read_manifest(train)
    assert not skips and [it.caption for it in items] == [r["caption"] for r in rows]
    valid_seeds = {json.loads(line)["seed"] for line in valid.read_text().splitlines()}
    assert not valid_seeds & {r["seed"] for r in rows}
    assert "masks" not in json.loads(valid.read_text().splitlines()[0])
    before = (tmp_path / rows[0]["audio"]).read_bytes()
    world.write_world(tmp_path, 1, seed=1, split="train")
    assert (tmp_path / rows[0]["audio"]).read_bytes() == before


@pytest.mark.parametrize("texts", ["events", "both"])
def test_write_world_event_prompt_lines(tmp_path, texts):
    manifest = world.write_world(tmp_path, 3, seed=2, split="train", texts=texts)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    expected = []
    for i in range(3):
        scene = world.render_scene(world.scene_seed(2, "train", i))
        if texts == "both":
            expected.append((f"train/scene_{i:05d}.flac", scene.caption))
        expected += [(f"train/scene_{i:05d}.flac", world.prompt_for(n)) for n in sorted({e.name for e in scene.events})]
    assert [(r["audio"], r["caption"]) for r in rows] == expected
    assert all(r["event"] in world.EVENTS for r in rows if "event" in r)
    items, skips = read_manifest(manifest)
    assert not skips and len(items) == len(rows)


def test_write_world_fixes_the_number_of_events(tmp_path):
    manifest = world.write_world(tmp_path, 4, seed=3, split="train", n_events=1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [len(r["events"]) for r in rows] == [1] * 4
    for i, row in enumerate(rows):
        scene = world.render_scene(world.scene_seed(3, "train", i), 1)
        assert row["seed"] == scene.seed and row["events"][0]["name"] == scene.events[0].name
    with pytest.raises(ValueError, match="n_events must be 1..3"):
        world.write_world(tmp_path / "bad", 1, n_events=4)
    assert not (tmp_path / "bad").exists()


def test_write_world_refuses_unknown_texts(tmp_path):
    with pytest.raises(ValueError, match="texts must be one of"):
        world.write_world(tmp_path, 1, texts="labels")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------ backgrounds


def _slope_db_per_octave(x: np.ndarray, lo_hz: float = 200.0, hi_hz: float = 6400.0) -> float:
    """Least-squares slope of the power spectrum (dB) against log2 frequency over [lo_hz, hi_hz]."""
    f, p = scipy_welch(x)
    keep = (f >= lo_hz) & (f <= hi_hz)
    return float(np.polyfit(np.log2(f[keep]), 10 * np.log10(p[keep]), 1)[0])


def scipy_welch(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import scipy.signal

    return scipy.signal.welch(x, fs=SAMPLE_RATE, nperseg=4096)


@pytest.mark.parametrize("kind, slope", [("white", 0.0), ("pink", -3.0), ("brown", -6.0), ("blue", 3.0)])
def test_coloured_backgrounds_are_unit_rms_with_their_spectral_slope(kind, slope):
    x = world.background_noise(kind, np.random.default_rng(1))
    assert x.dtype == np.float32 and x.shape == (CLIP_SAMPLES,)
    assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)
    assert _slope_db_per_octave(x) == pytest.approx(slope, abs=0.5)
    assert np.array_equal(x, world.background_noise(kind, np.random.default_rng(1)))


def test_traffic_swells_and_stays_under_two_kilohertz():
    x = world.background_noise("traffic", np.random.default_rng(2)).astype(np.float64)
    f, p = scipy_welch(x)
    assert p[f > 2500].sum() < 1e-3 * p.sum()
    second = np.sqrt(np.mean(x.reshape(10, -1) ** 2, axis=1))          # RMS per second
    assert second.max() > 2 * second.min()


def test_training_and_unseen_backgrounds_do_not_share_a_kind():
    assert not set(world.TRAIN_BACKGROUNDS) & set(world.UNSEEN_BACKGROUNDS)
    with pytest.raises(ValueError, match="unknown background 'rain'"):
        world.background_noise("rain", np.random.default_rng(0))


@pytest.mark.parametrize("snr", [0.0, 10.0, 20.0])
def test_an_event_over_a_background_sits_snr_db_above_it(snr):
    scene = world.event_over_background("siren", 5, "white", snr)
    (ev,) = scene.events
    source = scene.sources["siren"].astype(np.float64)
    noise = scene.wave.astype(np.float64) - source
    active = np.abs(source) > 0
    level = 10 * np.log10(np.mean(source[active] ** 2))
    assert scene.background == "white" and scene.snr_db == snr
    assert level - 10 * np.log10(np.mean(noise ** 2)) == pytest.approx(snr, abs=0.6)
    assert scene.masks["siren"].any()
    again = world.event_over_background("siren", 5, "white", snr)
    assert np.array_equal(scene.wave, again.wave)
    assert not np.array_equal(scene.wave, world.event_over_background("siren", 6, "white", snr).wave)


def test_a_louder_background_owns_more_of_the_event_s_cells():
    quiet = world.event_over_background("rain shower", 3, "white", 20.0).masks["rain shower"].sum()
    loud = world.event_over_background("rain shower", 3, "white", 0.0).masks["rain shower"].sum()
    assert loud < quiet


def test_write_world_over_training_backgrounds_records_kind_and_snr(tmp_path):
    manifest = world.write_world(tmp_path, 3, split="train", backgrounds=("blue", "band"), snr_range=(0.0, 10.0))
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert {line["background"] for line in lines} <= {"blue", "band"}
    assert all(0.0 <= line["snr_db"] for line in lines)
    plain_manifest = world.write_world(tmp_path / "plain", 3, split="train")
    plain = [json.loads(line) for line in plain_manifest.read_text().splitlines()]
    assert [sorted(e["name"] for e in line["events"]) for line in plain] == \
        [sorted(e["name"] for e in line["events"]) for line in lines]          # the same kinds, over other noise
    assert "background" not in plain[0]
    with pytest.raises(ValueError, match="unknown backgrounds"):
        world.write_world(tmp_path, 1, backgrounds=("white", "rain"))
