"""Training against a real S3 server (SeaweedFS): fresh-pod resume, server outage, wrong credentials."""

import json
import shutil
import signal
import time

import pytest

from tests.harness.common import TINY, assert_bitwise_equal, heartbeat_step, run_cli, start_cli, trainable_weights
from trainer.remote.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LORA = TINY + ["model.method=lora"]


def s3_overrides(server, bucket, prefix="runs/exp"):
    return [
        f"checkpoint.remote=s3://{bucket}/{prefix}",
        f"checkpoint.s3.endpoint_url={server.endpoint_url}",
        "checkpoint.s3.region=us-east-1",
        "checkpoint.s3.addressing_style=path",
        "checkpoint.s3.connect_timeout_s=2",
        "checkpoint.s3.read_timeout_s=10",
        "checkpoint.s3.deadline_s=60",
    ]


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run_cli("train", overrides=LORA, output_dir=d)
    return trainable_weights(d, 12)


def _events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_fresh_pod_pulls_remote_and_resumes_bitwise(tmp_path, s3_server, aws_env, lora_reference):
    bucket = s3_server.bucket()
    over = LORA + s3_overrides(s3_server, bucket)
    out = tmp_path / "pod1"
    proc = start_cli("train", overrides=over, output_dir=out)
    store = open_store(f"s3://{bucket}/runs/exp", s3_server.s3_config())
    deadline = time.monotonic() + 120
    while 8 not in store.committed_steps():  # wait for step 8 to be committed remotely
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.rmtree(out)  # the pod and its disk are gone
    out2 = tmp_path / "pod2"
    p = run_cli("train", overrides=over, output_dir=out2)
    assert "pulled checkpoint step" in p.stdout
    start = [e for e in _events(out2) if e["event"] == "train_start"][0]
    assert start["step"] >= 8
    assert_bitwise_equal(trainable_weights(out2, 12), lora_reference)
    assert 12 in store.committed_steps()
    assert store.get_manifest(12).kind == "final"
    # metrics came back from the checkpoint: complete, no duplicates
    steps = [
        json.loads(line)["step"]
        for line in (out2 / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, 13))


def test_server_outage_during_training_does_not_stop_it(tmp_path, own_s3_server, aws_env):
    server = own_s3_server
    bucket = server.bucket()
    over = (
        TINY
        + ["model.method=full", "train.max_steps=24", "checkpoint.every_steps=2", "checkpoint.keep_last=3"]
        + s3_overrides(server, bucket)
    )
    out = tmp_path / "run"
    proc = start_cli("train", overrides=over, output_dir=out)
    deadline = time.monotonic() + 120
    while heartbeat_step(out) < 4:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    server.kill()
    step_at_kill = heartbeat_step(out)
    time.sleep(3)
    step_during_outage = heartbeat_step(out)
    server.start()
    assert proc.wait(timeout=180) == 0, proc.stdout.read()
    # training went on while the server was down, and the newest checkpoints reached the bucket afterwards
    assert step_during_outage > step_at_kill
    store = open_store(f"s3://{bucket}/runs/exp", server.s3_config())
    assert store.committed_steps()[-1] == 24
    assert len(store.committed_steps()) <= 3  # remote retention
    assert "final/manifest.json" in {k for k in _keys(server, bucket)}


def _keys(server, bucket):
    c = server.client()
    listing = c.list_objects_v2(Bucket=bucket, Prefix="runs/exp/").get("Contents", [])
    return [o["Key"][len("runs/exp/") :] for o in listing]


def test_wrong_credentials_one_line_exit_2_nothing_lost(tmp_path, s3_server, aws_env):
    out = tmp_path / "run"
    run_cli("train", overrides=TINY + ["train.max_steps=4"], output_dir=out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print")
    p = run_cli(
        "train",
        overrides=TINY + ["train.max_steps=8"] + s3_overrides(s3_server, s3_server.bucket()),
        output_dir=out,
        check=False,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: s3://"), p.stderr
    assert "wrong-secret-do-not-print" not in p.stdout + p.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
