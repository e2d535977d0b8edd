"""Training data: manifests, clip decoding and cropping, collate, skip log, batch plans."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lmaczs_cli.audio import CLIP_SAMPLES, SAMPLE_RATE, load_audio, pad_clip
from lmaczs_cli.data import (
    Batch, ClipDataset, DataError, Item, MicroBatch, Skip, SkipLog, batches_for_step,
    collate, manifest_hash, read_manifest, shard, steps_per_epoch,
)


def write_noise(path: Path, seconds: float, sr: int = SAMPLE_RATE, seed: int = 0,
                channels: int = 1) -> Path:
    """A file of uniform noise in (-0.5, 0.5); any format soundfile infers from the name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(seconds * sr), channels))
    sf.write(path, x.astype(np.float32), sr, subtype="FLOAT" if path.suffix == ".wav" else None)
    return path


def write_clotho(tmp_path: Path, rows: list[list[str]],
                 name: str = "clotho_captions_development.csv") -> Path:
    import csv

    csv_path = tmp_path / name
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        w.writerows(rows)
    return csv_path


# ---------------------------------------------------------------------------- manifests


def test_clotho_csv_gives_one_item_per_caption_with_audio_beside_it(tmp_path):
    a = write_noise(tmp_path / "development" / "a b.wav", 0.5)
    b = write_noise(tmp_path / "development" / "b.wav", 0.5)
    caps_a = [f"a caption {k}, with a comma" for k in range(5)]
    caps_b = [f"b caption {k}" for k in range(5)]
    csv_path = write_clotho(tmp_path, [["a b.wav", *caps_a], ["b.wav", *caps_b]])

    items, skips = read_manifest(csv_path)

    assert skips == []
    assert [i.caption for i in items] == caps_a + caps_b
    assert [i.audio for i in items] == [a.resolve()] * 5 + [b.resolve()] * 5
    assert items[0].source == "clotho_captions_development.csv:2"
    assert items[5].source == "clotho_captions_development.csv:3"


def test_clotho_csv_skips_empty_captions_silently(tmp_path):
    write_noise(tmp_path / "development" / "a.wav", 0.5)
    csv_path = write_clotho(tmp_path, [["a.wav", "one", "", "three", " ", "five"]])
    items, skips = read_manifest(csv_path)
    assert [i.caption for i in items] == ["one", "three", "five"] and skips == []


def test_clotho_csv_without_its_audio_folder_names_the_audio_dir_option(tmp_path):
    csv_path = write_clotho(tmp_path, [["a.wav", *"vwxyz"]])
    with pytest.raises(DataError, match=r"development/ .*--audio-dir"):
        read_manifest(csv_path)

    elsewhere = tmp_path / "audio"
    write_noise(elsewhere / "a.wav", 0.5)
    items, _ = read_manifest(csv_path, audio_dir=elsewhere)
    assert len(items) == 5 and items[0].audio == (elsewhere / "a.wav").resolve()

    with pytest.raises(DataError, match="--audio-dir"):
        read_manifest(csv_path, audio_dir=tmp_path / "nowhere")


def test_missing_audio_becomes_one_skip_per_row(tmp_path):
    (tmp_path / "eval" / "a_folder.wav").mkdir(parents=True)
    write_noise(tmp_path / "eval" / "b.wav", 0.5)
    csv_path = write_clotho(tmp_path, [["gone.wav", *"abcde"], ["a_folder.wav", *"abcde"],
                                       ["b.wav", *"abcde"]], name="clotho_captions_eval.csv")

    items, skips = read_manifest(csv_path)

    assert len(items) == 5
    assert skips == [
        Skip(str((tmp_path / "eval" / "gone.wav").resolve()), "missing",
             "clotho_captions_eval.csv:2"),
        Skip(str((tmp_path / "eval" / "a_folder.wav").resolve()), "missing",
             "clotho_captions_eval.csv:3"),
    ]


