"""The bucket side of a checkpoint committed by several nodes (distributed.shared_output_dir=false): each node's
files go up without a manifest, rank 0 commits only what is there as uploaded, and nothing committed at that step is
ever written over (trainer/remote/store.py: clear_step, upload_files, commit_manifest)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.harness.remotes import make_checkpoint
from tests.unit.remote.helpers import read
from trainer.checkpoint.manifest import Manifest, sha256_file
from trainer.errors import CheckpointError
from trainer.remote.store import open_store


@pytest.fixture
def store(remote):
    s = open_store(remote.uri, remote.s3_config)
    yield s
    s.close()


def _two_nodes(tmp_path, step: int, run_id: str = "run-a") -> tuple[Manifest, list, list]:
    """One checkpoint's files split over two node dirs, and the manifest rank 0 would build from their reports."""
    whole = make_checkpoint(tmp_path / "whole", step)
    m = dataclasses.replace(Manifest.load(whole), run_id=run_id, seq=1)
    nodes = []
    for i, part in enumerate((m.files[:1], m.files[1:])):
        d = tmp_path / f"node{i}"
        d.mkdir()
        for f in part:
            (d / f.path).write_bytes((whole / f.path).read_bytes())
        nodes.append((d, part))
    return m, nodes, whole


def test_nodes_upload_their_files_and_rank_0_commits_them_verified(store, remote, tmp_path):
    m, nodes, _ = _two_nodes(tmp_path, 10)
    assert store.clear_step(10, "run-a") is False  # nothing there
    for d, files in nodes:
        store.upload_files(d, 10, files)
    assert store.committed_steps() == []  # files without a manifest are not a checkpoint
    store.commit_manifest(m)
    assert store.committed_steps() == [10]
    assert store.get_manifest(10).files == m.files
    pulled = store.pull(10, tmp_path / "pulled")
    assert sorted(p.name for p in pulled.iterdir()) == sorted([f.path for f in m.files] + ["manifest.json"])


def test_a_file_missing_or_not_as_uploaded_is_not_committed(store, remote, tmp_path):
    m, nodes, _ = _two_nodes(tmp_path, 10)
    d, files = nodes[0]
    store.upload_files(d, 10, files)  # the other node never uploaded
    with pytest.raises(CheckpointError, match="not as uploaded"):
        store.commit_manifest(m)
    assert store.committed_steps() == []
    # another launch on the same prefix uploaded that file with other bytes of the same size: the sha256 tells
    d, files = nodes[1]
    (d / files[0].path).write_bytes(b"x" * files[0].size)
    store.upload_files(d, 10, [dataclasses.replace(files[0], sha256=sha256_file(d / files[0].path))] + files[1:])
    with pytest.raises(CheckpointError, match="not as uploaded"):
        store.commit_manifest(m)
    assert store.committed_steps() == []


def test_a_committed_checkpoint_is_never_uncommitted_or_written_over(store, remote, tmp_path):
    m, nodes, whole = _two_nodes(tmp_path, 10)
    for d, files in nodes:
        store.upload_files(d, 10, files)
    store.commit_manifest(m)
    committed = read(remote, "checkpoints/step-00000010/manifest.json")
    # the same run saving that step again (an emergency right after resuming from it): nothing to do, untouched
    assert store.clear_step(10, "run-a") is True
    assert read(remote, "checkpoints/step-00000010/manifest.json") == committed
    # another writer's manifest appeared meanwhile: refused, not replaced
    other = dataclasses.replace(m, run_id="run-b")
    with pytest.raises(CheckpointError, match="another writer committed this step"):
        store.commit_manifest(other)
    assert read(remote, "checkpoints/step-00000010/manifest.json") == committed
    # another lineage saving step 10: the committed one is archived first (kept whole), never overwritten
    assert store.clear_step(10, "run-b") is False
    assert store.committed_steps() == []
    archived = store.archived()
    assert list(archived) == ["run-a"] and list(archived["run-a"]) == [10]
