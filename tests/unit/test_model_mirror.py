"""trainer/model_mirror.py without training: the config key, the fingerprint, what is mirrored, a round trip through a
file:// remote with its manifest checked (the S3 end-to-end tests are tests/e2e/test_model_mirror.py)."""

import json
import logging
from pathlib import Path

import pytest

from trainer.checkpoint.signing import Signer
from trainer.config.loader import load_config
from trainer.errors import ConfigError
from trainer.model_mirror import ModelMirror, accepted, fingerprint, mirror_rel, model_config_for_load
from trainer.remote.store import open_store
from trainer.run_dir import RunDir


def cfg_for(model: str, remote: Path):
    return load_config(None, [f"model.name_or_path={model}", "model.mirror=true", f"checkpoint.remote=file://{remote}"])


def test_mirror_needs_a_remote():
    with pytest.raises(ConfigError, match=r"^model\.mirror: needs checkpoint\.remote"):
        load_config(None, ["model.mirror=true"])


def test_fingerprint_tells_base_models_apart(tmp_path):
    plain = cfg_for("org/model", tmp_path)
    four_bit = [f"checkpoint.remote=file://{tmp_path}", "model.name_or_path=org/model", "model.mirror=true"]
    four_bit += ["model.mirror_4bit=true", "model.method=qlora"]
    four, fp4 = load_config(None, four_bit), load_config(None, four_bit + ["quant.quant_type=fp4"])
    assert len({fingerprint(plain), fingerprint(four), fingerprint(fp4)}) == 3 and fingerprint(four).endswith("-nf4")
    builtin = load_config(None, [])
    assert fingerprint(builtin) == fingerprint(load_config(None, []))
    assert fingerprint(builtin) != fingerprint(load_config(None, ["train.seed=1"]))  # another random init
    assert fingerprint(builtin) != fingerprint(load_config(None, ["model.builtin.hidden_size=32"]))
    a, b = cfg_for("/models/a", tmp_path), cfg_for("/models/b", tmp_path)
    assert fingerprint(a) != fingerprint(b) and fingerprint(a).startswith("models-a-")


def test_only_weights_configs_and_tokenizers_are_mirrored():
    assert all(accepted(p) for p in ["model-00001-of-00004.safetensors", "config.json", "tokenizer.model", "x.txt"])
    assert not any(accepted(p) for p in ["pytorch_model.bin", "modeling_x.py", "w.pt", ".cache/x.json", "a/.b.json"])


def model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"w" * 1000)
    (path / "tokenizer.json").write_text("{}")
    (path / "pytorch_model.bin").write_bytes(b"a pickle")  # never mirrored
    return path


def test_round_trip_and_refusals(tmp_path, caplog):
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    src = model_dir(tmp_path / "models" / "m")
    cfg = cfg_for(str(src), remote_dir)
    signer = Signer(b"k" * 32, env="KEY")
    remote = open_store(f"file://{remote_dir}", cfg.checkpoint.s3, signer)
    ModelMirror(cfg, RunDir(tmp_path / "pod1"), remote, print).publish(src)
    mirrored = remote_dir / mirror_rel(cfg)
    names = sorted(p.name for p in mirrored.iterdir())
    assert names == ["config.json", "manifest.json", "model.safetensors", "tokenizer.json"]  # no pickle
    assert json.loads((mirrored / "manifest.json").read_text())["signature"]["key_id"] == signer.key_id

    # a fresh pod: the model dir is gone; the copy lands in <output_dir>/base-model/ and the load points there
    (src / "config.json").rename(src / "gone")
    run = RunDir(tmp_path / "pod2")
    run.root.mkdir()
    assert ModelMirror(cfg, run, remote, print, prefetch=False).fetch("auto")
    assert (run.base_model / "model.safetensors").read_bytes() == b"w" * 1000
    assert model_config_for_load(cfg, run).model.name_or_path == str(run.base_model)

    # the wrong key: refused, nothing fetched
    other = open_store(f"file://{remote_dir}", cfg.checkpoint.s3, Signer(b"z" * 32, env="KEY"))
    pod3 = RunDir(tmp_path / "pod3")
    pod3.root.mkdir()
    with caplog.at_level(logging.WARNING):
        assert not ModelMirror(cfg, pod3, other, print, prefetch=False).fetch("auto")
    assert "signed with another key" in caplog.text and not pod3.base_model.exists()
    assert model_config_for_load(cfg, pod3).model.name_or_path == str(src)  # the normal path

    # a tampered shard: refused by its sha256, the bucket left as it is
    (mirrored / "model.safetensors").write_bytes(b"W" * 1000)
    pod4 = RunDir(tmp_path / "pod4")
    pod4.root.mkdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not ModelMirror(cfg, pod4, remote, print, prefetch=False).fetch("auto")
    assert "model.safetensors: sha256 does not match" in caplog.text and not pod4.base_model.exists()
    assert (mirrored / "model.safetensors").read_bytes() == b"W" * 1000


def test_a_4bit_copy_is_refused_for_another_method_and_mirror_4bit_needs_qlora(tmp_path):
    import torch

    from trainer import model as model_lib

    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
        )
    )
    cfg = load_config(None, [f"model.name_or_path={tmp_path}", "model.method=lora"])
    with pytest.raises(ConfigError, match="holds 4-bit weights") as e:
        model_lib.build_model(cfg, None, torch.device("cpu"), tmp_path / "out")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.mirror_4bit: mirrors 4-bit QLoRA weights"):
        load_config(None, ["checkpoint.remote=file:///tmp/x", "model.mirror=true", "model.mirror_4bit=true"])
    load_config(
        None, ["checkpoint.remote=file:///tmp/x", "model.mirror=true", "model.mirror_4bit=true", "model.method=qlora"]
    )


def test_a_4bit_copy_left_by_a_killed_process_is_never_uploaded(tmp_path):
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    src = model_dir(tmp_path / "models" / "m")
    over = [f"model.name_or_path={src}", "model.mirror=true", f"checkpoint.remote=file://{remote_dir}"]
    cfg = load_config(None, over + ["model.mirror_4bit=true", "model.method=qlora"])
    run = RunDir(tmp_path / "pod")
    for leftover in (".base-model-4bit", ".base-model-4bit.tmp"):  # saved with other settings, or half saved
        (run.root / leftover).mkdir(parents=True)
        (run.root / leftover / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "x"}}))
    mirror = ModelMirror(cfg, run, open_store(f"file://{remote_dir}", cfg.checkpoint.s3, None), print)
    assert mirror.wants_4bit_copy()  # the bucket has none: this process would save one after the load
    assert not (run.root / ".base-model-4bit").exists() and not (run.root / ".base-model-4bit.tmp").exists()
    mirror.start_upload()  # this process saved nothing (the save failed, say): nothing goes up
    mirror.wait_upload()
    assert not any(remote_dir.rglob("*"))
