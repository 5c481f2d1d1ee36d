"""Writing files so that a reader sees the old file or the new one, never half of one.

Every writer here writes to a hidden temporary sibling (``.NAME.tmp``) and renames it over the target, which is
atomic on POSIX and Windows. If writing fails (a full disk, an interruption), the temporary file is removed and
the old target, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"
#: errno values of a write that failed for want of space: the disk is full, or the user's quota is spent.
DISK_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def temporary_sibling(path: Path) -> Path:
    """The temporary name :func:`atomic_path` writes ``path`` under: ``.NAME.tmp`` in the same folder."""
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; it replaces ``path`` when the block ends.

    On an exception the temporary file is deleted and ``path`` is untouched. With ``fsync`` the new content is
    flushed to the disk before the rename, so that a machine crash cannot leave an empty file behind the name.
    A directory target is replaced too (the old one is removed first, so that instant is not atomic).
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    _discard(tmp)  # left by an earlier interrupted write
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data, *, fsync: bool = False) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", fsync=fsync)


def is_disk_full(error: BaseException) -> bool:
    """True for the OSError of a write that found no space left (a full disk, a spent quota)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL
