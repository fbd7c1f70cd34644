"""Batch arithmetic, DeepSpeed config filling, and real 2-process runs over gloo (DDP, ZeRO-2 + CPU offload).

The multi-process tests launch this file as a worker (`tests/test_distributed.py worker ...`) under
`accelerate launch --config_file launch/<name>.yaml`; the worker asserts the world size and that every
rank ends with the same weights, so a silent single-process run cannot pass.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config.loader import config_from_dict  # noqa: E402
from trainer.distributed import (
    deepspeed_config,
    mixed_precision,
    resolve_deepspeed_config,
    resolve_grad_accum,
)
from trainer.errors import ConfigError  # noqa: E402

TORCH_EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR",
                                      str(Path.home() / ".cache/spot-trainer/torch_extensions"))


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
    cfg = config_from_dict({"train": {"micro_batch_size": 2, "max_grad_norm": None},
                            "distributed": {"deepspeed": "zero2"}})
    assert deepspeed_config(cfg, 1, 1)["gradient_clipping"] == 0.0


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
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--num_processes", str(nproc), "--main_process_port", str(_free_port()),
           __file__, "worker", "--out", str(out), "--expect-world", str(nproc), *worker_args]
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
        "optimizer-rank00000.json", "optimizer-rank00000.safetensors",
        "optimizer-rank00001.json", "optimizer-rank00001.safetensors"]
    assert part["losses"] == full["losses"][:9]

    resumed = launch(2, tmp_path / "resumed", *common, "--resume", str(ckpt))
    assert resumed["losses"] == full["losses"][9:]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "2 -> 2 resume is not bitwise"

    one = launch(1, tmp_path / "one", *common, "--resume", str(ckpt))
    assert one["world_size"] == 1
    for got, want in zip(one["losses"], full["losses"][9:]):
        assert abs(got - want) < 1e-5 * abs(want)


# ---------------------------------------------------------------- the worker


def worker(argv: list[str]) -> None:
    import argparse

    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.distributed import make_accelerator, release
    from trainer.checkpoint.optimizer_state import load_optimizer_state, save_optimizer_state

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=["ddp", "zero2_offload"], required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--stop-at", type=int, default=0)
    p.add_argument("--resume", type=Path)
    p.add_argument("--expect-world", type=int, required=True)
    args = p.parse_args(argv)

    micro, global_batch = 2, 8
    cfg = config_from_dict({"model": {"dtype": "fp32"},
                            "train": {"micro_batch_size": micro, "global_batch_size": global_batch},
                            "distributed": {"deepspeed": None if args.mode == "ddp" else args.mode}})
    world = int(os.environ.get("WORLD_SIZE", 1))
    accum = resolve_grad_accum(cfg, world)
    acc = make_accelerator(cfg, accum)
    rank, W = acc.process_index, acc.num_processes
    assert W == args.expect_world, f"accelerate sees {W} processes, launched {args.expect_world}"

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=32))
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
    data = (torch.randint(0, 128, (256, 1), generator=g)
            + torch.randint(1, 4, (256, 1), generator=g) * torch.arange(16)) % 128
    losses = []
    for step in range(start, args.steps):
        total = torch.zeros(())
        for a in range(accum):
            lo = (step * global_batch + (a * W + rank) * micro) % len(data)
            batch = data[lo:lo + micro]
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
        save_file({n: p.detach().contiguous() for n, p in acc.unwrap_model(model).named_parameters()},
                  str(args.out / "final.safetensors"))
        inner = getattr(opt.optimizer, "optimizer", opt.optimizer)
        (args.out / "result.json").write_text(json.dumps({
            "world_size": W, "distributed_type": str(acc.distributed_type).split(".")[-1],
            "optimizer": type(inner).__name__, "ranks_identical": identical, "losses": losses,
            "time": time.time()}))
    del model, opt, sched
    release(acc)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2:])
