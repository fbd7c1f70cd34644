"""Background upload of committed checkpoints, so training never waits for the network.

One thread uploads the newest queued checkpoint first (an emergency checkpoint before everything: it is the newest
and the one a preemption must not lose), then applies remote retention with the newest uploaded checkpoint as the
head. Older queued ones follow, unless retention would drop them right away. A non-retryable StorageError is kept
and raised by the next submit()/wait(); a checkpoint whose upload ran out of time stays local and is tried again
with the next submit() (or by sync_pending() on the next start).

Credentials refused after the start (an expired session token, rotated keys) pause the uploads instead: the
checkpoints stay queued and local (`pending_steps`, so local retention keeps them), the thread asks the credential
chain again and retries with backoff, logs one warning a minute at most, and goes on once they work. Training never
waits for it; only the check at start (`RemoteStore.check`) treats refused credentials as fatal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from trainer.checkpoint import lineage
from trainer.checkpoint.manifest import Manifest
from trainer.errors import CheckpointError, StorageError
from trainer.remote.objects import CredentialsRefused, StorageUnavailable, UploadInterrupted
from trainer.remote.store import RemoteStore
from trainer.run_dir import committed_steps, parse_step_dirname, step_dirname

log = logging.getLogger(__name__)

OnUploaded = Callable[[int, float, int], None]  # (step, seconds, bytes uploaded)
OnEvent = Callable[..., object]  # (event name, **fields): EventLog.emit
PAUSE_RETRY_S = (2.0, 60.0)  # while the credentials are refused: first backoff, longest
PAUSE_WARN_EVERY_S = 60.0  # one warning a minute at most while paused


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
    """Uploads submitted checkpoint dirs in a daemon thread and keeps the newest `keep_last` remotely.

    `on_event(name, **fields)` hears "upload_paused" and "upload_resumed". `stop()` is checked between the files of
    every upload but an emergency checkpoint's: once true, the upload in flight ends without its manifest (nothing
    partial is committed) and stays local, pending, for the next submit() or start.
    """

    def __init__(
        self,
        store: RemoteStore,
        keep_last: int | None = None,
        on_uploaded: OnUploaded | None = None,
        *,
        on_event: OnEvent | None = None,
        stop: Callable[[], bool] | None = None,
    ):
        self.store, self.keep_last, self.on_uploaded = store, keep_last, on_uploaded
        self.on_event, self._stop = on_event, stop
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
        self._paused_since: float | None = None  # credentials refused since then (monotonic); None: not paused
        self._retry_at = 0.0  # while paused: when the thread tries again
        self._backoff = PAUSE_RETRY_S[0]
        self._warned_at: float | None = None
        self._give_up_at: float | None = None  # while paused: when wait() stops waiting for the credentials
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
    def paused(self) -> bool:
        """Uploads are paused: the store refused the credentials, and the thread retries until they work."""
        return self._paused_since is not None

    @property
    def gave_up_waiting(self) -> bool:
        """Paused, and wait() has waited the remote's deadline (checkpoint.s3.deadline_s) for the credentials."""
        with self._cond:
            return self._gave_up(time.monotonic())

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

    def urgent(self, ckpt_dir: Path) -> None:
        """Queue a committed checkpoint as the one a stop must not lose (like an emergency checkpoint: first in line,
        never interrupted by the stop): the newest step when a stop comes right after it was committed."""
        self.submit(ckpt_dir)
        with self._cond:
            self._emergency.add(_step(Path(ckpt_dir)))
            self._cond.notify_all()

    def sync_pending(self, local_ckpt_root: Path) -> None:
        """Queue (in the background) the local committed checkpoints of the current lineage that the remote does
        not hold with the same manifest."""
        with self._cond:
            self._sync_root = Path(local_ckpt_root)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or in flight; True if drained. Raises a stored StorageError.

        While uploads are paused, waiting makes the thread try again at once, and all the waits of one pause together
        last the remote's deadline (checkpoint.s3.deadline_s) at most: then it returns False (`gave_up_waiting`), the
        checkpoints stay local and are uploaded on the next start (or when the credentials work again).
        """
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._idle():
                now = time.monotonic()
                if self._paused_since is not None and self._give_up_at is None:
                    self._give_up_at, self._retry_at = now + self.store.deadline_s, now  # someone waits: try now
                    self._cond.notify_all()
                if self._gave_up(now) or (end is not None and now >= end):
                    break
                self._cond.wait(min(1.0, end - now) if end is not None else 1.0)
            drained = self._idle()
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

    def _gave_up(self, now: float) -> bool:
        return self._paused_since is not None and self._give_up_at is not None and now >= self._give_up_at

    def _ready(self, now: float) -> bool:
        """Work to do, and (while paused) its retry is due."""
        return not self._idle() and (self._paused_since is None or now >= self._retry_at)

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
                while not self._closing and not self._ready(now := time.monotonic()):
                    self._cond.wait(None if self._idle() else max(0.0, self._retry_at - now))
                if self._closing:
                    return
                paused = self._paused_since is not None
                what, fn, arg = self._next_job()
            outcome, paused_s = "failed", None
            try:
                if paused:  # static keys are read once per client: new ones (env, profile file) need a new client
                    self.store.refresh_credentials()
                outcome = self._guard(what, fn, arg)
            finally:
                with self._cond:  # idle only now, so wait() cannot return before the job is done
                    if fn == self._sync and outcome != "refused":
                        self._sync_root = None
                    if outcome == "done" and self._paused_since is not None:  # the credentials work again
                        paused_s = time.monotonic() - self._paused_since
                        self._paused_since = self._warned_at = self._give_up_at = None
                    self._in_flight = None
                    self._cond.notify_all()
            if paused_s is not None:
                log.warning(
                    "checkpoint uploads to %s resumed after %.0f s: the credentials work again",
                    self.store.uri,
                    paused_s,
                )
                self._event("upload_resumed", paused_s=round(paused_s, 1))

    def _guard(self, what: str, fn: Callable, arg: Path) -> str:
        """Run one job: "done", "refused" (credentials: queued again, uploads paused) or "failed" (logged)."""
        try:
            fn(arg)
            return "done"
        except CredentialsRefused as e:
            self.last_error = e
            with self._cond:  # back in the queue before in_flight is cleared: pending_steps never misses it
                if fn == self._upload and _step(arg) not in self._queue:
                    self._queue[_step(arg)] = arg
                    self._coalesce()
            self._pause(e)
            return "refused"
        except UploadInterrupted as e:
            self.last_error = e
            if fn == self._upload:
                with self._cond:
                    self._parked[_step(arg)] = arg
            log.info("%s: %s; it stays local and is uploaded with the next checkpoint or on the next start", what, e)
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
        return "failed"

    def _pause(self, e: CredentialsRefused) -> None:
        """The store refused the credentials: retry later with backoff; warn once a minute at most."""
        now = time.monotonic()
        with self._cond:
            first = self._paused_since is None
            if first:
                self._paused_since, self._backoff = now, PAUSE_RETRY_S[0]
            else:
                self._backoff = min(2 * self._backoff, PAUSE_RETRY_S[1])
            self._retry_at = now + self._backoff
            warn = self._warned_at is None or now - self._warned_at >= PAUSE_WARN_EVERY_S
            if warn:
                self._warned_at = now
            pending = sorted(set(self._queue) | set(self._parked))
        if warn:
            log.warning(
                "checkpoint uploads to %s paused: the credentials were refused (%s); training goes on and "
                "checkpoints stay on the local disk (pending: steps %s); retrying every %.0f s at most until they "
                "work again",
                self.store.uri,
                e,
                pending,
                PAUSE_RETRY_S[1],
            )
        else:
            log.debug("checkpoint uploads still paused (%s); next try in %.0f s", e, self._backoff)
        if first:
            self._event("upload_paused", error=str(e)[:300], pending=pending)

    def _event(self, name: str, **fields) -> None:
        if self.on_event is not None:
            try:
                self.on_event(name, **fields)
            except Exception:
                log.exception("on_event callback failed for %s", name)

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
        emergency = step in self._emergency  # the one a preemption must not lose: never stopped
        result = self.store.upload_checkpoint(ckpt_dir, stop=None if emergency else self._stop)
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
        if self.keep_last and not (self._stop is not None and self._stop()):
            try:
                deleted, archived = self.store.prune(self.keep_last, head=head, protect=protect)
            except (StorageUnavailable, CredentialsRefused) as e:  # the upload is done: retention runs after the next
                log.warning("remote retention after step %d postponed: %s", step, e)
                return
            with self._cond:
                self._remote -= set(deleted) | set(archived)
            if deleted:
                log.info("remote retention: deleted checkpoints %s", deleted)
            if archived:
                log.info("remote retention: archived checkpoints %s of another lineage", archived)
