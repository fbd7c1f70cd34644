"""A non-editable install works outside the repo: presets, the DeepSpeed JSONs and plan's tables are package data.

The package is built from a copy of this checkout (so the build writes nothing into the repo) and installed
with `pip install --no-deps --no-build-isolation --target DIR`, offline (PIP_NO_INDEX): nothing is fetched.
Then every command runs from a directory outside the repo with PYTHONPATH=DIR, and must import from DIR.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site dir, cwd outside the repo, environment) of a fresh non-editable install."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    shutil.copytree(ROOT / "trainer", src / "trainer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    site = work / "site"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--target",
            str(site),
            str(src),
        ],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (site / "trainer" / "__init__.py").is_file()
    outside = work / "elsewhere"
    outside.mkdir()
    return site, outside, {**env, "PYTHONPATH": str(site)}


def run(installed, *args: str) -> subprocess.CompletedProcess:
    site, cwd, env = installed
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_imports_come_from_the_install(installed):
    site = installed[0]
    r = run(installed, "-c", "import trainer, trainer.plan.tables as t; print(trainer.__file__); print(t.TABLES_DIR)")
    assert r.returncode == 0, r.stderr
    for line in r.stdout.split():
        assert Path(line).resolve().is_relative_to(site.resolve()), r.stdout


def test_presets_with_a_deepspeed_override(installed):
    r = run(installed, "-m", "trainer", "presets", "--set", "distributed.deepspeed=zero2_offload")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "zero2_offload" in r.stdout


def test_deepspeed_json_resolves_inside_the_install(installed):
    site = installed[0]
    r = run(
        installed,
        "-c",
        "import sys; from trainer.distributed import resolve_deepspeed_config; "
        "p = resolve_deepspeed_config('zero2_offload'); import json; json.loads(p.read_text()); "
        "print(p); print('deepspeed' in sys.modules)",
    )
    assert r.returncode == 0, r.stderr
    path, imported = r.stdout.split()
    assert Path(path).resolve().is_relative_to(site.resolve()) and Path(path).name == "zero2_offload.json"
    assert imported == "False"  # resolved without importing deepspeed


def test_plan_reads_its_tables_from_the_install(installed):
    r = run(installed, "-m", "trainer", "plan", "--gpu", "4090")
    assert r.returncode == 0, r.stdout + r.stderr
    for needle in ("Memory per GPU (GiB)", "predicted peak", "RTX 4090 (24 GiB): FITS", "Cost (prices as of"):
        assert needle in r.stdout, needle
    assert "measured table" not in r.stderr, r.stderr  # the packaged measured.json was found and read
