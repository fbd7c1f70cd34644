"""Every store call bounded by a deadline and retried while its errors are transient.

A deadline is an absolute `time.monotonic()` value. An operation starts with one (default: now +
checkpoint.s3.deadline_s) and a transfer of N bytes adds N / checkpoint.s3.min_throughput_mb_s seconds to it, so a
large checkpoint on a slow link still gets there; each transfer also gets its own deadline, so one stalled object
is noticed (and retried) without waiting for the whole checkpoint's. Both backends run under these rules alike: a
hung file:// mount and a silent S3 socket both cost a call its deadline (CallTimeout, retried), and the stuck
worker thread is abandoned (a daemon), never waited for.

An operation may also get `stop` (a callable): checked between files and before every retry, it ends the operation
early with UploadInterrupted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

from trainer.remote.objects import CallTimeout, Missing, ObjectStore, StorageUnavailable, UploadInterrupted, one_line

log = logging.getLogger(__name__)
_POLL_S = 0.05
T = TypeVar("T")


class Budget:
    """One operation's deadline: `at`, raised (never lowered) by the bytes its transfers move; and its `stop`."""

    def __init__(self, at: float, bytes_per_s: float, stop: Callable[[], bool] | None = None):
        self.base = self.at = at
        self._rate = bytes_per_s
        self.stop = stop

    def allow(self, nbytes: int) -> None:
        """Make room for moving `nbytes` (the remaining bytes, on a retry: the largest amount counts)."""
        self.at = max(self.at, self.base + nbytes / self._rate)

    def stopped(self) -> bool:
        return self.stop is not None and bool(self.stop())


class Calls:
    """Runs one store's calls under deadlines and retries; abort() stops running and later ones at once."""

    def __init__(self, uri: str, objects: ObjectStore, deadline_s: float, min_throughput_mb_s: float):
        self.uri, self.objects, self.deadline_s = uri, objects, deadline_s
        self.bytes_per_s = max(min_throughput_mb_s, 1e-6) * 1e6
        self._abort = threading.Event()

    def deadline(self, seconds: float | None = None) -> float:
        """The monotonic time `seconds` from now (default: checkpoint.s3.deadline_s)."""
        return time.monotonic() + (self.deadline_s if seconds is None else seconds)

    def abort(self) -> None:
        self._abort.set()

    def retry(
        self, what: str, attempt: Callable[[Budget], T], deadline: float | None, stop: Callable[[], bool] | None = None
    ) -> T:
        """attempt(budget) until it succeeds, fails for good, or the budget's deadline passes (StorageUnavailable);
        `stop()` turning true ends it too (UploadInterrupted)."""
        budget = Budget(self.deadline() if deadline is None else deadline, self.bytes_per_s, stop)
        start = time.monotonic()

        def give_up(rs: tenacity.RetryCallState) -> bool:
            return self._abort.is_set() or budget.stopped() or time.monotonic() + (rs.upcoming_sleep or 0) >= budget.at

        def sleep(seconds: float) -> None:  # woken by abort(), and (polled) by stop()
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0 and not budget.stopped():
                if self._abort.wait(min(left, 0.2)):
                    return

        def warn(rs: tenacity.RetryCallState) -> None:
            log.warning(
                "%s: %s failed (%s); retrying in %.1fs",
                self.uri,
                what,
                one_line(rs.outcome.exception()),
                rs.upcoming_sleep,
            )

        try:
            for a in tenacity.Retrying(
                retry=tenacity.retry_if_exception(self.objects.is_transient),
                stop=give_up,
                wait=tenacity.wait_random_exponential(multiplier=0.5, max=30),
                before_sleep=warn,
                sleep=sleep,
                reraise=True,
            ):
                with a:
                    return attempt(budget)
        except Exception as e:
            fatal = self.objects.explain(e)
            if fatal is not None:
                raise fatal from None
            if isinstance(e, UploadInterrupted) or (self.objects.is_transient(e) and budget.stopped()):
                raise UploadInterrupted(
                    f"{self.uri}: {what} stopped on request before it was complete; nothing of it counts as "
                    f"committed there (its manifest was not written)"
                ) from None
            if self.objects.is_transient(e):
                raise StorageUnavailable(
                    f"{self.uri}: {what} gave up after {time.monotonic() - start:.1f}s of retries ({one_line(e)})"
                ) from None
            raise
        raise AssertionError("unreachable")

    @staticmethod
    def check_stop(budget: Budget) -> None:
        """Raise UploadInterrupted if the operation's stop() says so (between files; retry() words the message)."""
        if budget.stopped():
            raise UploadInterrupted("stopped on request")

    def call(self, fn: Callable, *args, deadline: float):
        """Run one store call in a daemon thread, so a stalled socket cannot hold the caller past the deadline."""
        box: dict = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # handed to the caller
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, name="storage-call", daemon=True).start()
        while not done.wait(_POLL_S):
            self._check(deadline)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def sized(self, nbytes: int, budget: Budget) -> float:
        """The deadline of one call that moves `nbytes` (a server-side copy): its own, within the operation's."""
        return min(budget.at, time.monotonic() + self.deadline_s + nbytes / self.bytes_per_s)

    def transfer(self, start: Callable[[Callable], None], sizes: list[tuple[str, int]], budget: Budget) -> None:
        """Run `start(wait)` (a backend's put_files/get_files) with a deadline per object: deadline_s plus the time
        for the bytes queued up to and including it at the minimum throughput, within the operation's budget."""
        budget.allow(sum(n for _, n in sizes))
        t0, queued, due = time.monotonic(), 0, {}
        for rel, n in sizes:
            queued += n
            due[rel] = min(budget.at, t0 + self.deadline_s + queued / self.bytes_per_s)
        start(lambda futures: self.wait(futures, due, budget.at, budget))

    def wait(self, futures: list, due: dict[str, float], deadline: float, budget: Budget | None = None) -> None:
        """Wait for (rel, future) pairs, each until its own deadline; the first failure, a deadline, abort or the
        budget's stop() cancels the rest (files already running may still finish: none is committed by that)."""
        pending = list(futures)
        try:
            while True:
                self._check(deadline)
                if budget is not None:
                    self.check_stop(budget)
                now = time.monotonic()
                for item in list(pending):
                    rel, future = item
                    if future.done():
                        pending.remove(item)
                        try:
                            future.result()
                        except Exception as e:
                            if self.objects.is_missing(e):
                                raise Missing(rel) from None
                            raise
                    elif now >= due.get(rel, deadline):
                        raise CallTimeout(
                            f"{rel}: not transferred within its deadline (checkpoint.s3.deadline_s "
                            f"{self.deadline_s:g} s + its size at checkpoint.s3.min_throughput_mb_s "
                            f"{self.bytes_per_s / 1e6:g})"
                        )
                if not pending:
                    return
                time.sleep(_POLL_S)
        finally:
            for _, f in pending:
                f.cancel()

    def _check(self, deadline: float) -> None:
        if self._abort.is_set():
            raise StorageUnavailable(f"{self.uri}: aborted (shutting down)")
        if time.monotonic() >= deadline:
            raise CallTimeout("no answer before the deadline")
