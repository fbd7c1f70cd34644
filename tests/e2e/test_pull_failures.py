"""A fresh pod never trains from step 0 over progress it cannot pull (problem 2 of the lineage issue).

(c) the S3 server is down when the pod starts: no step is trained until it is back, then the remote step resumes
bitwise; when it stays down the trainer exits 69 (resumable). (d) the pod's disk is smaller than the newest remote
checkpoint: one line with the bytes needed and free, exit 69, nothing deleted locally or remotely.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.e2e.test_disk_full import _disk_usage, _run_on_tmpfs, _unshare_ok
from tests.e2e.test_remote_training import s3_overrides
from tests.harness.common import TINY, assert_bitwise_equal, run_cli, start_cli, trainable_weights
from trainer.remote.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LORA = [*TINY, "model.method=lora", "train.max_steps=12", "checkpoint.keep_last=3"]


def test_server_down_at_start_trains_nothing_until_it_is_back(tmp_path, own_s3_server, aws_env):
    server, bucket = own_s3_server, own_s3_server.bucket()
    over = [*LORA, *s3_overrides(server, bucket), "checkpoint.s3.deadline_s=2", "checkpoint.remote_wait_s=120"]
    reference = tmp_path / "reference"
    run_cli("train", overrides=LORA, output_dir=reference)
    first = tmp_path / "pod1"
    proc = start_cli("train", overrides=over, output_dir=first)
    store, deadline = open_store(f"s3://{bucket}/runs/exp", server.s3_config()), time.monotonic() + 120
    while 8 not in store.committed_steps():  # the same schedule as the reference: stopped, not finished, at 8
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    shutil.rmtree(first)  # the pod and its disk are gone
    server.kill()
    out = tmp_path / "pod2"
    proc = start_cli("train", overrides=over, output_dir=out)
    time.sleep(12)  # the check and the first tries of the pull fail meanwhile
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert not (out / "metrics.jsonl").exists() or '"loss"' not in (out / "metrics.jsonl").read_text()
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))
    server.start()
    text = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, text[-3000:]
    assert "pulled checkpoint step 8" in text, text[-3000:]
    assert_bitwise_equal(trainable_weights(out, 12), trainable_weights(reference, 12))


def test_server_that_stays_down_exits_69_without_training(tmp_path, own_s3_server, aws_env):
    server, bucket = own_s3_server, own_s3_server.bucket()
    over = [*LORA, *s3_overrides(server, bucket), "checkpoint.s3.deadline_s=1", "checkpoint.remote_wait_s=3"]
    server.kill()
    out = tmp_path / "pod"
    p = run_cli("train", overrides=over, output_dir=out, check=False, timeout=240)
    assert p.returncode == 69, p.stdout[-2000:] + p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: s3://") and "exiting 69" in last and "--resume never" in last, last
    assert "Traceback" not in p.stderr
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))
    assert not (out / "metrics.jsonl").exists() or '"loss"' not in (out / "metrics.jsonl").read_text()


def test_a_disk_too_small_for_the_remote_checkpoint_exits_69_and_deletes_nothing(tmp_path):
    why = _unshare_ok()
    if why:
        pytest.skip(why)
    remote_dir = tmp_path / "remote"
    over = [
        *TINY,
        "model.method=full",
        "train.max_steps=4",
        "checkpoint.every_steps=4",
        f"checkpoint.remote=file://{remote_dir}",
    ]
    first = tmp_path / "pod1"
    run_cli("train", overrides=over, output_dir=first)
    ckpt = _disk_usage(first / "checkpoints" / "step-00000004")
    rest = _disk_usage(first) - _disk_usage(first / "checkpoints") - _disk_usage(first / "final")
    remote_before = sorted(str(p.relative_to(remote_dir)) for p in remote_dir.rglob("*") if p.is_file())
    shutil.rmtree(first)
    # room for the base model and the tokenization cache, not for the checkpoint
    rc, log = _run_on_tmpfs(
        rest + ckpt // 3,
        tmp_path / "out",
        tmp_path / "keep",
        ["train", *[x for o in [*over, "train.max_steps=8"] for x in ("--set", o)]],
    )
    assert rc == 69, log[-3000:]
    assert "Traceback" not in log
    line = [ln for ln in log.splitlines() if ln.startswith("error:")][-1]
    assert "step-00000004" in line and "needs" in line and "free" in line and "nothing was deleted" in line, line
    assert '"loss"' not in (
        Path(tmp_path / "keep" / "metrics.jsonl").read_text() if (tmp_path / "keep" / "metrics.jsonl").exists() else ""
    )
    after = sorted(str(p.relative_to(remote_dir)) for p in remote_dir.rglob("*") if p.is_file())
    assert after == remote_before  # nothing deleted remotely
    assert open_store(f"file://{remote_dir}").committed_steps() == [4]
