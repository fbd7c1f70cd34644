"""Problem 5 of the lineage issue: a SIGTERM while the same step's background write is failing (a full disk) used to
skip the emergency checkpoint (the step counted as saved when its write was submitted) and print "checkpoint step
N committed" with nothing committed. Real CLI on a real small tmpfs (see test_disk_full.py)."""

from __future__ import annotations

import re

import pytest

from tests.e2e.test_disk_full import FULL, _run_on_tmpfs, reference  # noqa: F401  (reference: the fixture)
from trainer.checkpoint.store import CheckpointStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_exit_line_says_committed_only_when_a_manifest_exists(tmp_path, reference):  # noqa: F811
    one, rest, final = reference
    # room for one checkpoint and a half: step 1 commits, every later write (a second one beside it) fails
    rc, log = _run_on_tmpfs(
        rest - final + int(1.5 * one),
        tmp_path / "out",
        tmp_path / "keep",
        ["train", *[x for o in [*FULL, "train.max_steps=400", "checkpoint.every_steps=1"] for x in ("--set", o)]],
        sigterm_at=4,
    )
    keep = tmp_path / "keep"
    assert rc == 75, log[-3000:]
    assert "Traceback" not in log
    step = int(re.search(r"emergency checkpoint at step (\d+)", log).group(1))
    assert step >= 4
    committed = (keep / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists()
    said = f"checkpoint step {step} committed" in log
    assert said == committed, log[-3000:]  # honest either way
    assert not committed and "not written: the disk is full" in log, log[-3000:]
    assert CheckpointStore(keep).committed_steps() == [1]  # the newest committed one is never given up for it
