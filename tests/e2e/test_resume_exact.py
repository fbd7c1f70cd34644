"""The property the product rests on: a run killed at any step and resumed ends bitwise identical."""

import json
import signal

import pytest

from tests.harness.common import (
    TINY,
    assert_bitwise_equal,
    kill_at_step,
    run_cli,
    start_cli,
    trainable_weights,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.e2e

METHODS = {
    "full": ["model.method=full"],
    "lora": ["model.method=lora"],
    # the seed recipe's optimizer too; r=64 makes LoRA matrices big enough for bitsandbytes' 8-bit state
    "qlora": ["model.method=qlora", "train.optimizer=paged_adamw_8bit", "lora.r=64"],
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs' final weights, one per method (shared by the tests below), each run when a test first
    asks for it: the quick pass (-m 'not slow') runs the LoRA one only."""

    class References(dict):
        def __missing__(self, method):
            d = tmp_path_factory.mktemp(f"ref-{method}")
            run_cli("train", overrides=TINY + METHODS[method], output_dir=d)
            self[method] = trainable_weights(d, 12)
            return self[method]

    return References()


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_killed_off_boundary_resumes_bitwise(tmp_path, references, method):
    # killed between checkpoints (every 4 steps): the lost steps are redone, the result is identical
    proc = start_cli("train", overrides=TINY + METHODS[method], output_dir=tmp_path)
    wait_for_checkpoint(proc, tmp_path, 4)  # checkpoints are written in the background: wait for the commit
    reached = kill_at_step(proc, tmp_path, 6, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run_cli("train", overrides=TINY + METHODS[method], output_dir=tmp_path)
    starts = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    starts = [e for e in starts if e["event"] == "train_start"]
    assert len(starts) == 2 and 0 < starts[1]["step"] < 12 and starts[1]["step"] % 4 == 0, (reached, starts)
    assert_bitwise_equal(trainable_weights(tmp_path, 12), references[method])
    # metrics: one line per step, no duplicates or gaps, across the restart
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, 13))


@pytest.mark.slow  # keeps the -m "not slow" pass under 3 minutes
def test_sigterm_stops_with_emergency_checkpoint_and_resumes_bitwise(tmp_path, references):
    proc = start_cli("train", overrides=TINY + METHODS["lora"], output_dir=tmp_path)
    kill_at_step(proc, tmp_path, 5, signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 75
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    pre = [e for e in events if e["event"] == "preempt"]
    assert pre and pre[0]["step"] >= 5
    # the emergency checkpoint is at the step reached, not at the last periodic one: nothing lost
    assert (tmp_path / "checkpoints" / f"step-{pre[0]['step']:08d}" / "manifest.json").exists()
    run_cli("train", overrides=TINY + METHODS["lora"], output_dir=tmp_path)
    assert_bitwise_equal(trainable_weights(tmp_path, 12), references["lora"])
