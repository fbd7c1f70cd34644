"""Helpers for the remote tests: read an object behind a remote directly; a loopback proxy that throttles."""

from __future__ import annotations

import socket
import threading
import time


def read(remote, rel: str) -> bytes:
    """The bytes of one object, read past the store (S3Remote or FileRemote from tests/harness/remotes.py)."""
    if hasattr(remote, "client"):
        return remote.client.get_object(Bucket=remote.bucket, Key=f"{remote.prefix}/{rel}")["Body"].read()
    return (remote.root / rel).read_bytes()


class ThrottlingProxy:
    """A loopback TCP proxy to a server that moves at most `bytes_per_s` over all its connections (a slow link)."""

    def __init__(self, target_port: int, bytes_per_s: float):
        self._target, self._rate = target_port, bytes_per_s
        self._lock = threading.Lock()
        self._free_at = time.monotonic()  # when the link is free for the next chunk
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.endpoint_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

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
