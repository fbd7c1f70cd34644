"""trainer.model: the built-in tiny model built for full and LoRA fine-tuning on the CPU; dtypes; config errors."""

from __future__ import annotations

import pytest
import torch

from tests.harness.common import TINY
from trainer.config.loader import load_config
from trainer.errors import ConfigError
from trainer.model import build_model, load_tokenizer, model_config, resolve_dtype, trainable_parameters

CPU = torch.device("cpu")


def build(tmp_path, method: str):
    cfg = load_config(None, [*TINY, f"model.method={method}"])
    model = build_model(cfg, load_tokenizer(cfg), CPU, tmp_path)
    return cfg, model


def test_full_fine_tuning_trains_every_parameter_in_fp32(tmp_path):
    _, model = build(tmp_path, "full")
    params = list(model.parameters())
    trainable = trainable_parameters(model)
    assert len(trainable) == len(params) > 0
    assert sum(p.numel() for _, p in trainable) == sum(p.numel() for p in params)
    assert all(p.dtype == torch.float32 for p in params)
    assert (tmp_path / "base-model" / "config.json").exists()  # the random init is saved once, then loaded


def test_lora_trains_only_the_adapters(tmp_path):
    cfg, model = build(tmp_path, "lora")
    trainable = trainable_parameters(model)
    assert trainable and all("lora_" in name for name, _ in trainable)
    assert all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
    # r x (in + out) per adapted linear layer: lora_A is r x in, lora_B is out x r
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert adapted
    expected = sum(cfg.lora.r * (m.base_layer.in_features + m.base_layer.out_features) for m in adapted)
    assert sum(p.numel() for _, p in trainable) == expected
    assert all(p.dtype == torch.float32 for _, p in trainable)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_model_comes_back_in_train_mode(tmp_path, method):
    _, model = build(tmp_path, method)
    assert model.training and all(m.training for m in model.modules())


def test_auto_dtype_is_fp32_on_the_cpu():
    assert resolve_dtype("auto", CPU) is torch.float32
    assert resolve_dtype("bf16", CPU) is torch.bfloat16
    assert resolve_dtype("fp16", CPU) is torch.float16


def test_an_unknown_builtin_model_is_a_config_error():
    cfg = load_config(None, ["model.name_or_path=builtin:nope"])
    with pytest.raises(ConfigError, match="builtin:nope.*the built-in model is builtin:tiny-llama"):
        model_config(cfg)
