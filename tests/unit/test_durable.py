"""trainer.durable: whole-or-nothing file replacement and hashed writes."""

import hashlib
import os

import pytest

import trainer.durable as durable
from trainer.durable import replace_file, write_file


def test_write_file_returns_the_size_and_sha256(tmp_path):
    data = os.urandom(10_000)
    assert write_file(tmp_path / "f.bin", data) == (10_000, hashlib.sha256(data).hexdigest())
    assert (tmp_path / "f.bin").read_bytes() == data
    assert write_file(tmp_path / "e.bin", b"", fsync=False) == (0, hashlib.sha256(b"").hexdigest())
    assert (tmp_path / "e.bin").read_bytes() == b""


@pytest.mark.parametrize("fsync", [True, False])
def test_replace_file_swaps_in_a_new_file_and_leaves_no_temp_file(tmp_path, fsync):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old contents")
    with open(target, "rb") as reader:  # a reader that opened the old file before the replace...
        replace_file(target, b"new", fsync=fsync)
        assert reader.read() == b"old contents"  # ...still sees it whole: a rename, not a rewrite in place
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    replace_file(tmp_path / "fresh", b"x", fsync=fsync)  # no previous file: created
    assert (tmp_path / "fresh").read_bytes() == b"x"


def test_a_failed_replace_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "heartbeat"
    target.write_bytes(b"41\n")

    def broken_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(durable.os, "replace", broken_rename)
    with pytest.raises(OSError, match="rename failed"):
        replace_file(target, b"42\n")
    assert target.read_bytes() == b"41\n"
    assert [p.name for p in tmp_path.iterdir()] == ["heartbeat"]
