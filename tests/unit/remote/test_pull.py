"""Pulling remote checkpoints (trainer.remote.pull): falling back past bad ones, local errors, a disk too small,
resuming a partial pull, deadlines that grow with the size. Against SeaweedFS and the file:// backend."""

from __future__ import annotations

import dataclasses
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
from tests.harness.remotes import ThrottlingProxy, make_checkpoint
from trainer.checkpoint.manifest import Manifest, verify
from trainer.checkpoint.store import CheckpointStore
from trainer.errors import EXIT_STORAGE, CheckpointError, CorruptCheckpoint
from trainer.remote.objects import StorageUnavailable
from trainer.remote.pull import human_bytes, pull_dir
from trainer.remote.store import open_store


@pytest.fixture
def store(remote):
    s = open_store(remote.uri, remote.s3_config)
    yield s
    s.close()


def _s3_store(server, **cfg):
    return open_store(f"s3://{server.bucket()}/run", server.s3_config(**cfg))


# ---------------------------------------------------------------- (c) unusable checkpoints, local errors


def test_c_manifest_with_a_bad_field_falls_back_to_the_previous_checkpoint(store, remote, tmp_path, caplog):
    local = tmp_path / "local"
    store.upload_checkpoint(make_checkpoint(local, 10))
    store.upload_checkpoint(make_checkpoint(local, 20))
    bad = json.loads((local / "step-00000020" / "manifest.json").read_text())
    bad["files"][0]["path"] = 1
    remote.put("checkpoints/step-00000020/manifest.json", json.dumps(bad).encode())
    dest = tmp_path / "out" / "checkpoints"

    with pytest.raises(CorruptCheckpoint, match=r"step-00000020/manifest.json: not a valid manifest"):
        store.pull(20, dest)
    with caplog.at_level(logging.WARNING):
        got = store.pull_newest(dest)

    assert got == (10, dest / "step-00000010") and verify(got[1]) == []
    named = [r.getMessage() for r in caplog.records if "step-00000020/manifest.json" in r.getMessage()]
    assert len(named) == 1 and "not a valid manifest" in named[0]
    assert store.pull_latest(tmp_path / "other")[0] == 10  # the compatible form does the same


def _commit_remote_layout(remote, step: int, files: dict[str, bytes], template: Path) -> None:
    """A committed remote checkpoint with exactly these objects (names a local disk may not be able to hold)."""
    import hashlib

    m = Manifest.load(template)
    m.step = step
    m.files = [
        dataclasses.replace(m.files[0], path=p, size=len(b), sha256=hashlib.sha256(b).hexdigest())
        for p, b in files.items()
    ]
    for p, b in files.items():
        remote.put(f"checkpoints/step-{step:08d}/{p}", b)
    remote.put(f"checkpoints/step-{step:08d}/manifest.json", m.to_json().encode())


def test_c_file_path_that_is_a_directory_is_a_checkpoint_error_not_an_outage(s3_server, aws_env, tmp_path, caplog):
    # S3 only: an object store can hold both `w` and `w/x`, a directory cannot; pulled, `w` has to be both (EISDIR).
    from tests.harness.remotes import S3Remote

    store = _s3_store(s3_server, deadline_s=20)
    remote = S3Remote(s3_server, store.uri.split("/")[2], "run")
    store.upload_checkpoint(make_checkpoint(tmp_path / "local", 10))
    _commit_remote_layout(
        remote, 20, {"w": b"a file", "w/x": b"and a file below it"}, tmp_path / "local" / "step-00000010"
    )
    dest = tmp_path / "out"

    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        store.pull(20, dest)
    assert not isinstance(e.value, (CorruptCheckpoint, StorageUnavailable))
    assert time.monotonic() - t0 < 5  # not retried until the 20 s deadline as if the remote were down
    assert str(e.value).startswith(str(dest / ".pull-step-00000020" / "w")) and "Is a directory" in str(e.value)
    with caplog.at_level(logging.WARNING):
        assert store.pull_newest(dest)[0] == 10  # the caller tries the previous one
    assert "remote checkpoint step 20 is unusable" in caplog.text


def test_c_path_too_long_here_is_a_checkpoint_error_not_an_outage(store, remote, tmp_path, caplog):
    store.upload_checkpoint(make_checkpoint(tmp_path / "local", 10, sizes={"m": 100}))  # short names: they fit
    store.upload_checkpoint(make_checkpoint(tmp_path / "local", 20, sizes={"m" * 60 + ".safetensors": 100}))
    dest = tmp_path
    while len(str(dest)) < 4040 - 201:  # the pull dir still fits in PATH_MAX (4096), its file does not
        dest = dest / ("d" * 200)
    dest = dest / ("d" * (4040 - len(str(dest)) - 1))
    dest.mkdir(parents=True)

    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        store.pull(20, dest, deadline=store.deadline(20))
    assert not isinstance(e.value, (CorruptCheckpoint, StorageUnavailable))
    assert time.monotonic() - t0 < 5
    assert str(e.value).startswith(str(dest / ".pull-step-00000020")) and "File name too long" in str(e.value)
    assert str(e.value).endswith("not pulled: fix or remove that path, or pull into another --output-dir")
    with caplog.at_level(logging.WARNING):
        assert store.pull_newest(dest)[0] == 10


