import json

import torch

from trainer.checkpoint.store import CheckpointStore, Snapshot
from trainer.checkpoint.writer import CheckpointWriter
from trainer.checkpoint.manifest import Manifest, verify


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
    assert any("step-00000004" in w for w in warnings)


def test_prune_keeps_newest_and_protected(tmp_path):
    store = CheckpointStore(tmp_path)
    for s in range(1, 6):
        store.write_rank_files(_snap(s))
        store.commit(_snap(s))
    assert store.prune(2, protect={2}) == [1, 3]
    assert store.committed_steps() == [2, 4, 5]
    assert store.prune(0) == []  # 0/None: keep everything
    store.prune(1)
    assert store.committed_steps() == [5]


def test_stale_tmp_dirs_are_cleaned(tmp_path):
    store = CheckpointStore(tmp_path)
    store.write_rank_files(_snap(9))
    assert store.tmp_path(9).exists()
    store.clean_stale()
    assert not store.tmp_path(9).exists() and store.committed_steps() == []


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


def test_streaming_safetensors_reads_back_with_safetensors_and_hash_matches_the_file(tmp_path):
    import hashlib

    import pytest
    from safetensors import safe_open
    from safetensors.torch import load_file

    from trainer.checkpoint.stream import write_safetensors

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=g)
    tensors = {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f32": torch.randn(7, generator=g),
        "f16": torch.randn(2, 2, generator=g).half(),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "narrow": flat.narrow(0, 137, 101),  # a view with a storage offset, as ZeRO's partitions are
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }
    size, digest = write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt", "k": "v"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert size == len(raw) and digest == hashlib.sha256(raw).hexdigest()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
        assert torch.equal(f.get_slice("narrow")[10:20], flat[147:157])
    with pytest.raises(TypeError, match="complex"):
        write_safetensors(tmp_path / "y.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


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
