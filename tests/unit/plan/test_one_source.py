"""One activation model: `model.checkpoint_layers: auto` (trainer.speed) plans with the numbers `plan` shows.

The GPU planner runs only on CUDA; its arithmetic (trainer.speed.plan_checkpoint_layers) takes the GPU's free,
reserved and allocated bytes as numbers, and auto_checkpoint_plan's glue runs here with torch.cuda's
memory queries patched.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer import speed
from trainer.config.loader import load_config
from trainer.plan import memory
from trainer.plan.planner import make_plan, model_config

GIB = 1024**3
LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
# (preset, overrides): the speed features set explicitly, so `plan` (which reads "auto" as off) and the GPU
# path model the same run
CONFIGS = [
    ("qlora", ["model.liger_kernels=true", "model.kbit_bf16_frozen=true", "data.packing=true"]),
    ("qlora", ["model.liger_kernels=false", "model.kbit_bf16_frozen=false", "lora.dropout=0.0"]),
    (
        "qlora",
        [
            "model.liger_kernels=true",
            "model.kbit_bf16_frozen=true",
            "lora.target_modules=[q_proj,v_proj]",
            "train.micro_batch_size=2",
            "data.max_length=2048",
            "data.packing=true",
        ],
    ),
    ("lora", ["model.liger_kernels=true", "data.packing=true", "lora.dropout=0.1"]),
    ("lora", ["model.liger_kernels=false", "train.micro_batch_size=4"]),
    ("full", ["model.liger_kernels=false", "data.max_length=1024"]),
]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "llama3-8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    return d


def _config(preset, over, model_dir=None):
    return load_config(preset, [*over, *([f"model.name_or_path={model_dir}"] if model_dir else [])])


def _gpu_choices(cfg) -> dict:
    """What trainer.speed would report having turned on for this config on a GPU."""
    m = cfg.model
    return dict(liger=m.liger_kernels is True, upcast_kbit=m.kbit_bf16_frozen is not True, varlen=cfg.data.packing)


@pytest.mark.parametrize("model", ["builtin", "llama3-8b"])
@pytest.mark.parametrize("preset,over", CONFIGS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CONFIGS)])
def test_checkpoint_planner_uses_plans_per_layer_bytes(preset, over, model, llama3_dir):
    cfg = _config(preset, over, llama3_dir if model != "builtin" else None)
    plan = make_plan(cfg)
    shape, setup = speed.run_setup(cfg, model_config(cfg), **_gpu_choices(cfg))
    assert shape == plan.shape and setup == plan.setup  # the same run, as the memory model sees it
    seen = {}
    real = speed.plan_checkpointing

    def spy(n_layers, tokens, per_token_layer, budget_bytes, fixed_bytes, hidden, input_bytes=2):
        seen.update(per_token=per_token_layer, fixed=fixed_bytes, input_bytes=input_bytes)
        return real(n_layers, tokens, per_token_layer, budget_bytes, fixed_bytes, hidden, input_bytes)

    allocated = int(plan.memory.get("weights") + plan.memory.get("adapters"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speed, "plan_checkpointing", spy)
        cp = speed.plan_checkpoint_layers(
            shape, setup, free_bytes=8 * GIB, reserved_bytes=GIB, allocated_bytes=allocated
        )
    per_layer = memory.layer_activation_bytes(plan.shape, plan.setup)
    assert seen["per_token"] == cp.layer_bytes_per_token == per_layer  # exactly plan's number
    budget = 8 * GIB + GIB - GIB // 2
    assert seen["fixed"] == allocated + int(memory.layer_independent_bytes(plan.shape, plan.setup)) + int(0.06 * budget)
    assert seen["input_bytes"] * plan.shape.hidden_size == memory.checkpointed_layer_bytes(plan.shape, plan.setup)
    # and plan's own activation total is the same per-layer number times layers and tokens
    tokens = plan.setup.micro_batch_size * plan.setup.seq_len
    head = memory.head_activation_bytes(plan.shape, plan.setup)
    assert (
        plan.memory.get("activations") == tokens * (plan.shape.num_layers * per_layer + head)
        or plan.setup.gradient_checkpointing
    )


def test_checkpoint_count_follows_the_budget(llama3_dir):
    """A budget with room for k un-checkpointed layers (plus one recomputed) checkpoints the other n - k."""
    cfg = _config(*CONFIGS[0], llama3_dir)
    shape, setup = speed.run_setup(cfg, model_config(cfg), **_gpu_choices(cfg))
    tokens = setup.micro_batch_size * setup.seq_len
    per_layer = int(memory.layer_activation_bytes(shape, setup) * tokens * speed.SAFETY)
    ckpt_input = memory.checkpointed_layer_bytes(shape, setup) * tokens
    allocated = 6 * GIB
    for keep in (0, 5, 32):
        need = keep * per_layer + (32 - keep) * ckpt_input + per_layer  # + one layer rebuilt in backward
        # solve budget = allocated + fixed(budget) + need, fixed holding 6% of the budget
        budget = int((allocated + memory.layer_independent_bytes(shape, setup) + need) / 0.94) + 2
        cp = speed.plan_checkpoint_layers(
            shape, setup, free_bytes=budget + GIB // 2, reserved_bytes=0, allocated_bytes=allocated
        )
        assert cp.layers == 32 - keep, (keep, cp.describe())
        small = speed.plan_checkpoint_layers(
            shape,
            setup,
            free_bytes=budget + GIB // 2,
            reserved_bytes=0,
            allocated_bytes=allocated,
            budget_gb=(budget - per_layer) / GIB,
        )
        assert small.layers > cp.layers or cp.layers == 32


def _tiny_peft_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=101,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    )
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))


def test_auto_checkpoint_plan_on_a_gpu_is_plans_setup(monkeypatch):
    """The CUDA entry point: kbit_bf16_frozen auto is on on a GPU, Liger as reported, memory from torch.cuda."""
    cfg = load_config("qlora", ["model.liger_kernels=false"])
    model = _tiny_peft_model()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: GIB // 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cp = speed.auto_checkpoint_plan(model, cfg, torch.device("cuda"), liger=False)
    plan = make_plan(load_config("qlora", ["model.liger_kernels=false", "model.kbit_bf16_frozen=true"]))
    assert not plan.setup.upcast_non_quantized and plan.setup.compute_bytes == 2
    assert cp.layer_bytes_per_token == memory.layer_activation_bytes(plan.shape, plan.setup)
    assert cp.total == 4 and cp.budget_bytes == 3 * GIB + GIB - GIB // 2
    assert "gradient checkpointing on" in cp.describe()


Q4 = ("q_proj", "k_proj", "v_proj", "o_proj")
# Measured on an H200 (torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50.2, liger-kernel 0.8.5),
# 2026-12-01: torch.cuda.memory_allocated after a bf16-autocast forward with labels, minus before, for 4 and for
# 2 decoder layers of an 8B-shaped Llama (hidden 4096, MLP 14336, 32/8 heads), one row of 4096 tokens (SDPA, no
# mask), adapters r16 in fp32, model.train(); (4 - 2) / 2 / tokens = bytes per token per layer. One process a case.
# The figures are from bench/results/h200-layer-bytes-2026-12-01.json, produced by
# `python scripts/measure_layer_bytes.py --out bench/results/h200-layer-bytes-2026-12-01.json`.
# (case, method, targets, dropout, liger, fp32 upcast, measured; the speed formula before one source said)
H200_LAYERS = [
    ("lora-qkvo-dropout", "lora", Q4, 0.05, False, True, 188888),  # old speed formula: 221184
    ("lora-qkvo", "lora", Q4, 0.0, False, True, 172504),  # 172032
    ("lora-all-liger", "lora", "all-linear", 0.0, True, True, 173032),  # 122880
    ("qlora-bf16-qkvo-dropout-liger", "qlora", Q4, 0.05, True, False, 143832),  # 188416
    ("qlora-bf16-qkvo-liger", "qlora", Q4, 0.0, True, False, 102872),  # 139264
    ("qlora-bf16-all-liger", "qlora", "all-linear", 0.0, True, False, 140264),  # 167936
    ("qlora-bf16-qkvo-dropout", "qlora", Q4, 0.05, False, False, 188888),  # 266240
    ("qlora-upcast-qkvo-dropout", "qlora", Q4, 0.05, False, True, 274904),  # 266240
    ("qlora-upcast-all-dropout", "qlora", "all-linear", 0.05, False, True, 343016),  # 333824
    ("qlora-upcast-qkvo", "qlora", Q4, 0.0, False, True, 250328),  # 217088
    ("qlora-upcast-qkvo-dropout-liger", "qlora", Q4, 0.05, True, True, 217560),  # 188416
]


@pytest.mark.parametrize("run", H200_LAYERS, ids=[r[0] for r in H200_LAYERS])
def test_layer_bytes_match_the_h200(run):
    _, method, targets, dropout, liger, upcast, measured = run
    shape = memory.llama_shape(
        LlamaConfig(
            **{**{k: v for k, v in LLAMA3_8B.items() if k not in ("architectures", "model_type")}, "vocab_size": 32000}
        )
    )
    setup = memory.TrainingSetup(
        method=method,
        seq_len=4096,
        lora_targets=targets,
        lora_dropout=dropout,
        liger=liger,
        upcast_non_quantized=upcast,
        repeat_kv=False,
    )
    assert abs(memory.layer_activation_bytes(shape, setup) - measured) / measured < 0.005


def test_speed_knowledge_lives_in_the_memory_model():
    """Liger's smaller norm/MLP footprint and QLoRA's kept 4-bit inputs are setup fields of the memory model."""
    shape = memory.llama_shape(
        LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k not in ("architectures", "model_type")})
    )
    h, inter = shape.hidden_size, shape.intermediate_size
    base = memory.TrainingSetup(
        method="qlora",
        upcast_non_quantized=False,
        repeat_kv=False,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    )
    plain = memory.layer_activation_bytes(shape, base)
    liger = memory.layer_activation_bytes(shape, replace(base, liger=True))
    assert plain - liger == 2 * ((4 * h + 4) - (2 * h + 4)) + 2 * inter  # RMSNorm keeps bf16 input; SwiGLU 2 of 3
    kept = memory.layer_activation_bytes(shape, replace(base, kbit_keeps_input=True))
    assert kept - plain == 2 * h + 2 * h + 2 * inter  # attention's and the MLP's normed input, down's input
    # (off in the trainer's setup: bitsandbytes 0.50.2 keeps only the weight, as the H200 rows above show)
    assert not memory.TrainingSetup(method="qlora").kbit_keeps_input
    # the fused loss: no full-vocabulary logits or log-softmax
    tokens = 4096
    setup = replace(base, micro_batch_size=1, seq_len=tokens)
    fused = memory.logits_working_bytes(shape, replace(setup, liger=True))
    assert fused < memory.logits_working_bytes(shape, setup) / 10
    assert memory.head_activation_bytes(shape, replace(setup, liger=True)) < 4 * shape.vocab_size


@pytest.mark.parametrize("parts", ["attention", "mlp"])
def test_part_checkpointing_plans_with_the_memory_models_part_bytes(parts, llama3_dir):
    """model.checkpoint_parts: auto plans with part_checkpointed_layer_bytes and, under the same budget, checkpoints
    more layers (each keeping more) than whole-layer checkpointing; an 8B QLoRA packed row of 5120 tokens."""
    cfg = _config(*CONFIGS[0], llama3_dir)
    shape, setup = speed.run_setup(cfg, model_config(cfg), **_gpu_choices(cfg))
    setup = replace(setup, seq_len=5120, micro_batch_size=1)
    seen = {}
    real = speed.plan_checkpointing

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    kw = dict(free_bytes=12 * GIB, reserved_bytes=0, allocated_bytes=6 * GIB)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speed, "plan_checkpointing", spy)
        cp = speed.plan_checkpoint_layers(shape, setup, parts=parts, **kw)
    assert seen["parts"] == parts
    assert seen["part_bytes_per_token"] == memory.part_checkpointed_layer_bytes(shape, setup, parts)
    whole = speed.plan_checkpoint_layers(shape, setup, **kw)
    assert 0 < whole.layers < 32 and cp.layers > whole.layers and cp.parts == parts
    assert f"(whole {cp.whole_layers}, {parts} {cp.layers - cp.whole_layers})" in cp.describe()


def test_part_checkpointing_of_an_int8_base_is_a_config_error(tmp_path):
    from trainer.errors import ConfigError

    shape = memory.shape_from_config(LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k != "architectures"}))
    setup = memory.TrainingSetup(method="qlora", quant_bits=8, lora_targets=("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="checkpoint_parts attention.*LLM.int8"):
        speed.plan_checkpoint_layers(
            shape, setup, free_bytes=12 * GIB, reserved_bytes=0, allocated_bytes=6 * GIB, parts="attention"
        )
