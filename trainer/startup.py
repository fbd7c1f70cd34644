"""Start-up phases of one process, from its start to the end of its first optimizer step: the `startup` event.

What a preemption costs is mostly start-up, so every start measures it: `imports` runs from the process's start
(the kernel's start time of this process, /proc/self/stat) to `Trainer.setup()`; the other phases wrap the setup
steps and the first step; `other_s` is what fell between them, so the phases and `other_s` sum to `total_s`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

PHASES = (
    "imports",
    "device_init",
    "preflight",  # the memory pre-flight check (on a GPU the first CUDA call: the CUDA context)
    "output",  # the run lock, the output-dir check, the remote's access check
    "mirror",  # model.mirror: the base model's copy pulled from the remote (a fresh pod)
    "data",
    "model_load",
    "optimizer",
    "resume",
    "first_step",
)
T = TypeVar("T")


def process_age_s() -> float | None:
    """Seconds since the kernel started this process (10 ms ticks), or None where /proc has no answer."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        # fields after the command name (which may hold spaces, inside parentheses); starttime is field 22
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupTimer:
    """Times the start-up phases on the monotonic clock; `fields()` is the `startup` event once the first step ended."""

    def __init__(self, started: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        if started is not None:
            self.started, self.origin = started, "given"
        elif (age := process_age_s()) is not None:
            self.started, self.origin = clock() - age, "process"
        else:  # no /proc (macOS): from this module's first import (after torch's: `imports` then undercounts)
            self.started, self.origin = _IMPORTED_AT, "trainer_import"
        self.phases: dict[str, float] = {}
        self.resumed_from: int | None = None
        self.ended: float | None = None
        self.emitted = False

    def imports_done(self) -> None:
        """Everything from the process's start to now is `imports` (the interpreter, the CLI, torch, the config)."""
        self.phases["imports"] = max(0.0, self.clock() - self.started)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + self.clock() - t0

    def first_step(self, step: Callable[[], T]) -> T:
        """Run one optimizer step; the first one is the `first_step` phase and ends the start-up."""
        if self.ended is not None:
            return step()
        with self.phase("first_step"):
            result = step()
        self.ended = self.clock()
        return result

    def fields(self) -> dict | None:
        """The `startup` event's fields, once (None before the first step ended, and after they were taken)."""
        if self.ended is None or self.emitted:
            return None
        self.emitted = True
        phases = {name: round(self.phases.get(name, 0.0), 3) for name in PHASES}
        phases |= {k: round(v, 3) for k, v in self.phases.items() if k not in phases}
        total = round(self.ended - self.started, 3)
        return dict(
            phases=phases,
            total_s=total,
            other_s=round(total - sum(phases.values()), 3),
            resumed_from=self.resumed_from,
            started_from=self.origin,
        )


_IMPORTED_AT = time.monotonic()
