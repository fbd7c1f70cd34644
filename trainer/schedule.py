"""Learning-rate schedules as pure functions of the step: nothing to save, nothing to re-point on resume."""

from __future__ import annotations

import math


def warmup_steps(total: int, steps: int, ratio: float) -> int:
    return steps if steps else math.ceil(ratio * total)


def lr_at(step: int, total: int, base: float, kind: str, warmup: int) -> float:
    """LR for the optimizer step with 0-based index `step` of `total`."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
