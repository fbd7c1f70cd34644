"""Real 2-process runs over gloo (DDP, ZeRO-2 + CPU offload) of trainer.distributed's accelerator.

The tests launch this file as a worker (`tests/e2e/test_distributed.py worker ...`) under
`accelerate launch --config_file launch/<name>.yaml` with PYTHONPATH=<repo>; the worker asserts the world size
and that every rank ends with the same weights, so a silent single-process run cannot pass. Batch arithmetic
and DeepSpeed config filling are tested in tests/unit/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.common import REPO
from trainer.config.loader import config_from_dict
from trainer.distributed import resolve_grad_accum

pytestmark = pytest.mark.e2e

TORCH_EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/spot-trainer/torch_extensions"))


# ---------------------------------------------------------------- real multi-process runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, out: Path, *worker_args: str, config: str = "cpu_2proc", timeout: int = 500) -> dict:
    """Run this file's worker under `accelerate launch --config_file launch/<config>.yaml`; its result JSON."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR)
    config_file = REPO / "launch" / f"{config if nproc > 1 else 'single_gpu'}.yaml"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(_free_port()),
        __file__,
        "worker",
        "--out",
        str(out),
        "--expect-world",
        str(nproc),
        *worker_args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / "result.json").read_text())


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final.safetensors"))


@pytest.mark.slow
def test_ddp_two_processes_over_gloo(tmp_path):
    result = launch(2, tmp_path / "ddp", "--mode", "ddp", "--steps", "3")
    assert result["world_size"] == 2
    assert result["distributed_type"] == "MULTI_CPU"
    assert result["ranks_identical"] is True
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero2_offload_resume_is_exact_and_reshards_to_one_process(tmp_path):
    common = ("--mode", "zero2_offload", "--steps", "12")
    full = launch(2, tmp_path / "full", *common, config="zero2_offload")
    assert full["world_size"] == 2 and full["distributed_type"] == "DEEPSPEED"
    assert full["optimizer"] == "DeepSpeedCPUAdam" and full["ranks_identical"] is True
    part = launch(2, tmp_path / "part", *common, "--stop-at", "9")
    ckpt = tmp_path / "part" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("optimizer-rank*")) == [
        "optimizer-rank00000.json",
        "optimizer-rank00000.safetensors",
        "optimizer-rank00001.json",
        "optimizer-rank00001.safetensors",
    ]
    assert part["losses"] == full["losses"][:9]

    resumed = launch(2, tmp_path / "resumed", *common, "--resume", str(ckpt))
    assert resumed["losses"] == full["losses"][9:]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "2 -> 2 resume is not bitwise"

    one = launch(1, tmp_path / "one", *common, "--resume", str(ckpt))
    assert one["world_size"] == 1
    for got, want in zip(one["losses"], full["losses"][9:], strict=False):
        assert abs(got - want) < 1e-5 * abs(want)


# ---------------------------------------------------------------- the worker


def worker(argv: list[str]) -> None:
    import argparse

    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.harness.optimizer import save_optimizer_state
    from trainer.checkpoint.optimizer_state import load_optimizer_state
    from trainer.distributed import make_accelerator, release

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=["ddp", "zero2_offload"], required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--stop-at", type=int, default=0)
    p.add_argument("--resume", type=Path)
    p.add_argument("--expect-world", type=int, required=True)
    args = p.parse_args(argv)

    micro, global_batch = 2, 8
    cfg = config_from_dict(
        {
            "model": {"dtype": "fp32"},
            "train": {"micro_batch_size": micro, "global_batch_size": global_batch},
            "distributed": {"deepspeed": None if args.mode == "ddp" else args.mode},
        }
    )
    world = int(os.environ.get("WORLD_SIZE", 1))
    accum = resolve_grad_accum(cfg, world)
    acc = make_accelerator(cfg, accum)
    rank, W = acc.process_index, acc.num_processes
    assert W == args.expect_world, f"accelerate sees {W} processes, launched {args.expect_world}"

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=32,
        )
    )
    start = 0
    if args.resume:
        state = load_file(str(args.resume / "model.safetensors"))
        model.load_state_dict(state, strict=False)
        start = json.loads((args.resume / "trainer_state.json").read_text())["step"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (args.steps + 1))
    if args.resume:
        load_optimizer_state(acc, model, opt, args.resume)
        sched.load_state_dict(json.loads((args.resume / "scheduler.json").read_text()))

    g = torch.Generator().manual_seed(1234)
    data = (
        torch.randint(0, 128, (256, 1), generator=g) + torch.randint(1, 4, (256, 1), generator=g) * torch.arange(16)
    ) % 128
    losses = []
    for step in range(start, args.steps):
        total = torch.zeros(())
        for a in range(accum):
            lo = (step * global_batch + (a * W + rank) * micro) % len(data)
            batch = data[lo : lo + micro]
            with acc.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
            total += loss.detach() / accum
        sched.step()
        if W > 1:
            dist.all_reduce(total)
        losses.append(total.item() / W)
        if step + 1 == args.stop_at:
            ckpt = args.out / "ckpt"
            if acc.is_main_process:
                ckpt.mkdir()
            acc.wait_for_everyone()
            save_optimizer_state(acc, model, opt, ckpt)
            if acc.is_main_process:
                weights = {n: p.detach() for n, p in acc.unwrap_model(model).named_parameters()}
                save_file(weights, str(ckpt / "model.safetensors"))
                (ckpt / "scheduler.json").write_text(json.dumps(sched.state_dict()))
                (ckpt / "trainer_state.json").write_text(json.dumps({"step": step + 1}))
            acc.wait_for_everyone()
            break

    flat = torch.cat([p.detach().reshape(-1) for p in acc.unwrap_model(model).parameters()])
    gathered = [torch.empty_like(flat) for _ in range(W)]
    if W > 1:
        dist.all_gather(gathered, flat)
    else:
        gathered = [flat]
    identical = all(torch.equal(gathered[0], t) for t in gathered)
    if acc.is_main_process:
        save_file(
            {n: p.detach().contiguous() for n, p in acc.unwrap_model(model).named_parameters()},
            str(args.out / "final.safetensors"),
        )
        inner = getattr(opt.optimizer, "optimizer", opt.optimizer)
        (args.out / "result.json").write_text(
            json.dumps(
                {
                    "world_size": W,
                    "distributed_type": str(acc.distributed_type).split(".")[-1],
                    "optimizer": type(inner).__name__,
                    "ranks_identical": identical,
                    "losses": losses,
                    "time": time.time(),
                }
            )
        )
    del model, opt, sched
    release(acc)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2:])
