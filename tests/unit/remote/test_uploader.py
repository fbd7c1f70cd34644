"""The background checkpoint uploader: ordering, retention, resume of pending uploads, failures, paused uploads while
the credentials are refused, stop()."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from tests.harness.remotes import ExpiringProxy, ThrottlingProxy, make_checkpoint
from trainer.checkpoint.manifest import Manifest, write_manifest
from trainer.config.schema import S3Config
from trainer.errors import CheckpointError, StorageError
from trainer.remote import uploader as uploader_lib
from trainer.remote.objects import StorageUnavailable, UploadInterrupted
from trainer.remote.store import open_store
from trainer.remote.uploader import CheckpointUploader


@pytest.fixture
def store(remote):
    s = open_store(remote.uri, remote.s3_config)
    yield s
    s.close()


@pytest.fixture
def blackhole():
    """A TCP endpoint that accepts connections (kernel backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _stalled_store(endpoint: str, deadline_s: float):
    return open_store(
        "s3://bucket/run", S3Config(endpoint_url=endpoint, read_timeout_s=3, max_attempts=1, deadline_s=deadline_s)
    )


def test_uploads_and_reports_each(store, tmp_path):  # the order: test_g_newest_queued_checkpoint_goes_first
    reported = []
    uploader = CheckpointUploader(store, on_uploaded=lambda *a: reported.append(a))
    c10, c20 = make_checkpoint(tmp_path, 10), make_checkpoint(tmp_path, 20)
    uploader.submit(c10)
    uploader.submit(c20)

    assert uploader.wait(timeout=30)
    assert store.committed_steps() == [10, 20]
    assert {r[0]: r[2] for r in reported} == {10: Manifest.load(c10).total_bytes, 20: Manifest.load(c20).total_bytes}
    assert len(reported) == 2
    assert all(seconds > 0 for _, seconds, _ in reported)
    assert uploader.in_flight is None and uploader.pending_steps == [] and uploader.last_error is None
    assert uploader.close(timeout=5)


def test_final_dir_uploaded_beside_the_uploader_survives_its_retention(store, remote, tmp_path):
    # The trainer uploads final/ itself (RemoteStore.upload_dir, after uploader.wait()); retention and archiving
    # of checkpoints never touch it.
    uploader = CheckpointUploader(store, keep_last=1)
    uploader.submit(make_checkpoint(tmp_path / "checkpoints", 10))
    assert uploader.wait(timeout=30)
    store.upload_dir(make_checkpoint(tmp_path, 10, sizes={"adapter_model.safetensors": 500}), "final")
    uploader.submit(make_checkpoint(tmp_path / "checkpoints", 20))
    assert uploader.wait(timeout=30)

    assert store.committed_steps() == [20]
    assert [k for k in remote.keys() if k.startswith("final/")] == [
        "final/adapter_model.safetensors",
        "final/manifest.json",
    ]
    uploader.close()


def test_g_newest_queued_checkpoint_goes_first(store, tmp_path):
    uploaded, gate = [], threading.Event()
    upload = store.upload_checkpoint

    def held(ckpt_dir, deadline=None, stop=None):  # the first upload takes a while: the others queue behind it
        if not uploaded:
            gate.wait(30)
        uploaded.append(int(ckpt_dir.name[5:]))
        return upload(ckpt_dir, deadline, stop)

    store.upload_checkpoint = held
    uploader = CheckpointUploader(store)
    uploader.submit(make_checkpoint(tmp_path, 10))
    while uploader.in_flight != 10:
        time.sleep(0.01)
    for step in (20, 30, 40):
        uploader.submit(make_checkpoint(tmp_path, step))
    emergency = make_checkpoint(tmp_path, 45)  # the preemption's: its upload must not wait behind 20, 30, 40
    m = Manifest.load(emergency)
    m.kind = "emergency"
    write_manifest(emergency, m)
    uploader.submit(emergency)
    gate.set()

    assert uploader.wait(timeout=30)
    assert uploaded == [10, 45, 40, 30, 20]
    assert store.committed_steps() == [10, 20, 30, 40, 45]
    uploader.close(timeout=5)


def test_remote_retention_keeps_the_newest(store, remote, tmp_path):
    uploader = CheckpointUploader(store, keep_last=2)
    for step in (10, 20, 30, 40):
        uploader.submit(make_checkpoint(tmp_path, step))
        assert uploader.wait(timeout=30)

    assert store.committed_steps() == [30, 40]
    assert {k.split("/")[1] for k in remote.keys()} == {"step-00000030", "step-00000040"}
    uploader.close(timeout=5)


def test_retention_waits_for_a_newer_remote_commit(store, tmp_path):
    uploader = CheckpointUploader(store, keep_last=1)
    uploader.submit(make_checkpoint(tmp_path, 10))
    assert uploader.wait(timeout=30)
    broken = make_checkpoint(tmp_path, 20)
    (broken / "model.safetensors").write_bytes(b"truncated")  # not what its manifest says: never uploaded

    uploader.submit(broken)
    assert uploader.wait(timeout=30)

    assert store.committed_steps() == [10]  # the only remote checkpoint survives
    assert isinstance(uploader.last_error, CheckpointError) and "model.safetensors" in str(uploader.last_error)
    uploader.close(timeout=5)


def test_sync_pending_uploads_local_checkpoints_missing_remotely(store, tmp_path):
    root = tmp_path / "checkpoints"
    store.upload_checkpoint(make_checkpoint(root, 10))
    for step in (10, 20, 30):
        if step != 10:
            make_checkpoint(root, step)
    (root / ".tmp-step-00000040-123").mkdir()  # being written when the process died
    (make_checkpoint(root, 50) / "manifest.json").unlink()  # not committed locally

    uploader = CheckpointUploader(store)
    uploader.sync_pending(root)
    assert uploader.wait(timeout=30)

    assert store.committed_steps() == [10, 20, 30]
    uploader.close(timeout=5)


def test_non_retryable_error_is_raised_at_the_next_check(s3_server, aws_env, tmp_path):
    store = open_store("s3://no-such-bucket-here/run", s3_server.s3_config())  # refused credentials pause instead
    uploader = CheckpointUploader(store)
    uploader.submit(make_checkpoint(tmp_path, 10))

    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-here' does not exist"):
        uploader.wait(timeout=30)
    assert isinstance(uploader.last_error, StorageError)
    uploader.submit(make_checkpoint(tmp_path, 20))  # reported once: the caller decided what to do
    uploader.close(timeout=10)


@pytest.mark.slow  # a server of its own, killed and restarted
def test_outage_keeps_checkpoint_local_and_retries_with_the_next(own_s3_server, aws_env, tmp_path, caplog):
    server = own_s3_server
    bucket = server.bucket()
    store = open_store(f"s3://{bucket}/run", server.s3_config(deadline_s=2.0, max_attempts=1))
    uploader = CheckpointUploader(store, keep_last=3)
    server.kill()

    with caplog.at_level(logging.WARNING, logger="trainer.remote.uploader"):
        uploader.submit(make_checkpoint(tmp_path, 10))
        assert uploader.wait(timeout=30)
    assert isinstance(uploader.last_error, StorageUnavailable)
    assert "checkpoint step 10: upload gave up" in caplog.text
    assert uploader.pending_steps == [10]  # parked: local pruning must keep it

    server.start()
    uploader.submit(make_checkpoint(tmp_path, 20))
    assert uploader.wait(timeout=30)
    assert store.committed_steps() == [10, 20] and uploader.pending_steps == []
    uploader.close(timeout=5)


def test_in_flight_step_while_the_endpoint_stalls(blackhole, aws_env, tmp_path):
    uploader = CheckpointUploader(_stalled_store(blackhole, deadline_s=2.0))
    t0 = time.monotonic()
    uploader.submit(make_checkpoint(tmp_path, 10))
    assert time.monotonic() - t0 < 0.5  # submit never waits for the network
    deadline = time.monotonic() + 1.0
    while uploader.in_flight is None and time.monotonic() < deadline:
        time.sleep(0.01)

    assert uploader.in_flight == 10 and uploader.pending_steps == [10]
    assert uploader.wait(timeout=10)
    assert uploader.in_flight is None and isinstance(uploader.last_error, StorageUnavailable)
    uploader.close(timeout=1)


def test_close_aborts_a_stalled_upload(blackhole, aws_env, tmp_path):
    uploader = CheckpointUploader(_stalled_store(blackhole, deadline_s=60.0))
    uploader.submit(make_checkpoint(tmp_path, 10))

    while uploader.in_flight != 10:
        time.sleep(0.01)
    t0 = time.monotonic()
    assert uploader.close() is False  # by default close() does not wait: wait() is for waiting
    assert time.monotonic() - t0 < 1.0
    assert uploader.pending_steps == [10]


def test_queue_skips_checkpoints_retention_would_delete(blackhole, aws_env, tmp_path):
    uploader = CheckpointUploader(_stalled_store(blackhole, deadline_s=60.0), keep_last=2)
    uploader.submit(make_checkpoint(tmp_path, 10))
    while uploader.in_flight != 10:
        time.sleep(0.01)
    for step in (20, 30, 40, 50):  # wait behind the stalled upload of 10
        uploader.submit(make_checkpoint(tmp_path, step))
    assert uploader.pending_steps == [10, 40, 50]
    uploader.close(timeout=0.2)


# ---------------------------------------------------------------- credentials refused after the start


@pytest.fixture
def expiring(s3_server, aws_env, monkeypatch):
    """(store, proxy): a store on the session server through an ExpiringProxy; retries while paused every 0.2-0.4 s."""
    monkeypatch.setattr(uploader_lib, "PAUSE_RETRY_S", (0.2, 0.4))
    proxy = ExpiringProxy(s3_server.ports["s3"])
    store = open_store(
        f"s3://{s3_server.bucket()}/run", s3_server.s3_config(endpoint_url=proxy.endpoint_url, deadline_s=2.0)
    )
    yield store, proxy
    store.close()
    proxy.close()


def _paused_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "paused: the credentials were refused" in r.getMessage()]


