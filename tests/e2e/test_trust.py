"""A bucket (or a run dir) someone else can write cannot feed a run state: signed manifests refuse a self-consistent
forgery and fall back to the previous good checkpoint; export does not obey final/spot_trainer.json; credentials in
a URI are refused without a trace of the secret."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.harness.common import TINY, run_cli
from trainer.checkpoint.manifest import Manifest, build_manifest, write_manifest
from trainer.checkpoint.signing import Signer

pytestmark = pytest.mark.e2e

KEY_ENV = "SPOT_TRAINER_TEST_SIGN_KEY"
KEY = "9f2c4e1a7b3d5f60" * 4
SIGN = [f"checkpoint.sign_key_env={KEY_ENV}"]


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _start_step(out: Path) -> int:
    return [e for e in _events(out) if e["event"] == "train_start"][-1]["step"]


def forge(ckpt: Path) -> bytes:
    """Change model.safetensors and re-write the manifest with its new sha256 (self-consistent), keeping the old
    signature, which no longer matches; returns the forged bytes."""
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float: +inf
    f.write_bytes(bytes(data))
    m = Manifest.load(ckpt)
    next(e for e in m.files if e.path == "model.safetensors").sha256 = hashlib.sha256(data).hexdigest()
    write_manifest(ckpt, m)
    return bytes(data)


@pytest.mark.slow
def test_signed_remote_refuses_a_forgery_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    bucket = tmp_path / "bucket"
    remote = [f"checkpoint.remote=file://{bucket}"]
    run_cli("train", overrides=TINY + remote + SIGN, output_dir=tmp_path / "pod1")
    signer = Signer(KEY.encode())
    for d in (bucket / "checkpoints" / "step-00000012", bucket / "final"):
        assert signer.problem(Manifest.load(d)) is None
    forged = forge(bucket / "checkpoints" / "step-00000012")

    # signing off: the self-consistent forgery is accepted
    off = run_cli("train", overrides=TINY + remote, output_dir=tmp_path / "pod2")
    assert "pulled checkpoint step 12" in off.stdout and _start_step(tmp_path / "pod2") == 12

    # ckpt verify with the key: BAD SIGNATURE, exit 1; without it: files ok, signature not checked
    p = run_cli("ckpt", "verify", overrides=SIGN, output_dir=tmp_path / "pod2", check=False)
    assert p.returncode == 1 and "step 12: BAD SIGNATURE: " in p.stdout and "bad signature" in p.stdout, p.stdout
    p = run_cli("ckpt", "verify", output_dir=tmp_path / "pod2")
    assert p.stdout.strip() == "step 12: ok, signed, not checked (checkpoint.sign_key_env is not set)"

    # signing on, a fresh pod: step 12 refused with a line naming it, step 8 pulled, the run ends at 12 again
    on = run_cli("train", overrides=TINY + remote + SIGN, output_dir=tmp_path / "pod3")
    named = [ln for ln in on.stderr.splitlines() if "step-00000012/manifest.json: bad signature" in ln]
    assert len(named) == 1 and "remote checkpoint skipped" in named[0], on.stderr
    assert "pulled checkpoint step 8" in on.stdout and _start_step(tmp_path / "pod3") == 8
    assert signer.problem(Manifest.load(bucket / "checkpoints" / "step-00000012")) is None  # its own, signed
    kept = [p for p in (bucket / "checkpoints" / "corrupt").rglob("model.safetensors") if p.read_bytes() == forged]
    assert len(kept) == 1  # the forgery was moved aside, not deleted
    assert KEY not in "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_signed_local_checkpoints_refuse_a_forgery_and_resume_the_previous(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "run"
    run_cli("train", overrides=TINY + SIGN + ["train.max_steps=8"], output_dir=out)
    forged = forge(out / "checkpoints" / "step-00000008")

    p = run_cli("train", overrides=TINY + SIGN + ["train.max_steps=8"], output_dir=out)

    assert f"skipping checkpoint {out / 'checkpoints' / 'step-00000008'}: " in p.stderr, p.stderr
    assert "bad signature" in p.stderr and _start_step(out) == 4
    kept = [q for q in (out / "checkpoints").rglob("model.safetensors") if q.read_bytes() == forged]
    assert len(kept) == 1 and "archived" in kept[0].parts  # set aside when step 8 was written again, never deleted
    # signing off, the same forgery would have been resumed
    forge(out / "checkpoints" / "step-00000008")
    p = run_cli("train", overrides=TINY + ["train.max_steps=8"], output_dir=out)
    assert _start_step(out) == 8


def test_signing_key_variable_unset_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    for cmd in (("train",), ("run",), ("ckpt", "verify")):
        p = run_cli(*cmd, overrides=TINY + SIGN, output_dir=tmp_path / "run", check=False)
        assert p.returncode == 2, (cmd, p.stdout + p.stderr)
        assert p.stderr.strip().splitlines() == [
            f"error: checkpoint.sign_key_env: environment variable {KEY_ENV} is not set or empty; export the "
            f"signing key in it (e.g. {KEY_ENV}=$(openssl rand -hex 32)), or unset checkpoint.sign_key_env to "
            f"turn signing off"
        ]
    assert not (tmp_path / "run").exists()  # refused before any work: no output dir, no lock, no events


EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


@pytest.mark.slow
def test_export_merge_takes_the_base_model_and_trust_from_the_config_not_final(tmp_path):
    out = tmp_path / "run"
    run_cli("train", overrides=TINY + ["model.method=lora", "train.max_steps=4"], output_dir=out)
    evil, marker = tmp_path / "evil-model", tmp_path / "remote-code-ran"
    evil.mkdir()
    (evil / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    (evil / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}, "architectures": ["X"]})
    )
    final = out / "final"
    meta = json.loads((final / "spot_trainer.json").read_text())
    meta["base_model"] = str(evil)
    meta["config"]["model"]["trust_remote_code"] = True
    (final / "spot_trainer.json").write_text(json.dumps(meta))
    m = Manifest.load(final)  # self-consistent: final/ verifies
    write_manifest(final, build_manifest(final, m.step, kind="final", run_id=m.run_id))

    p = run_cli("export", str(out), "--merge")

    assert "exported merged model" in p.stdout and not marker.exists()
    said = [ln for ln in p.stderr.splitlines() if "spot_trainer.json says" in ln]
    assert len(said) == 1 and "not obeyed" in said[0] and str(evil) in said[0]
    assert "trust_remote_code False" in said[0] and str(out / "base-model") in said[0]
    assert (out / "export" / "model.safetensors").is_file()
    about = json.loads((out / "export" / "spot_trainer.json").read_text())
    assert about["base_model"] == str(out / "base-model") and about["config"]["model"]["trust_remote_code"] is False


SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzz"


@pytest.mark.parametrize(
    "args,overrides",
    [
        (("train",), [f"checkpoint.remote=s3://AKIAEXAMPLE:{SECRET}@bucket/runs/exp1"]),
        (("run",), [f"checkpoint.remote=s3://AKIAEXAMPLE:{SECRET}@bucket/runs/exp1"]),
        (("train",), ["checkpoint.remote=s3://bucket/x", f"checkpoint.s3.endpoint_url=http://k:{SECRET}@127.0.0.1:9"]),
        (("ckpt", "list", "--remote", f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"), []),
        (("export", "{out}", "--to", f"s3://AKIAEXAMPLE:{SECRET}@bucket/models"), []),
    ],
)
def test_credentials_in_a_uri_exit_2_without_a_trace_of_the_secret(tmp_path, args, overrides):
    out = tmp_path / "run"
    out.mkdir()
    args = tuple(a.format(out=out) for a in args)
    p = run_cli(*args, overrides=TINY + overrides, output_dir=out, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "the URI holds credentials" in err[0] and "AWS_ACCESS_KEY_ID" in err[0], p.stderr
    assert SECRET not in p.stdout + p.stderr and "AKIAEXAMPLE" not in p.stdout + p.stderr
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert not any(SECRET.encode() in f.read_bytes() for f in files), files


@pytest.mark.slow
@pytest.mark.deepspeed
def test_a_forged_optimizer_step_stops_a_cpu_adam_resume_at_once(tmp_path):
    out = tmp_path / "run"
    zero = TINY + ["distributed.deepspeed=zero2_offload"]
    run_cli("train", overrides=zero + ["train.max_steps=4"], output_dir=out)
    ckpt = out / "checkpoints" / "step-00000004"
    meta = json.loads((ckpt / "optimizer-rank00000.json").read_text())
    for e in meta["params"].values():
        e["values"]["step"] = 10**12  # replayed one C++ call at a time: weeks
    (ckpt / "optimizer-rank00000.json").write_text(json.dumps(meta))
    m = Manifest.load(ckpt)  # self-consistent: the checkpoint verifies
    write_manifest(ckpt, build_manifest(ckpt, m.step, kind=m.kind, run_id=m.run_id, seq=m.seq, parent=m.parent))

    p = run_cli("train", overrides=zero + ["train.max_steps=8"], output_dir=out, timeout=180, check=False)

    assert p.returncode == 1, p.stdout + p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "optimizer-rank00000.json: parameter " in err[0], p.stderr
    assert "optimizer step 1000000000000 is not a step between 0 and 4" in err[0] and "Traceback" not in p.stderr
