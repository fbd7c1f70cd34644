"""One trainer per output dir: a lock file with the owner's host, pid and start time, renewed while it runs.

Two trainers writing one output dir (two pods on one network volume, a second `spot-trainer train` by mistake)
would interleave checkpoints and retention. The lock is a file, so it works on network volumes where flock does
not. It is stale when its process is gone (same host: the pid is dead or belongs to a newer process) or when it
has not been renewed for LEASE_S (another host: a preempted pod leaves its lock behind, and the next pod takes it
over once the lease ran out instead of waiting for a person).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from trainer.durable import replace_file
from trainer.errors import ConfigError, StorageWait
from trainer.run_dir import LOCK_FILE
from trainer.spot.procs import start_time, stat_fields

log = logging.getLogger(__name__)
LEASE_S = 60.0  # a lock not renewed for this long is stale
RENEW_S = 10.0


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = stat_fields(pid)
    if fields and fields[0] == "Z":  # a zombie (killed, not reaped: no init in the container) holds nothing
        return False
    return start is None or start_time(pid) in (None, start)


class RunLock:
    """Held by the trainer (rank 0) from setup to exit; `acquire()` raises ConfigError when another holds it."""

    def __init__(self, output_dir: str | os.PathLike, lease_s: float = LEASE_S, wait_s: float | None = None):
        self.path = Path(output_dir) / LOCK_FILE
        self.lease_s = lease_s
        self.wait_s = lease_s + RENEW_S if wait_s is None else wait_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": start_time(os.getpid())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        end = time.monotonic() + self.wait_s
        while True:
            holder = self._read()
            if holder is None or self._mine(holder) or self._stale(holder):
                if holder is not None and not self._mine(holder):
                    log.warning(
                        "output dir lock of %s pid %s is stale (%s); taking it over",
                        holder.get("host"),
                        holder.get("pid"),
                        self._why_stale(holder),
                    )
                self._write()
                time.sleep(0.05)  # two takers at once: the last write wins; the other sees it below
                if self._mine(self._read() or {}):
                    break
            elif holder.get("host") != self.me["host"] and time.monotonic() < end:
                time.sleep(min(RENEW_S / 2, max(0.1, end - time.monotonic())))  # maybe a dead pod's: wait the lease
                continue
            elif holder.get("host") != self.me["host"]:
                # another pod still renews it: the preempted one finishing its emergency upload, or a live one;
                # either way not a config error: exit 69 and let the supervisor try again after a backoff
                raise StorageWait(self._busy(holder) + "; exiting 69 to try again later")
            else:
                raise ConfigError(self._busy(holder))
        self._thread = threading.Thread(target=self._renew, name="run-lock", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        holder = self._read()
        if holder is not None and self._mine(holder):
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ internals

    def _read(self) -> dict | None:
        for attempt in range(3):
            try:
                data = json.loads(self.path.read_text())
                return data if isinstance(data, dict) else {}
            except FileNotFoundError:
                return None
            except ValueError:
                return {}  # not ours to read (torn by a crash mid-write, or foreign): stale below
            except OSError:  # EIO/ESTALE on a network volume: unknown, not stale; try again
                time.sleep(0.2 * (attempt + 1))
        raise StorageWait(f"{self.path}: cannot be read (network volume?); exiting 69 to try again later")

    def _write(self) -> None:
        replace_file(self.path, json.dumps({**self.me, "renewed": time.time()}).encode())

    def _mine(self, holder: dict) -> bool:
        return all(holder.get(k) == v for k, v in self.me.items())

    def _stale(self, holder: dict) -> bool:
        return self._why_stale(holder) is not None

    def _why_stale(self, holder: dict) -> str | None:
        pid, renewed = holder.get("pid"), holder.get("renewed")
        if not isinstance(pid, int) or not isinstance(renewed, (int, float)):
            return "unreadable"
        if holder.get("host") == self.me["host"] and not _alive(pid, holder.get("start_time")):
            return "its process is gone"
        age = time.time() - renewed
        if age > self.lease_s:
            return f"not renewed for {age:.0f} s"
        return None

    def _busy(self, holder: dict) -> str:
        since = holder.get("renewed")
        when = time.strftime("%H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else "?"
        return (
            f"{self.path.parent}: in use by another trainer (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"lock renewed {when}); use another --output-dir, or if no trainer runs there any more, delete "
            f"{self.path}"
        )

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if self._mine(self._read() or {}):
                    self._write()
            except OSError as e:  # a full disk or a network volume hiccup must not stop training
                log.debug("lock renewal failed: %s", e)
