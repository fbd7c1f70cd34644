"""Prototype: 2-process DDP and DeepSpeed ZeRO-2 (+ CPU offload) on a CPU machine, save/resume in our format.

    OMP_NUM_THREADS=1 python scripts/dev/ds_cpu_probe.py check                  # DDP + ZeRO-2 offload, full + LoRA
    ... check --modes zero2_offload --methods lora,qlora --one-to-two            # also 1 -> 2 processes
    ... check --loop manual            # trainer/loop.py's idiom: sum/global-targets loss, acc.sync_gradients
    ... check --dtype bf16             # DeepSpeed bf16 weights + fp32 masters
    ... check --no-replay              # shows that CPU Adam resume is not bitwise without the step replay

`check` launches workers (`accelerate launch --multi_gpu` or torchrun) and asserts: world size and
rank-identical weights; same-world-size resume is bitwise equal to an uninterrupted run (weights, losses,
LR); 2 -> 1 (and 1 -> 2) resumes continue the loss curve. A worker is this file run as `worker ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SEQ_LEN, VOCAB, NUM_SAMPLES = 16, 128, 512
PY = sys.executable


# ---------------------------------------------------------------- worker


def build_model(method: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         max_position_embeddings=64))
    if method == "qlora":  # 4-bit frozen base (bitsandbytes works on CPU), LoRA adapters in fp32
        import tempfile

        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            # not save_pretrained: under torch.distributed transformers writes only on rank 0
            model.config.save_pretrained(tmp)
            save_file(model.state_dict(), f"{tmp}/model.safetensors")
            model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(1)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def make_data():
    """Learnable token sequences: arithmetic progressions mod VOCAB with a random start and stride."""
    import torch

    g = torch.Generator().manual_seed(1234)
    start = torch.randint(0, VOCAB, (NUM_SAMPLES, 1), generator=g)
    stride = torch.randint(1, 4, (NUM_SAMPLES, 1), generator=g)
    return (start + stride * torch.arange(SEQ_LEN)) % VOCAB


def trainable_state(module) -> dict:
    return {n: p.detach().clone().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from trainer.config.loader import config_from_dict
    from trainer.distributed import make_accelerator, release, resolve_grad_accum
    from trainer.checkpoint.optimizer_state import load_optimizer_state, save_optimizer_state

    t_start = time.time()
    out = Path(args.out)
    cfg = config_from_dict({
        "model": {"dtype": args.dtype},
        "train": {"micro_batch_size": args.micro, "global_batch_size": args.global_batch, "max_grad_norm": 1.0},
        "distributed": {"deepspeed": None if args.mode == "ddp" else args.mode},
    })
    world = int(os.environ.get("WORLD_SIZE", 1))
    accum = resolve_grad_accum(cfg, world)
    acc = make_accelerator(cfg, accum)
    rank, W = acc.process_index, acc.num_processes
    assert W == world == args.expect_world, f"world size {W} (env {world}), expected {args.expect_world}"
    ranks = [None] * W
    dist.all_gather_object(ranks, rank) if W > 1 else ranks.__setitem__(0, rank)
    assert sorted(ranks) == list(range(W)), f"ranks {ranks}: processes do not form one world"
    t_acc = time.time()

    model = build_model(args.method)
    start_step = 0
    if args.resume:
        ckpt = Path(args.resume)
        weights = load_file(str(ckpt / "model.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in weights.items():
                params[n].copy_(v)
        start_step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    model, opt = acc.prepare(model, opt)
    # built on the prepared optimizer: its param_groups is a live view of whatever optimizer DeepSpeed runs
    warmup = 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / (args.steps + 1)))
    if args.resume:
        if args.no_replay:  # show why the replay exists: resume is then not bitwise
            import trainer.checkpoint.optimizer_state as ost
            ost._replay_cpu_adam_steps = lambda *a: None
        load_optimizer_state(acc, model, opt, ckpt)
        sched.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
    t_ready = time.time()

    data = make_data()
    M, G = args.micro, args.global_batch
    log = open(out / "losses.jsonl", "a") if acc.is_main_process else None
    model.train()
    params = [p for p in acc.unwrap_model(model).parameters() if p.requires_grad]
    for step in range(start_step, args.steps):
        t0 = time.time()
        total = torch.zeros(())
        if args.loop == "accumulate":  # accelerate's idiom: mean loss per micro-batch
            for a in range(accum):
                lo = (step * G + a * M * W + rank * M) % NUM_SAMPLES
                batch = data[lo:lo + M]
                with acc.accumulate(model):
                    loss = model(input_ids=batch, labels=batch).loss
                    acc.backward(loss)
                    grad_norm = acc.clip_grad_norm_(model.parameters(), 1.0) if acc.sync_gradients else None
                    opt.step()
                    opt.zero_grad()
                total += loss.detach() / accum / W
        else:  # trainer/loop.py's idiom: loss = sum over this rank's targets / targets of the global batch
            n_targets = G * (SEQ_LEN - 1)
            for a in range(accum):
                lo = (step * G + a * M * W + rank * M) % NUM_SAMPLES
                batch = data[lo:lo + M]
                last = a == accum - 1
                acc.sync_gradients = last  # DeepSpeed: engine.step() runs in backward() of the last one only
                ctx = acc.no_sync(model) if (W > 1 and not last) else contextlib.nullcontext()
                with ctx:
                    res = model(input_ids=batch, labels=batch, num_items_in_batch=n_targets)
                    # accelerator.backward divides by grad_accum (accelerate for DDP, the engine under
                    # DeepSpeed); DDP and ZeRO average over ranks: undo both to get sum / global targets
                    acc.backward(res.loss * W * accum)
                total += res.loss.detach()
            grad_norm = acc.clip_grad_norm_(params, 1.0)  # DeepSpeed: clipped inside engine.step(); its norm
            opt.step()  # DeepSpeed: no-op
            opt.zero_grad()
        lr_used = opt.param_groups[0]["lr"]
        sched.step()
        if W > 1:
            dist.all_reduce(total)
        if log:
            log.write(json.dumps({"step": step + 1, "loss": total.item(), "lr": lr_used,
                                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                  "world_size": W, "step_time_s": round(time.time() - t0, 3)}) + "\n")
            log.flush()
        if args.stop_at and step + 1 == args.stop_at:
            save_checkpoint(acc, model, opt, sched, out, step + 1)
            break

    module = acc.unwrap_model(model)
    state = trainable_state(module)
    flat = torch.cat([v.reshape(-1) for _, v in sorted(state.items())])
    if W > 1:
        gathered = [torch.empty_like(flat) for _ in range(W)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], t) for t in gathered), "ranks hold different weights"
    if acc.is_main_process:
        save_file(state, str(out / "final.safetensors"))
        (out / "timing.json").write_text(json.dumps({
            "accelerator_s": round(t_acc - t_start, 2), "ready_s": round(t_ready - t_start, 2),
            "total_s": round(time.time() - t_start, 2), "world_size": W,
            "distributed_type": str(acc.distributed_type), "optimizer": type(getattr(opt.optimizer, "optimizer",
                                                                                       opt.optimizer)).__name__}))
        print(f"[worker] mode={args.mode} method={args.method} W={W} rank-identical weights: ok", flush=True)
    del model, opt, sched, module
    release(acc)


def save_checkpoint(acc, model, opt, sched, out: Path, step: int) -> Path:
    """Our layout: ranks write into one temp dir (named by rank 0), rank 0 commits after a barrier."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from trainer.checkpoint.optimizer_state import save_optimizer_state

    name = [str(out / "checkpoints" / f".tmp-step-{step:08d}-{os.getpid()}")]
    if acc.num_processes > 1:
        dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    if acc.is_main_process:
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_optimizer_state(acc, model, opt, tmp)
    if acc.is_main_process:
        save_file(trainable_state(acc.unwrap_model(model)), str(tmp / "model.safetensors"))
        (tmp / "scheduler.json").write_text(json.dumps(sched.state_dict()))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": acc.num_processes}))
    acc.wait_for_everyone()
    final = tmp.parent / f"step-{step:08d}"
    if acc.is_main_process:
        tmp.rename(final)
    acc.wait_for_everyone()
    return final


