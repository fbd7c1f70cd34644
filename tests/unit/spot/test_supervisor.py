"""The supervisor with real child processes (tests/harness/fake_trainer.py), real signals and real kills."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness.common import REPO
from trainer.checkpoint.manifest import build_manifest, write_manifest
from trainer.config.loader import load_config
from trainer.errors import ConfigError
from trainer.metrics import read_jsonl
from trainer.spot.supervisor import Supervisor, child_command, newest_checkpoint_step, read_heartbeat

# A supervisor that fails to kill must fail the test, not hang the suite.
pytestmark = pytest.mark.timeout(60)

FAKE = str(REPO / "tests" / "harness" / "fake_trainer.py")


def _cfg(out, *overrides, **supervisor):
    settings = dict(max_restarts=5, hang_timeout=30, backoff_initial_s=0.05, backoff_max_s=0.2)
    settings.update(supervisor)
    items = [f"supervisor.{k}={v}" for k, v in settings.items()] + ["preemption.grace_seconds=2", *overrides]
    return load_config(None, items, str(out)), items


def _fake(out, *args):
    return [sys.executable, FAKE, "--output-dir", str(out), *args]


def _events(out, source="supervisor", event=None):
    return [
        e
        for e in read_jsonl(Path(out) / "events.jsonl")
        if e["source"] == source and (event is None or e["event"] == event)
    ]


def _attempts(out):
    return read_jsonl(Path(out) / "fake_trainer.jsonl")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _supervise(tmp_path, *fake_args, **supervisor):
    out = tmp_path / "run"
    cfg, _ = _cfg(out, **supervisor)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))  # the fake trainer imports trainer
    start = time.monotonic()
    code = Supervisor(cfg, output_dir=str(out), child_argv=_fake(out, *fake_args), env=env).run()
    return out, code, time.monotonic() - start


# ---------------------------------------------------------------- outcomes


def test_the_ranks_get_the_whole_grace_from_torchrun(tmp_path):
    # torchrun SIGKILLs ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (default 30) after forwarding SIGTERM
    out, code, _ = _supervise(tmp_path, "--steps", "2")
    assert code == 0
    assert _attempts(out)[0]["env_shutdown_timeout"] == "2"  # preemption.grace_seconds=2


def test_exit_0_is_done_with_no_restart(tmp_path):
    out, code, _ = _supervise(tmp_path, "--steps", "6", "--checkpoint-every", "3")
    assert code == 0
    assert [e["event"] for e in _events(out)] == ["start", "launch", "exit", "done"]
    launch, exit_ = _events(out, event="launch")[0], _events(out, event="exit")[0]
    assert launch["attempt"] == 1 and launch["resume_step"] is None and launch["command"][1] == FAKE
    assert exit_["code"] == 0 and exit_["reason"] == "done" and exit_["last_step"] == 6 and exit_["runtime_s"] > 0
    assert newest_checkpoint_step(out) == 6 and read_heartbeat(out) == 6
    assert _attempts(out)[0]["env_attempt"] == "1"


def test_crash_twice_then_succeed_restarts_and_resumes(tmp_path):
    out, code, _ = _supervise(
        tmp_path, "--steps", "12", "--checkpoint-every", "4", "--crash-at", "6", "--crash-attempts", "2"
    )
    assert code == 0
    assert [e["reason"] for e in _events(out, event="exit")] == ["crash", "crash", "done"]
    assert [e["code"] for e in _events(out, event="exit")] == [1, 1, 0]
    assert [e["resume_step"] for e in _events(out, event="launch")] == [None, 4, 4]
    restarts = _events(out, event="restart")
    assert [(r["attempt"], r["resumed_from_step"], r["steps_lost"]) for r in restarts] == [(2, 4, 2), (3, 4, 2)]
    assert all(0.05 <= r["backoff_s"] <= 0.2 for r in restarts)
    assert [a["resumed_from"] for a in _attempts(out)] == [0, 4, 4]  # the child resumed by itself
    assert newest_checkpoint_step(out) == 12


def test_killed_by_a_signal_is_restarted(tmp_path):
    out, code, _ = _supervise(
        tmp_path,
        "--steps",
        "6",
        "--checkpoint-every",
        "2",
        "--crash-at",
        "3",
        "--crash-attempts",
        "1",
        "--crash-code",
        "kill",
    )
    assert code == 0
    first = _events(out, event="exit")[0]
    assert first["reason"] == "killed" and first["code"] == -signal.SIGKILL and first["last_step"] == 3
    assert _events(out, event="restart")[0]["steps_lost"] == 1


def test_exit_3_is_out_of_memory_and_the_same_config_is_not_rerun(tmp_path):
    out, code, _ = _supervise(tmp_path, "--exit-code", "3")
    assert code == 3
    assert len(_events(out, event="launch")) == 1 and not _events(out, event="restart")
    assert _events(out, event="give_up")[0]["reason"] == "oom"


def test_exit_2_is_a_config_error_and_not_restarted(tmp_path):
    out, code, _ = _supervise(tmp_path, "--exit-code", "2")
    assert code == 2
    assert len(_events(out, event="launch")) == 1 and not _events(out, event="restart")
    assert _events(out, event="exit")[0]["reason"] == "config_error"
    assert _events(out, event="give_up")[0]["reason"] == "config_error"


def test_crash_loop_without_progress_gives_up_with_exit_1(tmp_path, capsys):
    out, code, _ = _supervise(tmp_path, "--exit-code", "1", max_restarts=20)
    assert code == 1
    assert len(_events(out, event="launch")) == 3
    give_up = _events(out, event="give_up")
    assert len(give_up) == 1 and give_up[0]["reason"].startswith("crash loop: 3 failures in a row")
    assert "crash loop" in capsys.readouterr().err


def test_max_restarts_is_respected_even_with_progress(tmp_path):
    out, code, _ = _supervise(
        tmp_path, "--steps", "100", "--checkpoint-every", "1", "--crash-after-steps", "2", max_restarts=2
    )
    assert code == 1
    assert len(_events(out, event="launch")) == 3 and len(_events(out, event="restart")) == 2
    assert "supervisor.max_restarts=2" in _events(out, event="give_up")[0]["reason"]
    assert newest_checkpoint_step(out) == 6  # every attempt made progress, so it was not a crash loop


@pytest.mark.slow  # waits out hang timeouts and kill graces
def test_hang_is_killed_and_restarted_within_the_timeout(tmp_path, capfd):
    out, code, elapsed = _supervise(
        tmp_path, "--steps", "6", "--checkpoint-every", "2", "--hang-at", "3", hang_timeout=1
    )
    assert code == 0
    (hang,) = _events(out, event="hang")
    assert (hang["step"], hang["phase"]) == (3, "eval")  # what it was doing when it went silent
    assert "at step 3 in phase eval" in capfd.readouterr().err
    exits = _events(out, event="exit")
    assert [e["reason"] for e in exits] == ["hang", "done"]
    assert exits[0]["code"] == -signal.SIGKILL  # it ignored SIGTERM, so SIGKILL after the grace
    assert exits[0]["last_step"] == 3
    # hang_timeout (1 s) after the last beat, then SIGKILL min(10, grace=2) s after the SIGTERM
    assert exits[0]["runtime_s"] < 1 + 2 + 2.5
    assert elapsed < 10
    assert not _alive(_attempts(out)[0]["pid"])
    restart = _events(out, event="restart")[0]
    assert restart["resumed_from_step"] == 2 and restart["steps_lost"] == 1


@pytest.mark.slow  # waits out hang timeouts and kill graces
def test_no_first_heartbeat_counts_as_a_hang_after_twice_the_timeout(tmp_path):
    out, code, _ = _supervise(
        tmp_path, "--steps", "3", "--hang-at", "0", "--step-time", "5", hang_timeout=0.5, max_restarts=0
    )
    assert code == 1
    exit_ = _events(out, event="exit")[0]
    assert exit_["reason"] == "hang" and exit_["last_step"] is None
    assert 1.0 <= exit_["runtime_s"] < 1.0 + 2 + 2.5


def test_cloud_notice_exit_75_is_not_restarted(tmp_path):
    out, code, _ = _supervise(tmp_path, "--steps", "20", "--notice-at", "3", "--checkpoint-every", "10")
    assert code == 75
    assert len(_events(out, event="launch")) == 1
    assert _events(out, event="exit")[0]["reason"] == "preempted"
    assert newest_checkpoint_step(out) == 3  # the child's emergency checkpoint


def test_preempt_event_counts_when_accelerate_turns_75_into_1(tmp_path):
    out, code, _ = _supervise(tmp_path, "--steps", "20", "--notice-at", "3", "--preempt-exit-code", "1")
    assert code == 75
    assert _events(out, event="exit")[0] | {"runtime_s": 0} == {
        **_events(out, event="exit")[0],
        "code": 1,
        "reason": "preempted",
        "runtime_s": 0,
    }
    assert not _events(out, event="restart")


# ---------------------------------------------------------------- SIGTERM to the supervisor process

DRIVER = textwrap.dedent("""
    import json, sys
    from trainer.config.loader import load_config
    from trainer.spot.supervisor import Supervisor
    overrides, out, argv = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    sys.exit(Supervisor(load_config(None, overrides, out), output_dir=out, child_argv=argv).run())
