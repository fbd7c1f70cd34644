"""Optimizer-state JSON read from a checkpoint (optimizer.json, optimizer-rank*.json): every number in it is checked
before it is used, since it may come from a bucket someone else can write. A forged `step` would otherwise drive
the CPU Adam replay for as long as it says; a forged range or shape would index past a tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from trainer.errors import CorruptCheckpoint

# an optimizer `step` is never above the checkpoint's own trainer_state step, nor above this (the CPU Adam replay
# runs one C++ call per step: ~3 minutes here)
STEP_LIMIT = 100_000_000


def step_limit(ckpt_dir: Path) -> int:
    """The largest optimizer step the checkpoint can hold: its trainer_state step (STEP_LIMIT without one)."""
    try:
        step = json.loads((ckpt_dir / "trainer_state.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return STEP_LIMIT
    return min(step, STEP_LIMIT) if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else STEP_LIMIT


def check_meta(meta: object, where: str, max_step: int) -> None:
    """Every number in an optimizer JSON is checked before it is used (it may come from a bucket): ranges, shapes,
    and `step`, which a CPU Adam resume replays one by one."""

    def bad(what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{where}: {what}; the checkpoint is damaged or forged: resume from an earlier one")

    def count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 48

    if not isinstance(meta, dict) or not isinstance(meta.get("params", {}), dict):
        raise bad("not an optimizer state object")
    groups = meta.get("param_groups", [])
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and all(isinstance(n, str) for n in g["params"])
        for g in groups
    ):
        raise bad("param_groups is not a list of groups of parameter names")
    scaler = meta.get("loss_scaler", {})
    if not isinstance(scaler, dict) or not all(
        isinstance(v, (bool, int, float)) and _finite(v) for v in scaler.values()
    ):
        raise bad("loss_scaler is not an object of finite numbers")
    for name, e in meta.get("params", {}).items():
        name = str(name)[:100]
        if not isinstance(e, dict) or not {
            "shape",
            "start",
            "numel",
            "sliced",
            "whole",
            "values",
            "scalar_tensors",
        } <= set(e):
            raise bad(f"parameter {name!r}: not a complete entry")
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(count(d) for d in shape):
            raise bad(f"parameter {name!r}: shape {str(shape)[:60]} is not a list of sizes")
        if not (count(e.get("start")) and count(e.get("numel")) and e["start"] + e["numel"] <= math.prod(shape)):
            span = f"[{str(e.get('start'))[:20]}, +{str(e.get('numel'))[:20]})"
            raise bad(f"parameter {name!r}: elements {span} are not inside its shape {shape}")
        lists = [e["sliced"], e["whole"]]
        if not all(isinstance(x, list) and all(isinstance(k, str) for k in x) for x in lists):
            raise bad(f"parameter {name!r}: sliced/whole are not lists of state names")
        values, dtypes = e["values"], e["scalar_tensors"]
        if not isinstance(values, dict) or not isinstance(dtypes, dict):
            raise bad(f"parameter {name!r}: values/scalar_tensors are not objects")
        if not all(isinstance(getattr(torch, str(d), None), torch.dtype) for d in dtypes.values()):
            raise bad(f"parameter {name!r}: scalar_tensors names a dtype that is not a number type")
        if "step" in values:
            step = values["step"]
            if not (
                isinstance(step, (int, float))
                and not isinstance(step, bool)
                and _finite(step)
                and float(step).is_integer()
                and 0 <= step <= max_step
            ):
                raise bad(
                    f"parameter {name!r}: optimizer step {str(step)[:30]} is not a step between 0 and "
                    f"{max_step} (the checkpoint's own step)"
                )


def _finite(v) -> bool:
    """A finite number; a forged int too large for a float (10**400) is not (math.isfinite would raise)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False
