"""Shared helpers for tests: a tiny config, running the CLI as a user would, reading weights."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

# A tiny model and data so a run takes seconds on 2 cores; eval off unless a test wants it.
TINY = [
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
    "train.max_steps=12",
    "train.lr=1e-3",
    "train.warmup_steps=2",
    "train.log_every_steps=4",
    "eval.before_training=false",
    "eval.generate=false",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=10",
    "preemption.watch=none",
    "lora.r=4",
    "lora.dropout=0.1",
]


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    # DeepSpeed compiles CPU Adam on first use (~1-2 min); scripts/test.sh keeps the build here too
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/spot-trainer/torch_extensions"))
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cli(
    *args: str,
    launch_config: str = "cpu_2proc",
    num_processes: int = 2,
    launch_args: list[str] = (),
    overrides: list[str] = (),
    output_dir: Path | None = None,
) -> list[str]:
    """`accelerate launch --config_file launch/<x>.yaml ... -m trainer <args>`; launch_args (e.g. multi-node flags
    with their own --main_process_port) replace the default free port."""
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch" / f"{launch_config}.yaml"),
        "--num_processes",
        str(num_processes),
        *(launch_args or ["--main_process_port", str(free_port())]),
    ]
    return launch + cli_args(*args, overrides=overrides, output_dir=output_dir)[1:]


def cli_args(*args: str, overrides: list[str] = (), output_dir: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "trainer", *args]
    for o in overrides:
        cmd += ["--set", o]
    if output_dir is not None:
        cmd += ["--output-dir", str(output_dir)]
    return cmd


def run_cli(
    *args: str, overrides: list[str] = (), output_dir: Path | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    p = subprocess.run(
        cli_args(*args, overrides=overrides, output_dir=output_dir),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def start_cli(*args: str, overrides: list[str] = (), output_dir: Path | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        cli_args(*args, overrides=overrides, output_dir=output_dir),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def heartbeat_step(output_dir: Path) -> int:
    try:
        return int(((output_dir / "heartbeat").read_text().split() or ["-1"])[0])  # "<step> [<phase>]"
    except (OSError, ValueError):
        return -1


def kill_at_step(proc: subprocess.Popen, output_dir: Path, step: int, sig=signal.SIGKILL, timeout: float = 120) -> int:
    """Send `sig` to the process once its heartbeat reaches `step`; returns the step it had reached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = heartbeat_step(output_dir)
        if s >= step:
            proc.send_signal(sig)
            return s
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before step {step}: {proc.stdout.read()[-2000:]}")
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def wait_for_checkpoint(proc: subprocess.Popen, output_dir: Path, step: int, timeout: float = 120) -> None:
    """Until checkpoints/step-<step> is committed (its manifest exists); writes are asynchronous."""
    manifest = output_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json"
    deadline = time.monotonic() + timeout
    while not manifest.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before checkpoint {step}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"checkpoint {step} not committed in {timeout} s")
        time.sleep(0.002)


def trainable_weights(output_dir: Path, step: int) -> dict:
    return load_file(str(output_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].view(-1).view(__import__("torch").uint8).equal(b[k].view(-1).view(__import__("torch").uint8)), (
            f"{k} differs (max abs diff {(a[k].float() - b[k].float()).abs().max().item():.3e})"
        )
