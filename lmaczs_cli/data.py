"""Training data for `lmaczs train`: manifests -> items -> 10-s clips -> batches.

Three layouts are read (`read_manifest`):

- a Clotho captions CSV (``file_name,caption_1,...,caption_5``), one item per caption;
- a JSONL file of ``{"audio": path, "caption": text}`` lines;
- a labelled folder ``class_name/.../clip.wav``, captioned "this is the sound of <class>".

A row that cannot be used (missing audio, a malformed line) becomes a `Skip` instead of an
error, and so does a file that fails to decode later, in a DataLoader worker (`ClipDataset`
returns an error record, `collate` turns it into a `Skip`): one bad file never stops a run.
`SkipLog` writes them to a JSONL file once each.

Batches are planned, not sampled: `batches_for_step` splits an epoch into shuffled
micro-batches from (seed, epoch) alone, and `shard` deals them to DDP ranks so that any
world size and gradient-accumulation count with the same ``world * accum`` forms the same
optimizer steps from the same samples. Random crops are seeded by (seed, epoch, index), so
a clip's crop does not depend on which worker or rank loads it.
"""
from __future__ import annotations

import contextlib

import csv
import hashlib
import json
import os
import re
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch

from .audio import AUDIO_EXTENSIONS, CLIP_SAMPLES, AudioError, is_audio_name, load_audio, pad_clip
from .errors import LmaczsError

__all__ = [
    "AUDIO_EXTENSIONS", "Batch", "ClipDataset", "DataError", "Item", "MicroBatch", "Skip",
    "SkipLog", "batches_for_step", "class_caption", "collate", "manifest_hash", "read_manifest",
    "shard", "steps_per_epoch",
]

# A labelled folder's audio files are recognised by extension (audio.AUDIO_EXTENSIONS). Only
# folders are judged by name; a file named in a manifest is sniffed by libsndfile.

CLASS_CAPTION = "this is the sound of {}"   # caption of a labelled folder's clips
CLOTHO_PREFIX = "clotho_captions_"          # clotho_captions_development.csv -> development/
JSONL_SUFFIXES = (".jsonl", ".ndjson")

LAYOUTS = ("use a Clotho captions CSV (file_name,caption_1,...,caption_5), a JSONL file of "
           '{"audio": path, "caption": text} lines, or a labelled folder (class_name/clip.wav)')


class DataError(LmaczsError):
    """Training data that cannot be read as any accepted layout. The message names the fix."""


@dataclass(frozen=True)
class Item:
    """One (audio file, caption) training pair."""

    audio: Path     # absolute path of the audio file
    caption: str    # text paired with the clip
    source: str     # where the pair came from, for messages: "captions.csv:12", "dogs/a.wav"


@dataclass(frozen=True)
class Skip:
    """A row or file left out of training, and why."""

    path: str       # the audio file; the manifest itself for a malformed row
    reason: str     # one line: "missing", "bad JSON: ...", a decode error from load_audio
    source: str     # the row's location, as in `Item.source`

    def to_json(self) -> dict[str, str]:
        """The record written to skipped.jsonl: {"path", "reason", "source"}."""
        return {"path": self.path, "reason": self.reason, "source": self.source}


# ---------------------------------------------------------------------------- manifests


def read_manifest(path: str | os.PathLike,
                  audio_dir: str | os.PathLike | None = None) -> tuple[list[Item], list[Skip]]:
    """Read training pairs from a Clotho CSV, a JSONL file or a labelled folder.

    The layout follows from `path`: a folder is a labelled folder, a ``.csv`` file a Clotho
    captions CSV, a ``.jsonl``/``.ndjson`` file JSONL. `audio_dir` is the folder relative
    audio paths resolve against: for Clotho by default the folder beside the CSV named
    after it without the ``clotho_captions_`` prefix (``clotho_captions_development.csv``
    -> ``development/``), for JSONL the JSONL file's folder; a labelled folder takes none.

    Returns (items, skips), both in manifest order (a labelled folder's in sorted path
    order). A row whose audio file is absent or a folder becomes ``Skip(path, "missing",
    source)``; a malformed row a Skip whose reason says what is wrong with it.

    Raises `DataError` for anything else: a path that is missing or of another kind, a CSV
    without Clotho's header, a manifest without rows, a folder without audio in class
    folders, a Clotho audio folder that does not exist.
    """
    path = Path(path)
    if path.is_dir():
        if audio_dir is not None:
            raise DataError(f"{path} is a labelled folder, which holds its own audio; "
                            "drop --audio-dir (it applies to CSV and JSONL manifests)")
        return _read_folder(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder; {LAYOUTS}")
    suffix = path.suffix.lower()
    read = {".csv": _read_clotho, **{s: _read_jsonl for s in JSONL_SUFFIXES}}.get(suffix)
    if read is None:
        raise DataError(f"{path}: not a training manifest; {LAYOUTS}")
    try:
        return read(path, audio_dir)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the manifest "
                        "as UTF-8") from e


