"""DeepSpeed ZeRO-2 + CPU optimizer offload on one GPU, through the real CLI: full fine-tuning of a ~1B Llama
shape (uninterrupted, then SIGTERM -> emergency checkpoint -> resume, compared), and QLoRA under ZeRO-2 offload.

    python scripts/gpu_deepspeed.py --out $OUT --parts full            # on the device (about 5 minutes)
    python scripts/gpu_deepspeed.py --out $OUT --parts lora,qlora      # on the device (about 4 minutes)
    python scripts/gpu_deepspeed.py --out $OUT --parts stall           # on the device (about 7 minutes)
    python scripts/gpu_deepspeed.py --shape tiny --cpu                 # smoke test here
    python scripts/gpu_deepspeed.py --shape tiny --cpu --parts stall --stall-steps 12 --stall-every-minutes 0.05

For each method: an uninterrupted run; the same config stopped by SIGTERM (emergency checkpoint, exit 75); the
resumed run; then the last checkpoint's trainable weights of the two compared. `checkpoint.keep_last=1` and the
uninterrupted run's checkpoints are deleted once its weights are read: a full fine-tuning checkpoint of the 1.5 B
shape is about 24 GB (bf16 weights + fp32 master, exp_avg, exp_avg_sq) and the machine has a 64 GB disk.

`stall`: full fine-tuning without periodic checkpoints, then the same with one every `--stall-every-minutes`:
each checkpoint's stall (`stall_s`, the training thread inside save(), plus `copy_wait_s`, the next optimizer
step waiting for the background copy of the state), the overhead that stall is at a 5-minute interval, and the
step time measured with against without checkpoints (which also counts the background copy's and write's
contention with training).

Prints what it measured and writes deepspeed-<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench import build_model, write_data  # noqa: E402


def config(model: str, data: str, method: str, steps: int, every: int = 2) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"model.method={method}",
        "model.gradient_checkpointing=true",
        "lora.r=16",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        f"data.path={data}",
        "data.format=completion",
        "data.max_length=512",
        "data.eval_split=null",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        f"train.max_steps={steps}",
        "train.lr=1e-5",
        "train.log_every_steps=1",
        "eval.before_training=false",
        "eval.generate=false",
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=1",
        "preemption.watch=none",
        "distributed.deepspeed=zero2_offload",
    ]


def run(name: str, out: Path, overrides: list[str], sigterm_at: int | None = None, timeout: float = 240) -> dict:
    cmd = [sys.executable, "-m", "trainer", "train", "--output-dir", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    t0 = time.time()
    log = out.parent / f"{name}.log"
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        sent = None
        while proc.poll() is None and time.time() - t0 < timeout:
            hb = out / "heartbeat"
            try:
                step = int(hb.read_text().strip() or -1)
            except (OSError, ValueError):
                step = -1
            if sigterm_at is not None and sent is None and step >= sigterm_at:
                sent = time.time()
                proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
    metrics = (
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "metrics.jsonl").exists()
        else []
    )
    events = (
        [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
        if (out / "events.jsonl").exists()
        else []
    )
    train = [m for m in metrics if "loss" in m]
    res = {
        "name": name,
        "exit_code": rc,
        "wall_s": round(time.time() - t0, 1),
        "steps": len(train),
        "losses": [m["loss"] for m in train],
        "peak_memory_gb": max((m["memory_gb"] for m in train), default=None),
        "tokens_per_s_median": sorted(m["tokens_per_second"] for m in train)[len(train) // 2] if train else None,
        "stall_s": [e["stall_s"] for e in events if e["event"] == "checkpoint"],
        "copy_wait_s": {e["step"]: e["copy_wait_s"] for e in events if e["event"] == "checkpoint_copy"},
        "periodic": [e["step"] for e in events if e["event"] == "checkpoint" and e.get("kind") == "periodic"],
        "checkpoint_stall_s": {e["step"]: e["stall_s"] for e in events if e["event"] == "checkpoint"},
        "step_time_s": {m["step"]: m["step_time_s"] for m in train},
        "commit_s": [e.get("commit_s") for e in events if e["event"] == "checkpoint"],
        "preempt": [e for e in events if e["event"] == "preempt"],
    }
    if rc not in (0, 75):
        res["log_tail"] = log.read_text()[-2500:]
    print(
        f"{name}: exit {rc}, {len(train)} steps, {res['wall_s']} s, peak {res['peak_memory_gb']} GB, "
        f"{res['tokens_per_s_median']} tok/s",
        flush=True,
    )
    return res


def weights(out: Path, step: int):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def disk_free_gb(path: Path) -> float:
    st = os.statvfs(path)
    return round(st.f_bavail * st.f_frsize / 1e9, 1)


def method_runs(
    info: dict,
    work: Path,
    model: Path,
    data: str,
    method: str,
    steps: int,
    every: int,
    sigterm_at: int,
    save,
    baseline: bool = True,
) -> None:
    import torch

    cfg = config(str(model), data, method, steps, every)
    a, b = work / f"{method}-a", work / f"{method}-b"
    wa = None
    if baseline:
        info[f"{method}_uninterrupted"] = run(f"{method}_uninterrupted", a, cfg)
        save()
        try:
            wa = weights(a, steps)
        except Exception as e:  # a failed run above: record, do not hide
            info[f"{method}_resume_error"] = repr(e)
    subprocess.run(["rm", "-rf", str(a / "checkpoints"), str(a / "final")])
    info[f"{method}_disk_free_gb"] = disk_free_gb(work)
    info[f"{method}_sigterm"] = run(f"{method}_sigterm", b, cfg, sigterm_at=sigterm_at)
    save()
    info[f"{method}_resumed"] = run(f"{method}_resumed", b, cfg)
    if wa is not None:
        try:
            wb = weights(b, steps)
            info[f"{method}_resume_max_abs_diff"] = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
            info[f"{method}_resume_bitwise"] = all(torch.equal(wa[k], wb[k]) for k in wa)
            la, lb = info[f"{method}_uninterrupted"]["losses"], info[f"{method}_resumed"]["losses"]
            info[f"{method}_resumed_losses_match"] = la[-len(lb) :] == lb if lb else False
        except Exception as e:
            info[f"{method}_resume_error"] = repr(e)
    subprocess.run(["rm", "-rf", str(a), str(b)])
    save()


def stall_runs(
    info: dict, work: Path, model: Path, data: str, steps: int, every_minutes: float, save, extra: tuple = ()
) -> None:
    """Full fine-tuning without and with periodic checkpoints: what each checkpoint stalls, and its overhead."""
    cfg = [o for o in config(str(model), data, "full", steps) if not o.startswith("checkpoint.every_steps")]
    cfg += list(extra)  # later --set wins
    a, b = work / "stall-none", work / "stall-every"
    none = info["stall_without_checkpoints"] = run(
        "stall_without_checkpoints", a, cfg + ["checkpoint.every_steps=null"], timeout=560
    )
    subprocess.run(["rm", "-rf", str(a)])
    save()
    every = ["checkpoint.every_steps=null", f"checkpoint.every_minutes={every_minutes}"]
    ckpt = info["stall_with_checkpoints"] = run("stall_with_checkpoints", b, cfg + every, timeout=560)
    subprocess.run(["rm", "-rf", str(b)])
    steps_both = sorted(set(none["step_time_s"]) & set(ckpt["step_time_s"]))
    periodic = ckpt["periodic"]
    per = [ckpt["checkpoint_stall_s"][s] + ckpt["copy_wait_s"].get(s, 0.0) for s in periodic]
    out = {
        "checkpoints": len(periodic),
        "stall_s": [ckpt["checkpoint_stall_s"][s] for s in periodic],
        "copy_wait_s": [ckpt["copy_wait_s"].get(s) for s in periodic],
        "total_stall_per_checkpoint_s": [round(x, 4) for x in per],
        "overhead_at_5_min": [round(x / 300, 5) for x in per],  # stall per checkpoint / 300 s between them
        "step_time_median_without_s": _median([none["step_time_s"][s] for s in steps_both]),
        "step_time_median_with_s": _median([ckpt["step_time_s"][s] for s in steps_both]),
    }
    if periodic and steps_both:  # the steps' time plus save()'s, with checkpoints, less the same steps without
        extra = sum(ckpt["step_time_s"][s] - none["step_time_s"][s] for s in steps_both)
        extra += sum(ckpt["checkpoint_stall_s"][s] for s in periodic)
        out["measured_cost_per_checkpoint_s"] = round(extra / len(periodic), 4)
        out["measured_overhead_at_5_min"] = round(extra / len(periodic) / 300, 5)
    info["stall"] = out
    print("stall:", json.dumps(out), flush=True)
    save()


def _median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default="/tmp/ds-work")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--parts", default="full,lora,qlora")
    ap.add_argument("--no-baseline", action="store_true", help="only the SIGTERM + resume runs (timings)")
    ap.add_argument("--stall-steps", type=int, default=150, help="steps of each `stall` run")
    ap.add_argument("--stall-every-minutes", type=float, default=0.75, help="checkpoint interval of the `stall` run")
    a = ap.parse_args()
    work = Path(a.work)
    subprocess.run(["rm", "-rf", str(work)])
    work.mkdir(parents=True)
    model = work / f"model-{a.shape}"
    info = {
        "shape": a.shape,
        "parts": a.parts,
        "build": build_model(a.shape, model, "cpu" if a.cpu else "cuda"),
        "disk_free_gb": disk_free_gb(work),
        "command": "python scripts/gpu_deepspeed.py " + " ".join(sys.argv[1:]),
    }
    write_data(work / "data", n_var=200, n_fixed=64)
    data = str(work / "data" / "fixed.jsonl")
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"deepspeed-{a.shape}-{a.parts.replace(',', '-')}{'-nobaseline' if a.no_baseline else ''}.json"

    def save():  # after every run: a call cut short still leaves what it measured
        (out / name).write_text(json.dumps(info, indent=1))

    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for method in a.parts.split(","):
        if method == "stall":
            stall_runs(info, work, model, data, a.stall_steps, a.stall_every_minutes, save)
            continue
        # full: checkpoints at 3 and 6 (about 24 GB each), SIGTERM during step 3..4; adapters: every 2 steps
        every, sigterm_at = (3, 2) if method == "full" else (2, 3)
        method_runs(info, work, model, data, method, a.steps, every, sigterm_at, save, not a.no_baseline)
    print(json.dumps({k: v for k, v in info.items() if not isinstance(v, dict) or "exit_code" not in v}, indent=1))
    for k, v in info.items():
        if isinstance(v, dict) and "exit_code" in v:
            print(
                f"{k:22s} exit {v['exit_code']:>3}  steps {v['steps']:>2}  peak {v['peak_memory_gb']} GB  "
                f"tok/s {v['tokens_per_s_median']}  stall {v['stall_s']}  "
                f"preempt {[(p['step'], p['stop_to_commit_s']) for p in v['preempt']]}"
            )


if __name__ == "__main__":
    main()
