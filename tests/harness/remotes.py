"""Helpers for storage tests: committed local checkpoints, direct access to a remote's objects, a stalling network,
a store that refuses expired credentials."""

from __future__ import annotations

import email.utils
import json
import random
import socket
import threading
import time
from pathlib import Path

from tests.harness.s3_server import SeaweedServer


class StallingProxy:
    """A loopback TCP proxy to a server; stall() stops forwarding bytes (a network that goes silent)."""

    def __init__(self, target_port: int):
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
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._serve(client)

    def _serve(self, client: socket.socket) -> None:
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


class ThrottlingProxy(StallingProxy):
    """A loopback TCP proxy that moves at most `bytes_per_s` over all its connections (a slow link)."""

    def __init__(self, target_port: int, bytes_per_s: float):
        self._rate, self._lock = bytes_per_s, threading.Lock()
        self._free_at = time.monotonic()  # when the link is free for the next chunk
        super().__init__(target_port)

    def _take(self, n: int) -> None:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + n / self._rate
            until = self._free_at
        time.sleep(max(0.0, until - time.monotonic()))

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(16384):
                self._take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


EXPIRED_TOKEN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
    b"<Message>The provided token has expired.</Message><RequestId>5NDA2YMK0QS0WX5J</RequestId>"
    b"<HostId>jV2Hp8cBQQDd0fTzDkEmSMYUuc3fbxnxrP4ymQ9hV1GiLQ7+I4r9HgV3q9ZmFfpT0bqk7pVYhHk=</HostId></Error>"
)


class ExpiringProxy(StallingProxy):
    """A loopback proxy to an S3 server; while expire() is on, every request gets the answer S3 documents for an
    expired session token (HTTP 400, `<Code>ExpiredToken</Code>`) instead of reaching the server."""

    def __init__(self, target_port: int):
        self._expired = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # forwarded connections, cut when the credentials expire
        self.refused = 0  # requests answered with ExpiredToken
        super().__init__(target_port)

    def expire(self, on: bool = True) -> None:
        if not on:
            self._expired.clear()
            return
        self._expired.set()
        with self._lock:  # requests in flight and kept-alive connections see it now, as after a real expiry
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self, client: socket.socket) -> None:
        if not self._expired.is_set():
            with self._lock:
                self._open.add(client)
            super()._serve(client)
            return
        threading.Thread(target=self._refuse, args=(client,), daemon=True).start()

    def _refuse(self, client: socket.socket) -> None:
        """Read one request (a body announced with `Expect: 100-continue` is never sent), answer, close."""
        with client, client.makefile("rb") as r:
            head = []
            while (line := r.readline(65537)) not in (b"\r\n", b"\n", b""):
                head.append(line.decode("latin-1").strip())
            if not head:
                return
            fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            if fields.get("expect", "").lower() != "100-continue":
                r.read(int(fields.get("content-length") or 0))
            with self._lock:
                self.refused += 1
            body = b"" if head[0].startswith("HEAD ") else EXPIRED_TOKEN
            date = email.utils.formatdate(usegmt=True)
            client.sendall(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\n"
                b"x-amz-request-id: 5NDA2YMK0QS0WX5J\r\nServer: AmazonS3\r\nConnection: close\r\n"
                + f"Date: {date}\r\nContent-Length: {len(EXPIRED_TOKEN)}\r\n\r\n".encode()
                + body
            )


def make_checkpoint(root: Path, step: int, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A committed local checkpoint dir root/step-XXXXXXXX with random files of the given sizes."""
    from trainer.checkpoint.manifest import build_manifest, write_manifest
    from trainer.run_dir import step_dirname

    sizes = (
        sizes
        if sizes is not None
        else {"model.safetensors": 40_000, "optimizer.safetensors": 80_000, "trainer_state.json": 0}
    )
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
        return sorted(o["Key"][len(self.prefix) + 1 :] for p in pages for o in p.get("Contents", []))

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
