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
from trainer.remote.objects import Missing, transient_os_error


class FileObjects:
    """Objects as files under a directory (a mounted bucket, NFS, or another disk): same contract as S3."""

    def __init__(self, root: Path):
        self.root = root

    def list(self, rel_prefix: str) -> dict[str, int]:
        base = self.root / rel_prefix
        if not base.is_dir():
            return {}
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-")}

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

    def delete(self, rels: list[str]) -> None:
        for rel in rels:
            (self.root / rel).unlink(missing_ok=True)
        for d in sorted({(self.root / rel).parent for rel in rels}, key=lambda p: -len(p.parts)):
            while d != self.root and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                d = d.parent

    def put_files(self, items: list[tuple[Path, str, str]], wait: Callable) -> None:
        for path, rel, _ in items:
            wait([])  # deadline and abort checks between files
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}-{threading.get_ident()}")
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)

    def get_files(self, items: list[tuple[str, Path]], wait: Callable) -> None:
        for rel, path in items:
            wait([])
            if not (self.root / rel).is_file():
                raise Missing(rel)
            shutil.copyfile(self.root / rel, path)

    def is_missing(self, e: BaseException) -> bool:
        return isinstance(e, FileNotFoundError)

    def is_transient(self, e: BaseException) -> bool:
        return transient_os_error(e)

    def explain(self, e: BaseException) -> StorageError | None:
        if isinstance(e, PermissionError):
            return StorageError(f"file://{self.root}: permission denied ({e.filename}); fix the directory's "
                                f"permissions or checkpoint.remote")
        return None

    def close(self) -> None:
        pass