def test_jsonl_resolves_relative_paths_against_its_folder_and_skips_bad_lines(
        tmp_path, monkeypatch):
    data = tmp_path / "data"
    rel = write_noise(data / "clips" / "rel.flac", 0.5)
    absolute = write_noise(tmp_path / "other" / "abs.wav", 0.5)
    lines = [
        json.dumps({"audio": "clips/rel.flac", "caption": "a relative path"}),
        "",
        '{"audio": "clips/rel.flac", "caption": ',          # malformed
        json.dumps({"audio": str(absolute), "caption": "an absolute path"}),
        json.dumps({"audio": "clips/none.wav", "caption": "not there"}),
        json.dumps({"audio": "clips/rel.flac"}),            # no caption
        "   ",
    ]
    manifest = data / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "other")                   # not the manifest's folder

    items, skips = read_manifest(manifest)

    assert items == [Item(rel.resolve(), "a relative path", "train.jsonl:1"),
                     Item(absolute.resolve(), "an absolute path", "train.jsonl:4")]
    assert [(s.reason.split(":")[0], s.source) for s in skips] == [
        ("bad JSON", "train.jsonl:3"), ("missing", "train.jsonl:5"),
        ("bad row", "train.jsonl:6")]
    assert skips[0].reason.startswith("bad JSON: ") and "line 3" in skips[0].reason
    assert skips[1].path == str((data / "clips" / "none.wav").resolve())


def test_labelled_folder_captions_each_clip_with_its_class(tmp_path):
    root = tmp_path / "labelled"
    write_noise(root / "dog_barking" / "b.wav", 0.5)
    write_noise(root / "dog_barking" / "a.WAV", 0.5)                  # upper-case extension
    write_noise(root / "dog_barking" / "deep" / "er" / "c.flac", 0.5)  # any depth
    write_noise(root / "car-horn" / "x.ogg", 0.5)
    write_noise(root / "speech-like voice" / "v.wav", 0.5)
    write_noise(root / "dog_barking" / ".hidden.wav", 0.5)
    write_noise(root / ".cache" / "z.wav", 0.5)
    write_noise(root / "dog_barking" / ".trash" / "y.wav", 0.5)
    (root / "dog_barking" / "notes.txt").write_text("not audio")
    (root / "car-horn" / "x.ogg.json").write_text("{}")
    write_noise(root / "loose.wav", 0.5)                              # no class folder

    items, skips = read_manifest(root)

    assert [(i.audio.relative_to(root.resolve()).as_posix(), i.caption) for i in items] == [
        ("car-horn/x.ogg", "this is the sound of car-horn"),          # the name as written ...
        ("dog_barking/a.WAV", "this is the sound of dog barking"),      # ... but for underscores
        ("dog_barking/b.wav", "this is the sound of dog barking"),
        ("dog_barking/deep/er/c.flac", "this is the sound of dog barking"),
        ("speech-like voice/v.wav", "this is the sound of speech-like voice"),
    ]
    assert items[0].source == "labelled/car-horn/x.ogg"
    assert [(s.reason, s.source) for s in skips] == [("not in a class folder",
                                                      "labelled/loose.wav")]
    assert read_manifest(root) == (items, skips)                      # deterministic