""")


@pytest.mark.parametrize("on_sigterm, reason", [("emergency", "preempted"), ("crash", "crash"), ("ignore", "killed")])
def test_sigterm_to_the_supervisor_is_forwarded_and_never_restarted(tmp_path, on_sigterm, reason):
    out = tmp_path / "run"
    _, overrides = _cfg(out, "preemption.grace_seconds=1")
    argv = _fake(
        out, "--steps", "100000", "--step-time", "0.02", "--checkpoint-every", "1000", "--on-sigterm", on_sigterm
    )
    sup = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(overrides), str(out), json.dumps(argv)],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while (read_heartbeat(out) or 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (read_heartbeat(out) or 0) >= 3, sup.stderr.read() if sup.poll() is not None else "no heartbeat"
    sent = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=20)
    assert sup.returncode == 75, err
    assert time.monotonic() - sent < 1 + 3  # grace_seconds=1 (+ margin), even when the child ignores SIGTERM
    assert len(_events(out, event="launch")) == 1 and not _events(out, event="restart")
    exit_ = _events(out, event="exit")[0]
    assert exit_["reason"] == reason
    child = _attempts(out)[0]
    assert child["pgid"] == child["pid"] != sup.pid  # its own process group
    assert not _alive(child["pid"])
    if on_sigterm == "emergency":
        assert exit_["code"] == 75
        assert newest_checkpoint_step(out) == exit_["last_step"] == read_heartbeat(out)
        assert _events(out, "trainer", "preempt")[0]["reason"] == "SIGTERM"
    else:
        assert newest_checkpoint_step(out) is None


def test_sigterm_during_the_backoff_means_no_relaunch(tmp_path):
    out = tmp_path / "run"
    _, overrides = _cfg(out, backoff_initial_s=30, backoff_max_s=60)
    sup = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(overrides), str(out), json.dumps(_fake(out, "--exit-code", "1"))],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not (out / "events.jsonl").exists() or not _events(out, event="restart"):
        assert time.monotonic() < deadline and sup.poll() is None
        time.sleep(0.02)
    sent = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=20)
    assert sup.returncode == 75, err
    assert time.monotonic() - sent < 2  # did not sit out the 30 s backoff
    assert len(_events(out, event="launch")) == 1


# ---------------------------------------------------------------- pieces


def test_child_command_one_process_and_accelerate(tmp_path):
    cfg = load_config(None, [], str(tmp_path))
    assert child_command(cfg, "qlora", ["train.max_steps=5"], "/w/run") == [
        sys.executable,
        "-m",
        "trainer",
        "train",
        "qlora",
        "--set",
        "train.max_steps=5",
        "--output-dir",
        "/w/run",
        "--resume",
        "auto",
    ]
    cfg = load_config(None, ["supervisor.num_processes=4"], str(tmp_path))
    cmd = child_command(cfg, None, [], "/w/run")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("-m", 3) :] == ["-m", "trainer", "train", "--output-dir", "/w/run", "--resume", "auto"]
    cfg = load_config(
        None, ["supervisor.num_processes=2", "supervisor.accelerate_config=launch/ddp.yaml"], str(tmp_path)
    )
    cmd = child_command(cfg, None, [], "/w/run")
    assert cmd[3:5] == ["--config_file", "launch/ddp.yaml"] and "--multi_gpu" not in cmd


def _flag(cmd, name):
    """The value after `name` among the launcher's own flags (before `-m trainer`)."""
    launcher = cmd[: cmd.index("trainer", 3)]
    return launcher[launcher.index(name) + 1]


