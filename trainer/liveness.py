"""Liveness: the heartbeat (with the phase the run is in), rank-0-only phases, and the shared-output-dir check.

A rank-0-only phase (choosing and pulling the checkpoint, tokenizing, eval, `final/`) is not waited for inside a
collective: a collective is bounded by the process-group timeout, and a legitimate pull can take longer. The other
ranks poll the process group's key-value store instead, for the phase's result and for rank 0's beat (a counter a
thread of rank 0 bumps every second while the phase runs). Rank 0 alive: they wait as long as it takes; rank 0
silent for `distributed.timeout_s`: they stop with a message, and the supervisor restarts the run.

Nothing is pickled: results travel as short ASCII strings ("ok 120", "err 69").
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from trainer.errors import EXIT_FAILED, ConfigError, SpotTrainerError
from trainer.run_dir import NODE_CHECK_FILE, RunDir

log = logging.getLogger(__name__)

BEAT_EVERY_S = 1.0  # rank 0's beat in the store while a rank-0-only phase runs
_POLL_S = 0.05
NODE_CHECK_WAIT_S = 10.0  # NFS attribute caches may hide a new file for a few seconds


class RankZeroFailed(SpotTrainerError):
    """Another rank's view of a failure on rank 0: the same exit code, the reason is in rank 0's output."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class Heartbeat:
    """Rank 0 writes `<step> <phase>` into the heartbeat file at most once a second (unless forced); others no-op.

    The supervisor reads the file's change as "alive" and logs the phase when it kills a run it takes for hung.
    """

    def __init__(self, run: RunDir, enabled: bool, min_interval_s: float = BEAT_EVERY_S):
        self.run, self.enabled, self.min_interval_s = run, enabled, min_interval_s
        self.step, self.phase = 0, "setup"
        self._last = 0.0

    def __call__(self, step: int | None = None, phase: str | None = None, force: bool = False) -> None:
        if not self.enabled:
            return
        changed = (step is not None and step != self.step) or (phase is not None and phase != self.phase)
        self.step = self.step if step is None else step
        self.phase = self.phase if phase is None else phase
        now = time.monotonic()
        if force or changed or now - self._last >= self.min_interval_s:
            self._last = now
            self.run.write_heartbeat(self.step, self.phase)


def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _exit_code(e: BaseException) -> int:
    return int(getattr(e, "exit_code", EXIT_FAILED))


class Ranks:
    """What the ranks of one run share besides collectives: rank-0-only phases and the shared-dir check."""

    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.store = _store() if world > 1 else None
        # torchrun's agent store outlives a worker restart (--max-restarts): keys of one restart must not be read
        # by the next
        self._prefix = f"spot/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._seq = 0

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{self._seq}/{name}"

    # ------------------------------------------------------------------ rank-0-only phases

    def main_only(self, name: str, fn: Callable[[], int | None], heartbeat: Heartbeat | None = None) -> int:
        """Rank 0 runs fn() (an int, or None = 0) and every rank gets its result; the others never sit in a collective.

        An exception on rank 0 is raised there and, as RankZeroFailed with the same exit code, on the others.
        """
        self._seq += 1
        if self.store is None:
            return self._run_local(name, fn, heartbeat)
        done, beat = self._key(f"{name}/done"), f"{self._prefix}/beat"
        if self.rank == 0:
            stop = threading.Event()
            ticker = threading.Thread(target=self._tick, args=(beat, stop), daemon=True, name=f"beat-{name}")
            ticker.start()
            try:
                result = self._run_local(name, fn, heartbeat)
            except BaseException as e:
                self._set(done, f"err {_exit_code(e)}")
                raise
            finally:
                stop.set()
            self._set(done, f"ok {result}")
            return result
        return self._wait(name, done, beat)

    def _run_local(self, name: str, fn: Callable[[], int | None], heartbeat: Heartbeat | None) -> int:
        if heartbeat is not None:
            heartbeat(phase=name, force=True)
        result = fn()
        return 0 if result is None else int(result)

    def _set(self, key: str, value: str) -> None:
        try:
            self.store.set(key, value)
        except Exception as e:  # the store is gone (a peer died): the collectives that follow fail on their own
            log.warning("could not publish %s to the other ranks: %s", key, e)

    def _tick(self, key: str, stop: threading.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            self._set(key, str(n))
            stop.wait(BEAT_EVERY_S)

    def _wait(self, name: str, done: str, beat: str) -> int:
        last_beat, last_change = None, time.monotonic()
        while True:
            if self.store.check([done]):
                status, value = self.store.get(done).decode("ascii").split(" ", 1)
                if status == "ok":
                    return int(value)
                raise RankZeroFailed(f"rank 0 stopped during {name} (exit {value}); its output says why", int(value))
            now = time.monotonic()
            b = self.store.get(beat) if self.store.check([beat]) else None
            if b != last_beat:
                last_beat, last_change = b, now
            elif now - last_change > self.timeout_s:
                raise RankZeroFailed(
                    f"rank 0 gave no sign of life for {self.timeout_s:.0f} s during {name} "
                    f"(distributed.timeout_s); stopping so the run can be restarted"
                )
            time.sleep(_POLL_S)

    # ------------------------------------------------------------------ the shared output dir

    def check_shared_dir(self, run: RunDir) -> None:
        """Every rank sees the file rank 0 wrote into the output dir, or every rank stops with a ConfigError (exit 2).

        Checkpoints are written by each rank into the same output dir and committed by rank 0: a node with a disk
        of its own would leave them incomplete forever.
        """
        if self.store is None:
            return
        self._seq += 1
        token_key = self._key("node-token")
        if self.rank == 0:
            token = os.urandom(16).hex()
            (run.root / NODE_CHECK_FILE).write_text(token)
            self.store.set(token_key, token)
        token = self.store.get(token_key).decode("ascii")  # waits (store timeout) for rank 0
        seen, until = False, time.monotonic() + NODE_CHECK_WAIT_S
        while not seen and time.monotonic() < until:
            try:
                seen = (run.root / NODE_CHECK_FILE).read_text() == token
            except OSError:
                seen = False
            if not seen:
                time.sleep(0.2)
        host = socket.gethostname()
        self.store.set(self._key(f"node-check/{self.rank}"), f"{int(seen)} {host}")
        keys = [self._key(f"node-check/{r}") for r in range(self.world)]
        deadline = time.monotonic() + NODE_CHECK_WAIT_S + self.timeout_s
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                raise RankZeroFailed(f"not every rank reported on the output dir within {self.timeout_s:.0f} s")
            time.sleep(_POLL_S)
        reports = [self.store.get(k).decode("ascii", "replace").split(" ", 1) for k in keys]
        blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(reports) if ok != "1"]
        if blind:
            raise ConfigError(
                f"output_dir {run.root}: rank 0 wrote {NODE_CHECK_FILE} there but {', '.join(blind)} cannot "
                f"see it; a multi-node run needs output_dir on a filesystem every node shares (NFS, Lustre, EFS, a "
                f"FUSE-mounted bucket), at the same path"
            )
