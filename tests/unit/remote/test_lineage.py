"""Remote retention by lineage, archiving, and uploads that never overwrite another lineage's committed work
(trainer.remote.store/archive), against a real S3 server (SeaweedFS) and the file:// backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.remotes import make_checkpoint
from tests.unit.remote.helpers import read
from trainer.checkpoint.manifest import FileEntry, Manifest, Parent, sha256_file, write_manifest
from trainer.errors import CheckpointError
from trainer.remote.store import open_store
from trainer.remote.uploader import CheckpointUploader

T0 = 1_700_000_000.0  # commit times: run A first, run B later


@pytest.fixture
def store(remote):
    s = open_store(remote.uri, remote.s3_config)
    yield s
    s.close()


def commit(
    root: Path,
    step: int,
    run_id: str | None,
    seq: int | None,
    parent: Parent | None = None,
    at: float = T0,
    seed: int = 0,
) -> Path:
    """A committed local checkpoint with lineage fields."""
    d = make_checkpoint(root, step, seed=seed)
    m = Manifest.load(d)
    m.run_id, m.seq, m.parent, m.created_at = run_id, seq, parent, at
    write_manifest(d, m)
    return d


def run_a(root: Path) -> dict[int, Path]:
    """An earlier run A: 800, 900, 1000."""
    out, parent = {}, None
    for seq, step in enumerate((800, 900, 1000), start=1):
        out[step] = commit(root / "a", step, "runA", seq, parent, at=T0 + seq)
        parent = Parent("runA", step)
    return out


def _dirs(remote, under: str = "checkpoints/") -> set[str]:
    return {k[len(under) :].rsplit("/", 1)[0] for k in remote.keys() if k.startswith(under)}


def test_a_fresh_run_keeps_its_new_checkpoint_and_archives_the_old_high_steps(store, remote, tmp_path):
    a = run_a(tmp_path)
    for d in a.values():
        store.upload_checkpoint(d)
    b100 = commit(tmp_path / "b", 100, "runB", 1, None, at=T0 + 100)  # a fresh start in the same prefix
    store.upload_checkpoint(b100)

    deleted, archived = store.prune(3)  # head: the checkpoint committed last, B@100

    assert (deleted, archived) == ([], [800, 900, 1000])
    manifests, problems = store.committed()
    assert list(manifests) == [100] and problems == []
    moved = store.archived()
    assert list(moved) == ["runA"] and sorted(moved["runA"]) == [800, 900, 1000]
    for step, d in a.items():  # byte for byte, sha256 recorded, manifest last
        local = Manifest.load(d)
        assert moved["runA"][step] == local
        base = f"checkpoints/archived/runA/step-{step:08d}"
        assert read(remote, f"{base}/manifest.json") == (d / "manifest.json").read_bytes()
        for f in local.files:
            assert store.objects.sha256(f"{base}/{f.path}") == f.sha256
            assert read(remote, f"{base}/{f.path}") == (d / f.path).read_bytes()
    assert _dirs(remote) == {"step-00000100"} | {f"archived/runA/step-{s:08d}" for s in (800, 900, 1000)}


def test_a_branch_keeps_its_ancestors_and_archives_the_abandoned_future(store, remote, tmp_path):
    a = run_a(tmp_path)
    for d in a.values():
        store.upload_checkpoint(d)
    # resumed from A@900 (not A's newest): a new segment whose parent is A@900; its step continues from 900
    b = commit(tmp_path / "b", 950, "runB", 3, Parent("runA", 900), at=T0 + 100)
    store.upload_checkpoint(b)

    assert store.prune(3, head=950, protect={1000}) == ([], [])  # protected (being uploaded): left alone
    assert store.prune(3, head=950) == ([], [1000])
    assert sorted(store.committed()[0]) == [800, 900, 950]
    assert sorted(store.archived()["runA"]) == [1000]
    # its own lineage is still pruned: the oldest member goes, the head never does
    assert store.prune(2, head=950) == ([800], [])
    assert sorted(store.committed()[0]) == [900, 950]


def test_unreadable_manifests_are_reported_and_never_touched(store, remote, tmp_path):
    store.upload_checkpoint(commit(tmp_path, 100, "runB", 1, at=T0))
    store.upload_checkpoint(commit(tmp_path, 200, "runB", 2, Parent("runB", 100), at=T0 + 1))
    newer = json.loads(read(remote, "checkpoints/step-00000100/manifest.json"))
    newer["format"] = "spot-trainer/checkpoint/v999"
    remote.put("checkpoints/step-00000050/model.safetensors", b"from a newer version")
    remote.put("checkpoints/step-00000050/manifest.json", json.dumps(newer).encode())
    broken = json.loads(read(remote, "checkpoints/step-00000100/manifest.json"))
    broken["files"][0]["path"] = 1
    remote.put("checkpoints/step-00000060/manifest.json", json.dumps(broken).encode())
    before = {k for k in remote.keys() if "00000050" in k or "00000060" in k}

    manifests, problems = store.committed()

    assert sorted(manifests) == [100, 200]
    assert len(problems) == 2
    assert "step-00000050/manifest.json" in problems[0] and "newer spot-trainer" in problems[0]
    assert "step-00000060/manifest.json" in problems[1] and "not a valid manifest" in problems[1]
    assert store.prune(1) == ([100], [])  # 50 and 60 are neither deleted (not partial uploads) nor archived
    assert {k for k in remote.keys() if "00000050" in k or "00000060" in k} == before
    assert store.committed_steps() == [50, 60, 200]
    with pytest.raises(CheckpointError, match="newer spot-trainer's format; step 50 not uploaded over it"):
        store.upload_checkpoint(commit(tmp_path / "other", 50, "runC", 1, at=T0 + 9))
    assert {k for k in remote.keys() if "00000050" in k} == {k for k in before if "00000050" in k}


def test_b_upload_over_another_lineages_checkpoint_archives_it_first(store, remote, tmp_path):
    a1000 = commit(tmp_path / "a", 1000, "runA", 3, Parent("runA", 900), at=T0)
    store.upload_checkpoint(a1000)
    b1000 = commit(tmp_path / "b", 1000, "runB", 3, Parent("runA", 900), at=T0 + 10, seed=1)  # other bytes

    result = store.upload_checkpoint(b1000)

    assert store.archived() == {"runA": {1000: Manifest.load(a1000)}}
    assert store.get_manifest(1000) == Manifest.load(b1000)
    assert result.files_uploaded == 3  # A's files moved away, even the one B has the same bytes of
    for f in Manifest.load(a1000).files:
        assert read(remote, f"checkpoints/archived/runA/step-00001000/{f.path}") == (a1000 / f.path).read_bytes()


def test_b_a_rewrite_of_the_same_checkpoint_replaces_it(store, remote, tmp_path):
    first = commit(tmp_path / "first", 120, "runA", 2, Parent("runA", 100), at=T0)
    store.upload_checkpoint(first)
    again = commit(tmp_path / "again", 120, "runA", 2, Parent("runA", 100), at=T0 + 5, seed=7)  # emergency, again

    store.upload_checkpoint(again)

    assert store.get_manifest(120) == Manifest.load(again)
    assert store.archived() == {}


def test_b_legacy_checkpoints_with_other_files_are_archived_under_legacy(store, remote, tmp_path):
    old = make_checkpoint(tmp_path / "old", 10)  # written before lineage existed
    store.upload_checkpoint(old)
    other = make_checkpoint(tmp_path / "other", 10, seed=3)
    store.upload_checkpoint(other)
    third = make_checkpoint(tmp_path / "third", 10, seed=4)
    store.upload_checkpoint(third)

    assert store.get_manifest(10) == Manifest.load(third)
    assert sorted(_dirs(remote, "checkpoints/archived/")) == ["legacy/step-00000010", "legacy/step-00000010.1"]
    assert (
        read(remote, "checkpoints/archived/legacy/step-00000010/manifest.json") == (old / "manifest.json").read_bytes()
    )
    assert (
        read(remote, "checkpoints/archived/legacy/step-00000010.1/manifest.json")
        == (other / "manifest.json").read_bytes()
    )


def test_b_upload_over_a_corrupt_manifest_moves_it_to_corrupt(store, remote, tmp_path):
    remote.put("checkpoints/step-00000010/model.safetensors", b"whatever was there")
    remote.put("checkpoints/step-00000010/manifest.json", b'{"format": "spot-trainer/checkpoint/v1", "files": 1}')
    ckpt = commit(tmp_path, 10, "runB", 1, at=T0)

    store.upload_checkpoint(ckpt)

    assert store.get_manifest(10) == Manifest.load(ckpt)
    kept = [k for k in remote.keys() if k.startswith("checkpoints/corrupt/step-00000010-")]
    assert sorted(k.rsplit("/", 1)[1] for k in kept) == ["manifest.json", "model.safetensors"]
    assert read(remote, kept[1]) == b"whatever was there"


def test_delete_archived_one_run_or_all(store, remote, tmp_path):
    for d in run_a(tmp_path).values():
        store.upload_checkpoint(d)
    store.upload_checkpoint(commit(tmp_path / "b", 100, "runB", 1, at=T0 + 100))
    store.prune(3)
    store.upload_checkpoint(make_checkpoint(tmp_path / "legacy", 100, seed=5))  # archives B@100 under runB
    assert sorted(store.archived()) == ["runA", "runB"]

    gone = store.delete_archived("runA")

    assert gone == [f"{remote.uri}/checkpoints/archived/runA/step-{s:08d}" for s in (800, 900, 1000)]
    assert list(store.archived()) == ["runB"]
    assert store.delete_archived() == [f"{remote.uri}/checkpoints/archived/runB/step-00000100"]
    assert store.archived() == {} and store.committed_steps() == [100]
    assert not [k for k in remote.keys() if "archived" in k]


def test_a_startup_sync_uploads_the_current_lineage_below_the_remotes_highest_step(store, remote, tmp_path):
    for d in run_a(tmp_path).values():
        store.upload_checkpoint(d)
    root = tmp_path / "out" / "checkpoints"  # this pod: a fresh run B, never uploaded (the remote was down)
    commit(root, 100, "runB", 1, at=T0 + 100)
    commit(root, 200, "runB", 2, Parent("runB", 100), at=T0 + 200)
    commit(root, 300, "runOther", 1, at=T0 + 50)  # another lineage left in this dir: not uploaded
    uploaded = []
    uploader = CheckpointUploader(store, keep_last=3, on_uploaded=lambda step, *_: uploaded.append(step))

    uploader.sync_pending(root)
    assert uploader.wait(timeout=60)

    assert uploaded == [200, 100]  # newest first
    assert sorted(store.committed()[0]) == [100, 200]
    assert sorted(store.archived()["runA"]) == [800, 900, 1000]  # retention with head B@200: archived, not deleted
    uploader.close(timeout=5)


def test_startup_sync_skips_what_remote_retention_already_dropped(store, tmp_path):
    root = tmp_path / "checkpoints"
    for seq, step in enumerate((10, 20, 30, 40, 50), start=1):
        d = commit(root, step, "runA", seq, Parent("runA", step - 10) if seq > 1 else None, at=T0 + seq)
        if step >= 40:
            store.upload_checkpoint(d)  # the remote kept 40 and 50 (remote keep_last=2); 10-30 stay local only
    uploaded = []
    uploader = CheckpointUploader(store, keep_last=2, on_uploaded=lambda step, *_: uploaded.append(step))

    uploader.sync_pending(root)
    assert uploader.wait(timeout=60)

    assert uploaded == [] and store.committed_steps() == [40, 50]
    uploader.close(timeout=5)


def test_upload_then_retention_uses_the_newest_uploaded_as_head(store, tmp_path):
    # uploads go newest first: an older one uploaded after a newer one must not make the newer one look like
    # another lineage
    root = tmp_path / "checkpoints"
    dirs = [
        commit(root, step, "runA", seq, Parent("runA", step - 10) if seq > 1 else None, at=T0 + seq)
        for seq, step in enumerate((10, 20, 30), start=1)
    ]
    uploader = CheckpointUploader(store, keep_last=3)
    uploader.submit(dirs[2])
    assert uploader.wait(timeout=30)
    uploader.submit(dirs[1])
    assert uploader.wait(timeout=30)

    assert store.committed_steps() == [20, 30] and store.archived() == {}
    uploader.close(timeout=5)


def test_archive_copies_large_objects_server_side_with_their_sha256(s3_server, aws_env, tmp_path):
    bucket = s3_server.bucket()
    store = open_store(f"s3://{bucket}/run", s3_server.s3_config(part_size_mb=5))  # multipart copy above 5 MiB
    big = commit(tmp_path, 10, "runA", 1, at=T0)
    (big / "model.safetensors").write_bytes(b"\1" * (6 * 1024 * 1024 + 5))
    m = Manifest.load(big)
    m.files = [
        f
        if f.path != "model.safetensors"
        else FileEntry(f.path, 6 * 1024 * 1024 + 5, sha256_file(big / "model.safetensors"))
        for f in m.files
    ]
    write_manifest(big, m)
    store.upload_checkpoint(big)

    store.archive_checkpoint(10, Manifest.load(big))

    head = s3_server.client().head_object(
        Bucket=bucket, Key="run/checkpoints/archived/runA/step-00000010/model.safetensors"
    )
    assert head["ContentLength"] == 6 * 1024 * 1024 + 5
    assert head["Metadata"]["sha256"] == sha256_file(big / "model.safetensors")
    assert store.committed_steps() == [] and list(store.archived()["runA"]) == [10]
    assert store.pull_newest(tmp_path / "none") is None  # archived checkpoints are not pulled
