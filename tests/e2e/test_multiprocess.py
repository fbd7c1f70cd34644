"""The real trainer CLI under `accelerate launch` on CPU: DDP over gloo, ZeRO-2 + CPU offload, resume on another
process count, and two "machines" on loopback.

Every run here has the same global batch (16 = micro 8 x accumulation 2 on one process, 8 x 1 on each of two), so
the runs can be compared step by step.

Killing a launch: torchrun starts each worker in a session of its own, so a signal to the launcher's process group
does not reach the ranks. `Launch` remembers the workers it has seen and signals every group, as a dying machine
would (SIGKILL), or only the launcher's, as the supervisor does (SIGTERM: torchrun forwards it to the ranks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.harness.common import (
    TINY,
    accelerate_cli,
    assert_bitwise_equal,
    cli_args,
    free_port,
    heartbeat_step,
    trainable_weights,
)
from tests.harness.launch import Launch
from tests.harness.pod import wait_until

pytestmark = pytest.mark.e2e

STEPS = 40  # steps take ~20 ms: long enough that a kill after the step-4 commit lands mid-run
GLOBAL = [o for o in TINY if not o.startswith(("train.grad_accum=", "train.max_steps="))] + [
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    f"train.max_steps={STEPS}",
]
ZERO2 = ["distributed.deepspeed=zero2_offload"]

# Tolerances, measured on this CPU (AVX-512) and stated with margin:
# - DDP, 2 ranks x 1 micro-batch vs 1 process x 2 micro-batches: none. Both sum the same two gradients (a + b
#   commutes) and scale by powers of two (exact), so losses and weights come out bitwise equal (measured: 0),
#   also across a resume on the other process count. With more than 2 ranks the sum order would matter.
# - ZeRO-2 + CPU offload on 1 vs 2 processes: gradients are summed in other buckets and CPU Adam runs on other
#   partitions. Measured over 40 steps: losses within 3e-7 relative (one unit in the 6th decimal that
#   metrics.jsonl rounds to), weights within 6e-8 absolute. Asserted: 1e-5 relative, 1e-6 absolute.
ZERO2_LOSS_RTOL = 1e-5
ZERO2_WEIGHT_ATOL = 1e-6


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_to_end(cmd: list[str], log: Path, timeout: float = 240) -> None:
    launch = Launch(cmd, log)
    try:
        rc = launch.wait(timeout)
    finally:
        launch.close()
    assert rc == 0, f"exit {rc}\n{launch.output()}"


def one_process(out: Path, extra: list[str] = ()) -> list[str]:
    return cli_args("train", overrides=GLOBAL + list(extra), output_dir=out)


def two_processes(out: Path, extra: list[str] = (), launch_config: str = "cpu_2proc") -> list[str]:
    return accelerate_cli("train", launch_config=launch_config, overrides=GLOBAL + list(extra), output_dir=out)


def losses(out: Path) -> dict[int, dict]:
    """metrics.jsonl train lines by step."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "loss" in m}


def events(out: Path, name: str) -> list[dict]:
    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == name]


def state(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())


