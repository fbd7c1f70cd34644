"""The sizes a remote manifest declares are checked before anything is downloaded: against the free space here,
against the objects themselves, and for plausibility (a manifest from a bucket someone else can write)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.common import REPO
from tests.harness.remotes import FileRemote, make_checkpoint
from trainer.errors import EXIT_STORAGE, CorruptCheckpoint
from trainer.remote.store import open_store


@pytest.fixture
def two_steps(tmp_path):
    """A file:// remote with committed steps 4 and 8 (and the store)."""
    remote = FileRemote(tmp_path / "bucket")
    store = open_store(remote.uri)
    for s in (4, 8):
        store.upload_checkpoint(make_checkpoint(tmp_path / "local", s))
    return remote, store


def _declare(remote: FileRemote, step: int, path: str, size: int) -> None:
    rel = f"checkpoints/step-{step:08d}/manifest.json"
    m = json.loads((remote.root / rel).read_text())
    for f in m["files"]:
        if f["path"] == path:
            f["size"] = size
    (remote.root / rel).write_text(json.dumps(m))


_PULL_IN = """
import json, sys
from pathlib import Path
from trainer.remote.store import open_store
dest, out = Path(sys.argv[2]), {}
try:
    open_store(sys.argv[1]).pull(8, dest)
    out["ok"] = True
except Exception as e:
    out.update(type=type(e).__name__, message=str(e), needed=getattr(e, "needed", None),
               free=getattr(e, "free", None), exit_code=getattr(e, "exit_code", None))
out["bytes_here"] = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
print("RESULT " + json.dumps(out))
"""


def _pull_into_small_disk(uri: str, tmp_path: Path, size: str) -> dict:
    """Pull step 8 into a real tmpfs of `size` (a private user + mount namespace), so that even a broken check can
    fill only that, never the machine's disk."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot make a private tmpfs (unshare -rm)")
    dest = tmp_path / "small-disk"
    dest.mkdir()
    (tmp_path / "pull.py").write_text(_PULL_IN)
    cmd = (
        f"mount -t tmpfs -o size={size} tmpfs '{dest}' && '{sys.executable}' '{tmp_path / 'pull.py'}' '{uri}' '{dest}'"
    )
    p = subprocess.run(
        ["unshare", "-rm", "sh", "-c", cmd],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, p.stdout + p.stderr
    return json.loads(lines[0][len("RESULT ") :])


def test_a_checkpoint_declaring_more_than_the_free_space_is_refused_before_downloading(two_steps, tmp_path):
    remote, _ = two_steps
    huge = 1 << 40  # 1 TiB, and really that big: a sparse object on the remote side
    with open(remote.root / "checkpoints/step-00000008/model.safetensors", "r+b") as f:
        f.truncate(huge)
    _declare(remote, 8, "model.safetensors", huge)

    t0 = time.monotonic()
    out = _pull_into_small_disk(remote.uri, tmp_path, "2m")

    assert time.monotonic() - t0 < 60
    assert out.get("type") == "InsufficientSpace" and out["exit_code"] == EXIT_STORAGE, out
    assert out["needed"] > huge > out["free"]
    msg = out["message"]
    assert msg.startswith(f"pulling {remote.uri}/checkpoints/step-00000008 needs 1.0 TiB, ") and "\n" not in msg
    assert msg.endswith("free space or point --output-dir at a larger disk; nothing was deleted")
    assert out["bytes_here"] == 0  # nothing downloaded


@pytest.mark.parametrize("size,why", [(1 << 51, "more than any checkpoint"), (-1, "is not a non-negative integer")])
def test_an_absurd_or_negative_size_is_a_corrupt_manifest_and_the_previous_is_pulled(two_steps, tmp_path, size, why):
    remote, store = two_steps
    _declare(remote, 8, "model.safetensors", size)

    manifests, problems = store.committed()
    assert sorted(manifests) == [4] and len(problems) == 1 and why in problems[0]
    with pytest.raises(CorruptCheckpoint, match=why):
        store.pull(8, tmp_path / "out")
    assert store.pull_newest(tmp_path / "out")[0] == 4
    assert (remote.root / "checkpoints/step-00000008/manifest.json").is_file()  # left as it is


def test_an_object_bigger_than_declared_is_refused_before_it_is_downloaded(two_steps, tmp_path, caplog):
    remote, store = two_steps
    obj = remote.root / "checkpoints/step-00000008/optimizer.safetensors"
    with open(obj, "ab") as f:  # the object grows behind its unchanged manifest's back
        f.write(os.urandom(1 << 20))
    dest = tmp_path / "out"

    with pytest.raises(CorruptCheckpoint, match=r"optimizer.safetensors: \d+ bytes remotely, its manifest says 80000"):
        store.pull(8, dest)
    assert not any(p.is_file() for p in dest.rglob("*"))  # refused before downloading any of it
    with caplog.at_level(logging.WARNING):
        assert store.pull_newest(dest)[0] == 4
    assert "remote checkpoint step 8 is unusable" in caplog.text
