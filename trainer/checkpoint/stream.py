"""Streaming safetensors writer that hashes what it writes.

`safetensors.torch.save_file` first serializes the whole file into one buffer (a second copy of the state in
RAM) and the manifest then reads the file back to hash it. For a full fine-tuning checkpoint (tens of GB) that
is most of the time an emergency checkpoint takes. Here each tensor's bytes go straight from its memory to the
file, and sha256 is computed over the same bytes on the way: one pass, no extra copy. The file is a standard
safetensors file (read back by `safetensors.safe_open` / `load_file` in the tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch

_CHUNK = 64 * 1024 * 1024
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    fsync: bool = True,
) -> tuple[int, str]:
    """Write `tensors` to `path` as safetensors; returns (size in bytes, hex sha256 of the file)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    order = sorted(tensors)
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for piece in (struct.pack("<Q", len(head)), head):
            h.update(piece)
            f.write(piece)
        for name in order:
            data = _bytes(tensors[name])
            for i in range(0, len(data), _CHUNK):
                chunk = data[i : i + _CHUNK]
                h.update(chunk)  # hashlib and file writes release the GIL: other files write meanwhile
                f.write(chunk)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        size = f.tell()
    return size, h.hexdigest()


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> tuple[int, str]:
    """Write a small file durably; returns (size, sha256)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return len(data), hashlib.sha256(data).hexdigest()