def test_stale_entries_in_the_pull_dir_do_not_block_a_pull(store, tmp_path):
    ckpt = make_checkpoint(tmp_path / "local", 10, sizes={"model.safetensors": 1000, "tok/vocab.json": 10})
    store.upload_checkpoint(ckpt)
    dest = tmp_path / "out"
    (dest / ".pull-step-00000010" / "model.safetensors" / "leftover").mkdir(parents=True)  # a dir where a file goes
    (dest / ".pull-step-00000010" / "tok").write_bytes(b"a file where a dir goes")
    (dest / ".pull-step-00000010" / "model.safetensors.1a2b3c4d").write_bytes(b"a killed transfer's temp file")

    got = store.pull(10, dest)

    assert verify(got) == [] and sorted(p.name for p in got.iterdir()) == ["manifest.json", "model.safetensors", "tok"]


def test_destination_holding_another_checkpoint_is_not_replaced(store, tmp_path):
    store.upload_checkpoint(make_checkpoint(tmp_path / "remote-side", 10))
    dest = tmp_path / "out"
    mine = make_checkpoint(dest, 10, seed=9)  # committed here: another lineage's step 10
    before = {p.name: p.read_bytes() for p in mine.iterdir()}

    with pytest.raises(CheckpointError, match=r"step-00000010: holds another committed checkpoint .* not pulled"):
        store.pull(10, dest)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before

    (mine / "manifest.json").unlink()  # an uncommitted leftover may be replaced
    assert verify(store.pull(10, dest)) == []


# ---------------------------------------------------------------- (d) a disk too small for the checkpoint

_PULL_ON_TMPFS = """
import json, shutil, sys, time
from pathlib import Path
from tests.harness.remotes import make_checkpoint
from trainer.config.schema import S3Config
from trainer.remote.store import open_store
uri, cfg, dest, fake_room = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
store = open_store(uri, S3Config(**cfg))
mine = make_checkpoint(dest, 5, sizes={"model.safetensors": 300_000})  # committed work on this disk
if fake_room:  # only to get past the check before the download: the disk itself is real and fills up
    shutil.disk_usage = lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40)
t0 = time.monotonic()
out = {}
try:
    store.pull(10, dest)
    out["ok"] = True
except Exception as e:
    out.update(type=type(e).__name__, message=str(e), needed=getattr(e, "needed", None),
               free=getattr(e, "free", None), exit_code=getattr(e, "exit_code", None))
out["seconds"] = time.monotonic() - t0
out["files"] = {p.relative_to(dest).as_posix(): p.stat().st_size for p in dest.rglob("*") if p.is_file()}
from trainer.checkpoint.manifest import verify
out["mine_verified"] = verify(mine) == []
print("RESULT " + json.dumps(out))
"""


def _unshare_problem() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare(1)"
    p = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, text=True
    )
    return None if p.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {p.stderr.strip()}"


def _pull_on_tmpfs(remote, tmp_path: Path, size: int, fake_room: bool) -> dict:
    """Pull step 10 into a real tmpfs of `size` bytes (private user + mount namespace) in a child process."""
    why = _unshare_problem()
    if why:
        pytest.skip(why)
    dest = tmp_path / "small-disk"
    dest.mkdir()
    script = tmp_path / "pull.py"
    script.write_text(_PULL_ON_TMPFS)
    cfg = dataclasses.asdict(remote.s3_config) if remote.s3_config else {}
    cfg = json.dumps({**cfg, "deadline_s": 10.0})  # an outage would give up after 10 s
    args = " ".join(f"'{a}'" for a in (sys.executable, script, remote.uri, cfg, dest, "1" if fake_room else "0"))
    p = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs '{dest}' && {args}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, p.stdout + p.stderr
    return json.loads(lines[0][len("RESULT ") :])


def test_d_checkpoint_that_does_not_fit_is_refused_before_downloading(store, remote, tmp_path):
    ckpt = make_checkpoint(
        tmp_path / "local",
        10,
        sizes={"model.safetensors": 400_000, "optimizer.safetensors": 500_000, "trainer_state.json": 0},
    )
    store.upload_checkpoint(ckpt)
    keys = remote.keys()

    out = _pull_on_tmpfs(remote, tmp_path, 1024 * 1024, fake_room=False)

    assert out["type"] == "InsufficientSpace" and out["exit_code"] == EXIT_STORAGE == 69, out
    assert out["needed"] >= Manifest.load(ckpt).total_bytes > out["free"]
    msg = out["message"]
    assert msg.startswith(
        f"pulling {remote.uri}/checkpoints/step-00000010 needs {human_bytes(out['needed'])}, "
        f"{human_bytes(out['free'])} free on tmpfs ({tmp_path / 'small-disk'}"
    )
    assert msg.endswith("free space or point --output-dir at a larger disk; nothing was deleted")
    assert "\n" not in msg
    # nothing downloaded, nothing deleted: the local checkpoint is whole, the remote as it was
    assert sorted(out["files"]) == [f"step-00000005/{n}" for n in ("manifest.json", "model.safetensors")]
    assert out["mine_verified"] and remote.keys() == keys


