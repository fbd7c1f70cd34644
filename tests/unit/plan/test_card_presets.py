"""The card presets: each fits the GPU its `# card:` line names, as `spot-trainer plan` predicts it, from the
model's shape alone (trainer/plan/tables/models.yaml: no network, no weights)."""

from __future__ import annotations

import re

import pytest

from tests.harness.common import REPO, run_cli
from trainer.config.loader import list_presets, load_config, preset_cards
from trainer.errors import ConfigError
from trainer.plan.planner import make_plan
from trainer.plan.tables import find_gpu, known_model_config

CARD = re.compile(r"(?:(?P<count>\d+)x )?(?P<gpu>.+) (?P<gb>\d+) GB")
CARDS = {name: card for name, card in preset_cards().items() if card}


def target(name: str):
    """(GpuSpec, number of GPUs, the GB on the label) of a preset's card line."""
    m = CARD.fullmatch(CARDS[name])
    assert m, f"{name}: '# card: {CARDS[name]}' is not '[Nx ]<GPU> <GB> GB'"
    return find_gpu(m["gpu"]), int(m["count"] or 1), int(m["gb"])


def test_the_cards_in_users_hands_have_a_preset():
    cards = {target(name)[0].name for name in CARDS}
    assert {"RTX 4070 Ti", "T4", "RTX 4090", "RTX 4050 Laptop", "RTX 3090"} <= cards


@pytest.mark.parametrize("name", sorted(CARDS))
def test_card_preset_fits_its_card(name):
    gpu, count, gb = target(name)
    assert abs(gb - gpu.memory_gib) / gb < 0.1  # the label and plan's GPU table describe the same card
    cfg = load_config(name)
    assert known_model_config(cfg.model.name_or_path) is not None  # planned offline, from models.yaml
    plan = make_plan(cfg, gpu=gpu.name, num_gpus=count)
    assert plan.verdict == "fits", (name, plan.memory.peak_gib, plan.suggestions)
    assert plan.max_micro_batch >= cfg.train.micro_batch_size
    # what checkpoint_layers auto plans from: all layers checkpointed is the floor, fewer when memory allows; the T4
    # preset checkpoints every layer (null: the flag decides), measured to run out of memory with auto's 21/32
    assert cfg.model.gradient_checkpointing and cfg.model.checkpoint_layers == ("auto" if "t4" not in name else None)
    assert cfg.data.packing


def test_no_preset_is_named_for_a_card_it_does_not_target():
    """A preset whose name ends in a GPU (…-4090) carries that GPU's card line, so the fit test above covers it."""
    for name in list_presets():
        try:
            named = find_gpu(name.rsplit("-", 1)[-1])
        except ConfigError:
            continue
        assert name in CARDS and target(name)[0] == named, name


def test_full_fine_tuning_preset_fits_four_gpus_too():
    cfg = load_config("llama32-1b-full-zero2-offload")
    plan = make_plan(cfg, gpu="RTX 3090", num_gpus=4)
    assert plan.verdict == "fits" and plan.setup.deepspeed == "zero2_offload" and plan.setup.grad_accum == 4
    assert plan.memory.cpu_bytes > 0  # the optimizer lives in host RAM


def test_an_8b_model_does_not_fit_6_gb():
    """README: no 8B preset for 6 GB cards; even LoRA r8 on q/v over 256-token rows with Liger does not fit."""
    tiny = [
        "model.liger_kernels=true",
        "data.max_length=256",
        "lora.r=8",
        "lora.target_modules=[q_proj,v_proj]",
    ]
    plan = make_plan(load_config("llama3-8b-qlora-4070ti", tiny), gpu="RTX 4050 Laptop")
    assert plan.verdict == "no" and plan.max_micro_batch == 0
    assert plan.memory.get("weights") / 1024**3 > 4.5  # 4-bit decoder, bf16 embeddings and lm_head
    # plan's way out: smaller models of models.yaml, each quoted at a size that fits the card
    plan = make_plan(load_config("llama3-8b-qlora-4070ti"), gpu="RTX 4050 Laptop")
    smaller = [s for s in plan.suggestions if "a smaller model" in s]
    assert smaller and all(float(s.rsplit(": ", 1)[1].split(" GiB")[0]) <= 0.9 * 6 for s in smaller)
    for s in smaller:
        name = s.split("=", 1)[1].split(" ", 1)[0]
        assert (
            make_plan(load_config("llama3-8b-qlora-4070ti", [f"model.name_or_path={name}"]), gpu="4050").verdict
            == "fits"
        )


@pytest.mark.slow
def test_presets_cli_lists_the_card():
    out = run_cli("presets").stdout
    for name, card in CARDS.items():
        line = next(line for line in out.splitlines() if line.split()[0] == name)
        assert card in line


def test_readme_table_is_plans_prediction():
    """README "What fits on your card" quotes plan's predicted peak of each card preset, to 0.1 GiB."""
    text = (REPO / "README.md").read_text()
    section = text.split("## What fits on your card", 1)[1].split("\n## ", 1)[0]
    for name in CARDS:
        row = next((line for line in section.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row, f"README's card table has no row for {name}"
        gpu, count, _ = target(name)
        peak = make_plan(load_config(name), gpu=gpu.name, num_gpus=count).memory.peak_gib
        assert f"| {peak:.1f} GiB |" in row, (row, round(peak, 1))
