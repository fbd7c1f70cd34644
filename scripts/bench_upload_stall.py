"""Does an upload in flight slow training? Step times of the same CPU run with and without a remote.

    python scripts/bench_upload_stall.py [--steps 60] [--every 10]

Trains a ~30 M-parameter built-in model (full fine-tuning, so each checkpoint is ~350 MB: weights + AdamW
moments) twice, once with checkpoint.remote on a local SeaweedFS server, once without, and compares the step
times of steps that ran while an upload was in flight with those of the run without a remote.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root, for tests.harness
from tests.harness.s3_server import SeaweedServer  # noqa: E402


def train(out: Path, steps: int, every: int, extra: list[str], env: dict) -> tuple[list[dict], list[dict]]:
    sets = [
        "model.builtin.hidden_size=640",
        "model.builtin.intermediate_size=1728",
        "model.builtin.num_hidden_layers=6",
        "model.builtin.num_attention_heads=10",
        "model.builtin.num_key_value_heads=5",
        f"train.max_steps={steps}",
        "train.micro_batch_size=8",
        "data.max_length=32",
        "eval.before_training=false",
        "eval.generate=false",
        "eval.every_steps=null",
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=2",
        "preemption.watch=none",
        *extra,
    ]
    cmd = [sys.executable, "-m", "trainer", "train", "--output-dir", str(out)]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    return [m for m in metrics if "loss" in m], events


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = SeaweedServer(tmp / "s3")
        server.start()
        try:
            bucket = server.bucket()
            env = server.aws_env(env)
            remote = [
                f"checkpoint.remote=s3://{bucket}/stall",
                f"checkpoint.s3.endpoint_url={server.endpoint_url}",
                "checkpoint.s3.region=us-east-1",
                "checkpoint.s3.addressing_style=path",
            ]
            base, _ = train(tmp / "local", a.steps, a.every, [], env)
            with_remote, events = train(tmp / "remote", a.steps, a.every, remote, env)
        finally:
            server.kill()
    ckpt = {e["step"]: e["time"] for e in events if e["event"] == "checkpoint"}
    up = {e["step"]: e for e in events if e["event"] == "upload"}
    windows = [(ckpt[s], up[s]["time"]) for s in up if s in ckpt]
    # a step ran during an upload if it ended inside [commit, upload done]
    during = [m["step_time_s"] for m in with_remote if any(t0 < m["time"] <= t1 for t0, t1 in windows)]
    skip = 2  # first steps include warm-up
    base_t = [m["step_time_s"] for m in base[skip:]]
    mb = sum(e["bytes"] for e in up.values()) / 2**20
    secs = sum(e["seconds"] for e in up.values())
    print(f"checkpoints uploaded: {len(up)}, {mb:.0f} MiB in {secs:.1f} s ({mb / secs:.0f} MiB/s)")
    print(
        f"step time without a remote:          median {statistics.median(base_t) * 1000:.1f} ms ({len(base_t)} steps)"
    )
    if during:
        print(
            f"step time while an upload was in flight: median {statistics.median(during) * 1000:.1f} ms "
            f"({len(during)} steps), ratio {statistics.median(during) / statistics.median(base_t):.2f}"
        )
    print("command: python scripts/bench_upload_stall.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
