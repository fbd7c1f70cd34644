"""The supervisor (`spot-trainer run`): runs the trainer as a child process and keeps the run alive.

It never imports the training loop. It launches `python -m trainer train ... --resume auto` (or
`accelerate launch` for several GPUs) in its own process group, forwards SIGTERM/SIGINT to that group,
restarts after crashes and hangs with exponential backoff, and exits 75 when the machine is going away.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from tenacity import wait_exponential, wait_random

from trainer.checkpoint.manifest import Manifest
from trainer.config.schema import Config
from trainer.errors import EXIT_FAILED, EXIT_OK, EXIT_OOM, EXIT_PREEMPTED, EXIT_STORAGE, EXIT_USAGE, CheckpointError
from trainer.metrics import EventLog, read_jsonl
from trainer.run_dir import RunDir
from trainer.spot.procs import descendants, start_time

CRASH_LOOP_LIMIT = 3  # failures in a row with no new checkpoint and no new step: stop restarting
HANG_KILL_AFTER_S = 10.0  # after SIGTERM to a hung trainer, SIGKILL this much later (at most grace_seconds)
POLL_S = 0.1


# ---------------------------------------------------------------- what the trainer leaves on disk


def newest_checkpoint_step(output_dir: str | os.PathLike) -> int | None:
    """Step of the newest committed local checkpoint whose manifest parses (a damaged one is not a checkpoint)."""
    run = RunDir(output_dir)
    for step in reversed(run.committed_steps()):
        try:
            Manifest.load(run.checkpoint(step))
            return step
        except CheckpointError:
            continue
    return None


def read_heartbeat(output_dir: str | os.PathLike) -> int | None:
    """The step rank 0 last wrote into `<output_dir>/heartbeat`, or None."""
    return RunDir(output_dir).read_heartbeat()


def _heartbeat_stamp(output_dir: Path) -> tuple | None:
    try:
        st = os.stat(RunDir(output_dir).heartbeat)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def _trainer_reported(output_dir: Path, event: str, since: float) -> bool:
    # `accelerate launch` turns a rank's exit 75 (or 69) into its own exit 1; rank 0's event tells the truth.
    return any(
        e.get("source") == "trainer" and e.get("event") == event and e.get("time", 0) >= since
        for e in read_jsonl(RunDir(output_dir).events)
    )


# ---------------------------------------------------------------- the child command


def visible_gpus() -> int:
    """Number of CUDA GPUs this process can see (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def child_command(cfg: Config, config_source: str | None, overrides: list[str], output_dir: str) -> list[str]:
    """`python -m trainer train ...` for one process, `accelerate launch ... -m trainer train ...` for several
    (supervisor.num_processes per machine, on supervisor.num_machines machines)."""
    train = ["train", *([config_source] if config_source else [])]
    for item in overrides:
        train += ["--set", item]
    train += ["--output-dir", str(output_dir), "--resume", "auto"]
    s = cfg.supervisor
    n = s.num_processes  # per machine
    if n == "auto":
        n = max(1, visible_gpus())
    if n == 1 and s.num_machines == 1 and not s.accelerate_config:
        return [sys.executable, "-m", "trainer", *train]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if s.accelerate_config:
        launch += ["--config_file", s.accelerate_config]
    else:
        # Without a config file accelerate would start one process on CPU and warn on GPU: say it all.
        launch += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if s.num_machines > 1:  # on the command line they win over a config file's values
        launch += ["--num_machines", str(s.num_machines), "--machine_rank", str(s.machine_rank)]
        launch += ["--main_process_ip", str(s.main_process_ip), "--main_process_port", str(s.main_process_port)]
    elif not s.accelerate_config:
        launch += ["--num_machines", "1"]
    # accelerate's --num_processes is the total over all machines
    return [*launch, "--num_processes", str(n * s.num_machines), "-m", "trainer", *train]


# ---------------------------------------------------------------- the supervisor


@dataclass
class AttemptResult:
    code: int  # exit status; negative = killed by that signal
    reason: str  # done | preempted | storage_wait | crash | config_error | oom | hang | killed
    last_step: int | None  # heartbeat step written during this attempt
    runtime_s: float


class Supervisor:
    """Launch, watch, restart; `run()` returns the exit code for the pod."""

    def __init__(
        self,
        cfg: Config,
        config_source: str | None = None,
        overrides: list[str] = (),
        output_dir: str | None = None,
        child_argv: list[str] | None = None,
        env: dict | None = None,
    ) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir or cfg.output_dir)
        self.argv = (
            list(child_argv) if child_argv else child_command(cfg, config_source, list(overrides), str(self.output_dir))
        )
        self.env = dict(os.environ if env is None else env)
        s = cfg.supervisor
        self.grace = float(cfg.preemption.grace_seconds)
        self._wait = wait_exponential(multiplier=s.backoff_initial_s, max=s.backoff_max_s) + wait_random(
            0, s.backoff_initial_s
        )
        self._proc: subprocess.Popen | None = None
        self._tree: set[tuple[int, int]] = set()  # (pid, start time) of the launcher's descendants
        self._forwarded = False
        self._signalled: str | None = None
        self._signal_mono: float | None = None
        self._sigints = 0
        self._previous_handlers: dict = {}

    # ------------------------------------------------------------ output

    def _emit(self, event: str, text: str, **fields) -> None:
        self.events.emit(event, **fields)
        print(f"spot-trainer supervisor: {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------ signals

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._signalled is None:
            self._signalled, self._signal_mono = name, time.monotonic()
        if signum == signal.SIGINT:
            self._sigints += 1
        if self._sigints >= 2:  # Ctrl-C twice: stop now, no emergency checkpoint
            self._kill_group(signal.SIGKILL)
        elif not self._forwarded:
            self._forwarded = self._kill_group(signum)

    def _kill_group(self, sig: int) -> bool:
        proc = self._proc
        if proc is None:
            return False
        if sig == signal.SIGKILL:
            # torchrun starts each rank in a session of its own: the launcher's group does not reach them
            for pid, start in self._tree:
                if start_time(pid) == start:  # still the same process, not a reused pid
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _uninstall(self) -> None:
        for sig, prev in self._previous_handlers.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    # ------------------------------------------------------------ one attempt

    def _run_attempt(self, attempt: int) -> AttemptResult:
        s = self.cfg.supervisor
        start_wall, start = time.time(), time.monotonic()
        stamp = _heartbeat_stamp(self.output_dir)
        last_beat, beat_seen = start, False
        env = dict(self.env, SPOT_TRAINER_SUPERVISED="1", SPOT_TRAINER_ATTEMPT=str(attempt))
        # torchrun (under `accelerate launch`) SIGKILLs its ranks this long after forwarding SIGTERM (default 30 s):
        # give them the whole grace, as we do
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(max(1, math.ceil(self.grace))))
        self._forwarded = False
        self._tree = set()
        self._proc = subprocess.Popen(self.argv, start_new_session=True, env=env)
        tree_scan = 0.0
        if self._signalled and not self._forwarded:  # the signal came while we were starting it
            self._forwarded = self._kill_group(signal.SIGTERM)
        hang = killed = False
        kill_at: float | None = None
        while self._proc.poll() is None:
            now = time.monotonic()
            new_stamp = _heartbeat_stamp(self.output_dir)
            if new_stamp != stamp:
                stamp, last_beat, beat_seen = new_stamp, now, True
            if now - tree_scan > 1.0:  # remember the ranks while the launcher is alive to name them
                self._tree |= descendants(self._proc.pid)
                tree_scan = now
            if self._signal_mono is not None and kill_at is None:
                kill_at = self._signal_mono + self.grace
            # Model loading and the first step can be slow: allow twice the timeout before the first beat.
            limit = s.hang_timeout if beat_seen else 2 * s.hang_timeout
            if not hang and self._signalled is None and now - last_beat > limit:
                hang = True
                step, phase = RunDir(self.output_dir).read_heartbeat_phase() if beat_seen else (None, None)
                where = f" at step {step} in phase {phase or '?'}" if step is not None else " before its first beat"
                print(
                    f"spot-trainer supervisor: no heartbeat for {now - last_beat:.0f} s{where} "
                    f"(supervisor.hang_timeout={s.hang_timeout:g}): stopping the trainer",
                    file=sys.stderr,
                    flush=True,
                )
                self.events.emit("hang", step=step, phase=phase, silent_s=round(now - last_beat, 1))
                self._kill_group(signal.SIGTERM)
                kill_at = now + min(HANG_KILL_AFTER_S, self.grace)
            if kill_at is not None and now >= kill_at and not killed:
                self._kill_group(signal.SIGKILL)
                killed = True
            time.sleep(POLL_S)
        code = self._proc.returncode
        self._kill_group(signal.SIGKILL)  # leftovers (ranks, data workers) must not hold the GPU for the next try
        self._proc = None
        if _heartbeat_stamp(self.output_dir) != stamp:
            beat_seen = True
        last_step = read_heartbeat(self.output_dir) if beat_seen else None
        if hang:
            reason = "hang"
        elif code == EXIT_OK:
            reason = "done"
        elif code == EXIT_PREEMPTED or _trainer_reported(self.output_dir, "preempt", start_wall):
            reason = "preempted"
        elif code == EXIT_STORAGE or _trainer_reported(self.output_dir, "storage_wait", start_wall):
            reason = "storage_wait"
        elif code == EXIT_USAGE:
            reason = "config_error"
        elif code == EXIT_OOM or _trainer_reported(self.output_dir, "oom", start_wall):  # 3 becomes 1 under accelerate
            reason = "oom"
        elif killed or code < 0:
            reason = "killed"
        else:
            reason = "crash"
        return AttemptResult(code, reason, last_step, round(time.monotonic() - start, 3))

    # ------------------------------------------------------------ the run

    def run(self) -> int:
        """Supervise until done, preempted, a config error, or giving up; returns the exit code."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(RunDir(self.output_dir).events, "supervisor")
        self._install()
        try:
            return self._supervise()
        finally:
            self._uninstall()

    def _supervise(self) -> int:
        s = self.cfg.supervisor
        self._emit(
            "start",
            f"supervising {self.output_dir} (max_restarts {s.max_restarts}, hang_timeout {s.hang_timeout:g} s)",
            pid=os.getpid(),
            output_dir=str(self.output_dir),
            max_restarts=s.max_restarts,
            hang_timeout=s.hang_timeout,
        )
        best_ckpt = best_step = _or_minus_1(newest_checkpoint_step(self.output_dir))
        restarts = failures_without_progress = 0
        attempt = 1
        while True:
            if self._signalled:  # arrived during the backoff: the machine is going away, do not relaunch
                print(
                    f"spot-trainer supervisor: {self._signalled} before launch; exiting {EXIT_PREEMPTED}",
                    file=sys.stderr,
                    flush=True,
                )
                return EXIT_PREEMPTED
            resume_step = newest_checkpoint_step(self.output_dir)
            where = f"from step {resume_step}" if resume_step is not None else "no local checkpoint"
            self._emit(
                "launch",
                f"launch attempt {attempt} ({where}): {' '.join(self.argv)}",
                attempt=attempt,
                command=self.argv,
                resume_step=resume_step,
            )
            try:
                r = self._run_attempt(attempt)
            except OSError as e:
                msg = f"cannot start the trainer ({self.argv[0]}: {e.strerror or e})"
                self._emit("give_up", msg, reason=msg)
                return EXIT_FAILED
            how = f"code {r.code}" if r.code >= 0 else f"signal {signal.Signals(-r.code).name}"
            at = f"step {r.last_step}" if r.last_step is not None else "no step"
            self._emit(
                "exit",
                f"attempt {attempt} ended: {r.reason} ({how}) at {at} after {r.runtime_s:.1f} s",
                attempt=attempt,
                code=r.code,
                reason=r.reason,
                last_step=r.last_step,
                runtime_s=r.runtime_s,
            )

            if r.reason == "done":
                self._emit("done", "done", attempts=attempt, restarts=restarts)
                return EXIT_OK
            if r.reason == "config_error":
                self._emit(
                    "give_up",
                    "the trainer reported a config or usage error (exit 2); fix it and run again",
                    reason="config_error",
                )
                return EXIT_USAGE
            if r.reason == "oom":
                self._emit(
                    "give_up",
                    f"the trainer ran out of GPU memory (exit {EXIT_OOM}); the last completed step is checkpointed "
                    f"and the same config would run out again: change it (the trainer's message says how) and run "
                    f"again",
                    reason="oom",
                )
                return EXIT_OOM
            if self._signalled or r.reason == "preempted":
                # The machine (or a person) asked us to stop: never restart, the next machine resumes.
                why = self._signalled or "cloud notice"
                print(
                    f"spot-trainer supervisor: stopped by {why}; exiting {EXIT_PREEMPTED} (resumable)",
                    file=sys.stderr,
                    flush=True,
                )
                return EXIT_PREEMPTED

            # Progress = a newer committed checkpoint or a step beyond any reached before.
            ckpt = newest_checkpoint_step(self.output_dir)
            progressed = _or_minus_1(ckpt) > best_ckpt or _or_minus_1(r.last_step) > best_step
            best_ckpt, best_step = max(best_ckpt, _or_minus_1(ckpt)), max(best_step, _or_minus_1(r.last_step))
            if r.reason != "storage_wait":  # the remote or the disk not usable yet is not the trainer's failure
                failures_without_progress = 0 if progressed else failures_without_progress + 1
            if failures_without_progress >= CRASH_LOOP_LIMIT:
                msg = (
                    f"crash loop: {failures_without_progress} failures in a row without a new checkpoint or "
                    f"step (last: {r.reason}, code {r.code}); see the trainer output above"
                )
                self._emit("give_up", msg, reason=msg)
                return EXIT_FAILED
            if restarts >= s.max_restarts:
                msg = (
                    f"{restarts} restarts used (supervisor.max_restarts={s.max_restarts}); "
                    f"last: {r.reason}, code {r.code}"
                )
                self._emit("give_up", msg, reason=msg)
                return EXIT_FAILED

            if r.reason == "storage_wait":
                self._emit(
                    "storage_wait",
                    "the trainer is waiting for its checkpoint storage (exit 69); trying again after the backoff",
                    attempt=attempt,
                )
            backoff = min(
                float(s.backoff_max_s),
                self._wait(SimpleNamespace(attempt_number=max(1, failures_without_progress + 1))),
            )
            resumed_from = ckpt if ckpt is not None else 0
            steps_lost = max(0, r.last_step - resumed_from) if r.last_step is not None else 0
            restarts += 1
            attempt += 1
            self._emit(
                "restart",
                f"restart {restarts}/{s.max_restarts} in {backoff:.1f} s, resuming from step "
                f"{resumed_from} ({steps_lost} steps lost)",
                attempt=attempt,
                backoff_s=round(backoff, 3),
                resumed_from_step=resumed_from,
                steps_lost=steps_lost,
            )
            until = time.monotonic() + backoff
            while time.monotonic() < until and not self._signalled:
                time.sleep(min(POLL_S, max(0.0, until - time.monotonic())))


def _or_minus_1(step: int | None) -> int:
    return -1 if step is None else step


def run_supervisor(cfg: Config, config_source: str | None, overrides: list[str], output_dir: str) -> int:
    """`spot-trainer run`: supervise `spot-trainer train` until done; returns the exit code."""
    return Supervisor(cfg, config_source, overrides, output_dir).run()
