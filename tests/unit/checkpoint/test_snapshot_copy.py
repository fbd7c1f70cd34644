"""A periodic checkpoint's tensors are copied in the background: save() returns before the copy is done, the next
optimizer step waits for it, and what is written is the state at the saved step, not after the next one."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.progress import Progress
from trainer.checkpoint.snapshot_copy import SnapshotCopy
from trainer.config.schema import Config
from trainer.liveness import Ranks
from trainer.metrics import EventLog, MetricsLog, read_jsonl
from trainer.run_dir import RunDir


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


class Gate:
    """A copy that waits until opened: the test decides when the background copy may finish."""

    def __init__(self):
        self.open, self.calls = threading.Event(), 0

    def __call__(self, dst, src):
        self.calls += 1
        assert self.open.wait(10), "the gate was never opened"
        dst.copy_(src)


def setup(acc, tmp_path, copy):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model, opt = acc.prepare(model, opt)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    ckpt = Checkpointer(
        Config(),
        run,
        acc,
        model,
        opt,
        remote=None,
        events=EventLog(run.root / "events.jsonl", "trainer"),
        metrics=MetricsLog(run.root / "metrics.jsonl", True),
        heartbeat=lambda **_: None,
        say=lambda _: None,
        ranks=Ranks(0, 1, 60),
        copy=copy,
    )
    fresh = Progress(total_steps=100, global_batch=1, n_rows=100)
    assert ckpt.resume("never", fresh) is None
    return model, opt, ckpt, fresh


def step(model, opt, i):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def state(model, opt):
    inner = opt.optimizer
    names = dict(model.named_parameters())
    weights = {n: p.detach().clone() for n, p in names.items()}
    moments = {n: inner.state[p]["exp_avg_sq"].clone() for n, p in names.items()}
    return weights, moments


def written(run: RunDir, step_: int):
    path = run.checkpoint(step_)
    return load_file(str(path / "model.safetensors")), load_file(str(path / "optimizer.safetensors"))


def test_the_next_step_waits_for_the_copy_and_the_checkpoint_holds_the_saved_step(accelerator, tmp_path):
    gate = Gate()
    model, opt, ckpt, p = setup(accelerator, tmp_path, gate)
    for i in range(3):
        step(model, opt, i)
        p.step += 1
    want_w, want_m = state(model, opt)

    t0 = time.monotonic()
    ckpt.save(p)
    assert time.monotonic() - t0 < 1.0 and ckpt.copier.running  # save() did not wait for the copy

    threading.Timer(0.5, gate.open.set).start()
    t0 = time.monotonic()
    step(model, opt, 3)  # the optimizer step waits for the copy before it changes anything
    waited = time.monotonic() - t0
    assert waited >= 0.4, f"the step did not wait for the copy ({waited:.2f} s)"
    assert not torch.equal(model[0].weight, want_w["0.weight"])  # the step did happen
    ckpt._wait_writer()

    weights, optim = written(ckpt.run, 3)
    for n in want_w:
        assert torch.equal(weights[n], want_w[n]), n
        assert torch.equal(optim[f"exp_avg_sq/{n}"], want_m[n].reshape(-1)), n
    copy = [e for e in read_jsonl(ckpt.run.root / "events.jsonl") if e["event"] == "checkpoint_copy"]
    assert [e["step"] for e in copy] == [3] and copy[0]["copy_wait_s"] >= 0.4
    assert gate.calls == len(weights) + len(optim)
    ckpt.close()


def test_buffers_are_reused_and_hold_each_checkpoints_own_step(accelerator, tmp_path):
    gate = Gate()
    gate.open.set()
    model, opt, ckpt, p = setup(accelerator, tmp_path, gate)
    ptrs, wants = [], {}
    for i in range(4):
        step(model, opt, i)
        p.step += 1
        if p.step in (2, 4):
            wants[p.step] = state(model, opt)[0]
            ckpt.save(p)
            ckpt._wait_writer()
            ptrs.append({n: t.data_ptr() for n, t in ckpt.copier.copied["model.safetensors"].items()})
    assert ptrs[0] == ptrs[1]  # the second checkpoint copied into the first one's buffers
    for s, want in wants.items():
        weights, _ = written(ckpt.run, s)
        assert all(torch.equal(weights[n], want[n]) for n in want), s
    ckpt.close()


def test_a_synchronous_save_writes_the_live_tensors_without_copying(accelerator, tmp_path):
    gate = Gate()  # never opened: a copy would hang the save
    model, opt, ckpt, p = setup(accelerator, tmp_path, gate)
    step(model, opt, 0)
    p.step += 1
    want_w, _ = state(model, opt)
    ckpt.save(p, "emergency", sync=True)
    assert gate.calls == 0 and ckpt.committed(1)
    weights, _ = written(ckpt.run, 1)
    assert all(torch.equal(weights[n], want_w[n]) for n in want_w)
    ckpt.close()


def test_a_failed_copy_is_raised_at_the_next_step():
    def broken(dst, src):
        raise RuntimeError("simulated copy failure")

    copier = SnapshotCopy(broken)
    copier.start({"f": {"t": torch.ones(3)}})
    assert copier.running
    with pytest.raises(Exception, match="simulated copy failure"):
        copier.wait()
    assert not copier.running and copier.wait() == 0.0
