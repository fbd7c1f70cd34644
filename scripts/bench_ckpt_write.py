"""Time writing one rank's checkpoint files, the old way against the streaming writer.

    python scripts/bench_ckpt_write.py --gb 2 --dir /tmp/ckw            # here
    python scripts/bench_ckpt_write.py --gb 21 --dir /tmp/ckw --out $OUT # on the device (the 1.5B full FT size)

State: one "optimizer" file holding 3/4 of the bytes in ~150 fp32 tensors and one "model" file with the rest
in bf16, as a full fine-tuning checkpoint of a Llama shape under ZeRO-2 offload has (fp32 master + exp_avg +
exp_avg_sq, bf16 weights). Both ways end durable and hashed:

- before: `safetensors.torch.save_file` per file, fsync, then sha256 read back from the file (what
  spot-trainer did up to 2026-11-23);
- now: `trainer.st_io.write_safetensors` (bytes straight from the tensors, sha256 on the way, fsync), the
  files in parallel threads, as `CheckpointStore.write_rank_files` does.

Prints what it measured and writes ckpt-write-<gb>gb.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trainer.checkpoint.manifest import sha256_file  # noqa: E402
from trainer.checkpoint.stream import write_safetensors  # noqa: E402


def make_state(gb: float) -> dict[str, dict[str, torch.Tensor]]:
    n_opt = int(gb * 0.75e9 / 4 / 150)
    n_model = int(gb * 0.25e9 / 2 / 50)
    opt = {
        f"{k}/layer{i}": torch.full((n_opt,), float(i)) for k in ("master", "exp_avg", "exp_avg_sq") for i in range(50)
    }
    model = {f"layer{i}": torch.full((n_model,), float(i), dtype=torch.bfloat16) for i in range(50)}
    return {"optimizer-rank00000.safetensors": opt, "model.safetensors": model}


def before(state, d: Path) -> None:
    from safetensors.torch import save_file

    for name, tensors in state.items():
        save_file(tensors, str(d / name))
    for name in state:
        with open(d / name, "rb") as f:
            os.fsync(f.fileno())
    for name in state:
        sha256_file(d / name)


def now(state, d: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda kv: write_safetensors(d / kv[0], kv[1]), state.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/ckw")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    d = Path(a.dir)
    state = make_state(a.gb)
    nbytes = sum(t.numel() * t.element_size() for ts in state.values() for t in ts.values())
    res = {
        "command": "python scripts/bench_ckpt_write.py " + " ".join(sys.argv[1:]),
        "bytes": nbytes,
        "cpus": os.cpu_count(),
        "runs": [],
    }
    for _ in range(a.repeat):
        for name, fn in (("before", before), ("now", now)):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            os.sync()
            t0 = time.monotonic()
            fn(state, d)
            s = time.monotonic() - t0
            res["runs"].append({"way": name, "seconds": round(s, 2), "gb_per_s": round(nbytes / s / 1e9, 3)})
            print(f"{name:7s} {nbytes / 1e9:.2f} GB in {s:.2f} s ({nbytes / s / 1e9:.2f} GB/s)", flush=True)
    shutil.rmtree(d, ignore_errors=True)
    for way in ("before", "now"):
        res[f"{way}_best_s"] = min(x["seconds"] for x in res["runs"] if x["way"] == way)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"ckpt-write-{a.gb:g}gb.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