def test_refused_credentials_pause_uploads_until_they_work_again(expiring, tmp_path, caplog):
    store, proxy = expiring
    events = []
    uploader = CheckpointUploader(store, keep_last=3, on_event=lambda name, **f: events.append((name, f)))
    uploader.submit(make_checkpoint(tmp_path, 10))
    assert uploader.wait(timeout=30)

    proxy.expire()
    with caplog.at_level(logging.WARNING, logger="trainer.remote.uploader"):
        uploader.submit(make_checkpoint(tmp_path, 20))
        deadline = time.monotonic() + 20
        while proxy.refused < 5:  # several tries, well inside one minute
            assert time.monotonic() < deadline
            time.sleep(0.05)
        uploader.submit(make_checkpoint(tmp_path, 30))  # training goes on: submit neither raises nor waits
        assert uploader.paused and uploader.pending_steps == [20, 30]  # local retention keeps both
        uploader.raise_if_failed()
        assert len(_paused_warnings(caplog)) == 1, _paused_warnings(caplog)
        assert "ExpiredToken" in _paused_warnings(caplog)[0] and "training goes on" in _paused_warnings(caplog)[0]

        proxy.expire(False)
        assert uploader.wait(timeout=30)
    assert store.committed_steps() == [10, 20, 30]
    assert not uploader.paused and uploader.pending_steps == []
    assert "uploads to s3://" in caplog.text and "resumed after" in caplog.text
    assert [name for name, _ in events] == ["upload_paused", "upload_resumed"]
    assert "ExpiredToken" in events[0][1]["error"] and events[0][1]["pending"] == [20]
    uploader.close(timeout=5)


