"""trainer.schedule: learning rates at exact steps for warmup, linear, cosine and constant schedules."""

import math

import pytest

from trainer.schedule import lr_at, warmup_steps


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_warmup_ramps_linearly_to_the_base_lr(kind):
    # 0-based step s of the warmup trains at base * (s + 1) / warmup: never 0, the base at its last step
    assert [lr_at(s, 20, 2.0, kind, 4) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]


def test_linear_decays_to_zero_at_the_last_step():
    assert lr_at(4, 20, 2.0, "linear", 4) == 2.0
    assert lr_at(12, 20, 2.0, "linear", 4) == pytest.approx(1.0)
    assert lr_at(16, 20, 2.0, "linear", 4) == pytest.approx(0.5)
    assert lr_at(20, 20, 2.0, "linear", 4) == 0.0
    assert lr_at(25, 20, 2.0, "linear", 4) == 0.0  # past the end: stays at 0


def test_cosine_follows_half_a_cosine():
    assert lr_at(4, 20, 2.0, "cosine", 4) == pytest.approx(2.0)
    assert lr_at(8, 20, 2.0, "cosine", 4) == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert lr_at(12, 20, 2.0, "cosine", 4) == pytest.approx(1.0)
    assert lr_at(20, 20, 2.0, "cosine", 4) == pytest.approx(0.0, abs=1e-12)


def test_constant_and_no_warmup():
    assert [lr_at(s, 10, 3e-4, "constant", 0) for s in (0, 5, 9, 50)] == [3e-4] * 4
    assert lr_at(0, 10, 1.0, "linear", 0) == 1.0
    assert lr_at(5, 10, 1.0, "linear", 0) == pytest.approx(0.5)


def test_warmup_steps_explicit_or_from_the_ratio():
    assert warmup_steps(100, 7, 0.5) == 7  # explicit steps win
    assert warmup_steps(100, 0, 0.05) == 5
    assert warmup_steps(100, 0, 0.031) == 4  # rounded up
    assert warmup_steps(100, 0, 0.0) == 0
