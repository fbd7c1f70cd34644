"""Remote checkpoint storage (trainer.remote) against a real S3 server (SeaweedFS) and the file:// backend."""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness.remotes import ExpiringProxy, StallingProxy, make_checkpoint
from tests.harness.s3_server import free_ports
from trainer.checkpoint.manifest import Manifest, verify
from trainer.errors import CheckpointError, ConfigError, StorageError
from trainer.remote.objects import CredentialsRefused, StorageUnavailable, UploadInterrupted
from trainer.remote.store import open_store


@pytest.fixture
def store(remote):
    s = open_store(remote.uri, remote.s3_config)
    yield s
    s.close()


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


# ---------------------------------------------------------------- same contract, both backends


def test_round_trip_verifies_every_file(store, remote, tmp_path):
    local = tmp_path / "local"
    c10, c20 = make_checkpoint(local, 10), make_checkpoint(local, 20)
    r10 = store.upload_checkpoint(c10)
    store.upload_checkpoint(c20)

    assert store.committed_steps() == [10, 20]
    assert (r10.step, r10.files_uploaded, r10.bytes_uploaded) == (10, 3, Manifest.load(c10).total_bytes)
    assert store.get_manifest(10).files == Manifest.load(c10).files
    assert store.get_manifest(99) is None
    got = store.download_checkpoint(20, tmp_path / "pulled")
    assert got == tmp_path / "pulled" / "step-00000020"
    assert verify(got) == [] and _same_files(c20, got)
    assert [p.name for p in (tmp_path / "pulled").iterdir()] == ["step-00000020"]  # no temp dir left


def test_interrupted_upload_resumes_and_skips_files_already_there(store, remote, tmp_path):
    ckpt = make_checkpoint(tmp_path / "local", 10)
    store.upload_checkpoint(ckpt)
    # As if the process died mid-upload: no manifest, one file missing, one replaced by other bytes of the same size.
    remote.delete("checkpoints/step-00000010/manifest.json")
    remote.delete("checkpoints/step-00000010/optimizer.safetensors")
    remote.put("checkpoints/step-00000010/model.safetensors", b"x" * 40_000)
    assert store.committed_steps() == []

    result = store.upload_checkpoint(ckpt)

    assert (result.files_uploaded, result.files_skipped) == (2, 1)
    assert result.bytes_uploaded == 120_000
    assert store.committed_steps() == [10]
    assert verify(store.download_checkpoint(10, tmp_path / "pulled")) == []
    assert store.upload_checkpoint(ckpt).bytes_uploaded == 0  # already committed remotely: nothing sent


def test_files_without_manifest_are_not_a_checkpoint(store, remote, tmp_path):
    local = tmp_path / "local"
    store.upload_checkpoint(make_checkpoint(local, 10))
    store.upload_checkpoint(make_checkpoint(local, 20))
    remote.delete("checkpoints/step-00000020/manifest.json")

    assert store.committed_steps() == [10]
    assert store.pull_latest(tmp_path / "pulled") == (10, tmp_path / "pulled" / "step-00000010")
    with pytest.raises(CheckpointError, match="step-00000020/manifest.json: missing"):
        store.download_checkpoint(20, tmp_path / "pulled")


def test_corrupt_object_falls_back_to_previous_checkpoint(store, remote, tmp_path, caplog):
    local = tmp_path / "local"
    store.upload_checkpoint(make_checkpoint(local, 10))
    store.upload_checkpoint(make_checkpoint(local, 20))
    remote.put("checkpoints/step-00000020/optimizer.safetensors", b"\0" * 80_000)  # same size, wrong bytes

    with caplog.at_level(logging.WARNING, logger="trainer.remote"):
        step, path = store.pull_latest(tmp_path / "pulled")

    assert (step, path.name) == (10, "step-00000010") and verify(path) == []
    bad = [r.getMessage() for r in caplog.records if "step-00000020/optimizer.safetensors" in r.getMessage()]
    assert len(bad) == 1 and "sha256 does not match" in bad[0]
    # the partial pull of 20 stays (a retry resumes it); only 10 is committed
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == [".pull-step-00000020", "step-00000010"]


def test_missing_object_names_it(store, remote, tmp_path):
    store.upload_checkpoint(make_checkpoint(tmp_path / "local", 10))
    remote.delete("checkpoints/step-00000010/model.safetensors")

    with pytest.raises(CheckpointError, match=r"step-00000010/model.safetensors: missing") as e:
        store.download_checkpoint(10, tmp_path / "pulled")
    assert remote.uri in str(e.value)
    assert not (tmp_path / "pulled" / "step-00000010").exists()


