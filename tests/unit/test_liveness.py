"""Liveness across 2 real gloo ranks: rank-0-only phases, a frozen rank 0 (SIGSTOP), the process-group timeout,
the voted decision vector, and the heartbeat's phase."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.harness.common import REPO, env, free_port
from tests.harness.pod import wait_until
from trainer.liveness import Heartbeat
from trainer.run_dir import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # child interpreters with torch

SCRIPT = textwrap.dedent("""
    import datetime, json, os, sys, time
    import torch, torch.distributed as dist
    from trainer.liveness import Ranks, RankZeroFailed

    mode = sys.argv[1]
    if mode != "collective_timeout":  # that one's group comes from the trainer's config
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = int(os.environ["RANK"])
    out = {"rank": rank}
    if mode == "long_phase":  # rank 0 works 4 s, longer than timeout_s=1.5: the others wait, no timeout
        ranks = Ranks(rank, 2, timeout_s=1.5)
        out["result"] = ranks.main_only("eval", lambda: (time.sleep(4), 42)[1])
        out["again"] = ranks.main_only("final", lambda: 7)
    elif mode == "frozen":  # rank 0 is frozen (SIGSTOP) inside its phase: the others give up after timeout_s
        ranks = Ranks(rank, 2, timeout_s=2)
        if rank == 0:
            open(os.path.join(os.environ["OUT_DIR"], "rank0.pid"), "w").write(str(os.getpid()))
        t0 = time.monotonic()
        try:
            ranks.main_only("pull", lambda: time.sleep(60))
        except RankZeroFailed as e:
            out["error"], out["after_s"] = str(e), time.monotonic() - t0
    elif mode == "rank0_fails":
        ranks = Ranks(rank, 2, timeout_s=30)
        try:
            ranks.main_only("resume", lambda: 1 / 0)
        except ZeroDivisionError:
            out["error"] = "raised on rank 0"
        except RankZeroFailed as e:
            out["error"], out["code"] = str(e), e.exit_code
    elif mode == "collective_timeout":  # rank 0 never joins: rank 1's all-reduce fails after distributed.timeout_s
        from trainer.config.loader import load_config
        from trainer.distributed import make_accelerator
        acc = make_accelerator(load_config(None, ["distributed.timeout_s=3", "train.device=cpu"]), 1)
        if rank == 0:
            time.sleep(8)
        else:
            t0 = time.monotonic()
            try:
                dist.all_reduce(torch.ones(1))
            except Exception as e:
                out["error"], out["after_s"] = type(e).__name__, time.monotonic() - t0
    elif mode == "vote":
        from trainer.spot.stop import agree
        votes = [agree(rank == 1 and i == 2, rank == 0 and i == 4) for i in range(6)]
        out["votes"] = [[d.stop, d.checkpoint] for d in votes]
    elif mode in ("own_dirs", "one_dir"):  # each rank plays a node of its own (one process per node)
        from trainer.errors import ConfigError
        from trainer.run_dir import RunDir
        ranks = Ranks(rank, 2, timeout_s=20, local_rank=0, local_world=1)
        name = f"node{rank}" if mode == "own_dirs" else "shared"
        run = RunDir(os.path.join(os.environ["OUT_DIR"], name))
        run.root.mkdir(parents=True, exist_ok=True)
        try:
            ranks.check_own_dirs(run)
            out["ok"] = True
        except ConfigError as e:
            out["error"] = str(e)
        out["worked"] = ranks.main_only("data", lambda: 100 + rank, per_node=True)  # every node's own phase
    if mode in ("long_phase", "rank0_fails", "vote", "own_dirs", "one_dir"):
        dist.barrier()  # rank 0 hosts the store: it stays until the others have read it (the trainer does too)
    with open(os.path.join(os.environ["OUT_DIR"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    os._exit(0)
""")


def _launch(tmp_path, mode, **extra_env) -> subprocess.Popen:
    """Both ranks under torchrun, as `accelerate launch` runs them (the store lives in torchrun's agent)."""
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    return subprocess.Popen(
        [*cmd, str(script), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env(), PYTHONPATH=str(REPO), OUT_DIR=str(tmp_path), **extra_env),
    )


def _results(tmp_path, mode, timeout=90, **extra_env) -> list[dict]:
    p = _launch(tmp_path, mode, **extra_env)
    output, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, output[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_rank_0_phase_longer_than_the_timeout_is_waited_for_and_its_result_shared(tmp_path):
    results = _results(tmp_path, "long_phase")
    assert [(r["result"], r["again"]) for r in results] == [(42, 7), (42, 7)]


def test_a_frozen_rank_0_is_noticed_by_the_others_after_the_timeout(tmp_path):
    launch = _launch(tmp_path, "frozen")
    pid_file, result = tmp_path / "rank0.pid", tmp_path / "rank1.json"
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60), launch.stdout.read()
        time.sleep(1.0)  # inside its phase, its beat thread running
        os.kill(int(pid_file.read_text()), signal.SIGSTOP)  # frozen: no beat any more (a hung mount, a stuck driver)
        assert wait_until(lambda: result.exists() and result.read_text(), 30)
        r = json.loads(result.read_text())
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        launch.kill()
        launch.communicate(timeout=30)
    assert "no sign of life for 2 s during pull" in r["error"]
    assert r["after_s"] < 15


def test_a_failure_on_rank_0_reaches_the_others_with_its_exit_code(tmp_path):
    r0, r1 = _results(tmp_path, "rank0_fails")
    assert r0["error"] == "raised on rank 0"
    assert "rank 0 stopped during resume" in r1["error"] and r1["code"] == 1


def test_the_process_group_timeout_bounds_a_collective_with_a_missing_peer(tmp_path):
    t0 = time.monotonic()
    r0, r1 = _results(tmp_path, "collective_timeout")
    assert r1["error"] and 2 < r1["after_s"] < 7.5, r1  # 3 s, not torch's default 30 minutes
    assert time.monotonic() - t0 < 60


def test_one_vote_carries_stop_and_checkpoint_and_every_rank_gets_the_same(tmp_path):
    r0, r1 = _results(tmp_path, "vote")
    expected = [[False, False], [False, False], [True, False], [False, False], [False, True], [False, False]]
    assert r0["votes"] == r1["votes"] == expected


def test_the_heartbeat_carries_the_phase_and_old_readers_still_get_the_step(tmp_path):
    run = RunDir(tmp_path)
    beat = Heartbeat(run, enabled=True)
    beat(step=12, phase="eval", force=True)
    assert (tmp_path / "heartbeat").read_text() == "12 eval\n"
    assert run.read_heartbeat() == 12 and run.read_heartbeat_phase() == (12, "eval")
    (tmp_path / "heartbeat").write_text("7\n")  # written by an older version
    assert run.read_heartbeat_phase() == (7, None)
    Heartbeat(RunDir(tmp_path / "other"), enabled=False)(step=1, force=True)  # not rank 0: writes nothing
    assert not (tmp_path / "other").exists()


def test_accelerate_launch_gives_the_ranks_the_shutdown_timeout_the_supervisor_sets(tmp_path):
    # the supervisor sets TORCH_ELASTIC_SHUTDOWN_TIMEOUT to preemption.grace_seconds; this checks that the launcher
    # honours it: a rank that ignores SIGTERM is SIGKILLed that long after the launcher's SIGTERM, not 30 s after
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(tmp_path)!r} + f'/ready{{os.environ[\"RANK\"]}}', 'w').close()\n"
        "time.sleep(120)\n"
    )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/cpu_2proc.yaml")]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port()), str(script)]
    p = subprocess.Popen(
        cmd, env=dict(env(), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="3"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert wait_until(lambda: (tmp_path / "ready0").exists() and (tmp_path / "ready1").exists(), 60)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=25)
        took = time.monotonic() - t0
    finally:
        p.kill()
    assert 2.5 < took < 15, took  # 3 s, not the 30 s default


def test_own_output_dirs_are_checked_own_and_a_shared_one_is_refused(tmp_path):
    # distributed.shared_output_dir=false: every node works in its own dir; the same dir on two nodes would mix
    # their checkpoint files, and every rank stops with the same one-line ConfigError
    (tmp_path / "own").mkdir()
    own = _results(tmp_path / "own", "own_dirs")
    assert [r.get("ok") for r in own] == [True, True]
    assert [r["worked"] for r in own] == [100, 101]  # each node's first rank ran the per-node phase for its node
    (tmp_path / "one").mkdir()
    one = _results(tmp_path / "one", "one_dir")
    for r in one:
        assert "so the nodes share it; with a shared output dir set distributed.shared_output_dir=true" in r["error"]
