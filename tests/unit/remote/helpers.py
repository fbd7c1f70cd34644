"""Helpers for the remote tests: read an object behind a remote directly (proxies: tests/harness/remotes.py)."""

from __future__ import annotations


def read(remote, rel: str) -> bytes:
    """The bytes of one object, read past the store (S3Remote or FileRemote from tests/harness/remotes.py)."""
    if hasattr(remote, "client"):
        return remote.client.get_object(Bucket=remote.bucket, Key=f"{remote.prefix}/{rel}")["Body"].read()
    return (remote.root / rel).read_bytes()
