"""The directory backend: objects as files under a directory (a mounted bucket, NFS, another disk).

Same contract as S3: a reader sees a whole object or none of it (temp file, fsync, rename).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from trainer.checkpoint.manifest import sha256_file
from trainer.durable import fsync_dir, replace_file
from trainer.errors import StorageError
from trainer.remote.objects import DaemonPool, Missing, transient_os_error

_TMP = ".tmp-"
_WORKERS = 4


def _copy_whole(src: Path, dest: Path, fsync: bool) -> None:
    """Copy to a temp file beside `dest`, then rename: `dest` is the whole file or what it was before."""
    tmp = dest.with_name(f"{_TMP}{dest.name[:200]}-{os.getpid()}-{threading.get_ident()}")
    try:
        shutil.copyfile(src, tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(dest.parent)


class FileObjects:
    """Objects as files under a directory (a mounted bucket, NFS, or another disk): same contract as S3."""

    def __init__(self, root: Path):
        self.root = root
        self._pool: DaemonPool | None = None

    def _transfers(self) -> DaemonPool:
        if self._pool is None:  # threads only for a store that moves files
            self._pool = DaemonPool(_WORKERS)
        return self._pool

    def list(self, rel_prefix: str) -> dict[str, int]:
        base = self.root / rel_prefix
        if not base.is_dir():
            return {}
        return {
            p.relative_to(self.root).as_posix(): p.stat().st_size
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(_TMP)
        }

    def sha256(self, rel: str) -> str | None:
        p = self.root / rel
        return sha256_file(p) if p.is_file() else None

    def read(self, rel: str) -> bytes | None:
        p = self.root / rel
        return p.read_bytes() if p.is_file() else None

    def write(self, rel: str, data: bytes, sha256: str) -> None:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        replace_file(dest, data)  # a reader sees the whole object or none of it, as with S3

    def copy(self, src_rel: str, dst_rel: str) -> None:
        src, dest = self.root / src_rel, self.root / dst_rel
        if not src.is_file():
            raise Missing(src_rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _copy_whole(src, dest, fsync=True)

    def delete(self, rels: list[str]) -> None:
        for rel in rels:
            (self.root / rel).unlink(missing_ok=True)
        for d in sorted({(self.root / rel).parent for rel in rels}, key=lambda p: -len(p.parts)):
            while d != self.root and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                d = d.parent

    def put_files(self, items: list[tuple[Path, str, str]], wait: Callable) -> None:
        def put(path: Path, rel: str) -> None:
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _copy_whole(path, dest, fsync=True)

        wait([(rel, self._transfers().submit(put, path, rel)) for path, rel, _ in items])

    def get_files(self, items: list[tuple[str, Path]], wait: Callable) -> None:
        def get(rel: str, path: Path) -> None:
            if not (self.root / rel).is_file():
                raise Missing(rel)
            _copy_whole(self.root / rel, path, fsync=False)  # the caller verifies and fsyncs

        wait([(rel, self._transfers().submit(get, rel, path)) for rel, path in items])

    def is_missing(self, e: BaseException) -> bool:
        # only a file of the store: a missing local path is the caller's problem, not a missing object
        return isinstance(e, FileNotFoundError) and str(e.filename or "").startswith(str(self.root) + os.sep)

    def is_transient(self, e: BaseException) -> bool:
        return transient_os_error(e)

    def explain(self, e: BaseException) -> StorageError | None:
        if isinstance(e, PermissionError) and str(e.filename or "").startswith(str(self.root) + os.sep):
            return StorageError(
                f"file://{self.root}: permission denied ({e.filename}); fix the directory's "
                f"permissions or checkpoint.remote"
            )
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