def test_manifest_that_is_not_utf8_says_so(tmp_path):
    manifest = tmp_path / "train.jsonl"
    manifest.write_bytes('{"audio": "a.wav", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 .*save the manifest as UTF-8"):
        read_manifest(manifest)


def test_labelled_folder_takes_no_audio_dir(tmp_path):
    write_noise(tmp_path / "root" / "dog" / "a.wav", 0.5)
    with pytest.raises(DataError, match="drop --audio-dir"):
        read_manifest(tmp_path / "root", audio_dir=tmp_path)


@pytest.mark.parametrize("make", ["txt", "absent", "bad_csv_header", "empty_folder",
                                  "folder_without_audio"])
def test_anything_else_is_refused_with_the_accepted_layouts(tmp_path, make):
    target = {
        "txt": tmp_path / "list.txt",
        "absent": tmp_path / "absent.csv",
        "bad_csv_header": tmp_path / "labels.csv",
        "empty_folder": tmp_path / "empty",
        "folder_without_audio": tmp_path / "docs",
    }[make]
    if make == "txt":
        target.write_text("a.wav\n")
    elif make == "bad_csv_header":
        target.write_text("filename,category\na.wav,dog\n")
    elif make == "empty_folder":
        target.mkdir()
    elif make == "folder_without_audio":
        (target / "dog").mkdir(parents=True)
        (target / "dog" / "readme.md").write_text("no audio here")

    with pytest.raises(DataError) as e:
        read_manifest(target)
    message = str(e.value)
    assert "\n" not in message and str(target) in message
    for layout in ("Clotho captions CSV", "JSONL", "labelled folder"):
        assert layout in message


def test_manifest_hash_follows_captions_and_order_not_the_dataset_location(tmp_path):
    root = tmp_path / "one" / "labelled"
    for name in ("dog/a.wav", "dog/b.wav", "cat/c.wav"):
        write_noise(root / name, 0.5)
    items, _ = read_manifest(root)
    moved = tmp_path / "two" / "elsewhere"
    shutil.copytree(root, moved)
    moved_items, _ = read_manifest(moved)

    h = manifest_hash(items)
    assert len(h) == 64 and h == manifest_hash(moved_items)
    recaptioned = [items[0], Item(items[1].audio, items[1].caption + "!", items[1].source),
                   items[2]]
    assert manifest_hash(recaptioned) != h
    assert manifest_hash(items[::-1]) != h
    assert manifest_hash(items[:2]) != h


# ------------------------------------------------------------------------------ dataset


@pytest.fixture
def clips(tmp_path) -> dict[str, Item]:
    """A short 16-kHz clip, a long 44.1-kHz stereo clip, an exact window, and two bad files."""
    paths = {
        "short": write_noise(tmp_path / "short.wav", 0.5, sr=16_000, seed=1),
        "long": write_noise(tmp_path / "long.flac", 12.0, sr=44_100, seed=2, channels=2),
        "exact": write_noise(tmp_path / "exact.wav", 10.0, seed=3),
        "long48": write_noise(tmp_path / "long48.wav", 11.0, seed=4),
        "corrupt": tmp_path / "corrupt.wav",
        "truncated": write_noise(tmp_path / "truncated.wav", 1.0, seed=5),
    }
    paths["corrupt"].write_bytes(b"RIFF\x00\x00" + np.random.default_rng(6).bytes(3000))
    whole = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) - 4000])
    return {k: Item(p, f"caption of {k}", f"test:{k}") for k, p in paths.items()}


def test_every_good_clip_becomes_one_float32_window(clips):
    names = ["short", "long", "exact", "long48"]
    ds = ClipDataset([clips[n] for n in names], seed=0)
    for i, name in enumerate(names):
        sample = ds[i]
        assert sample["wave"].dtype == torch.float32 and sample["wave"].shape == (CLIP_SAMPLES,)
        assert sample["caption"] == f"caption of {name}" and sample["index"] == i
    short = load_audio(clips["short"].audio)
    assert len(short) == SAMPLE_RATE // 2                                # resampled 16k -> 48k
    np.testing.assert_array_equal(ds[0]["wave"].numpy(), pad_clip(short))
    np.testing.assert_array_equal(ds[2]["wave"].numpy(), load_audio(clips["exact"].audio))


