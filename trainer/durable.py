"""Durable file writes: what is written survives a crash or a power cut once these return.

`write_file` for files inside a dir that is committed later (a checkpoint's temp dir); `replace_file` for a
file that must be seen whole or not at all (a manifest, the heartbeat, a remote object on a mounted disk).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in the dir durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes, fsync: bool = True) -> tuple[int, str]:
    """Write `data` to `path` (flushed and fsynced); returns (size, hex sha256)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return len(data), hashlib.sha256(data).hexdigest()


def replace_file(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Atomically replace `path` with `data`: temp file in the same dir, (fsync,) rename, (fsync the dir)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        write_file(tmp, data, fsync=fsync)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
