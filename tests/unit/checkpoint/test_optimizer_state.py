"""Optimizer state files: exact round trip for torch optimizers, stitching slices written by several ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.harness.optimizer import consolidate_optimizer_state, save_optimizer_state
from trainer.checkpoint.optimizer_state import SavedOptimizerState, load_optimizer_state
from trainer.errors import CheckpointError


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)  # frozen parameters have no optimizer state
    return model


def train(model, opt, sched, steps, start=0):
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(64, 6, generator=g)
    for s in range(start, start + steps):
        loss = model(xs[s * 4 : (s + 1) * 4]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def make_opt(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    return opt, sched


def test_torch_adamw_resume_is_bitwise_and_keeps_the_scheduler_bound(accelerator, tmp_path):
    ref = tiny_model()
    ref_opt, ref_sched = make_opt(ref)
    train(ref, ref_opt, ref_sched, 8)

    model = tiny_model()
    opt, sched = make_opt(model)
    train(model, opt, sched, 5)
    written = save_optimizer_state(accelerator, model, opt, tmp_path)
    assert sorted(p.name for p in written) == ["optimizer.json", "optimizer.safetensors"]
    sched_state, weights = sched.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}

    model2 = tiny_model(seed=1)
    model2.load_state_dict(weights)
    opt2, sched2 = make_opt(model2)
    group = opt2.param_groups[0]
    load_optimizer_state(accelerator, model2, opt2, tmp_path)
    sched2.load_state_dict(sched_state)
    assert opt2.param_groups[0] is group, "param-group dicts were replaced: the scheduler would be orphaned"
    assert group["lr"] == opt.param_groups[0]["lr"]
    train(model2, opt2, sched2, 3, start=5)
    for a, b in zip(ref.parameters(), model2.parameters(), strict=False):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_files_are_keyed_by_parameter_name(accelerator, tmp_path):
    model = tiny_model()
    opt, sched = make_opt(model)
    train(model, opt, sched, 2)
    save_optimizer_state(accelerator, model, opt, tmp_path)
    meta = json.loads((tmp_path / "optimizer.json").read_text())
    assert sorted(meta["params"]) == ["0.weight", "2.bias", "2.weight"]  # 0.bias is frozen
    assert meta["params"]["2.weight"]["values"]["step"] == 2
    full = consolidate_optimizer_state(tmp_path)
    assert torch.equal(full["2.weight"]["exp_avg"], opt.state[model[2].weight]["exp_avg"])


def test_snapshot_is_a_copy_safe_to_write_later(accelerator, tmp_path):
    from trainer.checkpoint.optimizer_state import optimizer_snapshot

    model = tiny_model()
    opt, sched = make_opt(model)
    train(model, opt, sched, 2)
    tensors, meta = optimizer_snapshot(accelerator, model, opt)
    before = tensors["optimizer.safetensors"]["exp_avg/2.weight"].clone()
    train(model, opt, sched, 1, start=2)  # training goes on while a writer thread holds the snapshot
    assert torch.equal(tensors["optimizer.safetensors"]["exp_avg/2.weight"], before)
    assert not torch.equal(opt.state[model[2].weight]["exp_avg"].reshape(-1), before)
    assert meta["optimizer.json"]["params"]["2.weight"]["values"]["step"] == 2


def write_rank_file(d: Path, rank: int, world: int, name: str, shape, start: int, values: torch.Tensor):
    save_file(
        {f"exp_avg/{name}": values, f"master/{name}": values * 10}, str(d / f"optimizer-rank{rank:05d}.safetensors")
    )
    (d / f"optimizer-rank{rank:05d}.json").write_text(
        json.dumps(
            {
                "format": 1,
                "layout": "zero-partition",
                "rank": rank,
                "world_size": world,
                "param_groups": [{"lr": 0.1, "params": [name]}],
                "params": {
                    name: {
                        "shape": list(shape),
                        "group": 0,
                        "start": start,
                        "numel": values.numel(),
                        "sliced": ["master", "exp_avg"],
                        "whole": [],
                        "values": {"step": 3},
                        "scalar_tensors": {},
                    }
                },
            }
        )
    )


def test_slices_from_several_ranks_are_stitched_by_range(tmp_path):
    full = torch.arange(12, dtype=torch.float32)
    write_rank_file(tmp_path, 0, 2, "w", (3, 4), 0, full[:7].clone())
    write_rank_file(tmp_path, 1, 2, "w", (3, 4), 7, full[7:].clone())
    saved = SavedOptimizerState(tmp_path)
    assert torch.equal(saved.read("w", "exp_avg", 5, 4), full[5:9])  # crosses the rank boundary
    assert torch.equal(saved.read("w", "master", 0, 12), full * 10)
    assert torch.equal(consolidate_optimizer_state(tmp_path)["w"]["exp_avg"], full.view(3, 4))


def test_missing_rank_file_is_a_checkpoint_error(tmp_path):
    full = torch.arange(12, dtype=torch.float32)
    write_rank_file(tmp_path, 0, 2, "w", (3, 4), 0, full[:7].clone())
    with pytest.raises(CheckpointError, match="1 optimizer-rank files for a world size of 2"):
        SavedOptimizerState(tmp_path)
    with pytest.raises(CheckpointError, match="no optimizer.json"):
        SavedOptimizerState(tmp_path / "nowhere")


def test_different_model_is_a_checkpoint_error(accelerator, tmp_path):
    model = tiny_model()
    opt, sched = make_opt(model)
    train(model, opt, sched, 1)
    save_optimizer_state(accelerator, model, opt, tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(6, 3))
    with pytest.raises(CheckpointError, match="param groups hold different parameters"):
        load_optimizer_state(accelerator, other, torch.optim.AdamW(other.parameters()), tmp_path)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_cpu_adam_resume_is_bitwise_only_with_the_step_replay():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/spot-trainer/torch_extensions"))
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from trainer.checkpoint.optimizer_state import _replay_cpu_adam_steps

    grads = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(30)]

    def run(resume_at=None, replay=True):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 64))
        opt = DeepSpeedCPUAdam([p], lr=1e-2)
        for s, g in enumerate(grads):
            if s == resume_at:  # a fresh optimizer (as in a new process) with the saved state
                state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                p = torch.nn.Parameter(p.detach().clone())
                opt = DeepSpeedCPUAdam([p], lr=1e-2)
                opt.state[p].update(state)
                if replay:
                    _replay_cpu_adam_steps(opt, state["step"])
            p.grad = g.clone()
            opt.step()
        return p.detach()

    ref = run()
    assert torch.equal(run(resume_at=19), ref)
    # without the replay, C++ recomputes beta^t with pow() and the last bits differ
    assert not torch.equal(run(resume_at=19, replay=False), ref)


# ---------------------------------------------------------------- fp16: the loss scaler


def _stepped_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    for g in (1.0, float("inf"), 1.0, 1.0):  # one overflow: the scale backs off, the tracker counts again
        opt.zero_grad()
        scaler.scale((w * g).sum()).backward()
        scaler.step(opt)
        scaler.update()
    return scaler


def test_the_loss_scale_and_its_growth_tracker_survive_a_checkpoint_as_plain_numbers():
    from trainer.checkpoint.optimizer_state import load_scaler_state, scaler_state

    saved = json.loads(json.dumps(scaler_state(_stepped_scaler())))  # through JSON, as in optimizer.json
    assert saved["scale"] == 2.0**11 and saved["_growth_tracker"] == 2
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    load_scaler_state(fresh, saved, "ckpt")
    assert scaler_state(fresh) == saved
    load_scaler_state(fresh, None, "ckpt")  # bf16 checkpoints and older versions have none: unchanged
    assert scaler_state(fresh) == saved
    assert scaler_state(None) == {} and scaler_state(torch.amp.GradScaler("cpu", enabled=False)) == {}


@pytest.mark.parametrize(
    "forged",
    [{"scale": float("inf")}, {"scale": -1.0}, {"scale": 1e300}, {"_growth_tracker": 1.5}, {"evil": 1}, {"scale": "8"}],
)
def test_a_forged_loss_scale_is_refused(forged):
    from trainer.checkpoint.optimizer_state import load_scaler_state, scaler_state
    from trainer.errors import CorruptCheckpoint

    state = {**scaler_state(_stepped_scaler()), **forged}
    with pytest.raises(CorruptCheckpoint, match="loss_scaler"):
        load_scaler_state(torch.amp.GradScaler("cpu"), state, "ckpt")