def test_new_keys_in_the_profile_file_are_picked_up(s3_server, aws_env, tmp_path, monkeypatch):
    monkeypatch.setattr(uploader_lib, "PAUSE_RETRY_S", (0.2, 0.4))
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = testkey\naws_secret_access_key = revoked-secret\n")
    aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    store = open_store(f"s3://{s3_server.bucket()}/run", s3_server.s3_config())  # keys read once per client
    uploader = CheckpointUploader(store)
    uploader.submit(make_checkpoint(tmp_path / "ckpts", 10))
    deadline = time.monotonic() + 20
    while not uploader.paused:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    creds.write_text(f"[default]\naws_access_key_id = testkey\naws_secret_access_key = {s3_server.secret_key}\n")
    assert uploader.wait(timeout=20)  # a new client, signing with the rotated keys
    assert store.committed_steps() == [10] and not uploader.paused
    uploader.close(timeout=5)


def test_waiting_on_paused_uploads_ends_after_the_remote_deadline(expiring, tmp_path, caplog):
    store, proxy = expiring  # checkpoint.s3.deadline_s = 2
    proxy.expire()
    uploader = CheckpointUploader(store)
    uploader.submit(make_checkpoint(tmp_path, 10))

    t0 = time.monotonic()
    assert uploader.wait(timeout=30) is False
    assert 1.5 < time.monotonic() - t0 < 4  # the deadline, not the 30 s asked for, and not forever
    assert uploader.paused and uploader.gave_up_waiting
    assert uploader.pending_steps == [10]  # still local, uploaded on the next start
    assert uploader.wait(timeout=30) is False and time.monotonic() - t0 < 5  # the same pause: no new wait
    uploader.close(timeout=0)


