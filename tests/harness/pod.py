"""A pod for chaos runs and end-to-end tests: one process group we started, found and killed by PID only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[2]


def trainer_command(*args: str, overrides: list[str], output_dir: Path) -> list[str]:
    """`python -m trainer <args> --set ... --output-dir DIR` (what `spot-trainer <args>` runs)."""
    cmd = [sys.executable, "-m", "trainer", *args]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + ["--output-dir", str(output_dir)]


def child_env(base: dict | None = None) -> dict:
    """`base` (default os.environ) for a trainer on shared CPU cores: one thread each, unbuffered output."""
    env = dict(os.environ if base is None else base)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    return env


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.01) -> bool:
    """Poll `predicate` until true or `timeout` s pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(poll)
    return True


def children(pid: int) -> list[int]:
    """Live (not zombie) child PIDs of `pid`, from a scan of /proc/*/stat (no psutil, no /proc/*/children here)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(name))
    return sorted(out)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal the process group `pgid` (a process started with start_new_session); False if it is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Pod:
    """A command in its own session (like a container's PID 1), output appended to `log`."""

    def __init__(self, argv: list[str], env: dict, log: BinaryIO):
        self.argv, self.log = argv, log
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid = self.proc.pid
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None if still running after `timeout` s."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def trainer_pid(self) -> int | None:
        """The supervisor's child (the trainer, or `accelerate launch`): leader of its own process group."""
        pids = children(self.pid)
        return pids[0] if pids else None

    def kill(self) -> None:
        """SIGKILL everything the pod started: its own group and its children's groups (they start sessions)."""
        if self.proc.poll() is None:
            kill_group(self.pid, signal.SIGSTOP)  # a stopped supervisor cannot start another child while we look
            for pid in children(self.pid):
                kill_group(pid)
            kill_group(self.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if not self.log.closed:
            self.log.close()
