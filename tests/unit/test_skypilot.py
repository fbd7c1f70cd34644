"""launch/skypilot.yaml as SkyPilot reads it, and its `setup` and `run` scripts, as SkyPilot writes them for a
node, under bash with stubs on PATH.

SkyPilot lives in a venv of its own (.venv-sky, made by scripts/setup_env.sh: it would downgrade click here), so
the YAML is parsed by `sky.Task` in a subprocess of that Python, once for the module. No cloud credentials and no
network: parsing a task talks to no API server.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.harness.common import REPO
from trainer.config.loader import load_config
from trainer.spot.supervisor import child_command

pytestmark = pytest.mark.timeout(120)

TASK = REPO / "launch" / "skypilot.yaml"
ACCELERATORS = {"H100", "A100-80GB", "L40S", "A10G"}
FAKE_KEY, FAKE_SECRET = "AKIDFAKEFORTEST", "fake-secret-value-for-test"

# what the subprocess prints: the task as `sky jobs launch --env SPOT_REMOTE=... --secret ...` builds it, and
# the error of the YAML alone (SPOT_REMOTE unset)
PARSE = r"""
import json, sys
import sky, yaml
path = sys.argv[1]
out = {}
try:
    sky.Task.from_yaml(path)
except ValueError as e:
    out["plain_error"] = str(e)
