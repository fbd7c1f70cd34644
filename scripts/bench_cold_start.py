"""Empty disk to the first resumed step, with model.mirror on and off (issue 14).

A random Llama of `--shape` (scripts/bench.py save_random_llama, its tokenizer beside it) is trained for a few steps
with a `file://` remote (default: a directory on this machine's disk) and model.mirror on, which leaves a checkpoint
and a copy of the base model there. Then two fresh pods, each a new empty output dir:

- mirror off: the model dir is on this disk (as if the hub download were already done: its time is NOT included;
  the line prints the model's size so a hub download can be added at its throughput), the checkpoint is pulled;
- mirror on: the model dir is moved away and the hub is offline (HF_HUB_OFFLINE=1), so the base model comes from the
  remote's mirror, pulled in parallel with the checkpoint.

Each is timed from launch to the first training step after the resume (metrics.jsonl) and printed with the phases
from the log. 8B QLoRA on a GPU (bitsandbytes):

    python scripts/bench_cold_start.py --shape 8b --work /data/cold   # remotes: file:///data/cold/remote/*

CPU smoke test (LoRA, fp32, tiny shape):

    python scripts/bench_cold_start.py --shape tiny --cpu

`--mirror-4bit` mirrors the quantized weights instead (model.mirror_4bit, QLoRA; with --cpu QLoRA on the CPU):

    python scripts/bench_cold_start.py --shape 8b --work /data/cold --mirror-4bit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (scripts/bench.py: the random Llama and its data)


def overrides(a, model_dir: Path, data: Path, mirror: bool, max_steps: int, remote: Path) -> list[str]:
    common = [
        f"model.name_or_path={model_dir}",
        f"model.mirror={str(mirror).lower()}",
        f"model.mirror_4bit={str(mirror and a.mirror_4bit).lower()}",
        f"data.path={data}",
        "data.format=completion",
        "data.eval_split=null",
        "data.packing=false",
        f"data.max_length={a.seq_len}",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        f"train.max_steps={max_steps}",
        "train.log_every_steps=1",
        "train.warmup_steps=0",
        "eval.before_training=false",
        "eval.generate=false",
        "eval.every_steps=null",
        "checkpoint.every_steps=2",
        f"checkpoint.remote=file://{remote}",
        "preemption.watch=none",
    ]
    if a.cpu and a.mirror_4bit:
        return common + ["model.method=qlora", "train.device=cpu"]
    if a.cpu:
        return common + ["model.method=lora", "model.dtype=fp32", "train.device=cpu"]
    return common + ["model.method=qlora", "model.gradient_checkpointing=true"]


def train(a, out: Path, over: list[str], env: dict) -> tuple[float, str]:
    """Run `spot-trainer train` into `out`; (seconds from launch to the first step after the resume, its output)."""
    cmd = [sys.executable, "-m", "trainer", "train", "--output-dir", str(out)]
    for o in over:
        cmd += ["--set", o]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    text = p.stdout + p.stderr
    if p.returncode != 0:
        raise SystemExit(f"exit {p.returncode}: {' '.join(cmd)}\n{text[-4000:]}")
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    resumed = next(e["step"] for e in events if e["event"] == "train_start")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = min(m["time"] for m in metrics if m.get("step", 0) > resumed and "loss" in m)
    return first - t0, text


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _params(model_dir: Path) -> int:
    import math

    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            n += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8b", choices=sorted(bench.SHAPES))
    ap.add_argument("--cpu", action="store_true", help="LoRA in fp32 on the CPU (a smoke test of this script)")
    ap.add_argument("--work", default="/tmp/spot-cold-start", help="model, data, output dirs (wiped first)")
    ap.add_argument("--remote", default=None, help="a dir for the file:// remotes (default: <work>/remote)")
    ap.add_argument("--seq-len", type=int, default=None, help="data.max_length (default 1024, 32 with --cpu)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--model", default=None, help="a model dir built before (bench.build_model); default: build one")
    ap.add_argument("--result", default=None, help="write the numbers as JSON here")
    ap.add_argument("--mirror-4bit", action="store_true", help="model.mirror_4bit: the mirror holds 4-bit weights")
    a = ap.parse_args()
    work = Path(a.work).resolve()
    remotes = Path(a.remote or work / "remote").resolve()  # one copy of the seeded remote per fresh pod
    if remotes.exists():
        shutil.rmtree(remotes)
    a.seq_len = a.seq_len or (32 if a.cpu else 1024)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if a.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))

    model_dir = Path(a.model).resolve() if a.model else work / "model"
    if a.model:
        built = {"params": _params(model_dir)}
    else:
        built = bench.build_model(a.shape, model_dir, "cpu" if a.cpu else "cuda")
    data = work / "data.jsonl"  # rows of exactly data.max_length tokens
    bench.write_rows(data, np.full(64, a.seq_len), np.random.default_rng(0))
    model_bytes = dir_bytes(model_dir)
    print(f"model {a.shape}: {built['params'] / 1e9:.2f} B parameters, {model_bytes / 1e9:.2f} GB on disk", flush=True)

    # the first pod: 2 steps, a checkpoint and the mirror in the remote
    train(a, work / "seed", overrides(a, model_dir, data, True, 2, remotes / "seed"), env)
    for name in ("off", "on"):  # each fresh pod finds the remote as the first pod left it
        shutil.copytree(remotes / "seed", remotes / name)
    mirror_bytes = dir_bytes(remotes / "seed" / "base-model")
    results = {"shape": a.shape, "cpu": a.cpu, "remote": f"file://{remotes}", "model_bytes": model_bytes}
    results.update(mirror_4bit=a.mirror_4bit, mirror_bytes=mirror_bytes)

    off, _ = train(a, work / "fresh-off", overrides(a, model_dir, data, False, 3, remotes / "off"), env)
    results["mirror_off_s"] = round(off, 2)

    away = model_dir.parent / f"{model_dir.name}-away"  # the fresh pod has no model dir, and no hub
    model_dir.rename(away)
    try:
        on, text_on = train(
            a, work / "fresh-on", overrides(a, model_dir, data, True, 3, remotes / "on"), dict(env, HF_HUB_OFFLINE="1")
        )
    finally:
        away.rename(model_dir)
    if "base model from the mirror" not in text_on:
        raise SystemExit(f"the mirror was not used:\n{text_on[-4000:]}")
    results["mirror_on_s"] = round(on, 2)
    print(
        f"empty disk to first resumed step ({a.shape}, {'LoRA CPU' if a.cpu else 'QLoRA GPU'}, file://{remotes}): "
        f"mirror off {off:.1f} s (model already on disk: add its download, {model_bytes / 1e9:.2f} GB), "
        f"mirror on {on:.1f} s (model + checkpoint from the remote, in parallel; the mirror "
        f"{'4-bit' if a.mirror_4bit else 'as on disk'}, {mirror_bytes / 1e9:.2f} GB)",
        flush=True,
    )
    if a.result:
        Path(a.result).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
