"""The pod scripts in launch/ (entrypoint.sh, runpod.sh, vast.sh) with a fake `spot-trainer` on PATH."""

import json
import os
import subprocess
import sys

import pytest

from tests.harness.common import REPO

pytestmark = pytest.mark.timeout(60)

LAUNCH = REPO / "launch"


@pytest.mark.parametrize("script", ["entrypoint.sh", "runpod.sh", "vast.sh"])
def test_launch_scripts_parse_and_never_trace(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    code = [ln.split("#")[0] for ln in path.read_text().splitlines()]
    assert "set -euo pipefail" in [ln.strip() for ln in code]
    assert not any("set -x" in ln or "xtrace" in ln for ln in code)
    assert os.access(path, os.X_OK)


def _fake_spot_trainer(tmp_path):
    """A `spot-trainer` first on PATH that records its pid and argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    fake = bin_dir / "spot-trainer"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'pid': os.getpid(), 'argv': sys.argv[1:]}}, open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SPOT_OUTPUT_DIR=str(tmp_path / "run")), record


def test_entrypoint_execs_spot_trainer_with_env_settings(tmp_path):
    env, record = _fake_spot_trainer(tmp_path)
    env.update(
        SPOT_CONFIG="qlora",
        SPOT_REMOTE="s3://bucket/runs/exp1",
        SPOT_S3_ENDPOINT="http://127.0.0.1:8333",
        SPOT_SET="train.max_steps=50  eval.every_steps=10",
        AWS_ACCESS_KEY_ID="AKIDEXAMPLE",
        AWS_SECRET_ACCESS_KEY="very-secret-key",
    )
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "entrypoint.sh"), "--set", "train.lr=1e-4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    got = json.loads(record.read_text())
    assert got["pid"] == proc.pid  # exec: spot-trainer replaced the shell, so it gets the pod's SIGTERM
    assert got["argv"] == [
        "run",
        "qlora",
        "--output-dir",
        str(tmp_path / "run"),
        "--set",
        "checkpoint.remote=s3://bucket/runs/exp1",
        "--set",
        "checkpoint.s3.endpoint_url=http://127.0.0.1:8333",
        "--set",
        "train.max_steps=50",
        "--set",
        "eval.every_steps=10",
        "--set",
        "train.lr=1e-4",
    ]
    assert "very-secret-key" not in stdout + stderr and "AKIDEXAMPLE" not in stdout + stderr


def test_runpod_script_turns_the_watcher_off_and_lets_the_user_override(tmp_path):
    env, record = _fake_spot_trainer(tmp_path)
    env.update(SPOT_SET="preemption.grace_seconds=3")
    env.pop("SPOT_CONFIG", None)
    subprocess.run(["bash", str(LAUNCH / "runpod.sh")], env=env, check=True, capture_output=True, timeout=30)
    argv = json.loads(record.read_text())["argv"]
    assert argv == [
        "run",
        "--output-dir",
        str(tmp_path / "run"),
        "--set",
        "preemption.watch=none",
        "--set",
        "preemption.grace_seconds=5",
        "--set",
        "preemption.grace_seconds=3",
    ]


def test_install_step_warms_the_bytecode_of_the_packages_a_start_imports(tmp_path):
    """warm_bytecode (run after installing) leaves a .pyc for every module of the packages it finds."""
    pkg = tmp_path / "site" / "trainer"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "loop.py", "sub/__init__.py", "sub/deep.py"):
        (pkg / f).write_text("X = 1\n")
    python = tmp_path / "python"  # no site-packages: only the package above is found
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    text = (LAUNCH / "entrypoint.sh").read_text()
    start = text.index("warm_bytecode() {")
    function = text[start : text.index("\n}\n", start) + 3]
    subprocess.run(
        ["bash", "-c", f"set -euo pipefail\npython={python}\n{function}warm_bytecode"],
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
        cwd=REPO,  # its own trainer/ is not the installed one
        check=True,
        capture_output=True,
        timeout=30,
    )
    compiled = sorted(p.name.split(".")[0] for p in pkg.rglob("__pycache__/*.pyc"))
    assert compiled == ["__init__", "__init__", "deep", "loop"]
    assert "warm_bytecode" in text[text.index("install_spot_trainer\n") :]  # called in the install step
