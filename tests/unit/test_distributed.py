"""Batch arithmetic and DeepSpeed config filling (trainer.distributed), without launching processes.

The real multi-process runs are in tests/e2e/test_distributed.py.
"""

from __future__ import annotations

import json

import pytest

from trainer.config.loader import config_from_dict
from trainer.distributed import deepspeed_config, mixed_precision, resolve_deepspeed_config, resolve_grad_accum
from trainer.errors import ConfigError


def cfg_with(**train):
    ds = train.pop("deepspeed", None)
    dtype = train.pop("dtype", "fp32")
    return config_from_dict({"model": {"dtype": dtype}, "train": train, "distributed": {"deepspeed": ds}})


# ---------------------------------------------------------------- batch arithmetic


@pytest.mark.parametrize("world, accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_grad_accum_from_global_batch_follows_world_size(world, accum):
    assert resolve_grad_accum(cfg_with(micro_batch_size=2, global_batch_size=16), world) == accum


def test_grad_accum_explicit_or_default():
    assert resolve_grad_accum(cfg_with(micro_batch_size=4, grad_accum=3), 2) == 3
    assert resolve_grad_accum(cfg_with(micro_batch_size=4), 2) == 1


@pytest.mark.parametrize("global_batch, world", [(12, 4), (4, 4), (10, 1)])
def test_indivisible_global_batch_is_a_config_error(global_batch, world):
    cfg = cfg_with(micro_batch_size=4, global_batch_size=global_batch)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=\d+ is not a multiple of .* = \d+"):
        resolve_grad_accum(cfg, world)


def test_mixed_precision_from_dtype():
    assert mixed_precision(cfg_with(dtype="fp32"), cuda=True) == "no"
    assert mixed_precision(cfg_with(dtype="bf16"), cuda=False) == "bf16"
    assert mixed_precision(cfg_with(dtype="fp16"), cuda=True) == "fp16"
    assert mixed_precision(cfg_with(dtype="auto"), cuda=False) == "no"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        mixed_precision(cfg_with(dtype="fp16"), cuda=False)


# ---------------------------------------------------------------- DeepSpeed config


@pytest.mark.parametrize("name", ["zero2", "zero2_offload"])
def test_deepspeed_config_fills_every_auto_from_train_section(name):
    cfg = cfg_with(micro_batch_size=2, global_batch_size=16, max_grad_norm=0.5, deepspeed=name)
    ds = deepspeed_config(cfg, resolve_grad_accum(cfg, 2), 2)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == 2


def test_offload_config_puts_the_optimizer_on_cpu():
    ds = json.loads(resolve_deepspeed_config("zero2_offload").read_text())
    off = ds["zero_optimization"]["offload_optimizer"]
    assert off == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["overlap_comm"] is True


def test_deepspeed_config_by_path_and_bad_names(tmp_path):
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 3.0}))
    assert resolve_deepspeed_config(str(custom)) == custom
    with pytest.raises(ConfigError, match="zero2_offload"):
        resolve_deepspeed_config("zero2_ofload")
    with pytest.raises(ConfigError, match="file not found"):
        resolve_deepspeed_config(str(tmp_path / "missing.json"))
    # a value the train section owns, set to something else in the JSON, is refused
    with pytest.raises(ConfigError, match="gradient_clipping is 3.0 but the train config says 1.0"):
        deepspeed_config(cfg_with(micro_batch_size=2, deepspeed=str(custom)), 1, 1)


def test_bitsandbytes_optimizer_under_deepspeed_is_refused():
    cfg = cfg_with(micro_batch_size=2, optimizer="adamw_8bit", deepspeed="zero2_offload")
    with pytest.raises(ConfigError, match="train.optimizer=adamw_8bit cannot run under DeepSpeed"):
        deepspeed_config(cfg, 1, 1)


def test_no_clipping_disables_deepspeed_clipping():
    cfg = config_from_dict(
        {"train": {"micro_batch_size": 2, "max_grad_norm": None}, "distributed": {"deepspeed": "zero2"}}
    )
    assert deepspeed_config(cfg, 1, 1)["gradient_clipping"] == 0.0