def test_pull_latest_only_when_newer(store, tmp_path):
    local = tmp_path / "local"
    assert store.pull_latest(tmp_path / "pulled") is None  # empty remote
    store.upload_checkpoint(make_checkpoint(local, 10))
    store.upload_checkpoint(make_checkpoint(local, 20))

    assert store.pull_latest(tmp_path / "pulled", newer_than=20) is None
    assert store.pull_latest(tmp_path / "pulled", newer_than=10)[0] == 20


def test_delete_and_prune(store, remote, tmp_path):
    local = tmp_path / "local"
    for step in (10, 20, 30, 40):
        store.upload_checkpoint(make_checkpoint(local, step))
    remote.delete("checkpoints/step-00000020/manifest.json")  # abandoned partial upload, older than the newest
    remote.put("checkpoints/step-00000050/model.safetensors", b"partial")  # an upload in progress: kept

    store.delete_checkpoint(40)
    assert store.committed_steps() == [10, 30]
    assert store.prune(keep_last=1) == ([10, 20], [])  # (deleted, archived)

    assert store.committed_steps() == [30]
    assert {k.split("/")[1] for k in remote.keys()} == {"step-00000030", "step-00000050"}


def test_upload_dir_puts_manifest_last_and_lists_files(store, remote, tmp_path):
    final = make_checkpoint(tmp_path, 7, sizes={"adapter_model.safetensors": 1000, "tokenizer/vocab.json": 10})
    result = store.upload_dir(final, "final")

    assert result.files_uploaded == 2 and result.step is None
    assert remote.keys() == ["final/adapter_model.safetensors", "final/manifest.json", "final/tokenizer/vocab.json"]


def test_stop_ends_upload_dir_between_files_with_nothing_committed(store, remote, tmp_path):
    final = make_checkpoint(tmp_path, 7, sizes={f"model-{i:02d}.safetensors": 200_000 for i in range(12)})
    asked = []

    def stop() -> bool:  # a SIGTERM once the first file is there
        asked.append(1)
        return any(k.startswith("final/model-") for k in remote.keys())

    with pytest.raises(UploadInterrupted, match=r"upload of final stopped on request .* manifest was not written"):
        store.upload_dir(final, "final", stop=stop)
    assert "final/manifest.json" not in remote.keys() and len(asked) > 1  # asked before and between files
    assert isinstance(UploadInterrupted("x"), StorageUnavailable)  # callers that log a failed upload catch it

    result = store.upload_dir(final, "final")  # later (export, the next start): files already there are skipped
    assert "final/manifest.json" in remote.keys() and result.files_uploaded < 12


def test_uncommitted_local_checkpoint_is_refused(store, tmp_path):
    ckpt = make_checkpoint(tmp_path / "local", 10)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="cannot read manifest"):
        store.upload_checkpoint(ckpt)
    assert store.committed_steps() == []


# ---------------------------------------------------------------- S3 specifics


def test_multipart_upload_for_files_over_the_part_size(s3_server, aws_env, tmp_path):
    bucket = s3_server.bucket()
    store = open_store(f"s3://{bucket}/run", s3_server.s3_config(part_size_mb=5))
    ckpt = make_checkpoint(tmp_path / "local", 10, sizes={"model.safetensors": 5 * 1024 * 1024 + 1000})
    store.upload_checkpoint(ckpt)

    head = s3_server.client().head_object(Bucket=bucket, Key="run/checkpoints/step-00000010/model.safetensors")
    assert head["ETag"].strip('"').endswith("-2")  # two parts
    assert head["Metadata"]["sha256"] == Manifest.load(ckpt).files[0].sha256
    assert _same_files(ckpt, store.download_checkpoint(10, tmp_path / "pulled"))


