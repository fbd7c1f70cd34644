"""The background checkpoint writer: commits in order, and a full disk that does not stop training."""

import errno
import json

import pytest
import torch

from trainer.checkpoint.store import CheckpointStore, Snapshot
from trainer.checkpoint.writer import CheckpointWriter
from trainer.errors import CheckpointError


def _snap(step, rank=0, world=1, **kw):
    s = Snapshot(step=step, rank=rank, world_size=world, **kw)
    s.tensors[f"w-rank{rank}.safetensors"] = {"w": torch.full((4,), float(step))}
    s.json[f"state-rank{rank}.json"] = {"step": step}
    return s


def _weights_only_snap(step, rank=0, world=1):
    """A snapshot of one 256-element tensor and no JSON (the disk-full tests' size)."""
    s = Snapshot(step=step, rank=rank, world_size=world)
    s.tensors[f"w-rank{rank}.safetensors"] = {"w": torch.full((256,), float(step))}
    return s


def test_background_writer_commits_in_order_and_reports(tmp_path):
    store = CheckpointStore(tmp_path)
    seen = []
    w = CheckpointWriter(store, 0, lambda snap, path, secs: seen.append((snap.step, path.name)))
    for s in (2, 4, 6):
        w.submit(_snap(s))
    w.wait()
    w.close()
    assert seen == [(2, "step-00000002"), (4, "step-00000004"), (6, "step-00000006")]
    assert json.loads((store.path(6) / "state-rank0.json").read_text()) == {"step": 6}


# ---------------------------------------------------------------- out of space (end to end: tests/e2e/test_disk_full)


def test_periodic_checkpoint_out_of_space_is_reported_and_the_writer_goes_on(tmp_path, monkeypatch):
    import trainer.checkpoint.store as ck

    real = ck.write_safetensors

    def flaky(path, tensors, **kw):  # the disk is full for step 2 only
        if ".tmp-step-00000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, tensors, **kw)

    monkeypatch.setattr(ck, "write_safetensors", flaky)
    store, failed, committed = CheckpointStore(tmp_path), [], []
    w = CheckpointWriter(store, 0, lambda s, p, t: committed.append(s.step), lambda s, e: failed.append((s.step, e)))
    for step in (1, 2, 3):
        w.submit(_weights_only_snap(step))
    w.wait()  # does not raise: training goes on
    w.close()
    assert committed == [1, 3] and [s for s, _ in failed] == [2]
    assert store.committed_steps() == [1, 3] and not store.tmp_path(2).exists()

    # any other error still reaches the training thread
    def broken(path, tensors, **kw):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(ck, "write_safetensors", broken)
    w = CheckpointWriter(store, 0, lambda *a: None, lambda *a: None)
    w.submit(_weights_only_snap(4))
    with pytest.raises(CheckpointError, match="Input/output error"):
        w.wait()
    w.close()
