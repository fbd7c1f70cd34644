"""The background checkpoint writer: one snapshot at a time, in order; rank 0 also commits."""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from trainer.checkpoint.store import CheckpointStore, Snapshot
from trainer.errors import CheckpointError, SpotTrainerError


def out_of_space(err: BaseException) -> bool:
    """A write failed because the disk (or quota) is full, here or on another rank."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, CheckpointError):
        return "No space left" in str(err) or "quota exceeded" in str(err).lower()
    return isinstance(err.__cause__, BaseException) and out_of_space(err.__cause__)


class CheckpointWriter:
    """Writes snapshots in a background thread, one at a time, in order; rank 0 also commits.

    A periodic checkpoint that fails because the disk is full is abandoned (its temp dir deleted) and reported
    through `on_failed`; training goes on and the next one is tried at its time. Any other failure, and any
    failure of a synchronous write, reaches the training thread.
    """

    def __init__(
        self,
        store: CheckpointStore,
        rank: int,
        on_commit: Callable[[Snapshot, Path, float], None],
        on_failed: Callable[[Snapshot, BaseException], None] | None = None,
        node_commit=None,
    ):
        self.store, self.rank, self.on_commit, self.on_failed = store, rank, on_commit, on_failed
        self.node_commit = node_commit  # own output dirs: the commit happens in the bucket (node_commit.py)
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                self._write(item)
            except BaseException as e:  # surfaced to the training thread at the next submit/wait
                if self.on_failed is not None and out_of_space(e):
                    self._failed(item, e)
                else:
                    self._error = e
            finally:
                self._q.task_done()

    def _write(self, snap: Snapshot) -> None:
        t0 = time.monotonic()
        if self.node_commit is not None:
            try:
                self.store.write_rank_files(snap)
            except BaseException:
                self.node_commit.failed(snap)
                raise
            path = self.node_commit(snap)
            if path is not None:
                self.on_commit(snap, path, time.monotonic() - t0)
            return
        self.store.write_rank_files(snap)
        if self.rank == 0:
            path = self.store.commit(snap)
            self.on_commit(snap, path, time.monotonic() - t0)

    def _failed(self, snap: Snapshot, err: BaseException) -> None:
        try:
            cleans = self.node_commit.ranks.is_leader if self.node_commit is not None else self.rank == 0
            if cleans:  # the rank that owns this dir's temp dirs
                self.store.abandon(snap)
            self.on_failed(snap, err)
        except BaseException as e:
            self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, SpotTrainerError):  # e.g. a StorageError from handing it to the uploader
                raise err
            raise CheckpointError(f"writing a checkpoint failed: {err}") from err

    @property
    def busy(self) -> bool:
        """A submitted snapshot is still being written (or, with own output dirs, uploaded and committed)."""
        return self._q.unfinished_tasks > 0

    def submit(self, snap: Snapshot) -> None:
        self._raise()
        self._q.put(snap)

    def write_now(self, snap: Snapshot) -> None:
        """Synchronous write (emergency and final checkpoints): waits for earlier ones first."""
        self.wait()
        self._write(snap)

    def wait(self, timeout: float | None = None) -> bool:
        """Until every submitted checkpoint is written (or failed; its error is raised here); False if `timeout`
        passed first."""
        with self._q.all_tasks_done:
            if not self._q.all_tasks_done.wait_for(lambda: self._q.unfinished_tasks == 0, timeout):
                return False
        self._raise()
        return True

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=600)