@pytest.mark.parametrize(
    "key_id, secret, code",
    [("testkey", "not-the-secret", "SignatureDoesNotMatch"), ("AKIANOTAKEY", "testsecret-other", "InvalidAccessKeyId")],
)
def test_wrong_credentials_fail_fast_in_one_line(s3_server, aws_env, tmp_path, caplog, key_id, secret, code):
    bucket = s3_server.bucket()
    aws_env.setenv("AWS_ACCESS_KEY_ID", key_id)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = open_store(f"s3://{bucket}/run", s3_server.s3_config())

    t0 = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(StorageError) as e:  # botocore's debug log included
        store.upload_checkpoint(make_checkpoint(tmp_path, 10))
    assert time.monotonic() - t0 < 5  # not retried
    msg = str(e.value)
    assert msg == (
        f"s3://{bucket}/run: access denied with the credentials from env ({code}); "
        f"check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )
    assert secret not in msg and secret not in caplog.text and secret not in repr(store)
    with pytest.raises(StorageError, match=code):
        store.check()


def test_expired_token_is_refused_credentials_even_on_a_head(s3_server, aws_env, tmp_path):
    proxy = ExpiringProxy(s3_server.ports["s3"])  # S3's documented answer: 400 ExpiredToken (a HEAD: no body)
    store = open_store(f"s3://{s3_server.bucket()}/run", s3_server.s3_config(endpoint_url=proxy.endpoint_url))
    proxy.expire()
    with pytest.raises(CredentialsRefused, match=r"\(ExpiredToken\); refresh the credentials"):
        store.get_manifest(10)  # a GET
    with pytest.raises(CredentialsRefused, match="HTTP 400 without a reason"):
        store.calls.retry("stat", lambda b: store.calls.call(store.objects.sha256, "x", deadline=b.at), None)
    assert issubclass(CredentialsRefused, StorageError)  # fatal at start (exit 2)
    assert proxy.refused <= 3  # not retried (after a bare 400 botocore asks once for the bucket's region)
    proxy.close()


def test_missing_bucket(s3_server, aws_env, tmp_path):
    store = open_store("s3://no-such-bucket-here/run", s3_server.s3_config())
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-here' does not exist at http://127\.0\.0\.1"):
        store.check()
    with pytest.raises(StorageError, match="does not exist"):
        store.upload_checkpoint(make_checkpoint(tmp_path, 10))


def test_no_credentials(s3_server, aws_env):
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no AWS credentials found; set AWS_ACCESS_KEY_ID"):
        open_store("s3://bucket/run", s3_server.s3_config())


def test_bad_uris():
    for uri, hint in [
        ("s3:///run", "give a bucket"),
        ("file://relative/path", "absolute path"),
        ("gs://bucket/x", "must start with s3:// or file://"),
    ]:
        with pytest.raises(ConfigError, match=hint):
            open_store(uri)


def test_dead_endpoint_gives_up_within_the_deadline(aws_env, tmp_path, caplog):
    port = free_ports(1)[0]  # nothing listens there: connection refused
    cfg_deadline = 2.0
    from trainer.config.schema import S3Config

    store = open_store(
        "s3://bucket/run",
        S3Config(endpoint_url=f"http://127.0.0.1:{port}", deadline_s=cfg_deadline, max_attempts=2, connect_timeout_s=1),
    )
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trainer.remote"), pytest.raises(StorageUnavailable) as e:
        store.upload_checkpoint(make_checkpoint(tmp_path, 10))
    assert time.monotonic() - t0 < cfg_deadline + 0.5  # it stops early when the next backoff would pass the deadline
    assert "retrying in" in caplog.text  # it did retry first
    assert str(e.value).startswith("s3://bucket/run: upload of checkpoints/step-00000010 gave up after")


def test_stalled_endpoint_cannot_hold_an_upload_past_the_deadline(aws_env, tmp_path):
    # Accepts connections (the kernel backlog) and never answers: each request would wait read_timeout.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        from trainer.config.schema import S3Config

        store = open_store(
            "s3://bucket/run",
            S3Config(
                endpoint_url=f"http://127.0.0.1:{blackhole.getsockname()[1]}",
                read_timeout_s=4,
                max_attempts=1,
                deadline_s=1.5,
            ),
        )
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable):
            store.upload_checkpoint(make_checkpoint(tmp_path, 10))
        assert time.monotonic() - t0 < 2.5


@pytest.mark.slow  # seconds of outage or stall
def test_upload_survives_server_killed_and_restarted(own_s3_server, aws_env, tmp_path):
    server = own_s3_server
    bucket = server.bucket()
    store = open_store(f"s3://{bucket}/run", server.s3_config(max_concurrency=2, max_attempts=2, deadline_s=60))
    ckpt = make_checkpoint(tmp_path, 10, sizes={f"shard-{i}.bin": 6 * 1024 * 1024 for i in range(8)})
    outcome: dict = {}
    uploader = threading.Thread(target=lambda: outcome.update(result=store.upload_checkpoint(ckpt)))
    uploader.start()
    client = server.client()
    while not client.list_objects_v2(Bucket=bucket, Prefix="run/").get("KeyCount"):  # first file landed
        time.sleep(0.01)
    server.kill()
    killed_mid_upload = uploader.is_alive()
    time.sleep(2)
    server.start()
    uploader.join(timeout=60)

    assert killed_mid_upload
    assert "result" in outcome, "upload did not complete after the restart"
    assert store.committed_steps() == [10]
    assert verify(store.download_checkpoint(10, tmp_path / "pulled")) == []


