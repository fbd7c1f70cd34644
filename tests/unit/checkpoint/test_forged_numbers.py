"""Every number read from a checkpoint is checked before it is used: a forged optimizer `step` (which a CPU Adam
resume replays one by one), ranges and shapes of optimizer and model tensors, the data position, RNG states."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from tests.harness.optimizer import save_optimizer_state
from trainer.checkpoint import model_state
from trainer.checkpoint.optimizer_state import _replay_cpu_adam_steps, load_optimizer_state
from trainer.checkpoint.progress import Progress
from trainer.errors import CheckpointError, CorruptCheckpoint


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _trained(accelerator, d, steps=3):
    """A model, its AdamW after `steps` steps, and a checkpoint dir holding that state and trainer_state.json."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(steps):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    save_optimizer_state(accelerator, model, opt, d)
    (d / "trainer_state.json").write_text(json.dumps(Progress(step=steps).to_json()))
    return model, opt


def _edit(d, fn) -> None:
    meta = json.loads((d / "optimizer.json").read_text())
    fn(meta)
    (d / "optimizer.json").write_text(json.dumps(meta))


def _fresh(model):
    return torch.optim.AdamW(model.parameters(), lr=0.05)


def test_a_forged_optimizer_step_is_refused_at_once(accelerator, tmp_path):
    model, _ = _trained(accelerator, tmp_path)
    load_optimizer_state(accelerator, model, _fresh(model), tmp_path)  # step 3 of 3: fine

    for forged in (10**15, 4, -1, 2.5, float("inf"), "3"):
        _edit(tmp_path, lambda m, v=forged: m["params"]["2.weight"]["values"].update(step=v))
        t0 = time.monotonic()
        with pytest.raises(
            CorruptCheckpoint, match=r"optimizer.json: parameter '2.weight': optimizer step .* not a step"
        ):
            load_optimizer_state(accelerator, model, _fresh(model), tmp_path)
        assert time.monotonic() - t0 < 2


def test_the_cpu_adam_replay_never_runs_for_a_forged_step():
    t0 = time.monotonic()
    with pytest.raises(CorruptCheckpoint, match="not replayed"):
        _replay_cpu_adam_steps(object(), 10**12)  # checked before the optimizer is even looked at
    assert time.monotonic() - t0 < 1


def test_ranges_and_shapes_of_optimizer_state_are_checked(accelerator, tmp_path):
    model, _ = _trained(accelerator, tmp_path)
    _edit(tmp_path, lambda m: m["params"]["0.weight"].update(numel=10**6))
    with pytest.raises(CorruptCheckpoint, match=r"parameter '0.weight': elements \[0, \+1000000\) are not inside"):
        load_optimizer_state(accelerator, model, _fresh(model), tmp_path)

    model, _ = _trained(accelerator, tmp_path)
    _edit(tmp_path, lambda m: m["params"]["0.weight"].update(shape=[6, 5], numel=30))  # transposed: same size
    with pytest.raises(CheckpointError, match=r"parameter '0.weight' has shape \[6, 5\], the model's is \[5, 6\]"):
        load_optimizer_state(accelerator, model, _fresh(model), tmp_path)

    model, _ = _trained(accelerator, tmp_path)
    _edit(tmp_path, lambda m: m["params"]["0.bias"]["scalar_tensors"].update(step="load"))
    with pytest.raises(CorruptCheckpoint, match="names a dtype that is not a number type"):
        load_optimizer_state(accelerator, model, _fresh(model), tmp_path)

    model, _ = _trained(accelerator, tmp_path)
    _edit(tmp_path, lambda m: m.update(loss_scaler={"cur_scale": float("nan")}))
    with pytest.raises(CorruptCheckpoint, match="loss_scaler is not an object of finite numbers"):
        load_optimizer_state(accelerator, model, _fresh(model), tmp_path)

    model, _ = _trained(accelerator, tmp_path)  # the JSON is right, the tensor in the file is not
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "optimizer.safetensors"))
    tensors["exp_avg/0.weight"] = torch.zeros(7)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    with pytest.raises(CorruptCheckpoint, match=r"exp_avg/0.weight has shape \[7\] .* its JSON says 30 elements"):
        load_optimizer_state(accelerator, model, _fresh(model), tmp_path)


def test_model_weights_of_another_shape_are_refused_naming_the_parameter():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    tensors["2.bias"] = torch.zeros(1)  # copy_ would broadcast it over the 3 elements
    with pytest.raises(CheckpointError, match=r"ckpt: parameter '2.bias' has shape \[1\] in the checkpoint, \[3\]"):
        model_state.load_trainable_state(model, tensors, "ckpt")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing copied


def test_trainer_state_position_and_counts_are_checked():
    fresh = Progress(n_rows=256, total_steps=12)
    saved = Progress.from_json(Progress(step=4, epoch=0, epoch_offset=64).to_json(), "t.json")
    assert fresh.resumed(saved).epoch_offset == 64
    assert fresh.resumed(Progress(step=16, epoch_offset=256)).epoch_offset == 256  # the end of an epoch
    with pytest.raises(CorruptCheckpoint, match=r"ckpt/trainer_state.json: epoch_offset 257 is past the 256 rows"):
        fresh.resumed(Progress(step=4, epoch_offset=257), where="ckpt/trainer_state.json")
    with pytest.raises(CheckpointError, match=r"t.json: samples_seen=\d+ is not valid"):
        Progress.from_json({**Progress(step=4).to_json(), "samples_seen": 1 << 60}, "t.json")


def test_a_damaged_rng_state_is_a_corrupt_checkpoint():
    good = model_state.rng_json(model_state.capture_rng())
    model_state.set_rng_state(good)
    for bad in ({**good, "python": [3, [1, 2], None]}, {**good, "torch": "AAAA"}, {"numpy": []}):
        with pytest.raises(CorruptCheckpoint, match="rng-rank00000.json: not a valid RNG state"):
            model_state.set_rng_state(bad, "rng-rank00000.json")
