"""Result files (guess_optim._io): atomic writes with the permissions an ordinary ``open(path, "w")`` gives."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys

import pytest

from guess_optim._io import atomic_write, write_json, write_text

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_json_gets_the_umask_mode_not_0600(tmp_path, mask):
    """Regression: results were written through ``mkstemp`` and stayed ``0600`` whatever the umask."""
    path = tmp_path / "result.json"
    with umask(mask):
        write_json(path, {"a": 1})
    assert mode(path) == 0o666 & ~mask
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["result.json"]


@posix_only
def test_overwrite_keeps_the_existing_files_mode(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    with umask(0o022):
        write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write(path, lambda f: f.write(b"before"))

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"before" and os.listdir(tmp_path) == ["state.bin"]