def _audio_item(audio: Path, caption: str, source: str) -> Item | Skip:
    audio = Path(os.path.abspath(audio))
    if not audio.is_file():
        return Skip(str(audio), "missing", source)
    return Item(audio, caption, source)


def _read_clotho(path: Path, audio_dir: str | os.PathLike | None) -> tuple[list[Item], list[Skip]]:
    items: list[Item] = []
    skips: list[Skip] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        caption_cols = _clotho_caption_columns(path, header)   # the layout first, then its audio
        name_col = header.index("file_name")
        root = _clotho_audio_dir(path, audio_dir)
        n_rows = 0
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            n_rows += 1
            source = f"{path.name}:{reader.line_num}"
            name = row[name_col].strip() if name_col < len(row) else ""
            if not name:
                skips.append(Skip(str(path), f"bad row: empty file_name at line "
                                             f"{reader.line_num}", source))
                continue
            audio = Path(os.path.abspath(root / name))
            if not audio.is_file():
                skips.append(Skip(str(audio), "missing", source))
                continue
            captions = [row[c].strip() for c in caption_cols if c < len(row)]
            items.extend(Item(audio, c, source) for c in captions if c)   # empty ones: none
    if n_rows == 0:
        raise DataError(f"{path}: the CSV holds a header but no rows; add a row per audio file")
    return items, skips


def _clotho_audio_dir(path: Path, audio_dir: str | os.PathLike | None) -> Path:
    if audio_dir is not None:
        root = Path(audio_dir)
        if not root.is_dir():
            raise DataError(f"audio folder {root} (--audio-dir) does not exist or is not a folder")
        return root
    stem = path.stem.removeprefix(CLOTHO_PREFIX)
    root = path.parent / stem
    if not root.is_dir():
        raise DataError(f"{path}: expected its audio in {root}/ (beside the CSV, named after it); "
                        "pass --audio-dir DIR to say where the audio files are")
    return root


def _clotho_caption_columns(path: Path, header: list[str]) -> list[int]:
    """Column numbers of caption_1, caption_2, ... in caption order."""
    numbered = {int(m.group(1)): i for i, h in enumerate(header)
                if (m := re.fullmatch(r"caption_(\d+)", h))}
    if "file_name" not in header or not numbered:
        got = ",".join(header) if header else "an empty file"
        raise DataError(f"{path}: CSV header is {got}, not Clotho's "
                        f"file_name,caption_1,...,caption_5; {LAYOUTS}")
    return [numbered[k] for k in sorted(numbered)]


def _read_jsonl(path: Path, audio_dir: str | os.PathLike | None) -> tuple[list[Item], list[Skip]]:
    root = path.parent if audio_dir is None else Path(audio_dir)
    if not root.is_dir():
        raise DataError(f"audio folder {root} (--audio-dir) does not exist or is not a folder")
    items: list[Item] = []
    skips: list[Skip] = []
    n_rows = 0
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            n_rows += 1
            source = f"{path.name}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skips.append(Skip(str(path), f"bad JSON: {e.msg} at line {line_no} "
                                             f"column {e.colno}", source))
                continue
            audio, caption = (row.get("audio"), row.get("caption")) if isinstance(row, dict) \
                else (None, None)
            if not isinstance(audio, str) or not audio or not isinstance(caption, str):
                skips.append(Skip(str(path), f"bad row: needs {{\"audio\": path, \"caption\": "
                                             f"text}} at line {line_no}", source))
                continue
            if not caption.strip():
                skips.append(Skip(os.path.abspath(root / audio), f"empty caption at line "
                                                                  f"{line_no}", source))
                continue
            entry = _audio_item(root / audio, caption.strip(), source)   # absolute stays absolute
            (skips if isinstance(entry, Skip) else items).append(entry)
    if n_rows == 0:
        raise DataError(f"{path}: the JSONL file holds no lines; add one "
                        '{"audio": path, "caption": text} object per line')
    return items, skips


