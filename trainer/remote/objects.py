"""What a remote backend is: objects under a root, behind one small protocol (S3 in s3.py, a directory in files.py).

The RemoteStore (store.py) builds checkpoints out of these calls; a backend only moves bytes and says which of
its errors are worth retrying (`is_transient`), which mean "no such object" (`is_missing`), and which deserve a
one-line message for a person (`explain`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from trainer.errors import SpotTrainerError, StorageError


class StorageUnavailable(SpotTrainerError):
    """The store kept failing with retryable errors until the deadline, or the call was aborted."""


class Missing(Exception):
    """An object that should exist does not (args[0]: its path relative to the store)."""


class CallTimeout(Exception):
    """A call ran past its deadline (retryable until the operation's deadline stops it)."""


class ObjectStore(Protocol):
    """Objects (files) under one root, addressed by '/'-separated relative paths."""

    def list(self, rel_prefix: str) -> dict[str, int]:
        """Relative path -> size of every object under rel_prefix."""

    def sha256(self, rel: str) -> str | None:
        """The sha256 recorded for an object (None: no such object, or none recorded)."""

    def read(self, rel: str) -> bytes | None:
        """A small object's bytes; None if it does not exist."""

    def write(self, rel: str, data: bytes, sha256: str) -> None:
        """Write a small object whole (a reader sees all of it or nothing)."""

    def delete(self, rels: list[str]) -> None: ...

    def put_files(self, items: list[tuple[Path, str, str]], wait: Callable) -> None:
        """Upload (local path, rel, sha256) items; `wait(futures)` enforces the deadline and abort."""

    def get_files(self, items: list[tuple[str, Path]], wait: Callable) -> None: ...

    def is_transient(self, e: BaseException) -> bool: ...

    def is_missing(self, e: BaseException) -> bool: ...

    def explain(self, e: BaseException) -> StorageError | None:
        """A one-line StorageError for errors that retrying cannot fix; None for the others."""

    def close(self) -> None: ...


def transient_os_error(e: BaseException) -> bool:
    """Timeouts and I/O errors are worth retrying; permission problems are not."""
    return isinstance(e, CallTimeout) or (isinstance(e, OSError) and not isinstance(e, PermissionError))


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
