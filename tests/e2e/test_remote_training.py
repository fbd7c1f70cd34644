"""Training against a real S3 server (SeaweedFS): fresh-pod resume, server outage, wrong credentials, credentials that
expire mid-run."""

import json
import shutil
import signal
import time

import pytest

from tests.harness.common import TINY, assert_bitwise_equal, heartbeat_step, run_cli, start_cli, trainable_weights
from tests.harness.remotes import ExpiringProxy
from trainer.remote.store import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LORA = TINY + ["model.method=lora"]


def s3_overrides(server, bucket, prefix="runs/exp", endpoint_url=None):
    return [
        f"checkpoint.remote=s3://{bucket}/{prefix}",
        f"checkpoint.s3.endpoint_url={endpoint_url or server.endpoint_url}",
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


PAUSED = "paused: the credentials were refused"


@pytest.fixture
def expiring_run(tmp_path, s3_server, aws_env):
    """start(*overrides) -> (bucket, proxy, process, output dir, store): 24 steps, a checkpoint every 2, through a
    proxy that can expire the token; returns once the first checkpoint is in the bucket (start and first upload went
    through). The process is killed at teardown if a test left it running."""
    started = []

    def start(*extra):
        bucket, proxy = s3_server.bucket(), ExpiringProxy(s3_server.ports["s3"])
        over = (
            TINY
            + ["train.max_steps=24", "checkpoint.every_steps=2", "checkpoint.keep_last=3"]
            + s3_overrides(s3_server, bucket, endpoint_url=proxy.endpoint_url)
            + list(extra)
        )
        out = tmp_path / "run"
        proc = start_cli("train", overrides=over, output_dir=out)
        started.append((proxy, proc))
        store = open_store(f"s3://{bucket}/runs/exp", s3_server.s3_config())  # past the proxy
        deadline = time.monotonic() + 180
        while not store.committed_steps():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        return bucket, proxy, proc, out, store

    yield start
    for proxy, proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.close()


def test_credentials_expiring_mid_run_pause_uploads_and_training_goes_on(expiring_run, s3_server):
    bucket, proxy, proc, out, store = expiring_run()
    proxy.expire()
    t_on, step_on = time.monotonic(), heartbeat_step(out)
    deadline = t_on + 120
    while proxy.refused < 4 or heartbeat_step(out) < min(step_on + 4, 24):  # several tries, checkpoints meanwhile
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    step_off, expired_s = heartbeat_step(out), time.monotonic() - t_on
    proxy.expire(False)
    assert proc.wait(timeout=240) == 0
    text = proc.stdout.read()

    assert step_off > step_on  # training went on while the uploads were refused
    assert text.count(PAUSED) <= 1 + int(expired_s // 60), text  # one warning a minute, not one a try
    assert PAUSED in text and "ExpiredToken" in text and "training goes on" in text
    assert "resumed after" in text and s3_server.secret_key not in text
    assert store.committed_steps()[-1] == 24 and len(store.committed_steps()) <= 3  # the newest, retention as usual
    assert "final/manifest.json" in _keys(s3_server, bucket)
    events = _events(out)
    names = [e["event"] for e in events]
    assert names.count("upload_paused") == 1 and names.count("upload_resumed") == 1
    paused_at = names.index("upload_paused")
    assert paused_at < names.index("upload_resumed")  # reported once the first upload after the pause went through
    assert 24 in [e["step"] for e in events[paused_at:] if e["event"] == "upload"]


def test_credentials_refused_to_the_end_leave_the_checkpoints_local(expiring_run, s3_server):
    bucket, proxy, proc, out, store = expiring_run("checkpoint.s3.deadline_s=8")
    proxy.expire()
    assert proc.wait(timeout=150) == 0  # the end waits checkpoint.s3.deadline_s for the credentials, not forever
    text = proc.stdout.read()

    events = _events(out)
    last_save = [e["time"] for e in events if e["event"] == "checkpoint" and e["step"] == 24][0]
    end = [e["time"] for e in events if e["event"] == "train_end"][0]
    assert end - last_save < 8 + 12  # deadline_s of waiting (and final/ written), once: not one per wait
    assert text.count(PAUSED) == 1, text
    assert "committed locally and will be uploaded on the next start" in text
    assert "final/ not uploaded" in text
    assert store.committed_steps()[-1] < 24 and "final/manifest.json" not in _keys(s3_server, bucket)
    local = sorted(p.name for p in (out / "checkpoints").glob("step-*") if (p / "manifest.json").exists())
    assert "step-00000024" in local and len(local) >= 3  # nothing that is only local was pruned
    assert (out / "final" / "manifest.json").exists()


def test_a_sigterm_during_the_final_upload_is_a_preemption_and_the_next_start_uploads_final(
    tmp_path, s3_server, aws_env
):
    # a slow link: the end-of-run uploads take seconds, and the stop lands in them
    from tests.harness.remotes import ThrottlingProxy
    from trainer.run_dir import FINAL_DIR

    proxy = ThrottlingProxy(s3_server.ports["s3"], bytes_per_s=150_000)
    bucket = s3_server.bucket()
    over = TINY + ["model.method=full", "checkpoint.every_steps=1000"]
    out = tmp_path / "run"
    try:
        proc = start_cli(
            "train",
            overrides=over + s3_overrides(s3_server, bucket, endpoint_url=proxy.endpoint_url),
            output_dir=out,
        )
        manifest = out / "checkpoints" / "step-00000012" / "manifest.json"
        deadline = time.monotonic() + 120
        while not manifest.exists():  # the last step's checkpoint is committed: its upload and final/'s follow
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.02)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        took = time.monotonic() - t0
        output = proc.stdout.read()
    finally:
        proxy.close()
    assert rc == 75, output
    assert took < 25, took  # within the grace, not after the whole upload
    store = open_store(f"s3://{bucket}/runs/exp", s3_server.s3_config())
    assert f"{FINAL_DIR}/manifest.json" not in store.objects.list(f"{FINAL_DIR}/")  # final/ not committed remotely
    assert [e["status"] for e in _events(out) if e["event"] == "train_end"] == ["preempted"]

    # the next start (a fast link now) finds the run complete, writes final/ again and uploads it with the checkpoint
    p = run_cli("train", overrides=over + s3_overrides(s3_server, bucket), output_dir=out)
    assert "final/ uploaded" in p.stdout
    assert 12 in store.committed_steps()
    assert [e["status"] for e in _events(out) if e["event"] == "train_end"] == ["preempted", "done"]