# ---------------------------------------------------------------- orchestration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, worker_args: list[str], launcher: str, log: Path, timeout: int = 900) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache/spot-trainer/torch_extensions")))
    script = [str(Path(__file__).resolve()), "worker", "--expect-world", str(nproc), *worker_args]
    if launcher == "torchrun":
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *script]
    else:  # accelerate: --multi_gpu is its name for "several local processes"; no GPU needed
        cmd = [PY, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += (["--multi_gpu"] if nproc > 1 else []) + script
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise SystemExit(f"timeout: {' '.join(cmd)} (log {log})")
    if rc != 0:
        tail = "".join(open(log).readlines()[-30:])
        raise SystemExit(f"worker failed rc={rc}: {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return time.time() - t0


def losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}


def same_weights(a: Path, b: Path) -> tuple[bool, float]:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "final.safetensors")), load_file(str(b / "final.safetensors"))
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    return all(torch.equal(wa[k], wb[k]) for k in wa), diff


def check(args) -> None:
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    N, K = args.steps, args.stop_at
    results = []
    for mode in args.modes.split(","):
        for method in args.methods.split(","):
            tag = f"{mode}-{method}"
            common = ["--dtype", args.dtype, "--loop", args.loop, "--mode", mode, "--method", method,
                      "--steps", str(N), "--global-batch", str(args.global_batch), "--micro", str(args.micro)]

            def run(name, nproc, extra=()):
                d = root / tag / name
                d.mkdir(parents=True)
                secs = launch(nproc, common + ["--out", str(d), *extra], args.launcher, d / "log.txt")
                timing = json.loads((d / "timing.json").read_text())
                print(f"  {tag}/{name}: {nproc} proc, {secs:.1f}s wall, ready after {timing['ready_s']}s, "
                      f"{timing['optimizer']}, {timing['distributed_type']}", flush=True)
                return d

            print(f"== {tag}", flush=True)
            full = run("uninterrupted-2", 2)
            part = run("stop-2", 2, ["--stop-at", str(K)])
            ckpt = part / "checkpoints" / f"step-{K:08d}"
            print(f"  checkpoint files: {sorted(p.name for p in ckpt.iterdir())}")
            resumed = run("resume-2to2", 2, ["--resume", str(ckpt)] + (["--no-replay"] if args.no_replay else []))
            equal, diff = same_weights(full, resumed)
            la, lr_ = losses(full), losses(resumed)
            loss_equal = all(la[s]["loss"] == lr_[s]["loss"] for s in range(K + 1, N + 1))
            lr_equal = all(la[s]["lr"] == lr_[s]["lr"] for s in range(K + 1, N + 1))
            results.append((tag, "2->2 bitwise weights", equal, f"max|diff|={diff:g}"))
            results.append((tag, "2->2 bitwise losses+lr", loss_equal and lr_equal, ""))
            if mode != "ddp" or args.ddp_reshard:
                one = run("resume-2to1", 1, ["--resume", str(ckpt)])
                l1 = losses(one)
                rel = max(abs(l1[s]["loss"] - la[s]["loss"]) / abs(la[s]["loss"]) for s in range(K + 1, N + 1))
                _, wdiff = same_weights(full, one)
                tol = 1e-4 if args.dtype == "fp32" else 2e-3  # bf16 gradients are reduced in bf16 across ranks
                results.append((tag, "2->1 loss continuity", rel < tol, f"max rel loss diff={rel:.2e}, "
                                                                          f"max|w diff|={wdiff:.2e}"))
                if args.one_to_two:
                    part1 = run("stop-1", 1, ["--stop-at", str(K)])
                    two = run("resume-1to2", 2, ["--resume", str(part1 / "checkpoints" / f"step-{K:08d}")])
                    l2 = losses(two)
                    rel = max(abs(l2[s]["loss"] - la[s]["loss"]) / abs(la[s]["loss"]) for s in range(K + 1, N + 1))
                    results.append((tag, "1->2 loss continuity", rel < tol, f"max rel loss diff={rel:.2e}"))
            steps = [r["step_time_s"] for r in la.values()]
            print(f"  losses (uninterrupted): {[round(la[s]['loss'], 4) for s in sorted(la)]}")
            print(f"  step time median {sorted(steps)[len(steps) // 2]}s")
    print("\nRESULTS")
    ok = True
    for tag, what, passed, detail in results:
        ok &= passed
        print(f"  {'PASS' if passed else 'FAIL'}  {tag:22s} {what:26s} {detail}")
    raise SystemExit(0 if ok else 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--mode", choices=["ddp", "zero2", "zero2_offload"], required=True)
    w.add_argument("--method", choices=["full", "lora", "qlora"], required=True)
    w.add_argument("--steps", type=int, default=6)
    w.add_argument("--stop-at", type=int, default=0)
    w.add_argument("--resume")
    w.add_argument("--out", required=True)
    w.add_argument("--global-batch", type=int, default=8)
    w.add_argument("--micro", type=int, default=2)
    w.add_argument("--lr", type=float, default=1e-2)
    w.add_argument("--expect-world", type=int, required=True)
    w.add_argument("--no-replay", action="store_true", help="skip the CPU Adam step replay on resume")
    w.add_argument("--loop", choices=["accumulate", "manual"], default="accumulate")
    w.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    c = sub.add_parser("check")
    c.add_argument("--modes", default="ddp,zero2_offload")
    c.add_argument("--methods", default="full,lora")
    c.add_argument("--steps", type=int, default=24)
    c.add_argument("--stop-at", type=int, default=19)
    c.add_argument("--global-batch", type=int, default=8)
    c.add_argument("--micro", type=int, default=2)
    c.add_argument("--launcher", choices=["accelerate", "torchrun"], default="accelerate")
    c.add_argument("--one-to-two", action="store_true", help="also stop with 1 process, resume with 2")
    c.add_argument("--ddp-reshard", action="store_true", help="also resume DDP checkpoints on 1 process")
    c.add_argument("--no-replay", action="store_true", help="resume without the CPU Adam step replay")
    c.add_argument("--loop", choices=["accumulate", "manual"], default="accumulate",
                   help="accumulate: accelerator.accumulate(); manual: trainer/loop.py's loss and sync handling")
    c.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: DeepSpeed keeps bf16 weights and fp32 masters (accelerate autocast for DDP)")
    c.add_argument("--workdir", default="/tmp/ds_cpu_probe")
    args = p.parse_args()
    worker(args) if args.cmd == "worker" else check(args)


if __name__ == "__main__":
    main()
