"""A real tiny run writes one `startup` event per process start, its phases summing to its total; report shows them."""

from __future__ import annotations

import time

import pytest

from tests.harness.common import TINY, run_cli
from trainer.metrics import read_jsonl
from trainer.report import build_report, render_report
from trainer.run_dir import RunDir
from trainer.startup import PHASES

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # two real runs (~30 s idle); the quick pass stays under 3 minutes


def _startups(out):
    return [e for e in read_jsonl(RunDir(out).events) if e.get("event") == "startup"]


def test_fresh_and_resumed_starts_write_startup_events(tmp_path):
    base = [o for o in TINY if not o.startswith(("train.max_steps", "checkpoint.every_steps"))]
    t0 = time.monotonic()
    run_cli("train", overrides=base + ["train.max_steps=2", "checkpoint.every_steps=2"], output_dir=tmp_path)
    wall = time.monotonic() - t0
    (fresh,) = _startups(tmp_path)
    assert fresh["resumed_from"] is None and fresh["step"] == 1 and fresh["started_from"] == "process"
    assert list(fresh["phases"]) == list(PHASES)
    assert all(v >= 0 for v in fresh["phases"].values()) and fresh["other_s"] >= 0
    assert abs(sum(fresh["phases"].values()) + fresh["other_s"] - fresh["total_s"]) < 1e-3
    # from the process's start: the interpreter and torch's import are in it; the process ran within `wall`
    assert 0 < fresh["phases"]["imports"] and fresh["total_s"] < wall
    assert fresh["phases"]["model_load"] > 0 and fresh["phases"]["first_step"] > 0

    run_cli("train", overrides=base + ["train.max_steps=3", "checkpoint.every_steps=2"], output_dir=tmp_path)
    first, resumed = _startups(tmp_path)
    assert first == fresh
    assert resumed["resumed_from"] == 2 and resumed["step"] == 3
    assert abs(sum(resumed["phases"].values()) + resumed["other_s"] - resumed["total_s"]) < 1e-3

    text = render_report(build_report(tmp_path))
    assert "fresh" in text and "resumed from 2" in text and "median of 2" in text