def _read_folder(root: Path) -> tuple[list[Item], list[Skip]]:
    found: list[tuple[tuple[str, ...], Path]] = []   # (path parts under root, path)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not is_audio_name(name):
                continue
            p = Path(dirpath) / name
            found.append((p.relative_to(root).parts, p))
    if not found:
        raise DataError(f"{root}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) in "
                        f"the folder; {LAYOUTS}")
    items: list[Item] = []
    skips: list[Skip] = []
    for parts, p in sorted(found):
        source = f"{root.name}/{'/'.join(parts)}"
        if len(parts) == 1:
            skips.append(Skip(str(Path(os.path.abspath(p))), "not in a class folder", source))
            continue
        entry = _audio_item(p, class_caption(parts[0]), source)   # a dangling link: "missing"
        (skips if isinstance(entry, Skip) else items).append(entry)
    return items, skips


def class_caption(class_name: str) -> str:
    """A labelled folder's caption, its name as written but for underscores, which file names
    use for spaces (ESC-50's "dog_barking"): "dog_barking" -> "this is the sound of dog barking",
    "speech-like voice" -> "this is the sound of speech-like voice"."""
    return CLASS_CAPTION.format(" ".join(class_name.replace("_", " ").split()))


def manifest_hash(items: Sequence[Item]) -> str:
    """sha256 hex digest of the (audio path, caption) pairs, in order.

    Paths are taken relative to the folder that holds all the items' audio, so moving or
    re-mounting a dataset keeps its hash while renaming, reordering or re-captioning
    changes it; where no common folder exists (different drives) the absolute paths are
    hashed. Checkpoints record it, so a resume can tell it is given the same data.
    """
    paths = [os.path.abspath(item.audio) for item in items]
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    except ValueError:
        root = ""
    h = hashlib.sha256()
    for p, item in zip(paths, items):
        key = Path(os.path.relpath(p, root)).as_posix() if root else Path(p).as_posix()
        h.update(json.dumps([key, item.caption], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------- dataset, batches


class ClipDataset(torch.utils.data.Dataset):
    """Decodes items into one 10-s window each, in whatever process calls `__getitem__`.

    A clip longer than CLIP_SAMPLES gets a random window whose start is drawn from
    ``np.random.default_rng((seed, epoch, index))``: the same crop for the same
    (seed, epoch, index), whatever the worker count or order. A shorter one is
    repeat-padded (`audio.pad_clip`). Call `set_epoch` before iterating a DataLoader over
    it each epoch; DataLoader workers copy the dataset when an iteration starts, so that
    reaches them unless ``persistent_workers=True`` (then they keep the old epoch).
    """

    def __init__(self, items: Sequence[Item], seed: int = 0) -> None:
        _check_seed(seed)
        self.items = list(items)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops `__getitem__` returns."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """A sample ``{"wave": float32 (CLIP_SAMPLES,), "caption": str, "index": i}``.

        A file load_audio refuses (unreadable, truncated, NaN/Inf ...) gives the error
        record ``{"error": reason, "path": str, "source": str, "index": i}`` instead of
        raising; `collate` turns it into a `Skip`.
        """
        item = self.items[i]
        try:
            wave = load_audio(item.audio)
        except AudioError as e:
            return {"error": e.reason, "path": str(item.audio), "source": item.source, "index": i}
        if len(wave) > CLIP_SAMPLES:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            start = int(rng.integers(0, len(wave) - CLIP_SAMPLES + 1))
            clip = wave[start: start + CLIP_SAMPLES].copy()   # copy: free the full decode
        else:
            clip = pad_clip(wave)
        return {"wave": torch.from_numpy(clip), "caption": item.caption, "index": i}


@dataclass
class Batch:
    """The samples of one micro-batch that decoded, and the ones that did not."""

    waves: torch.Tensor     # float32 (B, CLIP_SAMPLES); B may be 0 when every file failed
    captions: list[str]     # B captions, row-aligned with waves
    indices: list[int]      # B dataset indices
    skipped: list[Skip]     # samples whose audio failed to decode

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> Batch:
        """Page-locked copy of `waves`; DataLoader(pin_memory=True) calls this."""
        return Batch(self.waves.pin_memory(), self.captions, self.indices, self.skipped)


def collate(samples: Sequence[dict[str, Any]]) -> Batch:
    """DataLoader collate_fn for `ClipDataset`: stack good samples, list the failed ones."""
    good = [s for s in samples if "error" not in s]
    skipped = [Skip(s["path"], s["error"], s["source"]) for s in samples if "error" in s]
    waves = (torch.stack([s["wave"] for s in good]) if good
             else torch.zeros((0, CLIP_SAMPLES), dtype=torch.float32))
    return Batch(waves, [s["caption"] for s in good], [s["index"] for s in good], skipped)


class SkipLog:
    """Appends each distinct `Skip` as one JSON line to `path`, flushed as it is written.

    De-duplicates by (path, reason) within this object, so a file failing every epoch is
    logged once. The file (and its folder) appears only with the first skip, and is
    appended to when it exists (a resumed run adds to it). Use one log per process: under
    DDP give each rank its own path, or log on rank 0 what the ranks gather.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._seen: set[tuple[str, str]] = set()
        self._file: IO[str] | None = None
        if self.path.is_file():  # a resumed run: what is already listed is not listed twice
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    rec = json.loads(line)
                    self._seen.add((rec["path"], rec["reason"]))

    @property
    def count(self) -> int:
        """Distinct skips written by this log."""
        return len(self._seen)

    def add(self, skip: Skip) -> bool:
        """Write `skip` unless it was written before; returns whether it was written."""
        key = (skip.path, skip.reason)
        if key in self._seen:
            return False
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(skip.to_json(), ensure_ascii=False) + "\n")
        self._file.flush()
        self._seen.add(key)
        return True

    def extend(self, skips: Iterable[Skip]) -> int:
        """Write each new skip; returns how many were new."""
        return sum(self.add(s) for s in skips)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SkipLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------ batch planning


class MicroBatch(NamedTuple):
    """One micro-batch of a rank's epoch plan (see `shard`)."""

    step: int            # optimizer step within the epoch it contributes to, from 0
    indices: list[int]   # dataset indices: a DataLoader batch_sampler entry
    last: bool           # completes `step` on this rank: all-reduce, then optimizer.step()


def batches_for_step(n_items: int, batch_size: int, epoch: int, seed: int,
                     groups: Sequence[Hashable] | None = None) -> list[list[int]]:
    """One epoch's micro-batches: a shuffled split of range(n_items), the same everywhere.

    The permutation comes from ``np.random.default_rng((seed, epoch))`` alone, so every
    process (and every world size) plans the same micro-batches. They hold `batch_size`
    indices each except the last, which keeps the remainder (1..batch_size indices) rather
    than dropping samples; `shard` decides whether it trains (only in a complete step).

    With `groups` (one key per item, e.g. its audio file) the groups are shuffled instead and
    laid out whole, one after another, before the split: items of a group sit side by side,
    so a clip's texts mostly share a micro-batch. Same number of micro-batches either way.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_items < 0 or epoch < 0:
        raise ValueError(f"n_items and epoch must be >= 0, got {n_items} and {epoch}")
    _check_seed(seed)
    rng = np.random.default_rng((seed, epoch))
    if groups is None:
        order = rng.permutation(n_items).tolist()
    else:
        if len(groups) != n_items:
            raise ValueError(f"groups must hold one key per item: {len(groups)} keys for {n_items} items")
        members: dict[Hashable, list[int]] = {}
        for i, key in enumerate(groups):
            members.setdefault(key, []).append(i)
        lists = list(members.values())
        order = [i for g in rng.permutation(len(lists)).tolist() for i in lists[g]]
    return [order[k: k + batch_size] for k in range(0, n_items, batch_size)]


def shard(micro_batches: Sequence[list[int]], rank: int, world: int,
          accum: int) -> list[MicroBatch]:
    """This rank's share of an epoch's micro-batches, labelled with their optimizer step.

    Consecutive groups of ``world * accum`` micro-batches form one optimizer step; inside
    a group, rank r takes the micro-batches at positions r, r + world, r + 2*world, ...
    (`accum` of them). Returns, in order, one `MicroBatch` per micro-batch this rank runs:
    every step appears exactly `accum` times in a row, the last flagged ``last=True``.
    A trailing group with fewer than ``world * accum`` micro-batches is dropped on every
    rank, so all ranks run the same number of steps (`steps_per_epoch`). The union of a
    step's micro-batches over ranks is the step that ``world=1, accum=world*accum`` forms.
    The last micro-batch of an epoch may be smaller than the others (`batches_for_step`);
    weight losses by sample count where that matters.
    """
    if world < 1 or accum < 1:
        raise ValueError(f"world and accum must be >= 1, got world={world}, accum={accum}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    group = world * accum
    plan: list[MicroBatch] = []
    for step in range(len(micro_batches) // group):
        mine = micro_batches[step * group + rank: (step + 1) * group: world]
        plan.extend(MicroBatch(step, list(mb), k == accum - 1) for k, mb in enumerate(mine))
    return plan


def steps_per_epoch(n_items: int, batch_size: int, world: int = 1, accum: int = 1) -> int:
    """Optimizer steps in one epoch of `shard` (0 when the data cannot fill one step)."""
    if batch_size < 1 or world < 1 or accum < 1:
        raise ValueError(f"batch_size, world and accum must be >= 1, got {batch_size}, "
                         f"{world}, {accum}")
    n_micro = -(-n_items // batch_size)
    return n_micro // (world * accum)


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy seeds are non-negative), got {seed}")
