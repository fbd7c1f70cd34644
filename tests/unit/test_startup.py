"""startup: the phase timer (fake clock), the process's start time, and a run without DeepSpeed not importing it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.harness.common import REPO, env
from trainer.startup import PHASES, StartupTimer, process_age_s


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_phases_are_recorded_and_sum_to_the_total():
    clock = FakeClock()
    timer = StartupTimer(started=90.0, clock=clock)
    clock.now = 93.25
    timer.imports_done()
    spent = {
        "device_init": 0.5,
        "preflight": 0.375,
        "output": 0.125,
        "mirror": 0.25,
        "data": 1.125,
        "model_load": 4.0,
        "optimizer": 0.25,
        "resume": 0.75,
    }
    for name, seconds in spent.items():
        clock.now += 0.01  # between phases: other_s
        with timer.phase(name):
            clock.now += seconds
    assert timer.fields() is None  # not before the first step ends

    def step():
        clock.now += 2.0
        return "result"

    assert timer.first_step(step) == "result"
    assert timer.first_step(lambda: clock.__setattr__("now", clock.now + 50) or "later") == "later"  # not timed
    timer.resumed_from = 40
    f = timer.fields()
    assert list(f["phases"]) == list(PHASES)
    assert f["phases"] == {"imports": 3.25, **spent, "first_step": 2.0}
    assert f["total_s"] == pytest.approx(3.25 + sum(spent.values()) + 2.0 + 0.01 * len(spent))
    assert f["other_s"] == pytest.approx(0.01 * len(spent))
    assert abs(sum(f["phases"].values()) + f["other_s"] - f["total_s"]) < 1e-3
    assert f["resumed_from"] == 40 and f["started_from"] == "given"
    assert timer.fields() is None  # once per process


def test_a_phase_that_raises_is_still_timed():
    clock = FakeClock()
    timer = StartupTimer(started=clock.now, clock=clock)
    with pytest.raises(RuntimeError), timer.phase("data"):
        clock.now += 1.5
        raise RuntimeError("boom")
    assert timer.phases["data"] == 1.5


def test_rounding_keeps_the_sum_within_a_millisecond():
    clock = FakeClock(0.0)
    timer = StartupTimer(started=0.0, clock=clock)
    clock.now = 1.0004
    timer.imports_done()
    for name in PHASES[1:-1]:
        with timer.phase(name):
            clock.now += 0.0004  # each rounds down to 0.000
    timer.first_step(lambda: setattr(clock, "now", clock.now + 0.0004))
    f = timer.fields()
    assert abs(sum(f["phases"].values()) + f["other_s"] - f["total_s"]) < 1e-3


def test_process_age_counts_from_the_process_start():
    if process_age_s() is None:
        pytest.skip("no /proc")
    code = "import time; time.sleep(0.6); from trainer.startup import process_age_s; print(process_age_s())"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, check=True)
    wall = time.monotonic() - t0
    age = float(out.stdout)
    assert 0.6 <= age <= wall + 0.02  # /proc counts in 10 ms ticks


def test_unwrapping_without_deepspeed_does_not_import_it():
    pytest.importorskip("deepspeed")
    code = """
import sys, torch
from trainer.config.loader import load_config
from trainer.distributed import make_accelerator
acc = make_accelerator(load_config(None, ["train.device=cpu"]), 1)
model = acc.prepare(torch.nn.Linear(2, 2))
assert acc.unwrap_model(model) is model
from accelerate.utils import extract_model_from_parallel
assert extract_model_from_parallel(model) is model
print("deepspeed" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_cli_and_the_supervisor_do_not_import_torch():
    """`spot-trainer run` (a pod's first process) and `--help` start without torch; `train` imports it in the loop."""
    code = (
        "import sys, trainer.cli.main, trainer.spot.supervisor; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
