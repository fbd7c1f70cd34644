"""Streaming safetensors writes: what safetensors reads back, and the sha256 computed while writing."""

import torch


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