_UPLOAD_SCRIPT = """
import sys, time
from pathlib import Path
from trainer.config.schema import S3Config
from trainer.remote.objects import CredentialsRefused, StorageUnavailable, UploadInterrupted
from trainer.remote.store import open_store
uri, endpoint, ckpt, deadline = sys.argv[1:]
store = open_store(uri, S3Config(endpoint_url=endpoint, part_size_mb=5, max_concurrency=2, read_timeout_s=60,
                                 max_attempts=2, deadline_s=float(deadline), min_throughput_mb_s=50))
t0 = time.monotonic()
try:
    store.upload_checkpoint(Path(ckpt))
    print("uploaded")
except StorageUnavailable:
    print(f"gave up after {time.monotonic() - t0:.1f}s")
"""


@pytest.mark.slow  # seconds of outage or stall
def test_network_stalling_mid_multipart_neither_hangs_the_upload_nor_the_exit(s3_server, aws_env, tmp_path):
    # The marin#9209 failure: a save stuck in multipart upload with no error. Here the connection goes
    # silent mid-upload (read_timeout 60 s); the upload must give up at its deadline (3 s, + 24 MB at 50 MB/s)
    # and the process exit.
    proxy = StallingProxy(s3_server.ports["s3"])
    bucket = s3_server.bucket()
    ckpt = make_checkpoint(tmp_path, 10, sizes={f"shard-{i}.bin": 6 * 1024 * 1024 for i in range(4)})
    script = tmp_path / "upload.py"
    script.write_text(_UPLOAD_SCRIPT)
    t0 = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, str(script), f"s3://{bucket}/run", proxy.endpoint_url, str(ckpt), "3"],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    client = s3_server.client()
    while not client.list_objects_v2(Bucket=bucket, Prefix="run/").get("KeyCount") and child.poll() is None:
        time.sleep(0.01)
    proxy.stall()
    out, _ = child.communicate(timeout=30)
    proxy.close()

    assert out.startswith("gave up after"), out
    assert time.monotonic() - t0 < 8  # deadline 3 s + interpreter start; read_timeout is 60 s
    assert "run/checkpoints/step-00000010/manifest.json" not in [
        o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/").get("Contents", [])
    ]


class _FakeInstanceMetadata(http.server.BaseHTTPRequestHandler):
    """EC2 instance metadata (IMDSv2) handing out role credentials the server does not know."""

    def do_PUT(self):
        self._send("imds-token" if self.path == "/latest/api/token" else None)

    def do_GET(self):
        base = "/latest/meta-data/iam/security-credentials/"
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        self._send(
            {
                base: "trainer-role",
                base + "trainer-role": json.dumps(
                    {
                        "Code": "Success",
                        "AccessKeyId": "ASIAROLEKEY",
                        "SecretAccessKey": "role-secret-value",
                        "Token": "role-token",
                        "Expiration": expires,
                    }
                ),
            }.get(self.path)
        )

    def _send(self, body):
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write((body or "").encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("source", ["profile", "instance role"])
def test_access_denied_names_the_credential_source(s3_server, aws_env, tmp_path, source, caplog):
    bucket = s3_server.bucket()
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    if source == "profile":
        creds = tmp_path / "credentials"
        creds.write_text("[ci]\naws_access_key_id = testkey\naws_secret_access_key = profile-secret-value\n")
        aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
        aws_env.setenv("AWS_PROFILE", "ci")
        secret, hint = "profile-secret-value", "check the keys of profile 'ci' in ~/.aws/credentials"
    else:
        imds = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeInstanceMetadata)
        threading.Thread(target=imds.serve_forever, daemon=True).start()
        aws_env.setenv("AWS_EC2_METADATA_DISABLED", "false")
        aws_env.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{imds.server_port}/")
        secret, hint = "role-secret-value", "check the IAM role attached to this instance"
    store = open_store(f"s3://{bucket}/run", s3_server.s3_config())
    with caplog.at_level(logging.DEBUG), pytest.raises(StorageError) as e:
        store.check()

    assert str(e.value).startswith(f"s3://{bucket}/run: access denied with the credentials from {source} (")
    assert str(e.value).endswith(hint)
    assert secret not in str(e.value) and secret not in caplog.text
    if source == "instance role":
        imds.shutdown()
