"""Lineage-aware retention on the local disk: the newest work of the current run is kept, nothing else is deleted."""

from __future__ import annotations

import errno
import json

import pytest

from trainer.checkpoint import lineage, manifest
from trainer.checkpoint.manifest import Manifest, Parent, build_manifest, check, write_manifest
from trainer.checkpoint.store import CheckpointStore
from trainer.run_dir import step_dirname


def commit(
    store: CheckpointStore, step: int, run_id: str | None, seq: int | None, parent: Parent | None, at: float
) -> None:
    d = store.path(step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(step.to_bytes(4, "little") * 100)
    write_manifest(d, build_manifest(d, step, run_id=run_id, seq=seq, parent=parent, created_at=at))


def manifests(store) -> dict:
    return store.manifests()[0]


def test_retention_keeps_the_new_run_not_the_highest_steps(tmp_path):
    """Problem 1: old checkpoints with higher step numbers (800, 900, 1000) and a new run's 100: prune(3) used to
    delete 100 right after it was committed. Now 100 stays and the other lineage is archived, not deleted."""
    store = CheckpointStore(tmp_path)
    for i, s in enumerate((800, 900, 1000)):
        commit(store, s, "runA", i + 1, Parent("runA", s - 100) if i else None, at=1000.0 + i)
    commit(store, 100, "runB", 1, None, at=2000.0)  # a fresh start in the same dir
    deleted, archived = store.prune(3, head=100)
    assert deleted == [] and archived == [800, 900, 1000]
    assert store.committed_steps() == [100]
    assert sorted(store.archived()["runA"]) == [step_dirname(s) for s in (800, 900, 1000)]
    assert store.prune(3) == ([], [])  # the newest committed is the head by default


def test_legacy_checkpoints_order_by_step_as_before(tmp_path):
    store = CheckpointStore(tmp_path)
    for i, s in enumerate((4, 8, 12, 16)):
        commit(store, s, None, None, None, at=100.0 + i)
    assert store.prune(2) == ([4, 8], [])
    assert store.committed_steps() == [12, 16]


def test_a_branch_keeps_its_ancestors_and_archives_the_abandoned_tail(tmp_path):
    """B was resumed from A@900: A@800 and A@900 are B's past (retention may delete them), A@1000 is not."""
    store = CheckpointStore(tmp_path)
    for i, s in enumerate((800, 900, 1000)):
        commit(store, s, "runA", i + 1, Parent("runA", s - 100) if i else None, at=1000.0 + i)
    commit(store, 904, "runB", 3, Parent("runA", 900), at=2000.0)
    ms = manifests(store)
    assert lineage.members(904, ms) == {800, 900, 904}
    assert lineage.newest(ms) == 904
    deleted, archived = store.prune(2, head=904)
    assert deleted == [800] and archived == [1000]
    assert store.committed_steps() == [900, 904]


def test_protected_and_head_are_never_deleted(tmp_path):
    store = CheckpointStore(tmp_path)
    for i, s in enumerate((4, 8, 12)):
        commit(store, s, "r", i + 1, Parent("r", s - 4) if i else None, at=10.0 + i)
    assert store.prune(1, head=12, protect={4}) == ([8], [])
    assert store.committed_steps() == [4, 12]


def test_verified_damage_is_moved_to_corrupt_never_deleted(tmp_path):
    """Problem 3: a hash mismatch moves the checkpoint aside; the resume takes the previous one."""
    store = CheckpointStore(tmp_path)
    commit(store, 4, "r", 1, None, at=1.0)
    commit(store, 8, "r", 2, Parent("r", 4), at=2.0)
    data = store.path(8) / "model.safetensors"
    data.write_bytes(b"\0" * data.stat().st_size)  # same size, other bytes: only sha256 can tell
    warnings = []
    got = store.latest_valid(warn=warnings.append, quarantine=True)
    assert got == (4, store.path(4))
    assert "sha256" in warnings[0] and "corrupt" in warnings[0]
    assert [p.name for p in store.corrupt()] == [step_dirname(8)]
    assert (store.corrupt()[0] / "model.safetensors").exists()


def test_unknown_fields_and_newer_formats_are_never_moved(tmp_path):
    """A field this version does not know is kept and ignored; a newer format is skipped with its version named,
    and stays where it is."""
    store = CheckpointStore(tmp_path)
    commit(store, 4, "r", 1, None, at=1.0)
    commit(store, 8, "r", 2, Parent("r", 4), at=2.0)
    commit(store, 12, "r", 3, Parent("r", 8), at=3.0)
    m8 = json.loads((store.path(8) / "manifest.json").read_text())
    m8["signed_by"] = {"key": "x"}  # what a newer version might add
    (store.path(8) / "manifest.json").write_text(json.dumps(m8))
    m12 = json.loads((store.path(12) / "manifest.json").read_text())
    m12["format"] = "spot-trainer/checkpoint/v9"
    (store.path(12) / "manifest.json").write_text(json.dumps(m12))
    warnings = []
    assert store.latest_valid(warn=warnings.append, quarantine=True) == (8, store.path(8))
    assert "v9" in warnings[0] and "newer" in warnings[0]
    assert store.committed_steps() == [4, 8, 12] and store.corrupt() == []
    assert Manifest.load(store.path(8)).unknown == {"signed_by": {"key": "x"}}
    assert '"signed_by"' in Manifest.load(store.path(8)).to_json()  # written back as it came


def test_a_read_error_is_retried_then_reported_not_quarantined(tmp_path, monkeypatch):
    """EIO/ESTALE on a network volume: tried again; if it persists the checkpoint is skipped but kept."""
    store = CheckpointStore(tmp_path)
    commit(store, 4, "r", 1, None, at=1.0)
    commit(store, 8, "r", 2, Parent("r", 4), at=2.0)
    real, calls = manifest._hash_all, {"n": 0}

    def flaky(paths):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(paths)

    monkeypatch.setattr(manifest, "_hash_all", flaky)
    assert check(store.path(8), retry_delay_s=0).ok  # the third try reads it

    def broken(paths):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(manifest, "_hash_all", broken)
    monkeypatch.setattr(manifest, "READ_RETRIES", 2)
    warnings = []
    assert store.latest_valid(warn=warnings.append, quarantine=True) is None
    assert all("cannot read" in w and "kept" in w for w in warnings)
    assert store.committed_steps() == [4, 8] and store.corrupt() == []


@pytest.mark.parametrize(
    "field,value", [("path", 1), ("path", "../../etc/passwd"), ("size", -1), ("sha256", "zz"), ("path", "/abs")]
)
def test_a_malformed_manifest_field_is_a_corrupt_checkpoint_not_a_crash(tmp_path, field, value):
    store = CheckpointStore(tmp_path)
    commit(store, 4, "r", 1, None, at=1.0)
    m = json.loads((store.path(4) / "manifest.json").read_text())
    m["files"][0][field] = value
    (store.path(4) / "manifest.json").write_text(json.dumps(m))
    verdict = check(store.path(4))
    assert verdict.corrupt and "not a valid manifest" in verdict.problems[0]


def test_commit_over_a_committed_step_of_another_lineage_archives_it(tmp_path):
    from trainer.checkpoint.lineage import Lineage
    from trainer.checkpoint.store import Snapshot

    store = CheckpointStore(tmp_path)
    commit(store, 8, "old", 2, Parent("old", 4), at=1.0)
    snap = Snapshot(step=8, rank=0, world_size=1, lineage=Lineage("new", Parent("old", 4), 2))
    snap.json["trainer_state.json"] = {"step": 8}
    store.write_rank_files(snap)
    store.commit(snap)
    assert Manifest.load(store.path(8)).run_id == "new"
    assert list(store.archived()["old"]) == [step_dirname(8)]
