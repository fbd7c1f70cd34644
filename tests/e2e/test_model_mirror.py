"""model.mirror against a real S3 server (SeaweedFS): the first pod leaves a copy of the base model in the bucket, a
fresh pod (empty disk, no model dir, the hub unreachable) starts from the bucket alone; a tampered or unsigned mirror
is refused and not used; and the cold start measured with the mirror on and off."""

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.e2e.test_remote_training import s3_overrides
from tests.harness.common import TINY, assert_bitwise_equal, run_cli, trainable_weights
from trainer import model as model_lib
from trainer.config.loader import load_config
from trainer.model_mirror import mirror_rel

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY_ENV = "SPOT_TRAINER_TEST_MIRROR_KEY"


@pytest.fixture
def offline(monkeypatch):
    """The hub is unreachable, as on a pod without it: transformers and huggingface_hub never go to the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def make_model_dir(dest: Path) -> Path:
    """A tiny random Llama with its tokenizer saved as a plain model dir (what a hub snapshot looks like)."""
    cfg = load_config(None, TINY)
    work = dest.parent / "materialize"
    work.mkdir(parents=True)
    shutil.move(str(model_lib.materialize_builtin(cfg, model_lib.load_tokenizer(cfg), work)), dest)
    shutil.rmtree(work)
    return dest


def output(*args, **kw) -> str:
    """run_cli's stdout and stderr (the trainer's lines and its warnings) in one text."""
    p = run_cli(*args, **kw)
    return p.stdout + p.stderr


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mirror_prefix(overrides: list[str], prefix: str) -> str:
    return f"{prefix}/{mirror_rel(load_config(None, overrides))}"


def objects(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    c = s3_server.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    return {k[len(prefix) + 1 :]: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def events(out: Path, name: str) -> list[dict]:
    lines = (out / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def test_fresh_pod_starts_from_the_bucket_alone(tmp_path, s3_server, aws_env, offline):
    bucket = s3_server.bucket()
    model_dir = make_model_dir(tmp_path / "models" / "tiny-llama")
    over = TINY + s3_overrides(s3_server, bucket) + [f"model.name_or_path={model_dir}", "model.method=lora"]
    mirror_on = over + ["model.mirror=true"]
    run_cli("train", overrides=mirror_on + ["train.max_steps=8"], output_dir=tmp_path / "pod1")

    # the bucket holds every file of the model dir, byte for byte, and a manifest naming each sha256
    prefix = mirror_prefix(mirror_on, "runs/exp")
    remote = objects(s3_server, bucket, prefix)
    manifest = json.loads(remote.pop("manifest.json"))
    local = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert remote == local
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {k: sha(v) for k, v in local.items()}
    assert manifest["kind"] == "base-model"

    # the pod, its disk and the model dir are gone; the hub cannot be reached
    shutil.rmtree(tmp_path / "pod1")
    shutil.rmtree(model_dir)
    without = run_cli("train", overrides=over, output_dir=tmp_path / "no-mirror", check=False)
    assert without.returncode == 2 and "cannot load a tokenizer" in without.stderr, without.stderr  # nothing else

    out = tmp_path / "pod2"
    text = output("train", overrides=mirror_on, output_dir=out)
    assert "base model from the mirror" in text and "sha256 verified" in text, text
    assert "pulled checkpoint step 8" in text, text  # beside the base model
    assert events(out, "train_start")[0]["step"] == 8
    assert events(out, "train_end")[-1] == {**events(out, "train_end")[-1], "step": 12, "status": "done"}
    copy = {p.name: p.read_bytes() for p in (out / "base-model").iterdir() if p.name != "manifest.json"}
    assert copy == local
    # the checkpoints keep the configured model, not the local copy's path
    assert str(model_dir) in (out / "checkpoints" / "step-00000012" / "config.yaml").read_text()


def test_tampered_or_unsigned_mirror_is_refused_and_not_used(tmp_path, s3_server, aws_env, offline, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k" * 40)
    bucket = s3_server.bucket()
    over = TINY + s3_overrides(s3_server, bucket) + ["model.mirror=true", f"checkpoint.sign_key_env={KEY_ENV}"]
    run_cli("train", overrides=over + ["train.max_steps=4"], output_dir=tmp_path / "pod1")
    prefix = mirror_prefix(over, "runs/exp")
    c = s3_server.client()
    raw = c.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read()
    signed = json.loads(raw)
    assert signed["signature"]["alg"] == "hmac-sha256"
    good_weights = c.get_object(Bucket=bucket, Key=f"{prefix}/model.safetensors")["Body"].read()

    # 1. the manifest rewritten without its signature: refused, the run takes the normal path (the built-in init)
    unsigned = {k: v for k, v in signed.items() if k != "signature"}
    c.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=json.dumps(unsigned).encode())
    text = output("train", overrides=over + ["train.max_steps=8"], output_dir=tmp_path / "pod2")
    assert "not signed" in text and "base model from the mirror" not in text, text
    assert not (tmp_path / "pod2" / "base-model" / "manifest.json").exists()
    assert events(tmp_path / "pod2", "train_start")[0]["step"] == 4

    # 2. the signed manifest back, one byte of the weights changed (same size): refused by its sha256
    c.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=raw)
    bad = bytearray(good_weights)
    bad[len(bad) // 2] ^= 0xFF
    c.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=bytes(bad))
    out = tmp_path / "pod3"
    text = output("train", overrides=over, output_dir=out)
    refusals = [line for line in text.splitlines() if "model.safetensors: sha256 does not match" in line]
    assert len(refusals) == 1 and "loading the model the normal way" in refusals[0], text
    assert "base model from the mirror" not in text
    assert events(out, "train_start")[0]["step"] == 8
    # not used: the weights here are the built-in init's, not the tampered bytes; the bucket is left as it is
    assert (out / "base-model" / "model.safetensors").read_bytes() == good_weights
    assert not (out / "base-model" / "manifest.json").exists()
    assert not (out / ".base-model-pull" / "model.safetensors").exists()  # the bad copy is not kept
    assert c.get_object(Bucket=bucket, Key=f"{prefix}/model.safetensors")["Body"].read() == bytes(bad)
    assert c.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read() == raw


def first_resumed_step(out: Path, started: float) -> float:
    """Seconds from launch to the first training step after the resume (metrics.jsonl, one line a step)."""
    resumed = events(out, "train_start")[0]["step"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = min(m["time"] for m in lines if m.get("step", 0) > resumed and "loss" in m)
    return first - started


def test_cold_start_mirror_on_vs_off(tmp_path, s3_server, aws_env, offline):
    """Empty disk to the first resumed step, tiny model, SeaweedFS on this machine (printed; run with -s)."""
    timings = {}
    for mirror in ("false", "true"):
        bucket = s3_server.bucket()
        over = TINY + s3_overrides(s3_server, bucket) + [f"model.mirror={mirror}", "train.log_every_steps=1"]
        run_cli("train", overrides=over + ["train.max_steps=4"], output_dir=tmp_path / f"seed-{mirror}")
        out = tmp_path / f"fresh-{mirror}"
        started = time.time()
        text = output("train", overrides=over + ["train.max_steps=6"], output_dir=out)
        timings[mirror] = first_resumed_step(out, started)
        assert ("base model from the mirror" in text) == (mirror == "true"), text
        assert events(out, "train_start")[0]["step"] == 4
    print(
        f"\ncold start to the first resumed step (tiny model, SeaweedFS): mirror off {timings['false']:.2f} s, "
        f"mirror on {timings['true']:.2f} s"
    )


QLORA = ["model.method=qlora", "train.optimizer=paged_adamw_8bit", "lora.r=64"]  # as tests/e2e/test_resume_exact.py


def test_a_4bit_mirror_is_a_third_of_the_bytes_and_a_fresh_pod_trains_bitwise_the_same(
    tmp_path, s3_server, aws_env, offline
):
    bucket = s3_server.bucket()
    model_dir = make_model_dir(tmp_path / "models" / "tiny-llama")
    from safetensors.torch import load, load_file

    original = load_file(str(model_dir / "model.safetensors"))
    base = TINY + QLORA + [f"model.name_or_path={model_dir}"]
    # the reference: 8 steps, then a restart to 12, loading (and quantizing) the original weights both times
    run_cli("train", overrides=base + ["train.max_steps=8"], output_dir=tmp_path / "ref")
    run_cli("train", overrides=base, output_dir=tmp_path / "ref")

    mirror_on = base + s3_overrides(s3_server, bucket) + ["model.mirror=true", "model.mirror_4bit=true"]
    run_cli("train", overrides=mirror_on + ["train.max_steps=8"], output_dir=tmp_path / "pod1")
    assert not (tmp_path / "pod1" / ".base-model-4bit").exists()  # the local copy for the upload, gone once up
    remote = objects(s3_server, bucket, mirror_prefix(mirror_on, "runs/exp"))
    manifest = json.loads(remote.pop("manifest.json"))
    assert manifest["kind"] == "base-model" and "quantization_config" in json.loads(remote["config.json"])
    # every linear layer's weights stored as 4-bit (two a byte, with their quantization state): for an 8B model that
    # is ~5.7 GB of 16 GB in bf16 (the embeddings and the head stay in the load dtype)
    copy = load(remote["model.safetensors"])
    linear = [k for k in original if k.endswith("_proj.weight")]
    assert linear and all(copy[k].dtype == torch.uint8 and 2 * copy[k].numel() == original[k].numel() for k in linear)
    assert all(f"{k}.absmax" in copy for k in linear)
    tokenizer = {p.name for p in model_dir.iterdir() if p.name.startswith("tokenizer")}
    assert tokenizer and tokenizer <= set(remote)
    # the plain mirror is another copy: not made, and a 4-bit copy is never published under its name
    assert not objects(
        s3_server, bucket, mirror_prefix(base + s3_overrides(s3_server, bucket) + ["model.mirror=true"], "runs/exp")
    )

    shutil.rmtree(tmp_path / "pod1")
    shutil.rmtree(model_dir)  # a fresh pod: no model dir, the hub unreachable
    out = tmp_path / "pod2"
    text = output("train", overrides=mirror_on, output_dir=out)
    assert "base model from the mirror" in text and "pulled checkpoint step 8" in text, text
    assert events(out, "train_start")[0]["step"] == 8
    assert_bitwise_equal(trainable_weights(out, 12), trainable_weights(tmp_path / "ref", 12))
