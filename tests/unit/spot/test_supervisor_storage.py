"""Exit 69 (waiting for storage) is a reason to try again later, not a crash loop and not a config error."""

import pytest

from tests.unit.spot.test_supervisor import _events, _supervise

pytestmark = pytest.mark.timeout(60)


def test_waiting_for_storage_is_retried_not_a_crash_loop(tmp_path):
    # the fake trainer exits 69 before its first step on every attempt: 5 restarts, not 3 (the crash-loop limit)
    out, code, _ = _supervise(tmp_path, "--exit-code", "69", max_restarts=5)
    exits = _events(out, event="exit")
    assert [e["reason"] for e in exits] == ["storage_wait"] * 6
    assert len(_events(out, event="storage_wait")) == 5
    give_up = _events(out, event="give_up")
    assert code == 1 and len(give_up) == 1 and "restarts used" in give_up[0]["reason"], give_up
    assert not any("crash loop" in e["reason"] for e in give_up)


def test_a_crash_is_still_a_crash_loop(tmp_path):
    out, code, _ = _supervise(tmp_path, "--exit-code", "1", max_restarts=5)
    assert code == 1 and "crash loop" in _events(out, event="give_up")[0]["reason"]
