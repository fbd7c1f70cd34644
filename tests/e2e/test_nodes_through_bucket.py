"""Several machines without a shared filesystem (distributed.shared_output_dir=false): two "machines" on loopback,
each with an output dir of its own, meet in a SeaweedFS bucket. Every node uploads its ranks' files, rank 0 commits
the manifest there; after a SIGKILL of both machines, both (or one) start again on empty disks and resume from the
bucket, bitwise as if nothing had happened.

DDP on 2 ranks x 1 micro-batch is bitwise equal to 1 process x 2 micro-batches (tests/e2e/test_multiprocess.py says
why), so an uninterrupted one-process run is the reference for every run here.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.e2e.test_multiprocess import GLOBAL, STEPS, losses, one_process, run_to_end
from tests.e2e.test_remote_training import s3_overrides
from tests.harness.common import accelerate_cli, assert_bitwise_equal, cli_args, free_port, trainable_weights
from tests.harness.launch import Launch
from trainer.remote.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

EVERY = 4
OWN_DIRS = ["distributed.shared_output_dir=false", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process")
    run_to_end(one_process(out), out.parent / f"{out.name}.log")
    return out


def _machines(tmp_path: Path, dirs: list[Path], over: list[str], tag: str) -> list[Launch]:
    port = free_port()
    launches = []
    for rank, out in enumerate(dirs):
        flags = ["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
        flags += ["--main_process_port", str(port)]
        cmd = accelerate_cli(
            "train", launch_config="multi_node", num_processes=2, launch_args=flags, overrides=over, output_dir=out
        )
        launches.append(Launch(cmd, tmp_path / f"{tag}-machine{rank}.log"))
    return launches


def _wait_all(launches: list[Launch], timeout: float = 300) -> list[int]:
    try:
        return [launch.wait(timeout) for launch in launches]
    finally:
        for launch in launches:
            launch.close()


def _kill_after_remote_commit(launches: list[Launch], store, step: int, timeout: float = 240) -> None:
    """SIGKILL every process of both machines once `step` is committed in the bucket (as two dying machines)."""
    deadline = time.monotonic() + timeout
    try:
        while not [s for s in store.committed_steps() if s >= step]:
            for launch in launches:
                assert launch.poll() is None, f"exited ({launch.proc.returncode}) early\n{launch.output()}"
            assert time.monotonic() < deadline, "\n".join(launch.output() for launch in launches)
            time.sleep(0.05)
        for launch in launches:
            launch.signal_all(signal.SIGKILL)
    finally:
        for launch in launches:
            launch.close()


def _events(out: Path, name: str) -> list[dict]:
    return [e for line in (out / "events.jsonl").read_text().splitlines() if (e := json.loads(line))["event"] == name]


def _bucket_weights(store, step: int, where: Path) -> dict:
    return load_file(str(store.pull(step, where) / "model.safetensors"))


def _run_killed(tmp_path, s3_server, over) -> tuple:
    store = open_store(over[0].split("=", 1)[1], s3_server.s3_config())
    first = [tmp_path / "first-node0", tmp_path / "first-node1"]
    _kill_after_remote_commit(_machines(tmp_path, first, over, "first"), store, 2 * EVERY)
    committed = store.committed_steps()
    assert committed and committed[-1] < STEPS, committed
    # each node kept only its own ranks' files; the bucket has the whole checkpoint
    newest = store.get_manifest(committed[-1])
    names = {f.path for f in newest.files}
    assert {"rng-rank00000.json", "rng-rank00001.json", "model.safetensors", "trainer_state.json"} <= names
    node1 = {p.name for p in (first[1] / "checkpoints").rglob("rng-rank*.json")}
    assert "rng-rank00000.json" not in node1, "node 1 holds rank 0's files: its dir is not its own"
    assert newest.world_size == 2
    return store, committed[-1]


def test_two_machines_with_own_dirs_killed_resume_from_the_bucket_bitwise(tmp_path, s3_server, aws_env, reference):
    over = s3_overrides(s3_server, s3_server.bucket()) + GLOBAL + OWN_DIRS
    store, killed_at = _run_killed(tmp_path, s3_server, over)
    again = [tmp_path / "again-node0", tmp_path / "again-node1"]  # new machines: empty disks
    codes = _wait_all(_machines(tmp_path, again, over, "again"))
    assert codes == [0, 0], "\n".join((tmp_path / f"again-machine{r}.log").read_text()[-3000:] for r in (0, 1))
    start = _events(again[0], "train_start")
    assert [e["step"] for e in start] == [killed_at], start
    # node 1 pulled the chosen checkpoint from the bucket into its own dir
    assert (again[1] / "checkpoints" / f"step-{killed_at:08d}" / "manifest.json").is_file()
    assert store.committed_steps()[-1] == STEPS
    assert_bitwise_equal(_bucket_weights(store, STEPS, tmp_path / "check"), trainable_weights(reference, STEPS))
    got, want = losses(again[0]), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))  # every step once: the metrics came back with the checkpoint
    assert [got[s]["loss"] for s in sorted(got)] == [want[s]["loss"] for s in sorted(want)]


def test_two_machines_killed_resume_on_one_machine(tmp_path, s3_server, aws_env, reference):
    over = s3_overrides(s3_server, s3_server.bucket()) + GLOBAL + OWN_DIRS
    store, killed_at = _run_killed(tmp_path, s3_server, over)
    alone = tmp_path / "alone"
    run_to_end(cli_args("train", overrides=over, output_dir=alone), tmp_path / "alone.log")
    assert [e["step"] for e in _events(alone, "train_start")] == [killed_at]
    assert store.committed_steps()[-1] == STEPS
    assert store.get_manifest(STEPS).world_size == 1
    assert_bitwise_equal(trainable_weights(alone, STEPS), trainable_weights(reference, STEPS))


def test_machines_with_different_data_stop_with_one_line(tmp_path):
    # each node reads its own files; a node with other data would train apart (or hang at the end on another step
    # count): every rank stops with the same one-line ConfigError, exit 2
    port, out, launches = free_port(), tmp_path / "run", []
    try:
        for rank, rows in ((0, 256), (1, 320)):
            flags = ["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
            cmd = accelerate_cli(
                "train",
                launch_config="multi_node",
                num_processes=2,
                launch_args=[*flags, "--main_process_port", str(port)],
                overrides=[*GLOBAL, f"data.builtin.num_train={rows}"],
                output_dir=out,
            )
            launches.append(Launch(cmd, tmp_path / f"machine{rank}.log"))
        codes = [launch.wait(240) for launch in launches]
    finally:
        for launch in launches:
            launch.close()
    text = "".join(launch.output() for launch in launches)
    assert all(c != 0 for c in codes), codes
    assert text.count("the ranks disagree on the config or the data") >= 2, text[-3000:]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step-*"))