# ---------------------------------------------------------------- stop(): ends an upload between files


def test_stop_ends_an_upload_between_files_but_never_an_emergency_one(s3_server, aws_env, tmp_path):
    proxy = ThrottlingProxy(s3_server.ports["s3"], bytes_per_s=2e6)
    bucket = s3_server.bucket()
    store = open_store(f"s3://{bucket}/run", s3_server.s3_config(endpoint_url=proxy.endpoint_url, max_concurrency=1))
    direct = s3_server.client()
    stop = threading.Event()
    uploader = CheckpointUploader(store, stop=stop.is_set)
    shards = {f"shard-{i}.bin": 400_000 for i in range(8)}  # 3.2 MB at 2 MB/s: about 1.6 s
    uploader.submit(make_checkpoint(tmp_path, 10, sizes=shards))
    deadline = time.monotonic() + 20
    while not direct.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/step-00000010/").get("KeyCount"):
        assert time.monotonic() < deadline
        time.sleep(0.02)

    t0 = time.monotonic()
    stop.set()  # e.g. SIGTERM
    assert uploader.wait(timeout=10)
    assert time.monotonic() - t0 < 1.0  # not the rest of the upload
    assert isinstance(uploader.last_error, UploadInterrupted)
    assert uploader.pending_steps == [10]  # parked: stays local
    keys = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket, Prefix="run/").get("Contents", [])]
    assert "run/checkpoints/step-00000010/manifest.json" not in keys and len(keys) < len(shards)
    assert store.committed_steps() == []

    emergency = make_checkpoint(tmp_path, 15)
    m = Manifest.load(emergency)
    m.kind = "emergency"
    write_manifest(emergency, m)
    uploader.submit(emergency)
    assert uploader.wait(timeout=30)
    assert store.committed_steps() == [15]  # uploaded although stop() is set; 10 stopped again at once
    assert uploader.pending_steps == [10]
    uploader.close(timeout=5)
    proxy.close()
