"""One FLOP count: plan's time estimate and scripts/bench.py's MFU/HFU come from trainer/plan/flops.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from trainer.plan import flops
from trainer.plan.memory import TrainingSetup, lora_params, shape_from_config

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_script"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_script", None)


def test_bench_and_plan_count_the_same_flops(bench):
    shape = shape_from_config(LlamaConfig(vocab_size=bench.VOCAB, tie_word_embeddings=False, **bench.SHAPES["8b"]))
    assert bench.model_shape("8b") == shape.__class__(**{**shape.__dict__, "name": "8b"})
    setup = TrainingSetup(
        method="qlora", seq_len=1024, lora_r=16, lora_targets=tuple(bench.TARGETS), gradient_checkpointing=True
    )
    assert flops.flops_per_token(shape, setup) == bench.flops_per_token("8b", 1024.0, 1.0)["hardware"]
    plain = TrainingSetup(method="qlora", seq_len=1024, lora_r=16, lora_targets=tuple(bench.TARGETS))
    assert flops.flops_per_token(shape, plain) == bench.flops_per_token("8b", 1024.0, 0.0)["model"]
    # the documented count: 4N + 6P + 3A, recompute 2(layers + P) + A
    n, p = shape.params_matmul, lora_params(shape, setup)
    a = 2 * shape.num_layers * shape.attention_width * 1024
    got = flops.shape_flops(shape, setup)
    assert got.model == 4 * n + 6 * p + 3 * a
    assert got.hardware == got.model + 2 * (shape.params_layer_linear + p) + a


@pytest.mark.parametrize("name", ["h100-8b-2026-11-23-run2.json", "h100-8b-2026-11-23-run1.json"])
def test_recorded_mfu_and_hfu_reproduce(bench, name):
    """The shared count gives the MFU/HFU recorded with bench.py's own count before (same rule; N now counts the
    norms' weights as plan does, +3e-5, and recompute the adapters, +0.06% HFU)."""
    rec = json.loads((ROOT / "bench" / "results" / name).read_text())
    rows = bench.summarize(rec["shape"], rec["data"], rec.get("seed", {}), rec.get("spot", []))
    assert [r["run"] for r in rows] == [r["run"] for r in rec["table"]]
    for old, new in zip(rec["table"], rows, strict=True):
        assert new["mfu"] == pytest.approx(old["mfu"], rel=1e-4), old["run"]
        assert new["hfu"] == pytest.approx(old["hfu"], rel=2e-3), old["run"]


def test_params_only_count_is_the_classic_6n_4n():
    assert flops.params_flops(1e9, "full", False) == 6e9
    assert flops.params_flops(1e9, "lora", False) == 4e9
    assert flops.params_flops(1e9, "qlora", True) == 6e9


def test_bench_ratios_to_the_seed_and_the_informed_setup(bench):
    """The informed part's rows: spot's speed and memory against both HF recipes, and the goal line per run."""
    data = {name: {"tokens": 1000, "sum_sq": 250000.0} for name in ("var", "fixed")}  # as write_data reports
    hf = {"tokens_per_step": 5000, "mean_sq_over_mean": 250.0}
    seed = {"var": {**hf, "tokens_per_s": 1500.0, "peak_allocated_gib": 24.0}}
    informed = {"var": {**hf, "tokens_per_s": 4000.0, "peak_allocated_gib": 12.0}}
    spot = dict(data="var", overrides={"model.memory_budget_gb": 12.0}, tokens_per_step=5100, stall_s=[], exit_code=75)
    spots = [
        {**spot, "name": "fast", "tokens_per_s": 10400.0, "peak_allocated_gib": 11.4, "ckpt_fraction": 0.8},
        {**spot, "name": "big", "tokens_per_s": 12000.0, "peak_allocated_gib": 12.6, "ckpt_fraction": 0.5},
        {**spot, "name": "slow", "tokens_per_s": 9000.0, "peak_allocated_gib": 11.0, "ckpt_fraction": 1.0},
    ]
    for r in spots:
        r["against"] = "informed"
    rows = bench.summarize("8b", data, seed, spots, informed)
    by = {r["run"]: r for r in rows}
    assert list(by) == ["seed-var", "informed-var", "spot-fast", "spot-big", "spot-slow"]
    assert by["informed-var"]["ratio"] == pytest.approx(4000 / 1500) and by["informed-var"]["ratio_informed"] == 1.0
    assert by["spot-fast"]["ratio"] == pytest.approx(10400 / 1500)
    assert by["spot-fast"]["ratio_informed"] == pytest.approx(2.6)
    assert by["spot-fast"]["mem_ratio_informed"] == pytest.approx(0.95)
    goal = {g["run"]: g["met"] for g in bench.against_informed(rows)}
    assert goal == {"spot-fast": True, "spot-big": False, "spot-slow": False}  # 2.6x at 0.95; 3.0x at 1.05; 2.25x


def test_bench_recompute_fraction_of_part_checkpointing(bench):
    line = "gradient checkpointing on 32/32 layers for 5120 tokens per micro-batch (140 KiB/token/layer, budget 9 GiB)"
    assert bench.recompute_fraction("8b", line) == 1.0
    s = bench.SHAPES["8b"]
    attn = 2 * 4096 * 4096 + 2 * 4096 * 1024
    share = attn / (attn + 3 * 4096 * s["intermediate_size"])
    assert bench.recompute_fraction("8b", line + " (whole 4, attention 28)") == pytest.approx((4 + 28 * share) / 32)
    assert bench.recompute_fraction("8b", line + " (whole 0, mlp 32)") == pytest.approx(1 - share)
