"""StopSignal with real signals, DataLoader workers under a real SIGTERM, agreed_stop over real gloo ranks."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.harness.common import REPO
from trainer.spot.stop import StopSignal, agreed_stop


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _wait_for(predicate, timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_sigterm_only_sets_the_flag_and_uninstall_restores_the_previous_handler():
    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        stop = StopSignal().install()
        assert not stop.requested and stop.reason is None
        before = time.time()
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: stop.requested)
        assert stop.reason == "SIGTERM"
        assert stop.deadline is None
        assert before <= stop.requested_at <= time.time()
        assert 24.0 < stop.grace_left(25.0) <= 25.0
        stop.uninstall()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_second_sigint_raises_keyboard_interrupt():
    old = signal.getsignal(signal.SIGINT)
    stop = StopSignal().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: stop.requested)
        assert stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the handler raises here, at the next bytecode boundary
    finally:
        stop.uninstall()
        signal.signal(signal.SIGINT, old)


def test_notice_deadline_drives_grace_left_and_first_reason_wins():
    stop = StopSignal()
    assert stop.grace_left(25.0) == 25.0  # nothing requested yet
    stop.request("aws:terminate", deadline=time.time() + 120)
    assert stop.requested and stop.reason == "aws:terminate"
    assert 118.0 < stop.grace_left(25.0) <= 120.0
    stop.request("SIGTERM", deadline=time.time() + 10)  # an earlier deadline is the one that counts
    assert stop.reason == "aws:terminate"
    assert 8.0 < stop.grace_left(25.0) <= 10.0


def test_grace_left_counts_down_from_the_signal_without_a_deadline():
    stop = StopSignal()
    start = time.monotonic()
    stop.request("SIGTERM")
    time.sleep(0.3)
    left = stop.grace_left(5.0)
    assert 5.0 - (time.monotonic() - start) <= left <= 5.0 - 0.3
    assert stop.grace_left(0.2) == 0.0  # never negative


def test_checkpoint_soon_is_separate_from_stop():
    stop = StopSignal()
    stop.request_checkpoint("aws rebalance recommendation")
    assert stop.checkpoint_soon and not stop.requested
    assert stop.checkpoint_reason == "aws rebalance recommendation"
    stop.checkpoint_taken()
    assert not stop.checkpoint_soon


AGREE_SCRIPT = textwrap.dedent("""
    import datetime, json, os
    import torch.distributed as dist
    from trainer.spot.stop import agreed_stop

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    results = [agreed_stop(rank == 1 and i >= 3, None) for i in range(6)]
    print(json.dumps({"rank": rank, "results": results}))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # child interpreters with torch
def test_agreed_stop_two_gloo_ranks_see_one_ranks_flag_at_the_same_call(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
            ),
        )
        for rank in (0, 1)
    ]
    results = {}
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        line = json.loads(stdout.strip().splitlines()[-1])
        results[line["rank"]] = line["results"]
    expected = [False, False, False, True, True, True]
    assert results == {0: expected, 1: expected}


def test_agreed_stop_without_distributed_returns_the_local_flag():
    assert agreed_stop(True, None) is True
    assert agreed_stop(False, None) is False
