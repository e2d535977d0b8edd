"""What `lmaczs explain` is asked to explain: audio files found under the given paths,
prompts read from files, and the one-line reason when something cannot be read."""
from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .audio import AudioError, is_audio_name
from .errors import LmaczsError, PathError


class ExplainError(LmaczsError):
    """An explanation cannot be made as asked; the message names the fix."""


def reason_of(e: BaseException) -> str:
    if isinstance(e, AudioError):
        return e.reason
    text = " ".join(str(e).split())
    return text if isinstance(e, LmaczsError) else f"{type(e).__name__}: {text}"


# ----------------------------------------------------------------------------- prompts


def check_prompts(prompts: Iterable[str]) -> None:
    """Refuse an empty or blank prompt: there is no text to explain."""
    if any(not p.strip() for p in prompts):
        raise ExplainError("empty prompt: give a text such as --prompt 'dog barking'")


def check_decoder(clap: str, decoder: str | os.PathLike | None) -> None:
    """Refuse a CLAP without a decoder unless it is the bundled demo CLAP, the only one
    that ships with a trained decoder (`decoder` None stands for that bundled one)."""
    if decoder is None and clap != "demo":
        raise ExplainError(f"--clap {clap} needs --decoder DIR (a folder written by `lmaczs train`)")


def label_prompt(label: str) -> str:
    """The text a label is scored and explained with in top-k mode.

    A label that already reads as a sentence (4 or more words, or ending in . ! ?) is used
    as written; any other gets the caption labelled folders are trained with:
    "dog_barking" -> "this is the sound of dog barking" (`data.class_caption`).
    """
    from .data import class_caption

    text = " ".join(label.split())
    if len(text.split()) >= 4 or text.endswith((".", "!", "?")):
        return text
    return class_caption(text)


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a text file, stripped; lines starting with # are comments."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExplainError(f"{path}: cannot read it ({reason_of(e)})") from e
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def read_prompts_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """Per-file prompts from a CSV of ``path,prompt`` rows (a header row is allowed).

    Returns {real path of the audio file: [prompts]}; relative paths are taken from the
    CSV's folder. A file may have several rows.
    """
    import csv

    out: dict[str, list[str]] = {}
    folder = Path(path).parent
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ExplainError(f"{path}: cannot read it as CSV ({reason_of(e)})") from e
    for i, row in enumerate(rows, 1):
        if not row or not "".join(row).strip():
            continue
        if i == 1 and row[0].strip().lower() in ("path", "file", "audio", "file_name"):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ExplainError(f"{path}, line {i}: expected two columns, path,prompt (quote a prompt with commas)")
        key = os.path.realpath(folder / row[0].strip())
        out.setdefault(key, [])
        if row[1].strip() not in out[key]:
            out[key].append(row[1].strip())
    return out


# ----------------------------------------------------------------------------- output folder


def check_out(out: str | os.PathLike) -> Path:
    """Make an output folder, or refuse it with one line naming why (a file in the way, no
    permission, a read-only or impossible path): commands call it before any model loads.
    Returns it, absolute."""
    import tempfile

    path = Path(os.path.abspath(out))
    try:
        blocker = next((p for p in [path, *path.parents] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise PathError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise PathError(f"--out {out}: cannot write there ({why}); choose a folder you can write to") from e
    return path


# ----------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Entry:
    """One audio file found, or one path that looked like audio and cannot be read."""

    rel: str                  # POSIX path relative to the inputs' common folder: the key of every record
    path: str                 # where it is read from, as found (links not resolved)
    error: str | None = None  # why it cannot be read (symlink loop, folder named like audio, ...)


@dataclass
class Discovery:
    entries: list[Entry]      # sorted by rel; one per rel
    skipped: Counter          # "hidden", "not_audio", "outputs": counts of what was passed over
    base: str                 # the common folder rel is relative to


def discover(paths: Sequence[str | os.PathLike], exclude: Callable[[str], bool] | None = None) -> Discovery:
    """Find the audio files under `paths` (files and folders), recursively, sorted.

    Folders are walked following symbolic links; a link back to a folder above it, or a
    link that resolves to itself, is an error entry, never followed. Hidden names (".x")
    and files without an audio extension (`audio.AUDIO_EXTENSIONS`, any case) are skipped
    and counted; a folder or special file (pipe, device) named like audio is an error
    entry. A file named on the command line is taken whatever its extension. `exclude`
    (a path -> bool) leaves out our own outputs when --out lies inside an input folder.
    `rel` is relative to the common folder of the arguments (a folder argument itself,
    the parent of a file argument).
    """
    absolute = [os.path.abspath(os.fspath(p)) for p in paths]
    base = os.path.commonpath([p if os.path.isdir(p) else os.path.dirname(p) for p in absolute])
    found: dict[str, Entry] = {}
    skipped: Counter = Counter()

    def rel_of(p: str) -> str:
        r = os.path.relpath(p, base).replace(os.sep, "/")
        return "" if r == "." else r

    def add(rel: str, path: str, error: str | None = None) -> None:
        found.setdefault(rel, Entry(rel, path, error))

    stack: list[tuple[str, str, frozenset]] = []
    for p in absolute:
        if os.path.isdir(p):
            st = os.stat(p)
            stack.append((p, rel_of(p), frozenset({(st.st_dev, st.st_ino)})))
        else:
            rel = rel_of(p)
            try:
                regular = stat.S_ISREG(os.stat(p).st_mode)
            except OSError as e:
                add(rel, p, _stat_error(e, os.path.islink(p)))
                continue
            add(rel, p, None if regular else "not a regular file (a pipe, socket or device)")
    while stack:
        folder, prefix, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as e:
            add(prefix or ".", folder, f"folder not readable ({e.strerror})")
            continue
        for child in children:
            rel = f"{prefix}/{child.name}" if prefix else child.name
            if child.name.startswith("."):
                skipped["hidden"] += 1
                continue
            if exclude is not None and exclude(child.path):
                skipped["outputs"] += 1
                continue
            audio = is_audio_name(child.name)
            try:
                st = os.stat(child.path)
            except OSError as e:
                if audio or e.errno == errno.ELOOP:
                    add(rel, child.path, _stat_error(e, child.is_symlink()))
                else:
                    skipped["not_audio"] += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    add(rel, child.path, "symlink loop: links back to a folder above it (not followed)")
                elif audio:
                    add(rel, child.path, "is a directory, not an audio file")
                else:
                    stack.append((child.path, rel, ancestors | {ident}))
            elif not audio:
                skipped["not_audio"] += 1
            elif stat.S_ISREG(st.st_mode):
                add(rel, child.path)
            else:
                add(rel, child.path, "not a regular file (a pipe, socket or device)")
    return Discovery([found[k] for k in sorted(found)], skipped, base)


def _stat_error(e: OSError, is_link: bool) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop: the link resolves to itself (not followed)"
    if is_link and e.errno == errno.ENOENT:
        return "broken symlink: its target does not exist"
    return f"not accessible ({e.strerror})"
