"""`spot-trainer plan`: will this run fit on a GPU, how long will it take, and what will it cost on demand vs spot.

The parts: trainer.plan.memory (the memory model), .flops (FLOPs per token), .tables (GPUs, prices, measured
runs), .throughput (tokens/s and tokens), .cost, .render (the terminal table); this module puts them together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from trainer.config.schema import Config
from trainer.errors import ConfigError
from trainer.plan.cost import CostRow, cost_rows, preemption_overhead
from trainer.plan.memory import (
    MemoryEstimate,
    ModelShape,
    TrainingSetup,
    checkpoint_bytes,
    estimate_memory,
    llama_shape,
    shape_from_config,
)
from trainer.plan.run_setup import setup_from_config  # noqa: F401 (plan's Config -> TrainingSetup rule)
from trainer.plan.tables import (
    GpuSpec,
    find_gpu,
    known_model_config,
    load_gpus,
    load_models,
    load_prices,
    read_bench_results,
)
from trainer.plan.throughput import Throughput, count_tokens, estimate_throughput, step_seconds

TIGHT = 0.90  # above this share of the card the verdict is "tight": measured peaks varied by about 10%
MAX_MICRO_BATCH = 4096


@dataclass
class GpuFit:
    gpu: GpuSpec
    peak_gib: float
    verdict: str  # fits | tight | no
    max_micro_batch: int  # 0: not even one sample fits
    hours: float | None = None
    cheapest_spot: tuple[str, float] | None = None  # (provider, total USD)


@dataclass
class Plan:
    model_name: str
    shape: ModelShape
    setup: TrainingSetup
    memory: MemoryEstimate
    gpu: GpuSpec | None
    num_gpus: int
    verdict: str | None
    max_micro_batch: int | None
    suggestions: list[str]
    table: list[GpuFit]
    tokens: int | None
    tokens_source: str
    throughput: Throughput | None
    hours: float | None
    costs: list[CostRow]
    prices_date: str
    preemption_overhead: float  # fraction of spot time lost to preemptions
    assumptions: list[str] = field(default_factory=list)
    checkpoint: dict[str, float] = field(default_factory=dict)  # bytes per part of one checkpoint
    keep_last: int | None = None


# ---------------------------------------------------------------- config -> model


def model_config(cfg: Config, vocab_size: int | None = None):
    """The transformers config of cfg.model (builtin, local dir, a hub id plan knows, or any hub id); never loads
    weights. The hub ids of trainer/plan/tables/models.yaml need no network."""
    from trainer.model import builtin_config, is_builtin
    from trainer.model import model_config as trainer_model_config

    if is_builtin(cfg) and vocab_size is not None:
        return builtin_config(cfg, vocab_size)
    known = known_model_config(cfg.model.name_or_path)
    return known if known is not None else trainer_model_config(cfg)


# ---------------------------------------------------------------- memory search


def verdict(peak_gib: float, gpu: GpuSpec) -> str:
    if peak_gib <= TIGHT * gpu.memory_gib:
        return "fits"
    return "tight" if peak_gib <= gpu.memory_gib else "no"


def largest_micro_batch(shape: ModelShape, setup: TrainingSetup, gpu: GpuSpec) -> int:
    """The largest micro-batch whose predicted peak stays under TIGHT x the card's memory (0: none)."""

    def ok(mb: int) -> bool:
        return estimate_memory(shape, replace(setup, micro_batch_size=mb)).peak_gib <= TIGHT * gpu.memory_gib

    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_MICRO_BATCH and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_MICRO_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def suggestions(shape: ModelShape, setup: TrainingSetup, gpu: GpuSpec, table: list[GpuFit]) -> list[str]:
    """Changes that make the run fit on `gpu`, each with its predicted peak."""
    out = []
    cap = TIGHT * gpu.memory_gib

    def peak(**changes) -> float:
        return estimate_memory(shape, replace(setup, **changes)).peak_gib

    mb = largest_micro_batch(shape, setup, gpu)
    if 0 < mb < setup.micro_batch_size:
        k = math.ceil(setup.micro_batch_size / mb)
        out.append(
            f"train.micro_batch_size={mb} (x{k} train.grad_accum keeps the batch): {peak(micro_batch_size=mb):.1f} GiB"
        )
    if not setup.gradient_checkpointing:
        ck = replace(setup, gradient_checkpointing=True)
        mb_ck = largest_micro_batch(shape, ck, gpu)
        if mb_ck:
            use = min(mb_ck, setup.micro_batch_size)
            out.append(
                f"model.gradient_checkpointing=true with micro-batch {use}: "
                f"{peak(gradient_checkpointing=True, micro_batch_size=use):.1f} GiB (~30% slower)"
            )
    for ckpt in sorted({setup.gradient_checkpointing, True}):
        seq = setup.seq_len // 2
        while seq >= 128:
            if peak(seq_len=seq, micro_batch_size=1, gradient_checkpointing=ckpt) <= cap:
                extra = " with gradient checkpointing" if ckpt and not setup.gradient_checkpointing else ""
                out.append(
                    f"data.max_length={seq}{extra} at micro-batch 1: "
                    f"{peak(seq_len=seq, micro_batch_size=1, gradient_checkpointing=ckpt):.1f} GiB"
                )
                break
            seq //= 2
    if setup.int8 and peak(quant_bits=4) <= cap:
        out.append(f"quant.bits=4 (NF4 base, none of LLM.int8's kept inputs and buffers): {peak(quant_bits=4):.1f} GiB")
    if setup.method == "full" and peak(method="lora", micro_batch_size=1, gradient_checkpointing=True) <= cap:
        out.append("model.method=lora (frozen bf16 base, fp32 adapters)")
    qlora_peak = peak(method="qlora", micro_batch_size=1, gradient_checkpointing=True)
    if setup.method in ("full", "lora") and qlora_peak <= cap:
        out.append("model.method=qlora (4-bit base)")
    if setup.method == "full" and setup.optimizer == "adamw":
        out.append(f"train.optimizer=paged_adamw_8bit: {peak(optimizer='paged_adamw_8bit'):.1f} GiB")
    if setup.method == "full" and setup.num_gpus > 1 and setup.deepspeed != "zero2_offload":
        out.append(f"distributed.deepspeed=zero2_offload: {peak(deepspeed='zero2_offload'):.1f} GiB per GPU")
    for name, size in smaller_models(shape, setup, cap):
        out.append(f"model.name_or_path={name} (a smaller model, same settings): {size:.1f} GiB")
    bigger = [f.gpu.name for f in table if f.verdict == "fits" and f.gpu.memory_gib > gpu.memory_gib]
    if bigger:
        out.append(f"a larger GPU: {', '.join(bigger[:4])}")
    return out


