"""A real S3-compatible server on loopback for tests and chaos runs: SeaweedFS `weed mini`, started by PID.

Used by tests/conftest.py (fixtures s3_server, own_s3_server), scripts/chaos.py and the upload benchmarks.
kill() is an outage without a clean shutdown; start() again brings it back on the same data dir and ports.
"""

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
        self.identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tester",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self.proc: subprocess.Popen | None = None
        self._pick_ports()

    def _pick_ports(self) -> None:
        # HTTP and gRPC ports given explicitly (gRPC would default to HTTP + 10000, which may be taken).
        ports = free_ports(2 * len(_PORTS))
        self.ports = dict(zip(_PORTS, ports[: len(_PORTS)], strict=True))
        self.grpc_ports = dict(zip(_PORTS, ports[len(_PORTS) :], strict=True))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"

    def _command(self) -> list[str]:
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.config={self.identities}",
        ]
        for name in _PORTS:
            cmd += [f"-{name}.port={self.ports[name]}", f"-{name}.port.grpc={self.grpc_ports[name]}"]
        return cmd

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart, same data dir and ports) and wait until it accepts writes."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = dict(os.environ, OMP_NUM_THREADS="1", GOMAXPROCS="2")
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True
            )
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
                    raise RuntimeError(
                        f"weed mini not ready on {self.endpoint_url} ({type(e).__name__}: {e}); "
                        f"log {self.log_path}:\n" + "\n".join(lines[:12] + ["..."] + lines[-12:])
                    ) from e
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

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def aws_env(self, base: dict | None = None) -> dict:
        """`base` (default os.environ) whose only AWS credentials are this server's: no ~/.aws files, no metadata."""
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_CA_BUNDLE")
        }
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            AWS_SHARED_CREDENTIALS_FILE=str(self.workdir / "no-aws-credentials"),
            AWS_CONFIG_FILE=str(self.workdir / "no-aws-config"),
        )
        return env

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"total_max_attempts": 1},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def s3_config(self, **overrides):
        """An S3Config for this server with test-sized timeouts and parts."""
        from trainer.config.schema import S3Config

        values = dict(
            endpoint_url=self.endpoint_url,
            region="us-east-1",
            addressing_style="path",
            part_size_mb=5,
            max_concurrency=4,
            connect_timeout_s=2.0,
            read_timeout_s=10.0,
            max_attempts=3,
            deadline_s=30.0,
        )
        values.update(overrides)
        return S3Config(**values)
