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

from trainer.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, SpotTrainerError
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
        # until the run knows its step, the beats of setup keep the step the last process reached (the supervisor
        # reads it as this attempt's progress)
        self.step, self.phase = (run.read_heartbeat() or 0) if enabled else 0, "setup"
        self._last = 0.0
        self._warned = False

    def __call__(self, step: int | None = None, phase: str | None = None, force: bool = False) -> None:
        if not self.enabled:
            return
        changed = (step is not None and step != self.step) or (phase is not None and phase != self.phase)
        self.step = self.step if step is None else step
        self.phase = self.phase if phase is None else phase
        now = time.monotonic()
        if force or changed or now - self._last >= self.min_interval_s:
            self._last = now
            try:
                self.run.write_heartbeat(self.step, self.phase)
            except OSError as e:  # a full disk (which training survives) must not end the run here
                if not self._warned:
                    self._warned = True
                    log.warning("cannot write the heartbeat file (%s); the supervisor may take the run for hung", e)


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

    def __init__(
        self,
        rank: int,
        world: int,
        timeout_s: float,
        stop_requested: Callable[[], bool] = lambda: False,
        local_rank: int | None = None,
        local_world: int | None = None,
    ):
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        # torchrun numbers ranks node by node, the same number on each: node n holds ranks n*L .. n*L+L-1
        self.local_rank = rank if local_rank is None else local_rank
        self.local_world = world if local_world is None else max(1, local_world)
        self.leader = self.rank - self.local_rank  # this node's first rank: it works for the node alone
        self.stop_requested = stop_requested  # this process's stop flag: told to rank 0 while it works alone
        self._stop_told = False
        self.store = _store() if world > 1 else None
        # torchrun's agent store outlives a worker restart (--max-restarts): keys of one restart must not be read
        # by the next
        self._prefix = f"spot/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._seq = 0

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{self._seq}/{name}"

    def shared_key(self, name: str) -> str:
        """A store key of this launch, the same on every rank whatever phases each has run."""
        return f"{self._prefix}/{name}"

    # ------------------------------------------------------------------ rank-0-only phases

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def leaders(self) -> list[int]:
        """The first rank of every node."""
        return list(range(0, self.world, self.local_world))

    def main_only(
        self,
        name: str,
        fn: Callable[[], int | None],
        heartbeat: Heartbeat | None = None,
        beat_file: bool = True,
        per_node: bool = False,
    ) -> int:
        """Rank 0 runs fn() (an int, or None = 0) and every rank gets its result; the others never sit in a collective.

        An exception on rank 0 is raised there and, as RankZeroFailed with the same exit code, on the others. While
        fn runs, a thread of rank 0 beats the store (the others' sign of life) and, with `beat_file`, the heartbeat
        file: for phases made of calls with deadlines of their own (pulls, uploads, tokenizing); eval beats per batch
        instead (beat_file=False), so an eval that truly hangs is still seen by the supervisor.

        per_node: the first rank of each node runs fn() for its node (its own output dir), and that node's ranks
        get its result; then every rank waits for every node to be done (a failure on one node reaches all, and
        none goes on into a collective while another node still works).

        A waiting rank that keeps its node's heartbeat (the first rank of a node other than rank 0's, with own
        output dirs) beats it while the worker it waits for beats the store.
        """
        self._seq += 1
        file_beat = heartbeat if beat_file else None
        worker = self.leader if per_node else 0
        if self.store is None:
            stop = threading.Event()
            if file_beat is not None:
                threading.Thread(target=self._tick, args=(None, stop, file_beat), daemon=True).start()
            try:
                return self._run_local(name, fn, heartbeat)
            finally:
                stop.set()
        done, beat = self._key(f"{name}/done/{worker}"), self._beat_key(worker)
        if self.rank == worker:
            stop = threading.Event()
            ticker = threading.Thread(target=self._tick, args=(beat, stop, file_beat), daemon=True, name=f"beat-{name}")
            ticker.start()
            try:
                result = self._run_local(name, fn, heartbeat)
            except BaseException as e:
                self._set(done, f"err {_exit_code(e)}")
                raise
            finally:
                stop.set()
            self._set(done, f"ok {result}")
        else:
            result = self._wait(name, done, beat, worker, heartbeat)
        if per_node:
            for other in self.leaders:
                if other != worker:
                    self._wait(name, self._key(f"{name}/done/{other}"), self._beat_key(other), other, heartbeat)
        return result

    def _beat_key(self, worker: int) -> str:
        return f"{self._prefix}/beat" if worker == 0 else f"{self._prefix}/beat/{worker}"

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

    def _tick(self, key: str | None, stop: threading.Event, heartbeat: Heartbeat | None) -> None:
        n = 0
        while not stop.wait(BEAT_EVERY_S):
            n += 1
            if key is not None:
                self._set(key, str(n))
            if heartbeat is not None:
                heartbeat()

    def peer_stop(self) -> bool:
        """Rank 0, inside a phase it works in alone: another rank (maybe on another node) was told to stop."""
        if self.store is None or self.rank != 0:
            return False
        try:
            return self.store.check([f"{self._prefix}/stop"])
        except Exception:  # the store is gone: the run is ending anyway
            return False

    def _wait(self, name: str, done: str, beat: str, worker: int = 0, heartbeat: Heartbeat | None = None) -> int:
        try:
            return self._wait_for(name, done, beat, worker, heartbeat)
        except RankZeroFailed:
            raise
        except Exception as e:  # the store went away with rank 0's node (its launcher exited)
            raise RankZeroFailed(
                f"lost contact with rank {worker} during {name} ({type(e).__name__}); its output says why"
            ) from e

    def _wait_for(self, name: str, done: str, beat: str, worker: int = 0, heartbeat: Heartbeat | None = None) -> int:
        last_beat, last_change = None, time.monotonic()
        while True:
            if not self._stop_told and self.stop_requested():  # rank 0 ends its phase early (eval) when told
                self._stop_told = True
                self._set(f"{self._prefix}/stop", "1")
            if self.store.check([done]):
                status, value = self.store.get(done).decode("ascii").split(" ", 1)
                if status == "ok":
                    return int(value)
                raise RankZeroFailed(
                    f"rank {worker} stopped during {name} (exit {value}); its output says why", int(value)
                )
            now = time.monotonic()
            b = self.store.get(beat) if self.store.check([beat]) else None
            if b != last_beat:
                last_beat, last_change = b, now
                if heartbeat is not None:  # the worker is alive: so is this node, for its supervisor
                    heartbeat(phase=name)
            elif now - last_change > self.timeout_s:
                raise RankZeroFailed(
                    f"rank {worker} gave no sign of life for {self.timeout_s:.0f} s during {name} "
                    f"(distributed.timeout_s); stopping so the run can be restarted"
                )
            time.sleep(_POLL_S)

    # ------------------------------------------------------------------ the shared output dir

    def check_own_dirs(self, run: RunDir) -> None:
        """distributed.shared_output_dir=false: each node's ranks see their node's dir, and no other node's.

        Every node's first rank writes a token of its own; a rank that sees another node's token shares the dir
        with it, where the nodes' checkpoint files would collide: every rank stops with a ConfigError (exit 2).
        """
        if self.store is None:
            return
        self._seq += 1
        if self.is_leader:
            token = os.urandom(16).hex()
            try:
                (run.root / f"{NODE_CHECK_FILE}-{self.rank}").write_text(token)
            except OSError as e:
                self.store.set(self._key(f"node-token/{self.rank}"), "!")
                raise ConfigError(f"output_dir {run.root}: cannot write {NODE_CHECK_FILE} ({e.strerror or e})") from e
            self.store.set(self._key(f"node-token/{self.rank}"), token)
        tokens = {}
        deadline = time.monotonic() + self.timeout_s
        for leader in self.leaders:
            key = self._key(f"node-token/{leader}")
            while not self.store.check([key]):
                if time.monotonic() > deadline:
                    raise RankZeroFailed(f"rank {leader} published no output-dir token in {self.timeout_s:.0f} s")
                time.sleep(_POLL_S)
            tokens[leader] = self.store.get(key).decode("ascii", "replace")
            if tokens[leader] == "!":
                raise RankZeroFailed(f"rank {leader} cannot write into its output_dir; its output says why", EXIT_USAGE)

        def sees(leader: int) -> bool:
            try:
                return (run.root / f"{NODE_CHECK_FILE}-{leader}").read_text() == tokens[leader]
            except OSError:
                return False

        own = sees(self.leader)
        shared = [leader for leader in self.leaders if leader != self.leader and sees(leader)]
        seen = ",".join(map(str, shared)) or "-"
        self.store.set(self._key(f"own-check/{self.rank}"), f"{int(own)} {seen} {self.leader} {self.local_world}")
        keys = [self._key(f"own-check/{r}") for r in range(self.world)]
        deadline = time.monotonic() + self.timeout_s
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                raise RankZeroFailed(f"not every rank reported on its output dir within {self.timeout_s:.0f} s")
            time.sleep(_POLL_S)
        reports = [self.store.get(k).decode("ascii", "replace").split(" ") for k in keys]
        layout = [(int(leader), int(n)) for _, _, leader, n in reports]
        if any(leader != r - r % n or n != self.local_world for r, (leader, n) in enumerate(layout)):
            raise ConfigError(
                "distributed.shared_output_dir=false needs the same number of processes on every node, numbered node "
                "by node (torchrun's LOCAL_WORLD_SIZE; accelerate launch and torchrun set it)"
            )
        blind = [r for r, (ok, *_) in enumerate(reports) if ok != "1"]
        if blind:
            raise ConfigError(
                f"output_dir {run.root}: ranks {blind} cannot see the file their node's first rank wrote there; "
                f"the ranks of one node need one output dir"
            )
        both = sorted({(r, o) for r, (_, others, *_) in enumerate(reports) if others != "-" for o in others.split(",")})
        if both:
            r, o = both[0]
            raise ConfigError(
                f"output_dir {run.root}: rank {r} sees the dir of rank {o}'s node, so the nodes share it; with a "
                f"shared output dir set distributed.shared_output_dir=true (or give each node a dir of its own)"
            )

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
            try:
                (run.root / NODE_CHECK_FILE).write_text(token)
            except OSError as e:
                self.store.set(token_key, "!")
                raise ConfigError(f"output_dir {run.root}: cannot write {NODE_CHECK_FILE} ({e.strerror or e})") from e
            self.store.set(token_key, token)
        try:
            token = self.store.get(token_key).decode("ascii")  # waits (store timeout) for rank 0
        except Exception as e:
            raise RankZeroFailed(f"rank 0 did not publish its output-dir token ({type(e).__name__})") from e
        if token == "!":
            raise RankZeroFailed("rank 0 cannot write into output_dir; its output says why", EXIT_USAGE)
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
