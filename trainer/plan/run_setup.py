"""A run's Config in the memory model's terms: one rule for `spot-trainer plan` and for the GPU trainer.

trainer.speed plans `model.checkpoint_layers: auto` with the TrainingSetup made here from what it actually
turned on (Liger, QLoRA without the fp32 upcast, per-document flash attention); plan makes it from the
config alone. Both then size activations with the same trainer.plan.memory functions.
"""

from __future__ import annotations

from trainer.config.schema import Config
from trainer.plan.memory import TrainingSetup
from trainer.plan.tables import GpuSpec


def grad_accum(cfg: Config, num_gpus: int) -> int:
    """The trainer's own rule (trainer.distributed), so plan refuses what training would refuse."""
    from trainer.distributed import resolve_grad_accum

    return resolve_grad_accum(cfg, num_gpus)


def setup_from_config(
    cfg: Config,
    num_gpus: int = 1,
    gpu: GpuSpec | None = None,
    *,
    liger: bool | None = None,
    upcast_kbit: bool | None = None,
    repeat_kv: bool | None = None,
    no_bf16: bool | None = None,
) -> TrainingSetup:
    """The memory model's view of a Config, for the trainer's GPU path (bf16 autocast unless dtype is fp32).

    The speed features default to how plan reads the config: an explicit true/false as given, "auto" as the
    plain path (no Liger kernels, peft's fp32 upcast for QLoRA); packed rows attend per document (flash, no
    repeated k/v heads) unless model.packed_attention is mask. trainer.speed passes what the run turned on;
    no_bf16 (default: the GPU's) says whether model.dtype auto means fp32.
    """
    m = cfg.model
    ds = cfg.distributed.deepspeed
    if ds and ds not in ("zero2", "zero2_offload"):
        ds = "zero2_offload" if "offload" in ds else "zero2"  # a JSON path: read as plain ZeRO-2
    targets = cfg.lora.target_modules
    # model.dtype auto is bf16 where the GPU has it and fp32 elsewhere (trainer.model.resolve_dtype): a T4 runs fp32
    no_bf16 = (gpu is not None and gpu.no_bf16) if no_bf16 is None else no_bf16
    fp32 = m.dtype == "fp32" or (m.dtype == "auto" and no_bf16)
    liger = getattr(m, "liger_kernels", False) is True if liger is None else liger
    upcast = getattr(m, "kbit_bf16_frozen", False) is not True if upcast_kbit is None else upcast_kbit
    if repeat_kv is None:
        repeat_kv = not (cfg.data.packing and getattr(m, "packed_attention", "auto") != "mask")
    return TrainingSetup(
        method=m.method,
        compute_bytes=4 if fp32 else 2,
        half="fp16" if m.dtype == "fp16" else "bf16",
        micro_batch_size=cfg.train.micro_batch_size,
        seq_len=cfg.data.max_length,
        gradient_checkpointing=m.gradient_checkpointing,
        optimizer=cfg.train.optimizer,
        quant_bits=cfg.quant.bits,
        double_quant=cfg.quant.double_quant,
        lora_r=cfg.lora.r,
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=cfg.lora.dropout,
        attention=m.attn_implementation or "sdpa",
        repeat_kv=repeat_kv,
        deepspeed=ds,
        num_gpus=num_gpus,
        grad_accum=grad_accum(cfg, num_gpus),
        upcast_non_quantized=upcast,
        liger=liger,
    )