def committed(out: Path, step: int) -> bool:
    return (out / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists()


def stop_after_checkpoint(launch: Launch, out: Path, step: int, sig: int, timeout: float = 180) -> int:
    """Once checkpoint `step` is committed, send `sig` (SIGKILL: every process; SIGTERM: the launcher's group,
    as the supervisor does). Returns the step the run had reached."""
    deadline = time.monotonic() + timeout
    while not committed(out, step):
        assert launch.poll() is None, f"exited ({launch.proc.returncode}) before checkpoint {step}\n{launch.output()}"
        assert time.monotonic() < deadline, f"checkpoint {step} not committed in {timeout} s\n{launch.output()}"
        time.sleep(0.002)
    reached = heartbeat_step(out)
    if sig == signal.SIGKILL:
        launch.signal_all(sig)
    else:
        os.killpg(launch.proc.pid, sig)
    assert reached < STEPS, f"the run finished before it could be stopped (step {reached}); raise STEPS"
    return reached


def assert_same_losses(got: dict[int, dict], want: dict[int, dict], steps, rtol: float = 0.0) -> None:
    for s in steps:
        a, b = got[s]["loss"], want[s]["loss"]
        assert abs(a - b) <= rtol * abs(b), f"step {s}: loss {a} vs {b} (relative {abs(a - b) / abs(b):.2e} > {rtol})"


# ---------------------------------------------------------------- uninterrupted references


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The same 40 steps on 1 process (python -m trainer) and on 2 (accelerate launch, gloo)."""
    one, two = tmp_path_factory.mktemp("ddp-1proc"), tmp_path_factory.mktemp("ddp-2proc")
    run_to_end(one_process(one), one.parent / f"{one.name}.log")
    run_to_end(two_processes(two), two.parent / f"{two.name}.log")
    return one, two


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    """40 steps of ZeRO-2 + CPU offload on 2 processes, launched with launch/zero2_offload.yaml."""
    out = tmp_path_factory.mktemp("zero2-2proc")
    run_to_end(two_processes(out, ZERO2, "zero2_offload"), out.parent / f"{out.name}.log", timeout=400)
    return out


# ---------------------------------------------------------------- DDP over gloo


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(ddp_runs):
    one, two = ddp_runs
    assert events(two, "train_start")[0]["world_size"] == 2
    for step in range(4, STEPS + 1, 4):
        s = state(two, step)
        assert (s["world_size"], s["grad_accum"], s["global_batch"]) == (2, 1, 16)
        files = {p.name for p in (two / "checkpoints" / f"step-{step:08d}").iterdir()}
        assert {"rng-rank00000.json", "rng-rank00001.json"} <= files, (step, files)
    assert state(one, STEPS)["grad_accum"] == 2 and state(one, STEPS)["world_size"] == 1
    got, want = losses(two), losses(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert_same_losses(got, want, range(1, STEPS + 1))
    assert all(got[s]["tokens"] == want[s]["tokens"] for s in got)  # the same rows, counted over both ranks
    assert_bitwise_equal(trainable_weights(two, STEPS), trainable_weights(one, STEPS))


# ---------------------------------------------------------------- ZeRO-2 + CPU offload


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero2_offload_killed_and_resumed_is_bitwise_exact(tmp_path, zero2_run):
    ref = zero2_run
    assert state(ref, STEPS)["world_size"] == 2
    ckpt = ref / "checkpoints" / f"step-{STEPS:08d}"
    assert {"optimizer-rank00000.safetensors", "optimizer-rank00001.safetensors"} <= {p.name for p in ckpt.iterdir()}
    out = tmp_path / "run"
    launch = Launch(two_processes(out, ZERO2, "zero2_offload"), tmp_path / "killed.log")
    try:
        reached = stop_after_checkpoint(launch, out, 4, signal.SIGKILL)
        assert launch.wait(30) == -signal.SIGKILL
        assert wait_until(lambda: not any(alive(pid) for pid in launch.workers), 10), "a rank outlived the kill"
    finally:
        launch.close()
    assert len(launch.workers) == 2
    run_to_end(two_processes(out, ZERO2, "zero2_offload"), tmp_path / "resumed.log")
    starts = events(out, "train_start")
    assert len(starts) == 2 and 4 <= starts[1]["step"] <= reached and starts[1]["step"] % 4 == 0, (reached, starts)
    assert_bitwise_equal(trainable_weights(out, STEPS), trainable_weights(ref, STEPS))
    assert [m["loss"] for m in losses(out).values()] == [m["loss"] for m in losses(ref).values()]


# ---------------------------------------------------------------- another process count, same global batch


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst:.2e} > {atol}"


def assert_continues(out: Path, ref: Path, resumed_from: int, rtol: float = 0.0) -> None:
    """The resumed run read the data from exactly where it stopped and the loss goes on without a jump."""
    a, b = state(out, STEPS), state(ref, STEPS)
    keys = ("epoch", "epoch_offset", "samples_seen", "tokens_seen")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    got, want = losses(out), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))  # no step lost or repeated in the metrics
    for s in range(resumed_from + 1, STEPS + 1):
        assert (got[s]["samples_seen"], got[s]["epoch"], got[s]["tokens"]) == (
            want[s]["samples_seen"],
            want[s]["epoch"],
            want[s]["tokens"],
        ), s
    assert_same_losses(got, want, range(resumed_from + 1, STEPS + 1), rtol)


@pytest.mark.slow
def test_two_processes_stopped_resume_on_one(tmp_path, ddp_runs):
    out = tmp_path / "run"
    launch = Launch(two_processes(out), tmp_path / "stopped.log")
    try:
        stop_after_checkpoint(launch, out, 4, signal.SIGTERM)  # torchrun forwards it to both ranks
        launch.wait(60)  # the ranks exit 75, torchrun itself 1 (SignalException); the preempt event tells
    finally:
        launch.close()
    (pre,) = events(out, "preempt")
    stopped = pre["step"]
    assert 4 <= stopped < STEPS and state(out, stopped)["world_size"] == 2, launch.output()
    run_to_end(one_process(out), tmp_path / "resumed.log")
    starts = events(out, "train_start")
    assert [(e["step"], e["world_size"]) for e in starts] == [(0, 2), (stopped, 1)]
    assert_continues(out, ddp_runs[1], stopped)
    assert_bitwise_equal(trainable_weights(out, STEPS), trainable_weights(ddp_runs[1], STEPS))


@pytest.mark.slow
def test_one_process_stopped_resumes_on_two(tmp_path, ddp_runs):
    out = tmp_path / "run"
    launch = Launch(one_process(out), tmp_path / "stopped.log")
    try:
        stop_after_checkpoint(launch, out, 4, signal.SIGTERM)
        assert launch.wait(60) == 75, launch.output()
    finally:
        launch.close()
    (pre,) = events(out, "preempt")
    run_to_end(two_processes(out), tmp_path / "resumed.log")
    starts = events(out, "train_start")
    assert [(e["step"], e["world_size"]) for e in starts] == [(0, 1), (pre["step"], 2)]
    assert_continues(out, ddp_runs[0], pre["step"])
    assert_bitwise_equal(trainable_weights(out, STEPS), trainable_weights(ddp_runs[0], STEPS))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero2_partitions_reshard_from_two_processes_to_one_and_back(tmp_path, zero2_run):
    # a fresh machine gets the checkpoint (as if pulled from the remote) and runs another number of processes
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(zero2_run / "checkpoints" / "step-00000008", one / "checkpoints" / "step-00000008")
    run_to_end(one_process(one, ZERO2), tmp_path / "one.log")
    assert [(e["step"], e["world_size"]) for e in events(one, "train_start")] == [(8, 1)]
    assert state(one, STEPS)["grad_accum"] == 2
    assert_continues(one, zero2_run, 8, ZERO2_LOSS_RTOL)
    assert_close_weights(trainable_weights(one, STEPS), trainable_weights(zero2_run, STEPS), ZERO2_WEIGHT_ATOL)

    ckpt = one / "checkpoints" / "step-00000012"
    assert sorted(p.name for p in ckpt.glob("optimizer*")) == [
        "optimizer-rank00000.json",
        "optimizer-rank00000.safetensors",
    ]
    shutil.copytree(ckpt, two / "checkpoints" / ckpt.name)
    run_to_end(two_processes(two, ZERO2, "zero2_offload"), tmp_path / "two.log")
    assert [(e["step"], e["world_size"]) for e in events(two, "train_start")] == [(12, 2)]
    assert_continues(two, zero2_run, 12, ZERO2_LOSS_RTOL)
    assert_close_weights(trainable_weights(two, STEPS), trainable_weights(zero2_run, STEPS), ZERO2_WEIGHT_ATOL)


# ---------------------------------------------------------------- two machines


@pytest.mark.slow
def test_two_machines_one_process_each_on_loopback(tmp_path):
    # Both "machines" share the output dir (distributed.shared_output_dir=true, the default): every rank writes its
    # checkpoint files (rng, ZeRO partitions) into the shared checkpoints/.tmp-step-* dir and rank 0 commits.
    # Machines with a dir each: tests/e2e/test_nodes_through_bucket.py.
    out = tmp_path / "run"
    port = free_port()
    launches = []
    try:
        for rank in (0, 1):
            flags = [
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
            ]
            cmd = accelerate_cli(
                "train",
                launch_config="multi_node",
                num_processes=2,
                launch_args=flags,
                overrides=GLOBAL,
                output_dir=out,
            )
            launches.append(Launch(cmd, tmp_path / f"machine{rank}.log"))
        codes = [launch.wait(240) for launch in launches]
    finally:
        for launch in launches:
            launch.close()
    assert codes == [0, 0], "\n".join(launch.output() for launch in launches)
    assert events(out, "train_start")[0]["world_size"] == 2
    s = state(out, STEPS)
    assert (s["world_size"], s["grad_accum"], s["step"]) == (2, 1, STEPS)
    assert {"rng-rank00000.json", "rng-rank00001.json"} <= {
        p.name for p in (out / "checkpoints" / f"step-{STEPS:08d}").iterdir()
    }
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
