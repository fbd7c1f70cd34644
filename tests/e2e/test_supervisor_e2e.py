"""`spot-trainer run` with the real trainer: real SIGKILLs and SIGTERMs, one and two processes (gloo on CPU)."""

import json
import os
import signal
import time

import pytest

# the chaos proof's helpers: its reference run, and pods started, found and killed by PID
from scripts.chaos import reference_run, training_overrides
from tests.harness.common import assert_bitwise_equal, heartbeat_step, trainable_weights
from tests.harness.pod import Pod, child_env, children, kill_group, trainer_command, wait_until
from trainer.checkpoint.manifest import Manifest, verify
from trainer.metrics import read_jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 32  # the same run as tests/chaos/test_chaos.py, so the two share one uninterrupted reference
SUPERVISOR = [
    "supervisor.backoff_initial_s=0.2",
    "supervisor.backoff_max_s=1",
    "supervisor.hang_timeout=120",
    "preemption.grace_seconds=20",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / f"chaos-reference-lora-{STEPS}"
    reference_run(out, training_overrides("lora", STEPS))
    return out


def _events(out, event=None):
    return [e for e in read_jsonl(out / "events.jsonl") if event is None or e["event"] == event]


def _start(tmp_path, overrides):
    out = tmp_path / "run"
    log = open(tmp_path / "pod.log", "wb")  # Pod.kill() closes it
    pod = Pod(trainer_command("run", overrides=overrides, output_dir=out), child_env(), log)
    return out, pod


def _log(tmp_path):
    return (tmp_path / "pod.log").read_text(errors="replace")[-3000:]


def _wait_step(pod, out, step, tmp_path):
    assert wait_until(lambda: heartbeat_step(out) >= step or pod.poll() is not None, 180), _log(tmp_path)
    assert pod.poll() is None, f"the run ended (exit {pod.poll()}) before step {step}:\n{_log(tmp_path)}"


def test_sigkill_of_the_trainer_restarts_it_and_ends_bitwise_equal(tmp_path, reference):
    out, pod = _start(tmp_path, training_overrides("lora", STEPS) + SUPERVISOR)
    try:
        _wait_step(pod, out, 10, tmp_path)
        trainer = pod.trainer_pid()
        kill_group(trainer, signal.SIGKILL)
        code = pod.wait(240)
    finally:
        pod.kill()
    assert code == 0, _log(tmp_path)
    killed, done = _events(out, "exit")
    assert killed["reason"] == "killed" and killed["code"] == -signal.SIGKILL and done["reason"] == "done"
    (restart,) = _events(out, "restart")
    # resumed from the newest committed checkpoint (every 4 steps); the steps after it are the ones lost
    assert restart["resumed_from_step"] % 4 == 0 and restart["resumed_from_step"] <= killed["last_step"]
    assert restart["steps_lost"] == killed["last_step"] - restart["resumed_from_step"]
    assert [e["step"] for e in _events(out, "train_start")] == [0, restart["resumed_from_step"]]
    assert_bitwise_equal(trainable_weights(out, STEPS), trainable_weights(reference, STEPS))
    steps = [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(1, STEPS + 1))


def test_sigterm_to_the_supervisor_exits_75_with_an_emergency_checkpoint_at_the_step_reached(tmp_path):
    out, pod = _start(tmp_path, training_overrides("lora", 400) + SUPERVISOR)
    try:
        _wait_step(pod, out, 6, tmp_path)
        sent = time.time()
        os.kill(pod.pid, signal.SIGTERM)
        code = pod.wait(60)
        exit_s = time.time() - sent
    finally:
        pod.kill()
    assert code == 75, _log(tmp_path)
    reached = heartbeat_step(out)
    (pre,) = _events(out, "preempt")
    assert pre["step"] == reached >= 6 and pre["reason"] == "SIGTERM"  # nothing lost: the step reached is saved
    ckpt = out / "checkpoints" / f"step-{reached:08d}"
    assert verify(ckpt) == []
    assert Manifest.load(ckpt).kind == "emergency" or reached % 4 == 0  # a periodic one at that step is kept
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == reached
    (exit_,) = _events(out, "exit")
    assert exit_["reason"] == "preempted" and exit_["code"] == 75
    # SIGTERM -> committed local checkpoint: the trainer's own measure, and from outside (signal sent -> event)
    sigterm_to_commit = pre["time"] - sent
    print(
        f"tiny LoRA: SIGTERM -> committed checkpoint {sigterm_to_commit:.3f} s (trainer: stop_to_commit_s "
        f"{pre['stop_to_commit_s']} s), SIGTERM -> supervisor exit {exit_s:.2f} s"
    )
    assert 0 < pre["stop_to_commit_s"] <= sigterm_to_commit < 10  # loose: 2 shared cores


def test_sigterm_stops_both_ranks_of_a_two_process_run_at_the_same_step(tmp_path):
    out, pod = _start(tmp_path, training_overrides("lora", 400) + SUPERVISOR + ["supervisor.num_processes=2"])
    try:
        _wait_step(pod, out, 4, tmp_path)
        launcher = pod.trainer_pid()
        ranks = children(launcher)
        os.kill(pod.pid, signal.SIGTERM)
        code = pod.wait(90)
    finally:
        pod.kill()
    assert code == 75, _log(tmp_path)
    (launch,) = _events(out, "launch")
    assert "accelerate.commands.launch" in launch["command"] and "2" in launch["command"]
    assert _events(out, "train_start")[0]["world_size"] == 2
    (pre,) = _events(out, "preempt")
    ckpt = out / "checkpoints" / f"step-{pre['step']:08d}"
    # committed only when every rank wrote its files for that step: both stopped at the same one
    assert verify(ckpt) == []
    files = {f.path for f in Manifest.load(ckpt).files}
    assert {"rng-rank00000.json", "rng-rank00001.json"} <= files, files
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == pre["step"] == heartbeat_step(out)
    assert len(ranks) == 2
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in [launcher, *ranks]), 10)
