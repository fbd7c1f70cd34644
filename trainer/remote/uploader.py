"""Background upload of committed checkpoints, so training never waits for the network.

One thread uploads the newest queued checkpoint first (an emergency checkpoint before everything: it is the newest
and the one a preemption must not lose), then applies remote retention with the newest uploaded checkpoint as the
head. Older queued ones follow, unless retention would drop them right away. A non-retryable StorageError is kept
and raised by the next submit()/wait(); a checkpoint whose upload ran out of time stays local and is tried again
with the next submit() (or by sync_pending() on the next start).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from trainer.checkpoint import lineage
from trainer.checkpoint.manifest import Manifest
from trainer.errors import CheckpointError, StorageError
from trainer.remote.objects import StorageUnavailable
from trainer.remote.store import RemoteStore
from trainer.run_dir import committed_steps, parse_step_dirname, step_dirname

log = logging.getLogger(__name__)

OnUploaded = Callable[[int, float, int], None]  # (step, seconds, bytes uploaded)


def _step(ckpt_dir: Path) -> int:
    step = parse_step_dirname(ckpt_dir.name)
    if step is None:
        raise ValueError(f"{ckpt_dir}: not a checkpoint directory (expected step-XXXXXXXX)")
    return step


def _rank(ckpt_dir: Path, step: int) -> tuple[tuple[int, int], bool]:
    """((position along the lineage, step), is an emergency checkpoint) from its manifest."""
    try:
        m = Manifest.load(ckpt_dir)
    except CheckpointError:  # its upload will say what is wrong
        return (step, step), False
    return (m.order, step), m.kind == "emergency"


class CheckpointUploader:
    """Uploads submitted checkpoint dirs in a daemon thread and keeps the newest `keep_last` remotely."""

    def __init__(self, store: RemoteStore, keep_last: int | None = None, on_uploaded: OnUploaded | None = None):
        self.store, self.keep_last, self.on_uploaded = store, keep_last, on_uploaded
        self._cond = threading.Condition()
        self._queue: dict[int, Path] = {}  # step -> dir, uploaded newest first
        self._parked: dict[int, Path] = {}  # ran out of time; queued again by the next submit()
        self._rank: dict[int, tuple[int, int]] = {}  # step -> (order, step) of every checkpoint seen
        self._emergency: set[int] = set()
        self._remote: set[int] = set()  # steps of this run's lineage committed remotely (uploaded, or found by sync)
        self._head: int | None = None  # the newest of those: the head remote retention keeps the lineage of
        self._sync_root: Path | None = None
        self._in_flight: int | None = None
        self._fatal: StorageError | None = None
        self._closing = False
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"CheckpointUploader({self.store.uri!r}, in_flight={self.in_flight}, queued={sorted(self._queue)})"

    @property
    def in_flight(self) -> int | None:
        """The step being uploaded now, if any."""
        return self._in_flight

    @property
    def pending_steps(self) -> list[int]:
        """Steps not yet safe remotely (in flight, queued or parked): local pruning must keep these."""
        with self._cond:
            steps = set(self._queue) | set(self._parked)
            if self._in_flight is not None:
                steps.add(self._in_flight)
            return sorted(steps)

    def submit(self, ckpt_dir: Path) -> None:
        """Queue a committed checkpoint dir for upload and return at once."""
        self.raise_if_failed()
        ckpt_dir = Path(ckpt_dir)
        step = _step(ckpt_dir)
        rank, emergency = _rank(ckpt_dir, step)
        with self._cond:
            self._queue.update(self._parked)
            self._parked.clear()
            self._queue[step] = ckpt_dir
            self._rank[step] = rank
            if emergency:
                self._emergency.add(step)
            self._coalesce()
            self._cond.notify_all()

    def sync_pending(self, local_ckpt_root: Path) -> None:
        """Queue (in the background) the local committed checkpoints of the current lineage that the remote does
        not hold with the same manifest."""
        with self._cond:
            self._sync_root = Path(local_ckpt_root)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or in flight; True if drained. Raises a stored StorageError."""
        with self._cond:
            drained = self._cond.wait_for(self._idle, timeout)
        self.raise_if_failed()
        return drained

    def raise_if_failed(self) -> None:
        """Raise (once) the StorageError that stopped an upload: retrying cannot fix it."""
        with self._cond:
            fatal, self._fatal = self._fatal, None
        if fatal is not None:
            raise fatal

    def close(self, timeout: float | None = 0.0) -> bool:
        """Give queued uploads up to `timeout` s (None: no limit), then abort the rest; True if all were uploaded."""
        with self._cond:
            drained = self._cond.wait_for(self._idle, timeout)
            self._closing = True
            self._cond.notify_all()
        if not drained:
            log.warning("checkpoint upload of step(s) %s not finished at shutdown; they stay local", self.pending_steps)
            self.store.abort()
        self._thread.join(timeout=5.0)
        return drained

    # ---------------------------------------------------------------- the thread

    def _idle(self) -> bool:
        return not self._queue and self._in_flight is None and self._sync_root is None

    def _key(self, step: int) -> tuple[int, int]:
        return self._rank.get(step, (step, step))

    def _coalesce(self) -> None:
        # Retention keeps the newest keep_last of the lineage: a queued checkpoint older than that many newer ones
        # (queued, in flight or already remote) would be deleted right after its upload, so it is skipped.
        if not self.keep_last:
            return
        known = set(self._queue) | self._remote | ({self._in_flight} if self._in_flight is not None else set())
        keep = set(sorted(known, key=self._key)[-self.keep_last :])
        for step in sorted(s for s in self._queue if s not in keep):
            log.info("checkpoint step %d: upload skipped, newer checkpoints are queued or uploaded", step)
            del self._queue[step]

    def _next_job(self) -> tuple[str, Callable, Path]:
        """(what, function, argument) to run next: a pending sync, then the newest queued checkpoint."""
        if self._sync_root is not None:
            return "sync of local checkpoints", self._sync, self._sync_root
        step = max(self._queue, key=lambda s: (s in self._emergency, self._key(s)))
        self._in_flight = step
        return f"checkpoint step {step}", self._upload, self._queue.pop(step)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or not self._idle())
                if self._closing:
                    return
                what, fn, arg = self._next_job()
            try:
                self._guard(what, fn, arg)
            finally:
                with self._cond:  # idle only now, so wait() cannot return before the job is done
                    if fn == self._sync:
                        self._sync_root = None
                    self._in_flight = None
                    self._cond.notify_all()

    def _guard(self, what: str, fn: Callable, arg: Path) -> None:
        try:
            fn(arg)
        except StorageError as e:
            self.last_error = e
            with self._cond:
                self._fatal = e
            log.error("%s: upload failed: %s", what, e)
        except StorageUnavailable as e:
            self.last_error = e
            if fn == self._upload:
                with self._cond:
                    self._parked[_step(arg)] = arg
            log.warning(
                "%s: upload gave up (%s); it stays local and is retried with the next checkpoint or on the next start",
                what,
                e,
            )
        except CheckpointError as e:
            self.last_error = e
            log.warning("%s: not uploaded: %s", what, e)
        except Exception as e:  # a bug must not kill the thread and silently stop uploads
            self.last_error = e
            log.exception("%s: unexpected upload error", what)

    def _sync(self, root: Path) -> None:
        local: dict[int, Manifest] = {}
        for step in committed_steps(root):
            try:
                local[step] = Manifest.load(root / step_dirname(step))
            except CheckpointError as e:
                log.warning("checkpoint step %d: not uploaded (%s)", step, e)
        if not local:
            return
        mine = lineage.members(lineage.newest(local), local)
        remote, _ = self.store.committed()
        missing = sorted(s for s in mine if remote.get(s) != local[s])
        with self._cond:
            for s in mine:
                self._rank[s] = (local[s].order, s)
                if local[s].kind == "emergency":
                    self._emergency.add(s)
            for s in mine:
                if s not in missing:
                    self._found_remote(s)
            self._queue.update(
                {s: root / step_dirname(s) for s in missing if s not in self._queue and s != self._in_flight}
            )
            self._coalesce()
        if missing:
            log.info(
                "checkpoints %s are committed locally but not remotely (or differently there): uploading them, "
                "newest first",
                missing,
            )

    def _found_remote(self, step: int) -> None:
        """`step` is now committed remotely with this run's manifest (call with the lock held)."""
        self._remote.add(step)
        if self._head is None or self._key(step) > self._key(self._head):
            self._head = step

    def _upload(self, ckpt_dir: Path) -> None:
        step = _step(ckpt_dir)
        if not ckpt_dir.is_dir():
            log.info("checkpoint step %d: local dir is gone (pruned); not uploaded", step)
            return
        result = self.store.upload_checkpoint(ckpt_dir)
        log.info(
            "checkpoint step %d uploaded to %s: %.1f MB in %.1f s (%d files were already there)",
            step,
            result.remote,
            result.bytes_uploaded / 1e6,
            result.seconds,
            result.files_skipped,
        )
        with self._cond:
            self._found_remote(step)
            head, protect = self._head, set(self._queue) | set(self._parked)
        if self.on_uploaded is not None:
            try:
                self.on_uploaded(step, result.seconds, result.bytes_uploaded)
            except Exception:
                log.exception("on_uploaded callback failed for step %d", step)
        if self.keep_last:
            try:
                deleted, archived = self.store.prune(self.keep_last, head=head, protect=protect)
            except StorageUnavailable as e:  # the upload itself is done: retention runs again after the next one
                log.warning("remote retention after step %d postponed: %s", step, e)
                return
            with self._cond:
                self._remote -= set(deleted) | set(archived)
            if deleted:
                log.info("remote retention: deleted checkpoints %s", deleted)
            if archived:
                log.info("remote retention: archived checkpoints %s of another lineage", archived)
