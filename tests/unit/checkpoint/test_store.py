"""The local checkpoint store: commit protocol (manifest last, rename), verification, pruning, stale temp dirs."""

import errno
import json
import time

import pytest
import torch

from trainer.checkpoint.manifest import Manifest, verify
from trainer.checkpoint.store import CheckpointStore, Snapshot
from trainer.errors import CheckpointError


def _snap(step, rank=0, world=1, **kw):
    s = Snapshot(step=step, rank=rank, world_size=world, **kw)
    s.tensors[f"w-rank{rank}.safetensors"] = {"w": torch.full((4,), float(step))}
    s.json[f"state-rank{rank}.json"] = {"step": step}
    return s


def test_commit_writes_manifest_last_and_renames(tmp_path):
    store = CheckpointStore(tmp_path)
    store.write_rank_files(_snap(5))
    assert store.committed_steps() == []  # files written, not committed
    path = store.commit(_snap(5))
    assert path.name == "step-00000005" and not store.tmp_path(5).exists()
    m = Manifest.load(path)
    assert m.step == 5 and {f.path for f in m.files} == {"w-rank0.safetensors", "state-rank0.json"}
    assert verify(path) == []


def test_multi_rank_commit_waits_for_every_rank(tmp_path):
    store = CheckpointStore(tmp_path)
    store.write_rank_files(_snap(3, rank=1, world=2))
    store.write_rank_files(_snap(3, rank=0, world=2))
    path = store.commit(_snap(3, rank=0, world=2), timeout=5)
    assert {f.path for f in Manifest.load(path).files} >= {"w-rank0.safetensors", "w-rank1.safetensors"}


def test_corrupt_newest_is_skipped_with_warning(tmp_path):
    store = CheckpointStore(tmp_path)
    for s in (1, 2, 3):
        store.write_rank_files(_snap(s))
        store.commit(_snap(s))
    f = store.path(3) / "w-rank0.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    (store.root / "step-00000004").mkdir()  # a dir with no manifest: never a checkpoint
    warnings = []
    assert store.latest_valid(warn=warnings.append) == (2, store.path(2))
    assert any("step-00000003" in w and "sha256" in w for w in warnings)
    assert (store.root / "step-00000004").is_dir()  # not committed: not a candidate, and left alone


def test_prune_keeps_newest_and_protected(tmp_path):
    store = CheckpointStore(tmp_path)
    for s in range(1, 6):
        store.write_rank_files(_snap(s))
        store.commit(_snap(s))
    assert store.prune(2, protect={2}) == ([1, 3], [])  # (deleted, archived)
    assert store.committed_steps() == [2, 4, 5]
    assert store.prune(0) == ([], [])  # 0/None: keep everything
    store.prune(1)
    assert store.committed_steps() == [5]


def test_stale_tmp_dirs_are_cleaned(tmp_path):
    store = CheckpointStore(tmp_path)
    store.write_rank_files(_snap(9))
    assert store.tmp_path(9).exists()
    store.clean_stale()
    assert not store.tmp_path(9).exists() and store.committed_steps() == []


def test_commit_takes_hashes_from_the_ranks_and_still_checks_sizes(tmp_path):
    import pytest

    from trainer.errors import CheckpointError

    store = CheckpointStore(tmp_path)
    store.write_rank_files(_snap(4, rank=0, world=2))
    store.write_rank_files(_snap(4, rank=1, world=2))
    marker = json.loads((store.tmp_path(4) / ".rank-00001.done").read_text())
    assert set(marker["files"]) == {"w-rank1.safetensors", "state-rank1.json"}
    path = store.commit(_snap(4, rank=0, world=2), timeout=5)
    assert verify(path) == []  # the hashes the ranks computed while writing are the files' hashes
    # a file that lost bytes after its rank wrote it is caught at commit, not committed
    store.write_rank_files(_snap(6))
    f = store.tmp_path(6) / "w-rank0.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="w-rank0.safetensors"):
        store.commit(_snap(6), timeout=5)
    assert 6 not in store.committed_steps()


def _weights_only_snap(step, rank=0, world=1):
    """A snapshot of one 256-element tensor and no JSON (the disk-full tests' size)."""
    s = Snapshot(step=step, rank=rank, world_size=world)
    s.tensors[f"w-rank{rank}.safetensors"] = {"w": torch.full((256,), float(step))}
    return s


def test_a_rank_that_cannot_write_fails_the_commit_at_once(tmp_path, monkeypatch):
    import trainer.checkpoint.store as ck

    store = CheckpointStore(tmp_path)
    store.write_rank_files(_weights_only_snap(5, rank=0, world=2))

    def full(path, tensors, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ck, "write_safetensors", full)
    with pytest.raises(OSError):
        store.write_rank_files(_weights_only_snap(5, rank=1, world=2))
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="rank 1 could not write.*No space left"):
        store.commit(_weights_only_snap(5, rank=0, world=2), timeout=60)
    assert time.monotonic() - t0 < 5  # not the 60 s a missing marker would cost
    store.abandon(_weights_only_snap(5, rank=0, world=2), timeout=1)
    assert not store.tmp_path(5).exists() and store.committed_steps() == []
