"""Every rank decides alike and no legitimate phase looks like a hang: 2 CPU ranks over gloo, real signals.

- checkpoint.every_minutes is rank 0's clock, voted to the others: every checkpoint has every rank's files.
- a rebalance recommendation (a loopback AWS metadata server) that only rank 0 watches: one checkpoint on all
  ranks, and only once across a restart (remembered in the run dir).
- an eval longer than distributed.timeout_s and supervisor.hang_timeout: no timeout, no restart.
- a SIGTERM during eval: the eval ends, exit 75 within the grace, the last completed step committed.
- two "machines" with output dirs of their own: both stop at once with exit 2 and a message.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.harness.common import TINY, accelerate_cli, cli_args, free_port, heartbeat_step
from tests.harness.launch import Launch
from tests.harness.metadata import Aws, FakeMetadata
from tests.harness.pod import wait_until
from trainer.checkpoint.manifest import Manifest
from trainer.metrics import read_jsonl
from trainer.run_dir import NOTICES_FILE, committed_steps

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TWO_RANKS = [o for o in TINY if not o.startswith(("train.grad_accum=", "train.max_steps=", "checkpoint."))] + [
    "train.grad_accum=1",
    "checkpoint.keep_last=1000",
]
# An eval that takes several seconds on 2 cores (greedy decoding of 400 tokens for 200 prompts)
SLOW_EVAL = [
    "eval.generate=true",
    "data.builtin.num_eval=200",
    "eval.max_samples=200",
    "eval.max_new_tokens=400",
    "model.builtin.max_position_embeddings=512",
]
RANK_FILES = {"rng-rank00000.json", "rng-rank00001.json"}


def _events(out, name=None):
    return [e for e in read_jsonl(out / "events.jsonl") if name is None or e["event"] == name]


def _files(out, step):
    return {f.path for f in Manifest.load(out / "checkpoints" / f"step-{step:08d}").files}


def _phase(out) -> str | None:
    try:
        fields = (out / "heartbeat").read_text().split()
    except OSError:
        return None
    return fields[1] if len(fields) > 1 else None


def _launch(tmp_path, out, overrides, name="launch"):
    return Launch(accelerate_cli("train", overrides=TWO_RANKS + overrides, output_dir=out), tmp_path / f"{name}.log")


@pytest.mark.slow
def test_every_minutes_is_rank_0s_clock_and_every_checkpoint_has_every_ranks_files(tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    launch = _launch(
        tmp_path,
        out,
        ["train.max_steps=220", "checkpoint.every_steps=null", "checkpoint.every_minutes=0.02", "eval.every_steps=60"],
    )
    try:
        rc = launch.wait(240)
    finally:
        launch.close()
    took = time.monotonic() - t0
    assert rc == 0, launch.output()
    steps = committed_steps(out / "checkpoints")
    assert len(steps) >= 4 and steps[-1] == 220, steps  # time-based ones, and the last step's
    for step in steps:
        assert RANK_FILES <= _files(out, step), step
    assert not _events(out, "checkpoint_failed")
    assert len(_events(out, "checkpoint_requested")) >= 3
    # a checkpoint only some ranks wrote would leave rank 0 waiting 600 s for the others' files
    assert took < 200, took


@pytest.mark.slow
def test_a_rebalance_notice_seen_by_rank_0_only_is_one_checkpoint_on_all_ranks_once(tmp_path):
    aws = Aws()
    aws.rebalance = {"noticeTime": "2026-12-01T08:22:00Z"}
    server = FakeMetadata(aws)
    out = tmp_path / "run"
    watch = [
        "preemption.watch=aws",
        "preemption.poll_seconds=0.1",
        f"preemption.metadata_url={server.url}",
        "checkpoint.every_steps=1000",  # none periodic: the notice's is the only one before the end
        "train.max_steps=400",
    ]
    try:
        first = _launch(tmp_path, out, watch, "first")
        try:
            assert wait_until(lambda: bool(committed_steps(out / "checkpoints")) or first.poll() is not None, 120)
            assert first.poll() is None, first.output()
            (noticed,) = committed_steps(out / "checkpoints")
            assert wait_until(lambda: heartbeat_step(out) >= noticed + 5, 60), first.output()
            first.proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the ranks
            first.wait(60)  # the ranks exit 75; the launcher reports 1 (the supervisor reads events.jsonl)
            assert _events(out, "preempt"), first.output()
        finally:
            first.close()
        assert RANK_FILES <= _files(out, noticed)
        assert json.loads((out / NOTICES_FILE).read_text()) == ["aws:rebalance:2026-12-01T08:22:00Z"]
        stopped_at = committed_steps(out / "checkpoints")[-1]
        assert stopped_at > noticed

        # the restarted process sees the same recommendation: no second checkpoint for it
        asked = len(server.requests)
        second = _launch(tmp_path, out, watch, "second")
        try:
            assert second.wait(240) == 0, second.output()
        finally:
            second.close()
    finally:
        server.close()
    assert committed_steps(out / "checkpoints") == [noticed, stopped_at, 400]
    assert len(_events(out, "checkpoint_requested")) == 1
    rebalance = "/latest/meta-data/events/recommendations/rebalance"
    assert any(path == rebalance for _, path, _ in server.requests[asked:])  # it did see the notice again


@pytest.mark.slow
def test_an_eval_longer_than_the_timeouts_is_neither_a_timeout_nor_a_hang(tmp_path):
    # 2 ranks under the supervisor: rank 1 waits for rank 0's eval (~25-40 s on 2 cores) with distributed.timeout_s=8,
    # and the supervisor's hang_timeout is 8 s: the eval beats. (Lower timeouts fail in DDP's own setup collectives
    # on 2 busy cores: tried 2 s.)
    out = tmp_path / "run"
    overrides = (
        TWO_RANKS
        + SLOW_EVAL
        + [
            "train.max_steps=3",
            "checkpoint.every_steps=2",
            "distributed.timeout_s=8",
            "supervisor.hang_timeout=8",
            "eval.max_new_tokens=900",
            "model.builtin.max_position_embeddings=1024",
            "supervisor.num_processes=2",
            "supervisor.accelerate_config=launch/cpu_2proc.yaml",
            "supervisor.max_restarts=0",
        ]
    )
    launch = Launch(cli_args("run", overrides=overrides, output_dir=out), tmp_path / "run.log")
    try:
        rc = launch.wait(240)
    finally:
        launch.close()
    assert rc == 0, launch.output()
    evals = [m for m in read_jsonl(out / "metrics.jsonl") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [3]  # the final eval (one, to keep the test short; the same wait)
    sup = [e for e in _events(out) if e["source"] == "supervisor"]
    assert [e["event"] for e in sup if e["event"] in ("launch", "hang")] == ["launch"]
    assert not _events(out, "eval_interrupted")
    evals_took = [e["seconds"] for e in _events(out, "eval")]
    # longer than both timeouts with a margin, or the test proves nothing (CI's 2 cores took 14 s for 480 tokens)
    assert min(evals_took) > 8 + 4, evals_took


@pytest.mark.slow
def test_a_sigterm_during_eval_ends_it_and_commits_the_last_completed_step(tmp_path):
    out = tmp_path / "run"
    launch = _launch(
        tmp_path,
        out,
        SLOW_EVAL
        + ["train.max_steps=40", "checkpoint.every_steps=4", "eval.every_steps=10", "eval.max_new_tokens=480"],
    )
    try:
        assert wait_until(lambda: _phase(out) == "eval" and heartbeat_step(out) == 10 or launch.poll() is not None, 120)
        assert launch.poll() is None, launch.output()
        time.sleep(0.5)  # well inside the eval (several seconds)
        t0 = time.monotonic()
        launch.proc.send_signal(signal.SIGTERM)
        launch.wait(60)
        took = time.monotonic() - t0
    finally:
        launch.close()
    assert _events(out, "preempt"), launch.output()  # the ranks exit 75; the launcher reports 1
    assert took < 10, took  # within the default 25 s grace; the eval alone takes longer than this
    assert committed_steps(out / "checkpoints")[-1] == 10
    assert RANK_FILES <= _files(out, 10)
    (interrupted,) = _events(out, "eval_interrupted")
    assert interrupted["step"] == 10
    assert not [m for m in read_jsonl(out / "metrics.jsonl") if "eval_loss" in m and m["step"] == 10]


@pytest.mark.slow
def test_nodes_that_do_not_share_the_output_dir_stop_at_once_with_exit_2(tmp_path):
    port = free_port()
    launches = []
    try:
        for rank in (0, 1):
            flags = ["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
            cmd = accelerate_cli(
                "train",
                launch_config="multi_node",
                num_processes=2,
                launch_args=[*flags, "--main_process_port", str(port)],
                overrides=TWO_RANKS,
                output_dir=tmp_path / f"node{rank}",  # a disk of its own on each "machine"
            )
            launches.append(Launch(cmd, tmp_path / f"node{rank}.log"))
        t0 = time.monotonic()
        codes = [launch.wait(120) for launch in launches]
        took = time.monotonic() - t0
    finally:
        for launch in launches:
            launch.close()
    logs = [launch.output() for launch in launches]
    assert all(c != 0 for c in codes), logs
    assert any("a filesystem every node shares" in log for log in logs), logs
    assert took < 90, took  # not the 600 s a commit would wait for the other node's files
    assert not (tmp_path / "node0" / "checkpoints").exists() or not committed_steps(tmp_path / "node0" / "checkpoints")