raw = yaml.safe_load(open(path))
bare = sky.Task.from_yaml_config(dict(raw), env_overrides=[("SPOT_REMOTE", "s3://bucket/runs/exp1")])
out["inline_secrets"] = sorted(bare.secrets)
out["secret_refs"] = sorted(ref.name for ref in bare.managed_secret_refs)
task = sky.Task.from_yaml_config(
    yaml.safe_load(open(path)),
    env_overrides=[("SPOT_REMOTE", "s3://bucket/runs/exp1")],
    secrets_overrides=[("AWS_ACCESS_KEY_ID", sys.argv[2]), ("AWS_SECRET_ACCESS_KEY", sys.argv[3])],
)
out["resources_type"] = type(task.resources).__name__
out["resources"] = [
    {"accelerators": r.accelerators, "use_spot": r.use_spot, "job_recovery": r.job_recovery} for r in task.resources
]
out["num_nodes"] = task.num_nodes
out["envs"] = task.envs
out["secrets"] = sorted(task.secrets)
out["workdir"] = task.workdir
# the scripts exactly as SkyPilot writes them for a node (it then runs `bash -i <file>` in the workdir)
from sky.skylet.log_lib import make_task_bash_script
out["setup"], out["run"] = make_task_bash_script(task.setup), make_task_bash_script(task.run)
out["version"] = sky.__version__
print(json.dumps(out))
"""


def _sky_python() -> str:
    for candidate in (os.environ.get("SPOT_SKY_PYTHON"), str(REPO / ".venv-sky" / "bin" / "python")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("no SkyPilot Python: run `bash scripts/setup_env.sh` (it makes .venv-sky) or set SPOT_SKY_PYTHON")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    home = tmp_path_factory.mktemp("sky-home")  # SkyPilot may create ~/.sky: not in the user's home
    env = dict(os.environ, HOME=str(home), SKYPILOT_DISABLE_USAGE_COLLECTION="1")
    proc = subprocess.run(
        [_sky_python(), "-c", PARSE, str(TASK), FAKE_KEY, FAKE_SECRET],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _on_node(script: str, tmp_path, env: dict) -> subprocess.Popen:
    """Run a script SkyPilot made for a node: a file run by bash, from ~/sky_workdir (this repo)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "sky_workdir").symlink_to(REPO)
    path = tmp_path / "sky_script.sh"
    path.write_text(script)
    env = dict(env, HOME=str(home))
    return subprocess.Popen(["bash", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- the task as SkyPilot reads it


def test_every_resources_option_is_spot_and_the_accelerators_are_a_set(task):
    assert task["resources_type"] == "set"  # any of them, SkyPilot picks: not an order of preference
    options = task["resources"]
    assert {acc for r in options for acc in r["accelerators"]} == ACCELERATORS
    assert all(r["use_spot"] is True for r in options)
    assert all(list(r["accelerators"].values()) == [1] for r in options)
    assert task["num_nodes"] == 1


def test_job_recovery_relaunches_and_bounds_restarts_on_errors(task):
    recoveries = [r["job_recovery"] for r in task["resources"]]
    assert all(rec == recoveries[0] for rec in recoveries)  # SkyPilot refuses differing strategies
    rec = recoveries[0]
    assert rec["strategy"] == "EAGER_NEXT_REGION"
    assert 1 <= rec["max_restarts_on_errors"] <= 5
    assert rec["recover_on_exit_codes"] == [75]  # preempted with a committed checkpoint: always relaunch


def test_the_bucket_is_required_and_credentials_are_only_secrets(task):
    assert "SPOT_REMOTE" in task["plain_error"]  # `sky jobs launch` without --env SPOT_REMOTE=... stops there
    assert task["envs"]["SPOT_REMOTE"] == "s3://bucket/runs/exp1"
    # the file holds no value for them: they are references filled by --secret at launch
    assert task["inline_secrets"] == [] and task["secret_refs"] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    assert task["secrets"] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    assert not any(k.startswith("AWS_") for k in task["envs"])
    assert FAKE_SECRET not in TASK.read_text()


def test_setup_installs_the_repo_and_compiles_it(task, tmp_path):
    # a `python3` first on PATH: `-c` runs for real (the torch pin, the package's dir), `-m` is only recorded
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    fake = bin_dir / "python3"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "if sys.argv[1] == '-c':\n"
        f"    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n"
        "args = sys.argv[1:]\n"
        "pin = open(args[args.index('--constraint') + 1]).read() if '--constraint' in args else None\n"
        f"open({str(record)!r}, 'a').write(json.dumps({{'argv': args, 'constraints': pin}}) + '\\n')\n"
    )
    fake.chmod(0o755)
    image = tmp_path / "image"  # the image's torch (a stand-in: importing the real one takes seconds)
    (image / "torch").mkdir(parents=True)
    (image / "torch" / "__init__.py").write_text('__version__ = "2.99.0+cu130"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=f"{image}:{REPO}")
    proc = _on_node(task["setup"], tmp_path, env)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["argv"][:3] for c in calls] == [["-m", "pip", "install"], ["-m", "compileall", "-q"]]
    assert calls[0]["argv"][-2:] == ["-e", "."] and calls[0]["constraints"] == "torch==2.99.0+cu130\n"
    assert os.path.realpath(calls[1]["argv"][-1]) == str((REPO / "trainer").resolve())


# ---------------------------------------------------------------- the run script on a node


def _run_on_node(task, tmp_path, **skypilot):
    """The task's `run` on a node (envs and secrets exported as SkyPilot does), a stub spot-trainer first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    fake = bin_dir / "spot-trainer"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'pid': os.getpid(), 'argv': sys.argv[1:]}}, open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPOT_", "SKYPILOT_"))}
    env.update(task["envs"], PATH=f"{bin_dir}:{env['PATH']}")
    env.update(AWS_ACCESS_KEY_ID=FAKE_KEY, AWS_SECRET_ACCESS_KEY=FAKE_SECRET, **skypilot)
    proc = _on_node(task["run"], tmp_path, env)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert FAKE_SECRET not in stdout + stderr and FAKE_KEY not in stdout + stderr
    got = json.loads(record.read_text())
    assert got["pid"] == proc.pid  # exec all the way: the supervisor is the process SkyPilot started
    argv = got["argv"]
    assert argv[:3] == ["run", "--output-dir", str(tmp_path / "home" / "spot-run")]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return argv, sets


def _launcher_flags(cmd):
    launcher = cmd[: cmd.index("trainer", 3)]
    return {a: launcher[i + 1] for i, a in enumerate(launcher) if a.startswith("--") and i + 1 < len(launcher)}


def test_node_1_of_2_joins_the_head_with_the_total_process_count(task, tmp_path):
    ips = "10.0.0.1\n10.0.0.2\n"
    _, sets = _run_on_node(
        task,
        tmp_path,
        SKYPILOT_NODE_RANK="1",
        SKYPILOT_NODE_IPS=ips,
        SKYPILOT_NUM_NODES="2",
        SKYPILOT_NUM_GPUS_PER_NODE="4",
    )
    assert "checkpoint.remote=s3://bucket/runs/exp1" in sets
    assert {
        "supervisor.num_processes=4",
        "supervisor.num_machines=2",
        "supervisor.machine_rank=1",
        "supervisor.main_process_ip=10.0.0.1",
        "supervisor.main_process_port=29500",
        "distributed.shared_output_dir=false",
    } <= set(sets)
    # what the supervisor on that node then launches
    cfg = load_config(None, sets, str(tmp_path / "run"))
    cmd = child_command(cfg, None, sets, str(tmp_path / "run"))
    flags = _launcher_flags(cmd)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "10.0.0.1" and flags["--main_process_port"] == "29500"
    assert flags["--num_processes"] == "8"


def test_one_node_is_one_machine_with_its_own_output_dir(task, tmp_path):
    _, sets = _run_on_node(
        task,
        tmp_path,
        SKYPILOT_NODE_RANK="0",
        SKYPILOT_NODE_IPS="10.0.0.7",
        SKYPILOT_NUM_NODES="1",
        SKYPILOT_NUM_GPUS_PER_NODE="1",
    )
    assert "distributed.shared_output_dir=true" in sets and "supervisor.num_machines=1" in sets
    cfg = load_config(None, sets, str(tmp_path / "run"))
    assert child_command(cfg, None, sets, str(tmp_path / "run"))[:3] == [sys.executable, "-m", "trainer"]
