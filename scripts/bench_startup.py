"""Start-up latency: process start -> end of the first optimizer step, by phase, for a fresh start and for resumes.

Builds a random-weight Llama of a shape (scripts/bench.py's builder), trains it with `python -m trainer train` for a
few steps with a checkpoint after every step, then starts it again (each resumes and trains one more step), and
reads the `startup` events the starts wrote (events.jsonl). Writes the events and each start's wall time to JSON.

  python scripts/bench_startup.py --shape 8b --out $OUT                # QLoRA on a GPU (device tool)
  python scripts/bench_startup.py --shape tiny --cpu --out /tmp/st      # smoke test on the CPU (LoRA, no 4-bit)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (scripts/bench.py: the random Llama, the tokenizer, the rows)


def write_rows(path: Path, rows: int, length: int) -> None:
    """prompt/completion rows of exactly `length` tokens each (bench.write_rows' word-per-token format)."""
    bench.write_rows(path, np.full(rows, length), np.random.default_rng(1234))


def run_config(a, model: Path, data: Path) -> dict:
    return {
        "model": {
            "name_or_path": str(model),
            "method": "lora" if a.cpu else "qlora",
            "gradient_checkpointing": not a.cpu,
            "checkpoint_layers": None if a.cpu else "auto",
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": bench.TARGETS},
        "data": {
            "path": str(data),
            "format": "completion",
            "eval_split": None,
            "packing": True,
            "max_length": a.length,
        },
        "train": {
            "max_steps": a.steps,
            "micro_batch_size": 1,
            "grad_accum": 1,
            "optimizer": "adamw",
            "lr": 2e-4,
            "warmup_steps": 0,
            "log_every_steps": 1,
            **({"device": "cpu"} if a.cpu else {}),
        },
        "eval": {"before_training": False, "generate": False, "every_steps": None},
        "checkpoint": {"every_steps": 1, "keep_last": 2},
        "preemption": {"watch": "none"},
    }


def start(config: Path, out: Path, max_steps: int, env: dict) -> dict:
    """One `python -m trainer train` process; its exit code, wall time and the `startup` event it wrote."""
    events = out / "events.jsonl"
    before = len(events.read_text().splitlines()) if events.exists() else 0
    cmd = [sys.executable, "-m", "trainer", "train", str(config), "--output-dir", str(out)]
    t0 = time.monotonic()
    p = subprocess.run(
        cmd + ["--set", f"train.max_steps={max_steps}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    new = [json.loads(line) for line in events.read_text().splitlines()[before:] if line.strip()]
    startups = [e for e in new if e.get("event") == "startup"]
    if len(startups) != 1:
        raise SystemExit(f"expected one startup event from this start, got {len(startups)}")
    return {"max_steps": max_steps, "wall_s": round(wall, 3), "startup": startups[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", choices=sorted(bench.SHAPES))
    ap.add_argument("--cpu", action="store_true", help="smoke test without a GPU: LoRA (no 4-bit), train.device=cpu")
    ap.add_argument("--out", default="bench/results", help="directory for startup-<shape>.json")
    ap.add_argument("--work", default="/tmp/bench-startup", help="model, data and the run's output dir")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps of the fresh start")
    ap.add_argument("--restarts", type=int, default=2, help="resumed starts after it (one more step each)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--length", type=int, default=None, help="tokens per row (default 1024 on a GPU, 48 on the CPU)")
    a = ap.parse_args()
    a.length = a.length or (48 if a.cpu else 1024)
    work = Path(a.work)
    model, data, out = work / f"model-{a.shape}", work / "data.jsonl", work / "run"
    if not (model / "config.json").exists():
        built = bench.build_model(a.shape, model, "cpu" if a.cpu else "cuda")
        print(f"built {a.shape}: {built['params']:,} parameters in {built['seconds']} s", flush=True)
    write_rows(data, a.rows, a.length)
    shutil.rmtree(out, ignore_errors=True)
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(a, model, data), sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if a.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")

    starts = [start(config, out, a.steps, env)]
    for i in range(a.restarts):
        starts.append(start(config, out, a.steps + i + 1, env))
    for s, kind in zip(starts, ["fresh"] + ["resumed"] * a.restarts):
        s["kind"] = kind
        e = s["startup"]
        print(
            f"{kind:8s} total {e['total_s']:7.2f} s (wall {s['wall_s']:.2f} s) resumed_from {e['resumed_from']}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in e["phases"].items())
            + f", other {e['other_s']:.2f}",
            flush=True,
        )
    resumed = [s["startup"] for s in starts[1:]]
    summary = {
        "fresh_total_s": starts[0]["startup"]["total_s"],
        "resumed_median_total_s": round(statistics.median(e["total_s"] for e in resumed), 3) if resumed else None,
        "resumed_median_phases": {
            k: round(statistics.median(e["phases"][k] for e in resumed), 3) for k in starts[0]["startup"]["phases"]
        }
        if resumed
        else None,
    }
    result = {
        "shape": a.shape,
        "method": "lora" if a.cpu else "qlora",
        "device": "cpu" if a.cpu else _gpu_name(),
        "rows": a.rows,
        "length": a.length,
        "date": time.strftime("%Y-%m-%d"),
        "versions": _versions(),
        "starts": starts,
        "summary": summary,
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"startup-{a.shape}{'-cpu' if a.cpu else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
