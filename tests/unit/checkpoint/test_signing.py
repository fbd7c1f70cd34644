"""Signed manifests (checkpoint.sign_key_env): written when committing, checked wherever a checkpoint is chosen; a
self-consistent forgery (files and sha256 match, signature does not) is skipped and kept, never deleted."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from tests.harness.remotes import make_checkpoint
from trainer.checkpoint import resume, signing
from trainer.checkpoint.manifest import Manifest, build_manifest, check, write_manifest
from trainer.checkpoint.store import CheckpointStore, Snapshot
from trainer.errors import ConfigError, UntrustedCheckpoint
from trainer.remote.store import open_store

KEY = "k" * 8 + "-a-test-signing-key-0123456789"
SIGNER = signing.Signer(KEY.encode(), env="TEST_SIGN_KEY")


def _signed(root: Path, step: int, signer=SIGNER, **kw) -> Path:
    d = make_checkpoint(root, step, **kw)
    write_manifest(d, signer.sign(Manifest.load(d)))
    return d


def tamper(ckpt: Path, keep_signature: bool = True) -> bytes:
    """Change model.safetensors' bytes and re-write the manifest with its new sha256 (self-consistent), keeping the
    old signature (now wrong) or dropping it; returns the forged bytes."""
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    m = Manifest.load(ckpt)
    for e in m.files:
        if e.path == "model.safetensors":
            e.sha256 = hashlib.sha256(bytes(data)).hexdigest()
    if not keep_signature:
        m.signature = None
    write_manifest(ckpt, m)
    return bytes(data)


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the signature


def test_signature_covers_every_field_but_itself_and_holds_no_key(tmp_path):
    d = _signed(tmp_path, 4)
    raw = (d / "manifest.json").read_text()
    m = Manifest.from_json(raw)
    assert m.signature["alg"] == "hmac-sha256" and m.signature["key_id"] == hashlib.sha256(KEY.encode()).hexdigest()[:8]
    assert KEY not in raw and KEY not in repr(SIGNER)
    assert SIGNER.problem(m) is None and check(d, signer=SIGNER).ok
    # canonical: compact JSON, sorted keys, no signature
    body = {k: v for k, v in json.loads(raw).items() if k != "signature"}
    assert m.canonical() == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    for change in (
        lambda x: setattr(x, "step", 5),
        lambda x: setattr(x, "run_id", "someoneelse"),
        lambda x: x.unknown.update(extra_field=1),
    ):
        forged = Manifest.from_json(raw)
        change(forged)
        assert "bad signature" in SIGNER.problem(forged)


def test_unsigned_other_key_and_forged_are_told_apart(tmp_path):
    plain = make_checkpoint(tmp_path, 1)
    other = _signed(tmp_path, 2, signer=signing.Signer(b"another-key-of-16-chars-or-more"))
    forged = _signed(tmp_path, 3)
    tamper(forged)
    assert "not signed (TEST_SIGN_KEY is set" in check(plain, signer=SIGNER).problems[0]
    assert "signed with another key" in check(other, signer=SIGNER).problems[0]
    v = check(forged, signer=SIGNER)
    assert v.untrusted and not v.corrupt and v.problems[0].startswith(f"{forged / 'manifest.json'}: bad signature")
    # signing off: all three read as before (the forgery is self-consistent)
    assert all(check(d).ok for d in (plain, other, forged))


def test_commit_signs_what_it_writes(tmp_path):
    store = CheckpointStore(tmp_path, SIGNER)
    snap = Snapshot(step=7, rank=0, world_size=1)
    snap.tensors["model.safetensors"] = {"w": torch.arange(4.0)}
    store.write_rank_files(snap)
    path = store.commit(snap)
    assert SIGNER.problem(Manifest.load(path)) is None
    plain = CheckpointStore(tmp_path / "plain")
    plain.write_rank_files(snap)
    assert Manifest.load(plain.commit(snap)).signature is None


# ---------------------------------------------------------------- local resume


def test_latest_valid_skips_a_forged_newest_and_keeps_it(tmp_path):
    store = CheckpointStore(tmp_path, SIGNER)
    for s in (4, 8):
        _signed(store.root, s)
    tamper(store.path(8))
    before = _tree(store.path(8))
    warnings = []
    assert store.latest_valid(warn=warnings.append, quarantine=True) == (4, store.path(4))
    assert len(warnings) == 1 and "step-00000008/manifest.json: bad signature" in warnings[0]
    assert _tree(store.path(8)) == before and store.corrupt() == []  # skipped, not moved, not deleted
    assert CheckpointStore(tmp_path).latest_valid() == (8, store.path(8))  # signing off: accepted


def test_retention_and_lineage_never_count_a_forgery(tmp_path):
    store = CheckpointStore(tmp_path, SIGNER)
    for s in (4, 8, 12):
        _signed(store.root, s)
    tamper(store.path(12), keep_signature=False)
    before = _tree(store.path(12))
    assert sorted(store.manifests()[0]) == [4, 8] and store.manifests()[1][12].untrusted

    assert store.prune(1) == ([4], [])  # the head is the newest trusted one, 8: kept, and the forgery untouched

    assert store.committed_steps() == [8, 12] and _tree(store.path(12)) == before


def test_choose_stops_rather_than_start_over_unsigned_work_and_refuses_an_unsigned_path(tmp_path, caplog):
    store = CheckpointStore(tmp_path, SIGNER)
    d = make_checkpoint(store.root, 4)  # unsigned (written with signing off), or signed with a rotated key
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match=r"local steps \[4\].*none is trusted"):
        resume.choose("auto", store, None, 0, lambda m: None, lambda: None)  # not step 0 over the work
    assert "skipping checkpoint" in caplog.text and "not signed" in caplog.text
    assert (d / "manifest.json").is_file()
    assert resume.choose("auto", CheckpointStore(tmp_path / "empty", SIGNER), None, 0, print, lambda: None).path is None
    with pytest.raises(ConfigError, match=r"--resume .*step-00000004: not signed"):
        resume.choose(str(d), store, None, 0, lambda m: None, lambda: None)
    assert resume.choose("auto", CheckpointStore(tmp_path), None, 0, print, lambda: None).path == d


# ---------------------------------------------------------------- remote pull


def test_remote_forgery_is_refused_at_pull_and_the_previous_is_pulled(remote, tmp_path, caplog):
    local = tmp_path / "local"
    plain = open_store(remote.uri, remote.s3_config)
    for s in (4, 8):
        plain.upload_checkpoint(_signed(local, s))
    forged_bytes = tamper(local / "step-00000008")  # then the forgery lands in the bucket
    remote.put("checkpoints/step-00000008/model.safetensors", forged_bytes)
    remote.put("checkpoints/step-00000008/manifest.json", (local / "step-00000008" / "manifest.json").read_bytes())
    keys = remote.keys()
    signed = open_store(remote.uri, remote.s3_config, SIGNER)

    manifests, problems = signed.committed()
    assert (
        sorted(manifests) == [4] and len(problems) == 1 and "step-00000008/manifest.json: bad signature" in problems[0]
    )
    with pytest.raises(UntrustedCheckpoint, match="bad signature"):
        signed.pull(8, tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        assert signed.pull_newest(tmp_path / "out") == (4, tmp_path / "out" / "step-00000004")
    assert remote.keys() == keys  # nothing deleted or moved remotely
    assert not (tmp_path / "out" / "step-00000008").exists()
    # signing off: the self-consistent forgery is accepted
    assert plain.pull_newest(tmp_path / "off")[0] == 8


def test_uploading_over_a_forgery_moves_it_to_corrupt_not_over_it(remote, tmp_path):
    signed = open_store(remote.uri, remote.s3_config, SIGNER)
    mine, forged = make_checkpoint(tmp_path / "mine", 8), make_checkpoint(tmp_path / "theirs", 8, seed=1)
    for d, signer in ((mine, SIGNER), (forged, None)):  # the forgery claims to be an earlier write of mine
        m = Manifest.load(d)
        m.run_id = "run1"
        write_manifest(d, signer.sign(m) if signer else m)
    open_store(remote.uri, remote.s3_config).upload_checkpoint(forged)

    signed.upload_checkpoint(mine)

    assert SIGNER.problem(signed.get_manifest(8)) is None
    assert any(k.startswith("checkpoints/corrupt/") and k.endswith("model.safetensors") for k in remote.keys())


def test_an_untrusted_local_checkpoint_is_never_uploaded(remote, tmp_path):
    signed = open_store(remote.uri, remote.s3_config, SIGNER)
    signed.upload_checkpoint(_signed(tmp_path / "local", 4))
    forged = _signed(tmp_path / "local", 8)
    tamper(forged)
    keys = remote.keys()
    with pytest.raises(UntrustedCheckpoint, match=r"step-00000008/manifest.json: bad signature.*; not uploaded"):
        signed.upload_checkpoint(forged)
    assert remote.keys() == keys


# ---------------------------------------------------------------- the key's variable


def test_key_variable_unset_empty_short_or_a_key_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TEST_SIGN_KEY", raising=False)
    assert signing.from_env(None) is None
    with pytest.raises(ConfigError, match="environment variable TEST_SIGN_KEY is not set or empty"):
        signing.from_env("TEST_SIGN_KEY")
    monkeypatch.setenv("TEST_SIGN_KEY", "  ")
    with pytest.raises(ConfigError, match="TEST_SIGN_KEY is not set or empty"):
        signing.from_env("TEST_SIGN_KEY")
    monkeypatch.setenv("TEST_SIGN_KEY", "short")
    with pytest.raises(ConfigError, match="shorter than 16 characters"):
        signing.from_env("TEST_SIGN_KEY")
    monkeypatch.setenv("TEST_SIGN_KEY", KEY)
    assert signing.from_env("TEST_SIGN_KEY").key_id == SIGNER.key_id
    with pytest.raises(ConfigError) as e:  # the key itself given as the name: never repeated
        signing.from_env("s3cr3t/key+value=")
    assert "s3cr3t" not in str(e.value) and "NAME of an environment variable" in str(e.value)


def test_a_malformed_signature_field_is_a_corrupt_manifest(tmp_path):
    d = make_checkpoint(tmp_path, 1)
    m = json.loads((d / "manifest.json").read_text())
    m["signature"] = "yes"
    (d / "manifest.json").write_text(json.dumps(m))
    assert check(d).corrupt


def test_build_manifest_of_a_signed_dir_then_signing_again_verifies(tmp_path):
    d = make_checkpoint(tmp_path, 2)
    m = build_manifest(d, 2)
    assert SIGNER.problem(SIGNER.sign(m)) is None