def test_long_clip_crop_is_a_window_seeded_by_seed_epoch_and_index(clips):
    full = load_audio(clips["long48"].audio)                              # 11 s: 1 s of slack
    items = [clips["short"], clips["long48"]]

    def crop_start(ds: ClipDataset, i: int) -> int:
        wave = ds[i]["wave"].numpy()
        start = int(np.flatnonzero(full == wave[0])[0])
        np.testing.assert_array_equal(wave, full[start: start + CLIP_SAMPLES])
        return start

    ds = ClipDataset(items, seed=7)
    first = crop_start(ds, 1)
    assert crop_start(ds, 1) == first == crop_start(ClipDataset(items, seed=7), 1)
    ds.set_epoch(1)
    assert crop_start(ds, 1) != first
    ds.set_epoch(0)
    assert crop_start(ds, 1) == first
    assert crop_start(ClipDataset(items, seed=8), 1) != first
    starts = {crop_start(ClipDataset(items[::-1], seed=7), 0)}            # index matters too
    assert starts != {first}


@pytest.mark.parametrize("bad", ["corrupt", "truncated"])
def test_undecodable_file_gives_an_error_record_not_an_exception(clips, bad):
    sample = ClipDataset([clips["short"], clips[bad]])[1]
    assert set(sample) == {"error", "path", "source", "index"}
    assert sample["path"] == str(clips[bad].audio) and sample["source"] == f"test:{bad}"
    assert sample["index"] == 1
    assert ("truncated" in sample["error"]) == (bad == "truncated")
    assert "\n" not in sample["error"] and sample["error"]


def test_collate_stacks_good_samples_and_lists_failed_ones(clips):
    ds = ClipDataset([clips["short"], clips["corrupt"], clips["exact"], clips["truncated"]])
    batch = collate([ds[i] for i in range(4)])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.waves.shape == (2, CLIP_SAMPLES) and batch.waves.dtype == torch.float32
    assert batch.captions == ["caption of short", "caption of exact"]
    assert batch.indices == [0, 2]
    assert [(s.path, s.source) for s in batch.skipped] == [
        (str(clips["corrupt"].audio), "test:corrupt"),
        (str(clips["truncated"].audio), "test:truncated")]
    torch.testing.assert_close(batch.waves[1], ds[2]["wave"], rtol=0, atol=0)

    empty = collate([ds[1], ds[3]])
    assert empty.waves.shape == (0, CLIP_SAMPLES) and len(empty) == 0
    assert len(empty.skipped) == 2


def test_worker_processes_form_the_same_batches_as_the_main_process(clips):
    items = [clips[n] for n in ("long", "short", "corrupt", "long48", "exact", "truncated")]
    plan = batches_for_step(len(items), 2, epoch=3, seed=5)

    def run(workers: int) -> list[Batch]:
        ds = ClipDataset(items, seed=5)
        ds.set_epoch(3)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=plan, num_workers=workers,
                                             collate_fn=collate)
        return list(loader)

    serial, parallel = run(0), run(2)
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a.waves, b.waves, rtol=0, atol=0)
        assert (a.captions, a.indices, a.skipped) == (b.captions, b.indices, b.skipped)
    assert sum(len(b.skipped) for b in serial) == 2


@pytest.mark.requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_loader_keeps_the_batch_type(clips):
    loader = torch.utils.data.DataLoader(ClipDataset([clips["short"], clips["corrupt"]]),
                                         batch_size=2, collate_fn=collate, pin_memory=True)
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and batch.waves.is_pinned()
    assert batch.indices == [0] and len(batch.skipped) == 1


# ----------------------------------------------------------------------------- skip log


def test_skip_log_writes_each_skip_once_as_json_lines(tmp_path):
    path = tmp_path / "run" / "skipped.jsonl"
    log = SkipLog(path)
    a = Skip("/data/a.wav", "missing", "m.csv:2")
    b = Skip("/data/b.wav", "truncated: header promises 10 frames, file holds 5", "m.csv:3")
    assert log.extend([a, b, a]) == 2
    assert log.add(Skip("/data/a.wav", "missing", "m.csv:9")) is False   # same path and reason
    assert log.add(b) is False
    assert log.count == 2
    # flushed line by line: readable before close
    assert [json.loads(line) for line in path.read_text().splitlines()] == [a.to_json(),
                                                                            b.to_json()]
    log.close()


