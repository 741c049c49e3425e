"""Result files: atomic writes, and JSON without NaN (used by the trainer, the CLI, the benchmark and the
reproductions)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["atomic_write", "ensure_writable_dir", "json_safe", "write_json", "write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, mode: str = "wb") -> None:
    """Write a file so that ``path`` holds either its previous content or the complete new one, never a torn file.

    ``write(f)`` writes into a temporary file in the same directory, which is flushed, fsync'ed and then moved over
    ``path`` with :func:`os.replace` (atomic on POSIX and Windows). If ``write`` raises, the temporary file is
    removed and ``path`` is untouched.

    The file gets the permissions ``open(path, "w")`` would give it: those of the file it replaces, or
    ``0o666 & ~umask`` for a new file (not ``tempfile.mkstemp``'s private ``0o600``).

    Args:
        path: destination file; its directory must exist.
        write: called once with the open temporary file.
        mode: ``"wb"`` or ``"w"``. (default: ``"wb"``)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temporary(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            with contextlib.suppress(OSError):  # keep the permissions of the file being replaced
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def ensure_writable_dir(path: str | os.PathLike) -> str:
    """Create directory ``path`` (with its parents) if missing and check that files can be created in it.

    Called before a run, so that an unusable output location is reported at once instead of after the run, with its
    results lost.

    Args:
        path: the directory.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: ``path`` is an existing file, cannot be created, or no file can be created in it (the message
            names the path and the reason).
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is an existing file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the directory {path!r}: {err.strerror or err}") from None
    try:
        fd, tmp = _create_temporary(path, "write-check")
    except OSError as err:
        raise ValueError(f"cannot write files in the directory {path!r}: {err.strerror or err}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return path


def _create_temporary(directory: str, name: str) -> tuple[int, str]:
    """A new file ``directory/.name.XXXXXXXX.tmp`` opened for writing, created with mode ``0o666`` so that the
    process umask applies as for any new file."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {os.path.join(directory, name)!r}")


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats replaced by ``None`` (JSON has no NaN or infinity: a diverged or undefined value),
    numpy scalars by Python numbers and dict keys by strings, throughout nested dicts, lists and tuples."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 1) -> None:
    """Write :func:`json_safe` of ``data`` to ``path`` as JSON, atomically."""
    write_text(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")
