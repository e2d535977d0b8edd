"""lmaczs_cli.audio: loading any soundfile format to 48-kHz mono, bad input, windowing."""
from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import soxr

from lmaczs_cli.audio import (
    CLIP_SAMPLES, HOP, N_FRAMES, RESAMPLE_QUALITY, SAMPLE_RATE, WINDOW_HOP, AudioError, Stitcher,
    audio_info, crossfade_weights, frame_starts, is_audio_name, iter_windows, load_audio, num_frames,
    pad_clip, window_starts, windows,
)

# --------------------------------------------------------------------------- helpers

EXT = {"WAV": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3", "RF64": "rf64",
       "W64": "w64", "AIFF": "aiff", "AU": "au"}


def tone(n: int, rate: int, freq: float = 1000.0, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


def write(path, data, rate: int, fmt: str = "WAV", subtype: str = "PCM_16"):
    sf.write(path, data, rate, format=fmt, subtype=subtype)
    return path


def peak_hz(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * rate / len(x)


def cut_tail(path, keep_fraction: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def raises_audio_error(path, reason: str, **kwargs) -> AudioError:
    with pytest.raises(AudioError) as info:
        load_audio(path, **kwargs)
    message = str(info.value)
    assert reason in message and str(path) in message and "\n" not in message, message
    assert message.startswith(reason), message   # reason first, then the path
    return info.value


# ------------------------------------------------------------- every format, rate, layout

LOSSLESS = [("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"),
            ("WAV", "FLOAT"), ("WAV", "DOUBLE"), ("FLAC", "PCM_16"), ("FLAC", "PCM_24")]
RATES = [8000, 16000, 22050, 44100, 48000, 96000, 192000]
CHANNELS = [1, 2, 6, 8]
# Codec limits: Opus encodes only 8/12/16/24/48 kHz; MPEG-1/2/2.5 layer III only rates
# up to 48 kHz and at most 2 channels.
CASES = (
    [(fmt, sub, rate, ch) for fmt, sub in LOSSLESS for rate in RATES for ch in CHANNELS]
    + [("OGG", "VORBIS", rate, ch) for rate in RATES for ch in CHANNELS]
    + [("OGG", "OPUS", rate, ch) for rate in (8000, 16000, 48000) for ch in CHANNELS]
    + [("MP3", "MPEG_LAYER_III", rate, ch) for rate in (8000, 16000, 22050, 44100, 48000)
       for ch in (1, 2)]
)


@pytest.mark.parametrize("fmt, subtype, rate, channels", CASES,
                         ids=[f"{s}-{r}-{c}ch" for _, s, r, c in CASES])
def test_any_format_loads_as_48k_mono_float32_and_keeps_pitch(tmp_path, fmt, subtype, rate,
                                                              channels):
    n = rate // 2   # 0.5 s
    gains = np.linspace(1.0, 0.5, channels, dtype=np.float32)
    path = write(tmp_path / f"clip.{EXT[fmt]}", tone(n, rate)[:, None] * gains, rate, fmt,
                 subtype)

    wave = load_audio(path)

    assert wave.dtype == np.float32 and wave.ndim == 1
    # libsndfile trims the lossy codecs' encoder delay and padding (Vorbis, Opus, and MP3
    # through its LAME tag), so they meet the same +-1-sample length as lossless files.
    assert abs(len(wave) - round(n * SAMPLE_RATE / rate)) <= 1
    assert abs(peak_hz(wave) - 1000.0) <= SAMPLE_RATE / len(wave)   # within one FFT bin
    assert np.isfinite(wave).all() and np.abs(wave).max() < 1.0


@pytest.mark.parametrize("channels", [2, 6, 8])
def test_downmix_is_the_channel_mean(tmp_path, channels):
    n = 12_000
    data = np.stack([tone(n, SAMPLE_RATE, 300.0 * (c + 1), 0.1 + 0.1 * c)
                     for c in range(channels)], axis=1)
    path = write(tmp_path / "multi.wav", data, SAMPLE_RATE, subtype="FLOAT")

    np.testing.assert_array_equal(load_audio(path), data.mean(axis=1))


def test_resampled_downmix_matches_one_shot_soxr(tmp_path):
    rate, n = 44_100, 200_000   # several read blocks, so the stream has seams
    data = np.stack([tone(n, rate, 440.0), tone(n, rate, 2500.0, 0.2),
                     np.zeros(n, np.float32)], axis=1)
    path = write(tmp_path / "three.flac", data, rate, "FLAC", "PCM_24")
    stored = sf.read(path, dtype="float32")[0]

    reference = soxr.resample(stored.mean(axis=1), rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
    np.testing.assert_allclose(load_audio(path), reference, atol=1e-6)


def test_other_target_rate(tmp_path):
    path = write(tmp_path / "a.wav", tone(4410, 44_100), 44_100)
    wave = load_audio(path, sr=16_000)
    assert len(wave) == 1600 and abs(peak_hz(wave, 16_000) - 1000.0) <= 16_000 / 1600


def test_audio_info_reads_the_header(tmp_path):
    path = write(tmp_path / "i.flac", np.zeros((22_050, 6), np.float32), 44_100, "FLAC")
    info = audio_info(path)
    assert (info.samplerate, info.channels, info.frames) == (44_100, 6, 22_050)
    assert (info.format, info.subtype, info.duration_s) == ("FLAC", "PCM_16", 0.5)


# ------------------------------------------------------------------- short and odd names


def test_one_sample_clip_loads(tmp_path):
    path = write(tmp_path / "one.wav", np.array([0.25], np.float32), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), [0.25])


def test_one_sample_at_192k_still_gives_one_sample(tmp_path):
    path = write(tmp_path / "one.wav", np.array([0.25], np.float32), 192_000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), [0.25])


def test_ten_ms_clip_loads(tmp_path):
    path = write(tmp_path / "short.wav", tone(441, 44_100), 44_100)
    assert abs(len(load_audio(path)) - 480) <= 1


@pytest.mark.parametrize("name", ["LOUD.WAV", "müsik – 音.wav", "no_extension"])
def test_file_names_do_not_matter(tmp_path, name):
    path = write(tmp_path / name, tone(4800, SAMPLE_RATE), SAMPLE_RATE, "WAV", "PCM_16")
    assert len(load_audio(path)) == 4800 and len(load_audio(str(path))) == 4800


# --------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    raises_audio_error(tmp_path / "nope.wav", "file not found")


@pytest.mark.parametrize("name", [".", "x.wav"])
def test_directory(tmp_path, name):
    (tmp_path / name).mkdir(exist_ok=True)
    raises_audio_error(tmp_path / name, "is a directory")


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    error = raises_audio_error(path, "not readable as audio")
    assert isinstance(error.__cause__, sf.LibsndfileError)


def test_random_bytes_named_flac(tmp_path):
    path = tmp_path / "noise.flac"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    raises_audio_error(path, "not readable as audio")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    raises_audio_error(path, "empty file")


def test_header_with_zero_frames(tmp_path):
    path = write(tmp_path / "zero.wav", np.zeros((0, 2), np.float32), SAMPLE_RATE)
    assert audio_info(path).frames == 0
    raises_audio_error(path, "no audio")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    data = tone(100_000, SAMPLE_RATE)
    data[77_777] = bad
    path = write(tmp_path / "bad.wav", np.stack([data, data], 1), SAMPLE_RATE, subtype="FLOAT")
    error = raises_audio_error(path, "non-finite samples")
    assert "frame 77777" in str(error)


def test_audio_error_pickles_with_its_message(tmp_path):
    error = AudioError("file not found", tmp_path / "a.wav")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


# ---------------------------------------------------------------------------- truncation

WAV_FAMILY = [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("RF64", "PCM_24"), ("W64", "PCM_16"),
              ("AIFF", "PCM_16"), ("AU", "FLOAT")]


@pytest.mark.parametrize("fmt, subtype", WAV_FAMILY)
def test_truncated_wav_family_is_refused_then_kept_on_request(tmp_path, fmt, subtype):
    n = SAMPLE_RATE
    full = write(tmp_path / f"full.{EXT[fmt]}", tone(n, SAMPLE_RATE), SAMPLE_RATE, fmt, subtype)
    stored = load_audio(full)
    path = tmp_path / f"cut.{EXT[fmt]}"
    path.write_bytes(full.read_bytes())
    cut_tail(path, 0.6)
    held = audio_info(path).frames   # libsndfile silently clamps to what is there

    raises_audio_error(path, f"truncated: header promises {n} frames, file holds {held}")
    part = load_audio(path, allow_truncated=True)
    assert 0.55 * n < len(part) == held < n
    np.testing.assert_array_equal(part, stored[:held])


def test_truncated_compressed_wav_counts_bytes(tmp_path):
    path = write(tmp_path / "adpcm.wav", tone(SAMPLE_RATE, SAMPLE_RATE), SAMPLE_RATE, "WAV",
                 "IMA_ADPCM")
    cut_tail(path, 0.6)
    error = raises_audio_error(path, "truncated: header promises")
    assert "bytes of audio data, file holds" in str(error)


def test_wav_with_unset_streaming_size_is_not_truncated(tmp_path):
    path = write(tmp_path / "stream.wav", tone(4800, SAMPLE_RATE), SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    at = data.find(b"data") + 4
    data[at: at + 4] = (0xFFFFFFFF).to_bytes(4, "little")   # what a pipe writer leaves
    path.write_bytes(bytes(data))
    assert len(load_audio(path)) == 4800


def test_truncated_flac_is_refused_then_kept_on_request(tmp_path):
    n = 2 * SAMPLE_RATE
    full = write(tmp_path / "full.flac", tone(n, SAMPLE_RATE), SAMPLE_RATE, "FLAC")
    stored = load_audio(full)
    path = tmp_path / "cut.flac"
    path.write_bytes(full.read_bytes())
    cut_tail(path, 0.5)
    assert audio_info(path).frames == n   # STREAMINFO still promises everything

    error = raises_audio_error(path, "truncated or corrupt: header promises 96000 frames")
    assert isinstance(error.__cause__, sf.LibsndfileError)
    part = load_audio(path, allow_truncated=True)
    # decoding stops at the first incomplete FLAC frame (4096 samples here)
    assert 0.45 * n < len(part) < 0.5 * n
    np.testing.assert_array_equal(part, stored[: len(part)])


def test_flac_cut_at_a_frame_boundary_is_truncated(tmp_path):
    n = 2 * SAMPLE_RATE
    full = write(tmp_path / "full.flac", np.zeros(n, np.float32), SAMPLE_RATE, "FLAC")
    data = full.read_bytes()
    last_frame = data.rfind(b"\xff\xf8")   # silence: the only sync codes are frame starts
    path = tmp_path / "cut.flac"
    path.write_bytes(data[:last_frame])
    # libsndfile's FLAC reader reports a decode error whenever STREAMINFO's count is not
    # met, so a clean cut reads like damage: the message says both
    raises_audio_error(path, f"truncated or corrupt: header promises {n} frames")
    part = load_audio(path, allow_truncated=True)
    block = int.from_bytes(data[10:12], "big")   # STREAMINFO's block size (fixed blocking)
    present = (n - 1) // block * block            # every frame but the last
    assert present - 64 <= len(part) <= present   # within one salvage read of all of it


@pytest.mark.parametrize("subtype, ext", [("VORBIS", "ogg"), ("OPUS", "opus")])
def test_truncated_ogg_is_refused_then_kept_on_request(tmp_path, subtype, ext):
    n = 4 * SAMPLE_RATE
    full = write(tmp_path / f"full.{ext}", tone(n, SAMPLE_RATE), SAMPLE_RATE, "OGG", subtype)
    assert len(load_audio(full)) == n   # an intact stream ends with its EOS page
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(full.read_bytes())
    cut_tail(path, 0.9)

    raises_audio_error(path, "truncated: Ogg stream ends without its end-of-stream page")
    part = load_audio(path, allow_truncated=True)   # libsndfile stops at the last whole page
    assert 0 < len(part) < n


def test_truncated_mp3_is_refused_then_kept_on_request(tmp_path):
    n = 2 * SAMPLE_RATE
    full = write(tmp_path / "full.mp3", tone(n, SAMPLE_RATE), SAMPLE_RATE, "MP3",
                 "MPEG_LAYER_III")
    path = tmp_path / "cut.mp3"
    path.write_bytes(full.read_bytes())
    cut_tail(path, 0.5)

    raises_audio_error(path, f"truncated: header promises {n} frames, file holds")
    assert 0.4 * n < len(load_audio(path, allow_truncated=True)) < 0.6 * n


# ------------------------------------------------------------------------------ memory


def test_loading_holds_the_signal_about_once(tmp_path):
    rate, n = 44_100, 180 * 44_100   # 3 minutes of stereo
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", rate, 2, "PCM_16") as f:
        block = np.stack([tone(rate, rate), tone(rate, rate, 250.0)], 1)
        for _ in range(n // rate):
            f.write(block)

    tracemalloc.start()
    try:
        wave = load_audio(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert abs(len(wave) - 180 * SAMPLE_RATE) <= 1
    read_block = (1 << 16) * 2 * 4
    assert peak < 1.2 * wave.nbytes + 4 * read_block, peak / wave.nbytes


# --------------------------------------------------------------------- windows and stitch


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n, np.float32)


def stitch(parts: np.ndarray, length: int, starts: list[int] | None = None) -> np.ndarray:
    """parts (n_windows, win, *rest) through a `Stitcher` one window at a time, as the explainer feeds it."""
    s = Stitcher(length, window_starts(length) if starts is None else starts, parts.shape[1], parts.shape[2:])
    for part in parts:
        s.add(part)
    assert s.done
    return s.out


LENGTHS = {"0.3s": int(0.3 * SAMPLE_RATE), "10s": CLIP_SAMPLES, "25s": 25 * SAMPLE_RATE,
           "25s+123": 25 * SAMPLE_RATE + 123, "3min": 180 * SAMPLE_RATE}


def test_audio_names_are_matched_by_extension_in_any_case():
    assert all(is_audio_name(n) for n in ("a.wav", "b.FLAC", "dir/c.Ogg", "d.tar.mp3"))
    assert not any(is_audio_name(n) for n in ("a.txt", "wav", ".wav", "a.wav.json", "a."))


def test_window_hop_sits_on_the_frame_grid():
    assert WINDOW_HOP == CLIP_SAMPLES // 2 and WINDOW_HOP % HOP == 0


@pytest.mark.parametrize("n", [1, 1000, CLIP_SAMPLES - 1, CLIP_SAMPLES, CLIP_SAMPLES + 1,
                               CLIP_SAMPLES + WINDOW_HOP, 25 * SAMPLE_RATE + 123,
                               3 * CLIP_SAMPLES, 3_600 * SAMPLE_RATE + 7])
def test_window_starts_cover_the_signal_on_the_frame_grid(n):
    starts = window_starts(n)
    if n <= CLIP_SAMPLES:
        assert starts == [0]
        return
    gaps = np.diff(starts)
    assert starts[0] == 0 and (gaps > 0).all()
    assert (gaps[:-1] == WINDOW_HOP).all() and gaps[-1] <= WINDOW_HOP
    assert all(s % HOP == 0 for s in starts)
    overhang = starts[-1] + CLIP_SAMPLES - n       # last window reaches the end...
    assert 0 <= overhang < HOP                     # ...padding less than one hop
    assert (overhang == 0) == (n % HOP == 0)


def test_window_starts_in_other_units():
    assert window_starts(10, win=4, hop=2, align=1) == [0, 2, 4, 6]
    assert window_starts(11, win=4, hop=2, align=1) == [0, 2, 4, 6, 7]
    with pytest.raises(ValueError, match="hop"):
        window_starts(10, win=4, hop=5, align=1)
    with pytest.raises(ValueError, match="multiple of align"):
        window_starts(10 * CLIP_SAMPLES, hop=1000)


@pytest.mark.parametrize("n", list(LENGTHS.values()), ids=list(LENGTHS))
def test_stitch_of_windows_gives_back_the_signal(n):
    x = noise(n)
    parts = windows(x)
    assert parts.shape == (len(window_starts(n)), CLIP_SAMPLES) and parts.dtype == np.float32
    np.testing.assert_array_equal(stitch(parts, n), x)


def test_iter_windows_matches_windows_and_views_full_windows():
    x = noise(25 * SAMPLE_RATE + 123)
    pairs = list(iter_windows(x))
    assert [s for s, _ in pairs] == window_starts(len(x))
    np.testing.assert_array_equal(np.stack([w for _, w in pairs]), windows(x))
    assert np.shares_memory(pairs[0][1], x)
    assert (pairs[-1][1][len(x) - pairs[-1][0]:] == 0).all()   # the overhang is silence


def test_short_clip_is_one_repeat_padded_window():
    x = noise(int(0.3 * SAMPLE_RATE))
    parts = windows(x)
    assert parts.shape == (1, CLIP_SAMPLES)
    np.testing.assert_array_equal(parts[0], pad_clip(x))


@pytest.mark.parametrize("n", [1, 7, 14_400, 250_000, CLIP_SAMPLES - 1, CLIP_SAMPLES])
def test_pad_clip_is_laion_repeatpad(n):
    x = noise(n)
    repeats = CLIP_SAMPLES // n        # repeat whole copies, then zero-fill the rest
    padded = pad_clip(x)
    assert padded.shape == (CLIP_SAMPLES,) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[: repeats * n], np.tile(x, repeats))
    assert (padded[repeats * n:] == 0).all()


def test_pad_clip_refuses_what_is_not_a_short_clip():
    with pytest.raises(ValueError, match="windows"):
        pad_clip(np.zeros(CLIP_SAMPLES + 1, np.float32))
    with pytest.raises(ValueError):
        pad_clip(np.zeros(0, np.float32))


@pytest.mark.parametrize("n", [CLIP_SAMPLES // 3, 25 * SAMPLE_RATE + 123])
def test_stitch_of_constant_parts_is_that_constant(n):
    starts = window_starts(n)
    parts = np.full((len(starts), CLIP_SAMPLES, 3), 0.7, np.float32)
    stitched = stitch(parts, n)
    assert stitched.shape == (n, 3) and (stitched == np.float32(0.7)).all()


def test_stitch_crossfades_smoothly_between_windows():
    n = CLIP_SAMPLES + WINDOW_HOP   # two windows, overlapping by WINDOW_HOP
    parts = np.stack([np.zeros(CLIP_SAMPLES, np.float32), np.ones(CLIP_SAMPLES, np.float32)])
    y = stitch(parts, n)
    assert (y[:WINDOW_HOP] == 0).all() and (y[CLIP_SAMPLES:] == 1).all()
    fade = y[WINDOW_HOP:CLIP_SAMPLES]
    assert (np.diff(fade) >= 0).all() and np.abs(np.diff(fade)).max() < 1e-4
    assert abs(fade[len(fade) // 2] - 0.5) < 1e-3


def test_crossfade_weights_are_positive_and_flat_between_ramps():
    w = crossfade_weights(10, 3)
    assert (w > 0).all() and (w[3:7] == 1).all() and np.allclose(w[:3], w[-3:][::-1])


@pytest.mark.parametrize("n", list(LENGTHS.values()), ids=list(LENGTHS))
def test_frame_grid_stitch_reproduces_absolute_frame_time(n):
    starts = frame_starts(n)
    assert [s * HOP for s in starts] == window_starts(n)
    f = np.arange(N_FRAMES)
    parts = np.stack([np.stack([s + f, -(s + f)], axis=1) for s in starts]).astype(np.float32)

    stitched = stitch(parts, num_frames(n), starts)

    assert stitched.shape == (num_frames(n), 2) == (n // HOP + 1, 2)
    np.testing.assert_array_equal(stitched[:, 0], np.arange(num_frames(n)))
    np.testing.assert_array_equal(stitched[:, 1], -np.arange(num_frames(n)))


def test_stitch_refuses_parts_that_do_not_fit():
    with pytest.raises(ValueError, match="cover"):
        Stitcher(3 * CLIP_SAMPLES, [0, WINDOW_HOP], CLIP_SAMPLES)
    with pytest.raises(ValueError, match="cover"):
        Stitcher(12, [0, 8], 4)
    s = Stitcher(12, [0, 4, 8], 4, (2,))
    with pytest.raises(ValueError, match="shape"):
        s.add(np.zeros((4, 3), np.float32))
    for _ in range(3):
        s.add(np.ones((4, 2), np.float32))
    assert s.done and (s.out == 1).all()
    with pytest.raises(ValueError, match="already added"):
        s.add(np.ones((4, 2), np.float32))