def test_d_disk_filling_up_during_the_pull_is_insufficient_space_not_an_outage(store, remote, tmp_path):
    ckpt = make_checkpoint(
        tmp_path / "local",
        10,
        sizes={"model.safetensors": 400_000, "optimizer.safetensors": 500_000, "trainer_state.json": 0},
    )
    store.upload_checkpoint(ckpt)
    keys = remote.keys()

    out = _pull_on_tmpfs(remote, tmp_path, 1024 * 1024, fake_room=True)

    assert out["type"] == "InsufficientSpace" and out["exit_code"] == 69, out
    assert "ran out of space" in out["message"] and out["message"].endswith("nothing was deleted")
    assert out["seconds"] < 10  # not retried until the deadline as if the remote were down
    assert out["mine_verified"] and remote.keys() == keys


# ---------------------------------------------------------------- (e) a partial pull is resumed


def test_e_partial_pull_survives_the_failure_and_the_restart_downloads_only_the_rest(store, remote, tmp_path):
    ckpt = make_checkpoint(tmp_path / "local", 10)
    store.upload_checkpoint(ckpt)
    remote.put("checkpoints/step-00000010/model.safetensors", b"\0" * 40_000)  # same size, wrong bytes
    out = tmp_path / "out"
    dest = CheckpointStore(out).root

    with pytest.raises(CorruptCheckpoint, match="step-00000010/model.safetensors: sha256 does not match"):
        store.pull(10, dest)
    partial = pull_dir(dest, 10)
    assert partial.name == ".pull-step-00000010" and partial.is_dir(), "the partial pull was removed"
    assert sorted(p.name for p in partial.iterdir()) == ["optimizer.safetensors", "trainer_state.json"]
    kept = (partial / "optimizer.safetensors").stat()
    CheckpointStore(out).clean_stale()  # what every restart of the trainer does
    assert (partial / "optimizer.safetensors").is_file(), "the restart's clean-up removed the partial pull"

    remote.put("checkpoints/step-00000010/model.safetensors", (ckpt / "model.safetensors").read_bytes())  # repaired
    got = store.pull(10, dest)

    assert verify(got) == [] and not partial.exists()
    again = (got / "optimizer.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not downloaded again


# ---------------------------------------------------------------- (f) deadlines that grow with the size


@pytest.fixture
def slow_link(s3_server, aws_env):
    proxy = ThrottlingProxy(s3_server.ports["s3"], bytes_per_s=400_000)
    yield proxy
    proxy.close()


def _slow_store(s3_server, proxy, bucket: str, mb_s: float):
    return open_store(
        f"s3://{bucket}/run",
        s3_server.s3_config(
            endpoint_url=proxy.endpoint_url, deadline_s=1.0, min_throughput_mb_s=mb_s, max_concurrency=2
        ),
    )


def test_f_slow_link_download_longer_than_deadline_s_gets_there(s3_server, slow_link, tmp_path):
    bucket = s3_server.bucket()
    ckpt = make_checkpoint(tmp_path / "local", 10, sizes={"a.bin": 600_000, "b.bin": 600_000})
    open_store(f"s3://{bucket}/run", s3_server.s3_config()).upload_checkpoint(ckpt)  # a fast upload

    t0 = time.monotonic()
    got = _slow_store(s3_server, slow_link, bucket, mb_s=0.25).pull(10, tmp_path / "out")
    took = time.monotonic() - t0

    assert verify(got) == []
    assert took > 2.0  # 1.2 MB at 0.4 MB/s: longer than deadline_s (1 s), within 1 s + 1.2 MB / 0.25 MB/s
    with pytest.raises(StorageUnavailable, match="download of checkpoints/step-00000010 gave up"):
        # the same link, but a minimum throughput it does not reach: 1 s + 1.2 MB / 10 MB/s
        _slow_store(s3_server, slow_link, bucket, mb_s=10).pull(10, tmp_path / "out2")


def test_f_slow_link_upload_longer_than_deadline_s_gets_there(s3_server, slow_link, tmp_path):
    bucket = s3_server.bucket()
    ckpt = make_checkpoint(tmp_path / "local", 10, sizes={"a.bin": 600_000, "b.bin": 600_000})

    t0 = time.monotonic()
    _slow_store(s3_server, slow_link, bucket, mb_s=0.25).upload_checkpoint(ckpt)

    assert time.monotonic() - t0 > 2.0
    assert open_store(f"s3://{bucket}/run", s3_server.s3_config()).committed_steps() == [10]
