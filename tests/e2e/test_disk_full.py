"""A disk that fills up: a checkpoint that does not fit never stops training or loses a committed one.

These run the real CLI with its output dir on a real, small tmpfs, mounted in a private user + mount namespace
(`unshare -rm`, no root needed); where the kernel forbids that they skip and say why. The writer's and the
store's own handling of ENOSPC is tested in tests/unit/checkpoint/test_writer.py and test_store.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.common import REPO, TINY, cli_args, env, heartbeat_step
from trainer.checkpoint.manifest import verify
from trainer.checkpoint.store import CheckpointStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# ---------------------------------------------------------------- end to end, on a real full disk


def _unshare_ok() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare(1)"
    p = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m tmpfs /mnt 2>&1 || mount -t tmpfs -o size=1m tmpfs /tmp 2>&1",
        ],
        capture_output=True,
        text=True,
    )
    return None if p.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {p.stdout or p.stderr}"


def _disk_usage(path: Path) -> int:
    """Bytes a tree takes on a tmpfs: whole 4 KiB pages per file."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


def _run_on_tmpfs(size: int, out: Path, keep: Path, args: list[str], sigterm_at: int | None = None):
    """Run the CLI with `out` on a tmpfs of `size` bytes; the tree is copied to `keep` before the mount goes."""
    out.mkdir(parents=True, exist_ok=True)
    keep.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(f"'{a}'" for a in cli_args(*args, output_dir=out))
    script = (
        f"mount -t tmpfs -o size={size} tmpfs '{out}' || exit 97; {cmd} & pid=$!; echo $pid > '{keep}/pid'; "
        f"wait $pid; rc=$?; cp -a '{out}/.' '{keep}/'; exit $rc"
    )
    proc = subprocess.Popen(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if sigterm_at is not None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            # the heartbeat lives on the tmpfs, visible only inside the namespace: read it through /proc
            pid_file = keep / "pid"
            if pid_file.exists() and pid_file.read_text().strip():
                pid = int(pid_file.read_text())
                if heartbeat_step(Path(f"/proc/{pid}/root") / str(out).lstrip("/")) >= sigterm_at:
                    subprocess.run(["kill", "-TERM", str(pid)])
                    break
            time.sleep(0.01)
    stdout, _ = proc.communicate(timeout=300)
    return proc.returncode, stdout


FULL = [*TINY, "model.method=full", "train.max_steps=12", "checkpoint.every_steps=1", "checkpoint.keep_last=100"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run on a roomy disk: how much space the run needs besides checkpoints, and one checkpoint's size."""
    why = _unshare_ok()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("ref") / "out"
    p = subprocess.run(
        cli_args("train", overrides=FULL, output_dir=out),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 12
    one = max(_disk_usage(c) for c in ckpts)
    rest = _disk_usage(out) - sum(_disk_usage(c) for c in ckpts)
    return one, rest, _disk_usage(out / "final")


def test_training_goes_on_when_checkpoints_fill_the_disk(tmp_path, reference):
    one, rest, _ = reference
    # room for the run and about three checkpoints (plus one in the making): the 5th write hits ENOSPC
    rc, log = _run_on_tmpfs(
        rest + int(3.5 * one), tmp_path / "out", tmp_path / "keep", ["train", *[x for o in FULL for x in ("--set", o)]]
    )
    keep = tmp_path / "keep"
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log
    assert "the disk is full" in log
    events = [json.loads(x) for x in (keep / "events.jsonl").read_text().splitlines()]
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert len(failed) == 1 and "No space left" in failed[0]["error"], failed  # then only the newest is kept
    steps = [json.loads(x)["step"] for x in (keep / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 13))  # no step lost or repeated
    store = CheckpointStore(keep)
    assert store.committed_steps() == [12] and verify(store.path(12)) == []
    assert not list((keep / "checkpoints").glob(".tmp-step-*"))  # abandoned writes are cleaned up
    assert verify(keep / "final") == []


def test_emergency_checkpoint_that_does_not_fit_still_exits_resumable(tmp_path, reference):
    one, rest, final = reference
    rc, log = _run_on_tmpfs(
        rest - final + one // 2,
        tmp_path / "out",
        tmp_path / "keep",
        ["train", *[x for o in [*FULL, "train.max_steps=400", "checkpoint.every_steps=1000"] for x in ("--set", o)]],
        sigterm_at=3,
    )
    keep = tmp_path / "keep"
    assert rc == 75, log[-3000:]
    assert "Traceback" not in log
    assert "emergency checkpoint at step" in log and "not written: the disk is full" in log
    assert CheckpointStore(keep).committed_steps() == []
    assert not list((keep / "checkpoints").glob(".tmp-step-*"))
    events = [json.loads(x) for x in (keep / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "checkpoint_failed" and e["kind"] == "emergency" for e in events)
    # the copy resumes on a roomy disk from the start: nothing committed was lost, nothing broken is used
    p = subprocess.run(
        cli_args("train", overrides=[*FULL, "train.max_steps=2"], output_dir=keep),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
