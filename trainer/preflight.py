"""Out of memory is an answer, not a traceback: a check before anything is loaded or written, and the report of a
CUDA out-of-memory error during training. Both use `spot-trainer plan`'s memory model and its suggestions.

The check is optimistic on purpose: `checkpoint_layers: auto` is assumed to checkpoint every layer it needs to, and
a run is refused only when even that is predicted over the memory there is (by more than the model's error), so it
never refuses a run that would fit.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from trainer.config.schema import Config
from trainer.errors import EXIT_OOM, ConfigError, SpotTrainerError

GIB = 2**30
MARGIN = 1.05  # refuse above this x the memory there is: the model has been measured up to 4% over real peaks


class OutOfMemory(SpotTrainerError):
    """Training ran out of GPU memory: exit EXIT_OOM (the supervisor does not restart the same config)."""

    exit_code = EXIT_OOM


def _budget_bytes(cfg: Config, device: torch.device) -> tuple[float | None, str]:
    """The memory this run may use, and where the figure comes from; None on a CPU without memory_budget_gb."""
    budget, where = None, ""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, where = float(free), f"free on {torch.cuda.get_device_name(device)}"
    if cfg.model.memory_budget_gb is not None and (budget is None or cfg.model.memory_budget_gb * GIB < budget):
        budget, where = cfg.model.memory_budget_gb * GIB, "model.memory_budget_gb"
    return budget, where


def _shape_and_setup(cfg: Config, device: torch.device, world: int, vocab_size: int | None):
    from trainer import speed
    from trainer.plan.planner import model_config

    model_cfg = model_config(cfg, vocab_size)
    on_gpu = device.type == "cuda"
    shape, setup = speed.run_setup(
        cfg,
        model_cfg,
        liger=speed.use_liger(cfg, device),
        upcast_kbit=speed.upcast_kbit(cfg, device),
        varlen=speed.use_varlen(cfg, device, lambda: model_cfg),
        no_bf16=on_gpu and not torch.cuda.is_bf16_supported(),
        num_gpus=world,
    )
    layers = cfg.model.checkpoint_layers
    if layers == "auto" and on_gpu or (isinstance(layers, int) and layers > 0):  # as much as the planner may take
        setup = replace(setup, gradient_checkpointing=True)
    return shape, setup


def _components(estimate) -> str:
    parts = [f"{c.name} {c.bytes / GIB:.1f}" for c in estimate.components if c.in_peak and c.bytes >= 0.05 * GIB]
    return ", ".join(parts)


def _suggestion(shape, setup, budget: float) -> str:
    from trainer.plan.planner import TIGHT, suggestions
    from trainer.plan.tables import GpuSpec

    here = GpuSpec(name="this GPU", memory_gib=budget / GIB / TIGHT, bf16_tflops=0.0, memory_bandwidth_gbs=0.0)
    tips = suggestions(shape, setup, here, [])
    return f"try {tips[0]}" if tips else "use a smaller model or a larger GPU"


def check_fits(cfg: Config, device: torch.device, world: int, vocab_size: int | None = None) -> None:
    """Refuse (ConfigError, exit 2) a run predicted not to fit, in one line: the predicted peak by component, the
    memory there is, and plan's best suggestion. Nothing is loaded or written before it."""
    budget, where = _budget_bytes(cfg, device)
    if budget is None:
        return
    from trainer.plan.memory import estimate_memory

    shape, setup = _shape_and_setup(cfg, device, world, vocab_size)
    estimate = estimate_memory(shape, setup)
    if estimate.peak_bytes <= MARGIN * budget:
        return
    raise ConfigError(
        f"{cfg.model.name_or_path} ({cfg.model.method}, micro-batch {setup.micro_batch_size} x {setup.seq_len} "
        f"tokens) does not fit: predicted peak {estimate.peak_gib:.1f} GiB ({_components(estimate)}) > "
        f"{budget / GIB:.1f} GiB {where}; {_suggestion(shape, setup, budget)} (`spot-trainer plan` shows all)"
    )


def oom_message(
    cfg: Config, device: torch.device, world: int, step: int, tokens: int, vocab_size: int | None, saved: str
) -> str:
    """One line for a CUDA out-of-memory error in `step`: what ran out, the peak, what is saved (`saved`) and plan's
    suggestion."""
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    try:
        shape, setup = _shape_and_setup(cfg, device, world, vocab_size)
        cap = cfg.model.memory_budget_gb * GIB if cfg.model.memory_budget_gb else None
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            cap = min(cap, total) if cap else total
        tip = _suggestion(shape, setup, cap) if cap else "see `spot-trainer plan`"
    except Exception as e:  # the report must not fail where the run did
        tip = f"see `spot-trainer plan` ({type(e).__name__})"
    peak_text = "" if math.isnan(peak) else f", peak {peak:.1f} GiB allocated"
    return (
        f"out of GPU memory in step {step} (micro-batch of {tokens} tokens{peak_text}); {saved}; the same config "
        f"would run out again: {tip}"
    )
