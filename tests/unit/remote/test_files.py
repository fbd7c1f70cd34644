"""The file:// backend under deadlines: a remote path whose open() never returns (a FIFO without a peer, as a hung
NFS mount behaves) costs an operation its deadline, never the caller's thread or the process's exit."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.remotes import make_checkpoint
from trainer.config.schema import S3Config
from trainer.remote.objects import StorageUnavailable
from trainer.remote.store import open_store

DEADLINE_S = 1.0
SLACK_S = 1.0  # thread start, polling (50 ms) and the Python around it


@pytest.fixture
def hung(tmp_path):
    """make(path): a FIFO there (open() on it blocks until a peer opens the other end). At teardown every FIFO
    gets a writer that closes at once, so the threads stuck on them see EOF and end."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        return path

    yield make
    for p in made:
        with contextlib.suppress(OSError):  # ENXIO: no reader (nothing stuck on it)
            os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))


def _store(root: Path, deadline_s: float = DEADLINE_S, min_throughput_mb_s: float = 1.0):
    return open_store(f"file://{root}", S3Config(deadline_s=deadline_s, min_throughput_mb_s=min_throughput_mb_s))


def test_read_of_a_hung_object_gives_up_at_the_deadline(tmp_path, hung):
    root = tmp_path / "remote"
    hung(root / "checkpoints/step-00000010/manifest.json")
    store = _store(root)

    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match="read of checkpoints/step-00000010/manifest.json gave up"):
        store.get_manifest(10)
    assert time.monotonic() - t0 < DEADLINE_S + SLACK_S


def test_upload_to_a_hung_directory_gives_up_at_the_deadline(tmp_path, hung):
    root = tmp_path / "remote"
    hung(root / "checkpoints/step-00000010/manifest.json")  # the upload reads the remote manifest first
    store = _store(root)

    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match="upload of checkpoints/step-00000010 gave up"):
        store.upload_checkpoint(make_checkpoint(tmp_path / "local", 10))
    assert time.monotonic() - t0 < DEADLINE_S + SLACK_S


def test_download_deadline_scales_with_size_and_stuck_workers_are_left_behind(tmp_path, hung):
    root, local = tmp_path / "remote", tmp_path / "local"
    store = _store(root, min_throughput_mb_s=2.0)
    sizes = {f"shard-{i}.bin": 1_000_000 for i in range(6)}  # more files than transfer workers
    store.upload_checkpoint(make_checkpoint(local / "src", 10, sizes=sizes))
    store.upload_checkpoint(make_checkpoint(local / "src", 20, sizes={"model.safetensors": 1000}))
    for name in sizes:  # every object of step 10 hangs on open
        (root / "checkpoints/step-00000010" / name).unlink()
        hung(root / "checkpoints/step-00000010" / name)

    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match="download of checkpoints/step-00000010 gave up"):
        store.pull(10, local / "dest")
    took = time.monotonic() - t0
    # 6 MB at 2 MB/s on top of deadline_s: the first shard's own deadline is 1 + 0.5 s, the operation's 1 + 3 s
    assert DEADLINE_S + 0.4 < took < DEADLINE_S + 3.0 + SLACK_S, took

    # the workers stuck in open() are abandoned: the next transfer gets fresh ones
    t0 = time.monotonic()
    assert store.pull(20, local / "dest") == local / "dest/step-00000020"
    assert time.monotonic() - t0 < DEADLINE_S


_SCRIPT = """
import sys, time
from trainer.config.schema import S3Config
from trainer.remote.objects import StorageUnavailable
from trainer.remote.store import open_store

store = open_store("file://" + sys.argv[1], S3Config(deadline_s=1.0))
try:
    store.get_manifest(10)
except StorageUnavailable as e:
    print("gave up:", e, flush=True)
"""


def test_process_exits_with_a_thread_stuck_in_the_mount(tmp_path, hung):
    root = tmp_path / "remote"
    hung(root / "checkpoints/step-00000010/manifest.json")

    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("gave up:"), p.stdout + p.stderr
    assert time.monotonic() - t0 < 20  # the interpreter's start, 1 s of deadline, and no wait for the stuck thread