def test_skip_log_creates_no_file_when_nothing_was_skipped(tmp_path):
    with SkipLog(tmp_path / "run" / "skipped.jsonl") as log:
        log.extend([])
    assert log.count == 0 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ batch planning


def test_epoch_plan_is_a_seeded_shuffle_of_every_index():
    plan = batches_for_step(23, 5, epoch=0, seed=1)
    assert [len(mb) for mb in plan] == [5, 5, 5, 5, 3]                    # remainder kept
    assert sorted(i for mb in plan for i in mb) == list(range(23))
    assert plan == batches_for_step(23, 5, epoch=0, seed=1)
    assert plan != batches_for_step(23, 5, epoch=1, seed=1)
    assert plan != batches_for_step(23, 5, epoch=0, seed=2)
    assert batches_for_step(0, 5, epoch=0, seed=1) == []


def test_grouped_epoch_plan_keeps_each_group_contiguous():
    # 10 clips with 1, 2 or 3 texts each (one item per text), items of a clip not adjacent
    clip_of = [k % 10 for k in range(20)] + [0, 3, 6, 9]
    plan = batches_for_step(len(clip_of), 4, epoch=2, seed=3, groups=clip_of)
    assert len(plan) == len(batches_for_step(len(clip_of), 4, epoch=2, seed=3))   # same number of micro-batches
    flat = [i for mb in plan for i in mb]
    assert sorted(flat) == list(range(len(clip_of)))
    runs = [clip_of[i] for i in flat]
    # every clip's items form one run in the epoch's order
    assert all(runs[a] != runs[b] or all(runs[c] == runs[a] for c in range(a, b))
               for a in range(len(runs)) for b in range(a + 1, len(runs)))
    assert plan == batches_for_step(len(clip_of), 4, epoch=2, seed=3, groups=clip_of)
    assert plan != batches_for_step(len(clip_of), 4, epoch=3, seed=3, groups=clip_of)
    with pytest.raises(ValueError, match="one key per item"):
        batches_for_step(5, 2, epoch=0, seed=0, groups=[0, 1])


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 3), (3, 2), (4, 1)])
def test_ranks_together_form_the_steps_of_a_single_process(world, accum):
    micro = batches_for_step(101, 4, epoch=2, seed=0)                      # 26 micro-batches
    single = shard(micro, rank=0, world=1, accum=world * accum)
    per_rank = [shard(micro, rank=r, world=world, accum=accum) for r in range(world)]
    n_steps = steps_per_epoch(101, 4, world, accum)
    assert n_steps == 26 // (world * accum)

    for plan in per_rank:
        assert len(plan) == n_steps * accum
        assert [m.step for m in plan] == [k // accum for k in range(n_steps * accum)]
        assert [m.last for m in plan] == [k % accum == accum - 1 for k in range(len(plan))]
    for step in range(n_steps):
        want = sorted(map(tuple, (m.indices for m in single if m.step == step)))
        got = sorted(tuple(m.indices) for plan in per_rank for m in plan if m.step == step)
        assert got == want and len(got) == world * accum
    ranks_used = [i for plan in per_rank for m in plan for i in m.indices]
    assert len(ranks_used) == len(set(ranks_used))                         # no sample twice


def test_shard_drops_an_incomplete_trailing_step_on_every_rank():
    micro = [[i] for i in range(7)]
    plans = [shard(micro, rank=r, world=2, accum=2) for r in range(2)]
    assert plans == [[MicroBatch(0, [0], False), MicroBatch(0, [2], True)],
                     [MicroBatch(0, [1], False), MicroBatch(0, [3], True)]]
    with pytest.raises(ValueError, match="rank"):
        shard(micro, rank=2, world=2, accum=1)