def smaller_models(shape: ModelShape, setup: TrainingSetup, cap_gib: float, most: int = 2) -> list[tuple[str, float]]:
    """The largest models of trainer/plan/tables/models.yaml, smaller than `shape`, that fit `cap_gib` with the
    same settings: (hub id, predicted peak GiB), largest first."""
    fits = []
    for name, fields in load_models().items():
        known = llama_shape(SimpleNamespace(**fields), name)
        if known.params_total >= shape.params_total:
            continue
        try:
            peak = estimate_memory(known, setup).peak_gib
        except ConfigError:  # LoRA targets it does not have
            continue
        if peak <= cap_gib:
            fits.append((known.params_total, name, peak))
    return [(name, peak) for _, name, peak in sorted(fits, reverse=True)[:most]]


# ---------------------------------------------------------------- the plan


def make_plan(
    cfg: Config,
    gpu: str | None = None,
    num_gpus: int = 1,
    dataset_tokens: int | None = None,
    *,
    dataset_rows: int | None = None,
    vocab_size: int | None = None,
    price_per_hour: float | None = None,
    spot_price_per_hour: float | None = None,
    prices_path: Path | None = None,
    bench_dir: Path | None = None,
    efficiency: float | None = None,
    preemptions_per_day: float = 2.0,
    restart_latency_s: float = 300.0,
    lost_work_s: float | None = None,
) -> Plan:
    """Memory per GPU, a verdict for every known GPU, and time and cost on the chosen one."""
    if num_gpus < 1:
        raise ConfigError(f"--gpus {num_gpus}: must be at least 1")
    gpus = load_gpus()
    chosen = find_gpu(gpu, gpus) if gpu else None
    shape = shape_from_config(model_config(cfg, vocab_size), cfg.model.name_or_path)
    setup = setup_from_config(cfg, num_gpus, chosen)
    memory = estimate_memory(shape, setup)
    tokens, tokens_source = count_tokens(cfg, num_gpus, dataset_tokens, dataset_rows)
    bench = read_bench_results(bench_dir)
    prices = load_prices(prices_path)

    def spot_overhead(tp: Throughput) -> tuple[float, float]:
        """(fraction of spot time lost, seconds of work redone per preemption) on one GPU type."""
        ck = cfg.checkpoint
        if lost_work_s is not None:
            lost = lost_work_s
        else:  # upper bound: the emergency checkpoint on a preemption notice usually saves this work
            step_s = step_seconds(cfg, setup, tp)
            lost = (ck.every_minutes * 60 if ck.every_minutes else (ck.every_steps or 0) * step_s) / 2
        return preemption_overhead(preemptions_per_day, restart_latency_s, lost), lost

    table = []
    for g in gpus:
        fit = GpuFit(g, memory.peak_gib, verdict(memory.peak_gib, g), largest_micro_batch(shape, setup, g))
        if tokens is not None and fit.verdict != "no":
            tp = estimate_throughput(shape, setup, g, cfg.model.name_or_path, num_gpus, bench, efficiency)
            fit.hours = tokens / tp.tokens_per_second / 3600
            rows = cost_rows(g, fit.hours, num_gpus, prices, spot_overhead(tp)[0], None, None)
            spots = [(r.provider, r.spot_total) for r in rows if r.spot_total is not None]
            fit.cheapest_spot = min(spots, key=lambda x: x[1]) if spots else None
        table.append(fit)

    throughput = hours = None
    costs: list[CostRow] = []
    overhead = 0.0
    plan_verdict = max_mb = None
    advice: list[str] = []
    kbit = (
        "QLoRA via prepare_model_for_kbit_training, so embeddings/lm_head/norms fp32"
        if setup.upcast_non_quantized
        else f"QLoRA with model.kbit_bf16_frozen, so embeddings/lm_head/norms {setup.half}"
    )
    loss = (
        "Liger kernels (model.liger_kernels): fused RMSNorm/SwiGLU, cross-entropy without full logits"
        if setup.liger
        else "unfused HF cross-entropy"
    )
    assumptions = [
        f"memory: trainer's GPU path ({setup.half} autocast; full FT keeps fp32 weights + fused AdamW;"
        f" LoRA adapters fp32; {kbit}); {loss}",
        f"verdict 'tight' above {TIGHT:.0%} of the card: H100 peaks measured 11% above to 4% below the prediction",
    ]
    if chosen:
        plan_verdict = verdict(memory.peak_gib, chosen)
        max_mb = largest_micro_batch(shape, setup, chosen)
        if plan_verdict != "fits":
            advice = suggestions(shape, setup, chosen, table)
        throughput = estimate_throughput(shape, setup, chosen, cfg.model.name_or_path, num_gpus, bench, efficiency)
        if chosen.no_bf16:
            assumptions.append(
                f"{chosen.name} has no bf16: model.dtype=auto trains in fp32 there "
                f"({chosen.fp32_tflops} TFLOP/s); "
                f"model.dtype=fp16 uses its {chosen.bf16_tflops:g} TFLOP/s fp16 tensor cores"
            )
        if tokens is not None:
            hours = tokens / throughput.tokens_per_second / 3600
            overhead, lost_work = spot_overhead(throughput)
            assumptions.append(
                f"spot: {preemptions_per_day:g} preemptions/day x ({restart_latency_s:g} s restart + {lost_work:.0f} s "
                f"redone work) = {overhead:.1%} more wall time; redone work defaults to half a checkpoint interval, "
                f"an upper bound since the emergency checkpoint on a notice usually saves it"
            )
        costs = cost_rows(chosen, hours, num_gpus, prices, overhead, price_per_hour, spot_price_per_hour)
    return Plan(
        model_name=cfg.model.name_or_path,
        shape=shape,
        setup=setup,
        memory=memory,
        gpu=chosen,
        num_gpus=num_gpus,
        verdict=plan_verdict,
        max_micro_batch=max_mb,
        suggestions=advice,
        table=table,
        tokens=tokens,
        tokens_source=tokens_source,
        throughput=throughput,
        hours=hours,
        costs=costs,
        prices_date=str(prices.get("date", "undated")),
        preemption_overhead=overhead,
        assumptions=assumptions,
        checkpoint=checkpoint_bytes(shape, setup),
        keep_last=cfg.checkpoint.keep_last,
    )


def __getattr__(name: str):
    # `from trainer.plan.planner import render_plan` keeps working; the renderer lives in trainer.plan.render,
    # which imports this module (Plan), so it is looked up here only when asked for
    if name == "render_plan":
        from trainer.plan.render import render_plan

        return render_plan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
