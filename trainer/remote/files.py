"""The directory backend: objects as files under a directory (a mounted bucket, NFS, another disk).

Same contract as S3: a reader sees a whole object or none of it (temp file, fsync, rename). Same deadlines too:
RemoteStore runs every call here in a worker thread (calls.py), so a hung mount costs an operation its deadline
(checkpoint.s3.deadline_s, plus the time its bytes take at checkpoint.s3.min_throughput_mb_s), never the caller's
thread. Files are opened without a stat first: one round trip less on NFS, and an open that hangs is the hang the
deadline catches.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from trainer.durable import fsync_dir, replace_file
from trainer.errors import StorageError
from trainer.remote.objects import CredentialsRefused, DaemonPool, Missing, transient_os_error

_TMP = ".tmp-"
_WORKERS = 4


_CHUNK = 1 << 20


def _copy_whole(src: Path, dest: Path, fsync: bool) -> None:
    """Copy to a temp file beside `dest`, then rename: `dest` is the whole file or what it was before."""
    tmp = dest.with_name(f"{_TMP}{dest.name[:200]}-{os.getpid()}-{threading.get_ident()}")
    with open(src, "rb") as fin:  # first: a missing source leaves no temp file behind
        try:
            with open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
                if fsync:
                    fout.flush()
                    os.fsync(fout.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if fsync:
        fsync_dir(dest.parent)


def _open_object(p: Path):
    """`p` opened for reading; None if there is no such object (nothing there, or a directory)."""
    try:
        return open(p, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class FileObjects:
    """Objects as files under a directory (a mounted bucket, NFS, or another disk): same contract as S3."""

    def __init__(self, root: Path):
        self.root = root
        self._pool: DaemonPool | None = None

    def _transfer(self, fn: Callable, jobs: list[tuple[str, tuple]], wait: Callable) -> None:
        """fn(*args) for each (rel, args) on the pool, under `wait`'s deadlines. A worker still stuck in the
        filesystem when `wait` gives up is left to it (a daemon thread): the next transfer gets a fresh pool."""
        if self._pool is None:  # threads only for a store that moves files
            self._pool = DaemonPool(_WORKERS)
        pool = self._pool
        futures = [(rel, pool.submit(fn, *args)) for rel, args in jobs]
        try:
            wait(futures)
        finally:
            if any(f.running() for _, f in futures) and self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False)

    def _put(self, path: Path, rel: str) -> None:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        _copy_whole(path, dest, fsync=True)

    def _get(self, rel: str, path: Path) -> None:
        try:
            _copy_whole(self.root / rel, path, fsync=False)  # the caller verifies and fsyncs
        except IsADirectoryError:
            raise Missing(rel) from None

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
        f = _open_object(self.root / rel)
        if f is None:
            return None
        with f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def read(self, rel: str) -> bytes | None:
        f = _open_object(self.root / rel)
        if f is None:
            return None
        with f:
            return f.read()

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
        self._transfer(self._put, [(rel, (path, rel)) for path, rel, _ in items], wait)

    def get_files(self, items: list[tuple[str, Path]], wait: Callable) -> None:
        self._transfer(self._get, [(rel, (rel, path)) for rel, path in items], wait)

    def is_missing(self, e: BaseException) -> bool:
        # only a file of the store: a missing local path is the caller's problem, not a missing object
        return isinstance(e, FileNotFoundError) and str(e.filename or "").startswith(str(self.root) + os.sep)

    def is_transient(self, e: BaseException) -> bool:
        return transient_os_error(e)

    def explain(self, e: BaseException) -> StorageError | None:
        if isinstance(e, PermissionError) and str(e.filename or "").startswith(str(self.root) + os.sep):
            return CredentialsRefused(  # a mounted bucket whose credentials expired says EACCES too
                f"file://{self.root}: permission denied ({e.filename}); fix the directory's "
                f"permissions or checkpoint.remote"
            )
        return None

    def refresh_credentials(self) -> bool:
        return False  # the mount holds them, if any

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
