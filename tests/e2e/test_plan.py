"""plan's checkpoint size against the checkpoint a real `spot-trainer train` writes."""

from __future__ import annotations

import pytest

from tests.harness.common import TINY, run_cli
from trainer.config.loader import load_config
from trainer.plan.planner import make_plan
from trainer.plan.render import render_plan

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpoint_size_in_the_plan_matches_a_real_checkpoint(tmp_path, method):
    """`plan` says how big a checkpoint is (disk, emergency write time): it must be what training writes."""
    over = [
        *TINY,
        f"model.method={method}",
        "model.builtin.hidden_size=128",
        "model.builtin.intermediate_size=256",
        "train.max_steps=1",
        "checkpoint.every_steps=1",
    ]
    run_cli("train", overrides=over, output_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    written = sum(p.stat().st_size for p in ckpt.iterdir() if p.suffix == ".safetensors")
    plan = make_plan(load_config(None, over))
    predicted = sum(plan.checkpoint.values())
    assert abs(predicted - written) <= 0.02 * written + 16384, (predicted, written)  # + safetensors headers
    assert "Checkpoint:" in render_plan(plan)
