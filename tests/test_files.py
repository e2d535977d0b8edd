"""atomic_path: whole files or nothing, with ordinary permissions; sha256_file."""
from __future__ import annotations

import hashlib
import os

import pytest

from lmaczs_cli.files import atomic_path, sha256_file


def test_atomic_write_appears_whole_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a" / "out.txt") as tmp:
            tmp.write_text("hello")
            assert not (tmp_path / "a" / "out.txt").exists()
    finally:
        os.umask(old)
    out = tmp_path / "a" / "out.txt"
    assert out.read_text() == "hello" and (out.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["out.txt"]


def test_failed_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("before")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_sha256_file_hashes_the_bytes_across_read_blocks(tmp_path):
    data = os.urandom(3 * (1 << 20) + 5)      # more than one 1 MiB block, not a whole number of them
    (tmp_path / "w.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(tmp_path / "empty")) == hashlib.sha256(b"").hexdigest()
