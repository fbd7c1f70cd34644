"""A small real child for supervisor tests: behaves like `spot-trainer train` on disk, without torch.

It resumes from the newest committed checkpoint, writes `heartbeat` every step, commits checkpoints the
way the trainer does (temp dir, manifest last, rename), and on SIGTERM writes an emergency checkpoint
and exits 75. Flags make it crash, hang, get a cloud notice or fail with a usage error. Unknown
arguments (train, CONFIG, --set ...) are accepted and ignored, so it can stand in for the real command.

Run it by path (`python tests/harness/fake_trainer.py ...`, what the supervisor tests do) or as
`python -m tests.harness.fake_trainer ...` from the repo root; it needs `trainer` importable (installed, or
PYTHONPATH=<repo>).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from trainer.checkpoint.manifest import build_manifest, write_manifest
from trainer.metrics import EventLog
from trainer.run_dir import step_dirname
from trainer.spot.supervisor import newest_checkpoint_step


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--steps", type=int, default=10, help="total optimizer steps of the run")
    p.add_argument("--step-time", type=float, default=0.02)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--exit-code", type=int, default=None, help="exit with this code before the first step")
    p.add_argument("--crash-at", type=int, default=None, help="crash after this step's heartbeat ...")
    p.add_argument("--crash-after-steps", type=int, default=None, help="... or this many steps into each attempt")
    p.add_argument("--crash-attempts", type=int, default=1_000_000, help="... on the first N attempts")
    p.add_argument("--crash-code", default="1", help="exit code, or 'kill' for SIGKILL (like the OOM killer)")
    p.add_argument("--hang-at", type=int, default=None, help="stop beating and ignore SIGTERM at this step ...")
    p.add_argument("--hang-attempts", type=int, default=1, help="... on the first N attempts")
    p.add_argument("--notice-at", type=int, default=None, help="a cloud notice arrives at this step")
    p.add_argument(
        "--preempt-exit-code",
        type=int,
        default=75,
        help="exit code after a preemption (accelerate launch turns 75 into 1)",
    )
    p.add_argument("--on-sigterm", choices=["emergency", "crash", "ignore"], default="emergency")
    args, _unknown = p.parse_known_args(argv)
    return args


def commit_checkpoint(out: Path, step: int, kind: str) -> None:
    final = out / "checkpoints" / step_dirname(step)
    if final.exists():
        return
    tmp = out / "checkpoints" / f".tmp-{step_dirname(step)}-{os.getpid()}"
    tmp.mkdir(parents=True)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    write_manifest(tmp, build_manifest(tmp, step, kind=kind))
    os.rename(tmp, final)


def main(argv) -> int:
    args = parse(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    counter = out / "fake_attempts"
    attempt = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempt))
    resumed = newest_checkpoint_step(out) or 0
    with open(out / "fake_trainer.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "attempt": attempt,
                    "pid": os.getpid(),
                    "pgid": os.getpgid(0),
                    "resumed_from": resumed,
                    "argv": argv,
                    "env_attempt": os.environ.get("SPOT_TRAINER_ATTEMPT"),
                    "env_shutdown_timeout": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"),
                }
            )
            + "\n"
        )
    events = EventLog(out / "events.jsonl", "trainer")
    if args.exit_code is not None:
        print(f"fake trainer: exiting {args.exit_code}", file=sys.stderr)
        return args.exit_code

    stop = {"reason": None}
    if args.on_sigterm == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.update(reason="SIGTERM"))

    step = resumed
    events.emit("train_start", step=step, world_size=1)
    while step < args.steps:
        if stop["reason"] == "SIGTERM" and args.on_sigterm == "crash":
            raise RuntimeError("fake trainer: crashed while stopping")
        if stop["reason"]:
            commit_checkpoint(out, step, "emergency")
            events.emit("preempt", step=step, reason=stop["reason"], stop_to_commit_s=0.0)
            events.emit("train_end", step=step, status="preempted")
            return args.preempt_exit_code
        time.sleep(args.step_time)
        step += 1
        (out / "heartbeat").write_text(f"{step} train\n")
        if step % args.checkpoint_every == 0:
            commit_checkpoint(out, step, "periodic")
        if args.hang_at == step and attempt <= args.hang_attempts:
            (out / "heartbeat").write_text(f"{step} eval\n")  # where it is stuck, as the trainer says
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck in a collective: signals do nothing
            while True:
                time.sleep(60)
        crash = (args.crash_at == step) or (
            args.crash_after_steps is not None and step - resumed == args.crash_after_steps
        )
        if crash and attempt <= args.crash_attempts:
            print(f"fake trainer: crashing at step {step}", file=sys.stderr, flush=True)
            if args.crash_code == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return int(args.crash_code)
        if args.notice_at == step:
            stop["reason"] = "aws:terminate"
    commit_checkpoint(out, step, "final")
    events.emit("train_end", step=step, status="done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