def test_child_command_several_machines_passes_the_rendezvous_and_the_total(tmp_path):
    machines = ["supervisor.num_machines=2", "supervisor.machine_rank=1", "supervisor.main_process_ip=10.0.0.5"]
    cfg = load_config(
        None, ["supervisor.num_processes=4", "supervisor.main_process_port=29511", *machines], str(tmp_path)
    )
    cmd = child_command(cfg, None, [], "/w/run")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert _flag(cmd, "--num_machines") == "2" and _flag(cmd, "--machine_rank") == "1"
    assert _flag(cmd, "--main_process_ip") == "10.0.0.5" and _flag(cmd, "--main_process_port") == "29511"
    assert _flag(cmd, "--num_processes") == "8"  # 4 per machine x 2 machines: accelerate wants the total
    assert cmd.count("--num_machines") == 1
    assert cmd[cmd.index("-m", 3) :] == ["-m", "trainer", "train", "--output-dir", "/w/run", "--resume", "auto"]
    # one GPU per machine is still a distributed launch, and a config file's values give way to these
    cfg = load_config(None, [*machines, "supervisor.accelerate_config=launch/multi_node.yaml"], str(tmp_path))
    cmd = child_command(cfg, None, [], "/w/run")
    assert cmd[3:5] == ["--config_file", "launch/multi_node.yaml"]
    assert _flag(cmd, "--num_processes") == "2" and _flag(cmd, "--machine_rank") == "1"
    cfg = load_config(None, machines, str(tmp_path))
    assert child_command(cfg, None, [], "/w/run")[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    # one machine never names a port: several runs on one machine must not collide on 29500
    cfg = load_config(None, ["supervisor.num_processes=2"], str(tmp_path))
    assert "--main_process_port" not in child_command(cfg, None, [], "/w/run")


@pytest.mark.parametrize(
    "items, key",
    [
        (["supervisor.num_machines=2"], "supervisor.main_process_ip"),
        (["supervisor.num_machines=2", "supervisor.machine_rank=2", "supervisor.main_process_ip=h"], "machine_rank"),
        (["supervisor.machine_rank=-1"], "supervisor.machine_rank"),
        (["supervisor.num_machines=0"], "supervisor.num_machines"),
        (["supervisor.main_process_port=70000"], "supervisor.main_process_port"),
    ],
)
def test_bad_machine_settings_are_one_line_naming_the_key(tmp_path, items, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, items, str(tmp_path))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_newest_checkpoint_needs_a_manifest(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name in ("step-00000010", "step-00000030", ".tmp-step-00000040-123", "step-00000020"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "trainer_state.json").write_text("{}")
    for name, step in (("step-00000010", 10), ("step-00000020", 20), (".tmp-step-00000040-123", 40)):
        write_manifest(ckpts / name, build_manifest(ckpts / name, step))
    (ckpts / "step-00000030" / "manifest.json").write_text("{not json")  # torn: not a checkpoint
    assert newest_checkpoint_step(tmp_path) == 20
    assert newest_checkpoint_step(tmp_path / "nothing") is None


@pytest.mark.slow  # waits out hang timeouts and kill graces
def test_hung_ranks_in_sessions_of_their_own_are_killed_too(tmp_path):
    # like torchrun: the launcher starts each rank in a new session, so killing the launcher's group misses them
    out = tmp_path / "run"
    pidfile = tmp_path / "rank.pid"
    rank = (
        f"import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    launcher = ["bash", "-c", f'setsid {sys.executable} -c "{rank}" & wait']
    cfg, _ = _cfg(out, hang_timeout=0.5, max_restarts=0)
    code = Supervisor(cfg, output_dir=str(out), child_argv=launcher, env=dict(os.environ)).run()
    assert code == 1 and _events(out, event="exit")[0]["reason"] == "hang"
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the hung rank outlived the supervisor's kill")
