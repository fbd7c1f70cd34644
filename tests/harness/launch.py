"""A launched command (the CLI, `accelerate launch`) in a session of its own, its output in a log file.

Killing a launch: torchrun starts each worker in a session of its own, so a signal to the launcher's process group
does not reach the ranks. `Launch` remembers the workers it has seen and signals every group, as a dying machine
would (SIGKILL), or only the launcher's, as the supervisor does (SIGTERM: torchrun forwards it to the ranks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.harness.common import REPO, env
from tests.harness.pod import children


class Launch:
    """A command in its own session; remembers the torchrun workers it started so it can kill them all."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.workers: set[int] = set()

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is None:  # a worker seen while its launcher lives is ours (its PID cannot be reused before)
            self.workers.update(children(self.proc.pid))
        return rc

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"{self.log.name}: still running after {timeout} s\n{self.output()}")
            time.sleep(0.05)
        return self.proc.returncode

    def signal_all(self, sig: int) -> None:
        """`sig` to the launcher's group and every worker's group (each worker leads its own session)."""
        self.poll()
        for pgid in (self.proc.pid, *self.workers):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        self.signal_all(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log.read_text(errors="replace")[-4000:]
