"""Nothing committed is lost by a restart with a changed option: starting over is explicit, a resume from an older
checkpoint branches and archives the later ones, unknown manifest fields resume, export and the output-dir lock
never destroy what is there. Real CLI runs of the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.harness.common import TINY, run_cli, start_cli, wait_for_checkpoint
from trainer.checkpoint.manifest import Manifest
from trainer.checkpoint.store import CheckpointStore
from trainer.run_dir import step_dirname

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN = [*TINY, "model.method=lora", "train.max_steps=12"]


def tree(root) -> dict:
    """Every file under root with its size and mtime: what "nothing touched" means (the heartbeat aside: a liveness
    signal the trainer writes from its first second, not saved work)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.name != "heartbeat"
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 12-step run with checkpoints 4, 8, 12 (copied per test)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run_cli("train", overrides=RUN, output_dir=out)
    return out


def copy_of(run, tmp_path):
    dest = tmp_path / "out"
    subprocess.run(["cp", "-a", str(run), str(dest)], check=True)
    return dest


def test_resume_never_over_checkpoints_is_refused_then_archive_existing_starts_over(tmp_path, finished):
    """(a) `--resume never` into a dir with committed checkpoints: exit 2, one line with the ways on, nothing
    touched; with --archive-existing the old ones move to checkpoints/archived/<run-id>/ and a new run starts."""
    out = copy_of(finished, tmp_path)
    before = tree(out)
    old_run = Manifest.load(out / "checkpoints" / step_dirname(12)).run_id
    p = run_cli("train", "--resume", "never", overrides=RUN, output_dir=out, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "3 in" in err[0] and "--resume auto" in err[0] and "--archive-existing" in err[0], err[0]
    assert tree(out) == before  # nothing touched
    p = run_cli(
        "train", "--resume", "never", "--archive-existing", overrides=[*RUN, "train.max_steps=4"], output_dir=out
    )
    store = CheckpointStore(out)
    assert store.committed_steps() == [4]
    assert Manifest.load(store.path(4)).run_id not in (None, old_run)
    # the old run's final/ too: the new run's final/ would have replaced it
    assert sorted(store.archived()[old_run]) == ["final"] + [step_dirname(s) for s in (4, 8, 12)]


def test_resume_from_an_older_step_branches_and_archives_the_later_ones(tmp_path, finished):
    """(b) `--resume PATH` to step 4, train past it, SIGKILL, `--resume auto`: the new lineage resumes (not the old
    step 12), the old 8 and 12 are in archived/."""
    out = copy_of(finished, tmp_path)
    store = CheckpointStore(out)
    old = {s: Manifest.load(store.path(s)) for s in (4, 8, 12)}
    proc = start_cli("train", "--resume", str(store.path(4)), overrides=[*RUN, "train.max_steps=16"], output_dir=out)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # the new lineage's step 8 (the old one was archived at the start)
        try:
            if Manifest.load(store.path(8)).run_id != old[8].run_id:
                break
        except Exception:
            pass
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out_text = proc.communicate(timeout=60)[0]
    assert "archived checkpoints [8, 12]" in out_text, out_text[-3000:]
    new8 = Manifest.load(store.path(8))
    assert new8.parent.run_id == old[4].run_id and new8.parent.step == 4 and new8.run_id != old[4].run_id
    assert sorted(store.archived()[old[8].run_id]) == [step_dirname(8), step_dirname(12)]
    newest = max(store.committed_steps())  # of the new lineage: the old 12 is archived
    p = run_cli("train", overrides=[*RUN, "train.max_steps=16"], output_dir=out)
    resumed = [ln for ln in p.stdout.splitlines() if ln.startswith("resumed from")]
    assert resumed and step_dirname(newest) in resumed[0], p.stdout[-2000:]
    assert Manifest.load(store.path(newest)).run_id == new8.run_id
    assert Manifest.load(store.path(16)).run_id == new8.run_id
    # still there, and the old run's final/ with them (the branch wrote its own)
    assert sorted(store.archived()[old[8].run_id]) == ["final", step_dirname(8), step_dirname(12)]


def test_a_manifest_with_an_unknown_field_resumes_normally(tmp_path, finished):
    """(e) A field written by a newer version is kept and ignored (it used to make the checkpoint invalid and be
    deleted at resume)."""
    out = copy_of(finished, tmp_path)
    path = out / "checkpoints" / step_dirname(12) / "manifest.json"
    m = json.loads(path.read_text())
    m["provenance"] = {"builder": "spot-trainer 9.0", "digest": "00"}  # ("signature" is a field of ours now)
    path.write_text(json.dumps(m))
    p = run_cli("train", overrides=[*RUN, "train.max_steps=14"], output_dir=out)
    assert f"resumed from {out / 'checkpoints' / step_dirname(12)}" in p.stdout, p.stdout[-2000:]
    assert json.loads(path.read_text())["provenance"]["digest"] == "00"  # kept as it came


def test_export_refuses_a_non_empty_dir_that_is_not_its_own_export(tmp_path, finished):
    """Problem 4: `export --to models/` used to delete models/ (another model in it)."""
    out = copy_of(finished, tmp_path)
    models = tmp_path / "models"
    (models / "other-model").mkdir(parents=True)
    (models / "other-model" / "weights.bin").write_bytes(b"precious")
    p = run_cli("export", str(out), "--to", str(models), check=False)
    assert p.returncode == 2 and "not empty" in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert (models / "other-model" / "weights.bin").read_bytes() == b"precious"
    dest = models / "mine"
    run_cli("export", str(out), "--to", str(dest))
    run_cli("export", str(out), "--to", str(dest))  # its own earlier export: replaced
    assert Manifest.load(dest).kind == "export"
    p = run_cli("export", str(out), "--to", str(models / "other-model"), "--overwrite")
    assert not (models / "other-model" / "weights.bin").exists() and Manifest.load(models / "other-model")


def test_a_second_trainer_on_the_same_output_dir_is_refused(tmp_path):
    """Problem 7: two trainers sharing one output dir used to interleave checkpoints and retention."""
    out = tmp_path / "out"
    proc = start_cli("train", overrides=[*RUN, "train.max_steps=400"], output_dir=out)
    try:
        wait_for_checkpoint(proc, out, 4)
        p = run_cli("train", overrides=[*RUN, "train.max_steps=400"], output_dir=out, check=False)
        assert p.returncode == 2 and "in use by another trainer" in p.stderr, p.stderr
        lock = json.loads((out / ".lock").read_text())
        assert lock["pid"] == proc.pid  # the first one still owns it
    finally:
        proc.kill()
        proc.wait()
    # SIGKILLed: the lock is left behind, but its process is gone: the next trainer takes it over
    assert (out / ".lock").exists()
    run_cli("train", overrides=[*RUN, "train.max_steps=8"], output_dir=out)
    assert not (out / ".lock").exists()


def test_a_lock_renewed_by_another_host_waits_for_its_lease(tmp_path):
    from trainer.errors import StorageWait
    from trainer.run_lock import RunLock

    (tmp_path / ".lock").write_text(
        json.dumps({"host": "other-pod", "pid": 1, "start_time": 5, "renewed": time.time()})
    )
    # another pod still renews it (a preempted one finishing its upload): exit 69, the supervisor tries again
    with pytest.raises(StorageWait, match="in use by another trainer .*other-pod.*delete.*exiting 69"):
        RunLock(tmp_path, lease_s=30, wait_s=0.3).acquire()
    (tmp_path / ".lock").write_text(
        json.dumps({"host": "other-pod", "pid": 1, "start_time": 5, "renewed": time.time() - 31})
    )
    lock = RunLock(tmp_path, lease_s=30, wait_s=0.3).acquire()  # a dead pod's lock: its lease ran out
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()
