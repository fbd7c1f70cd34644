"""What a remote backend is: objects under a root, behind one small protocol (S3 in s3.py, a directory in files.py).

The RemoteStore (store.py) builds checkpoints out of these calls; a backend only moves bytes and says which of
its errors are worth retrying (`is_transient`), which mean "no such object" (`is_missing`), and which deserve a
one-line message for a person (`explain`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from trainer.errors import SpotTrainerError, StorageError, StorageWait


class StorageUnavailable(SpotTrainerError):
    """The store kept failing with retryable errors until the deadline, or the call was aborted."""


class UploadInterrupted(StorageUnavailable):
    """An upload stopped between files because its `stop()` said so: its manifest was not written, so nothing of it
    counts as committed remotely; the local copy is complete and is uploaded again later."""


class CredentialsRefused(StorageError):
    """The store refused the credentials (expired, revoked, denied). At start it is fatal (exit 2) like any
    StorageError; after a successful start the uploader pauses instead and retries, as credentials get refreshed."""


class InsufficientSpace(StorageWait):
    """A pull does not fit on the local disk (checked before downloading, or the disk filled up meanwhile): exit 69,
    resumable once there is room; nothing was deleted."""

    def __init__(self, message: str, needed: int, free: int):
        super().__init__(message)
        self.needed, self.free = needed, free


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

    def copy(self, src_rel: str, dst_rel: str) -> None:
        """Copy an object inside the store (server-side where there is one), keeping its recorded sha256."""

    def delete(self, rels: list[str]) -> None: ...

    def put_files(self, items: list[tuple[Path, str, str]], wait: Callable) -> None:
        """Upload (local path, rel, sha256) items; `wait([(rel, future), ...])` enforces deadlines and abort."""

    def get_files(self, items: list[tuple[str, Path]], wait: Callable) -> None:
        """Download (rel, local path) items, each replacing its path whole; `wait` as for put_files."""

    def is_transient(self, e: BaseException) -> bool: ...

    def is_missing(self, e: BaseException) -> bool: ...

    def explain(self, e: BaseException) -> StorageError | None:
        """A one-line StorageError for errors that retrying cannot fix; None for the others."""

    def refresh_credentials(self) -> bool:
        """Ask the credential chain again (after the store refused them); True if it gave different ones."""

    def close(self) -> None: ...


class DaemonPool:
    """An executor with daemon threads: a transfer abandoned on a stalled socket or mount (deadline, abort) must not
    hold the process at exit, as ThreadPoolExecutor's threads would."""

    def __init__(self, max_workers: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name="storage-transfer", daemon=True) for _ in range(max_workers)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to the waiter through the future
                    future.set_exception(e)

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        end = time.monotonic() + 1.0
        for t in self._threads if wait else ():
            t.join(timeout=max(0.0, end - time.monotonic()))  # bounded: a stalled one dies with the process


def transient_os_error(e: BaseException) -> bool:
    """Timeouts and I/O errors are worth retrying; permission problems are not."""
    return isinstance(e, CallTimeout) or (isinstance(e, OSError) and not isinstance(e, PermissionError))


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
