"""`spot-trainer plan`'s terminal output: memory by component, verdicts per GPU, time, cost and checkpoints."""

from __future__ import annotations

from trainer.plan.memory import GIB
from trainer.plan.planner import MAX_MICRO_BATCH, Plan
from trainer.spot.notices import AWS_DEFAULT_NOTICE_S, AZURE_MIN_NOTICE_S, GCP_NOTICE_S, RUNPOD_GRACE_S


def _fmt_hours(h: float | None) -> str:
    if h is None:
        return "-"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _money(x: float | None) -> str:
    return "-" if x is None else (f"${x:,.2f}" if x < 100 else f"${x:,.0f}")


def render_plan(plan: Plan) -> str:
    """A terminal table: memory by component, verdicts per GPU, time and cost."""
    s, m, sh = plan.setup, plan.memory, plan.shape
    lines = [
        f"Plan: {plan.model_name} ({_fmt_params(sh.params_total)} params, {sh.num_layers} layers, "
        f"hidden {sh.hidden_size}, vocab {sh.vocab_size:,}), {s.method}, micro-batch {s.micro_batch_size} x "
        f"{s.seq_len} tokens, grad ckpt {'on' if s.gradient_checkpointing else 'off'}, {s.optimizer}"
        + (
            f", {s.deepspeed} on {plan.num_gpus} GPUs"
            if s.deepspeed
            else (f", {plan.num_gpus} GPUs (DDP)" if plan.num_gpus > 1 else "")
        ),
        f"trainable parameters: {m.trainable_params:,}",
        "",
        "Memory per GPU (GiB)                   peak  note",
    ]
    for c in m.components:
        if c.bytes <= 0:
            continue
        mark = "" if c.in_peak else "   (not at the peak)"
        lines.append(f"  {c.name:<34} {c.bytes / GIB:6.2f}  {c.note}{mark}")
    lines.append(f"  {'predicted peak (' + m.phase + ')':<34} {m.peak_gib:6.2f}")
    if m.cpu_bytes:
        lines.append(f"  {'CPU RAM (offloaded, whole node)':<34} {m.cpu_bytes / GIB:6.2f}")
    lines += [f"  note: {n}" for n in m.notes]
    if plan.gpu:
        g = plan.gpu
        word = {"fits": "FITS", "tight": "TIGHT (may OOM)", "no": "DOES NOT FIT"}[plan.verdict]
        lines += [
            "",
            f"{g.name} ({g.memory_gib:g} GiB): {word} at {m.peak_gib:.1f} GiB; "
            f"largest micro-batch that fits: {plan.max_micro_batch or 'none'}",
        ]
        if plan.suggestions:
            lines.append("  to make it fit:")
            lines += [f"    - {x}" for x in plan.suggestions]
    each = f" (x{plan.num_gpus})" if plan.num_gpus > 1 else ""
    lines += [
        "",
        f"{'GPU' + each:<16}{'GiB':>6}  {'verdict':<7}{'max mb':>7}{'time':>10}  cheapest spot, preemptions included",
    ]
    for f in plan.table:
        spot = f"{_money(f.cheapest_spot[1])} ({f.cheapest_spot[0]})" if f.cheapest_spot else "-"
        mb = f">{MAX_MICRO_BATCH}" if f.max_micro_batch >= MAX_MICRO_BATCH else str(f.max_micro_batch)
        lines.append(f"{f.gpu.name:<16}{f.gpu.memory_gib:>6g}  {f.verdict:<7}{mb:>7}{_fmt_hours(f.hours):>10}  {spot}")
    lines += ["", f"Tokens: {plan.tokens:,} ({plan.tokens_source})" if plan.tokens else f"Tokens: {plan.tokens_source}"]
    if plan.throughput:
        tp = plan.throughput
        lines.append(
            f"Throughput on {plan.num_gpus} x {plan.gpu.name}: {tp.tokens_per_second:,.0f} tokens/s "
            f"({tp.flops_per_token / 1e9:.1f} GFLOP/token; {tp.source})"
        )
    if plan.hours is not None:
        spot_hours = plan.hours / (1 - plan.preemption_overhead)
        lines.append(
            f"Time: {_fmt_hours(plan.hours)} on demand, {_fmt_hours(spot_hours)} on spot (preemptions included)"
        )
    if plan.costs:
        lines += [
            "",
            f"Cost (prices as of {plan.prices_date}, per GPU-hour)",
            f"  {'provider':<18}{'on-demand':>10}{'spot':>8}{'total':>11}{'spot total':>12}{'saved':>7}",
        ]
        for r in plan.costs:
            saved = f"{r.savings:.0%}" if r.savings is not None else "-"
            lines.append(
                f"  {r.provider:<18}{_money(r.on_demand_per_hour):>10}{_money(r.spot_per_hour):>8}"
                f"{_money(r.on_demand_total):>11}{_money(r.spot_total):>12}{saved:>7}"
            )
    lines += render_checkpoint(plan)
    lines += ["", "Assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


# Measured end to end on the H100 machine (bench/results/h100-deepspeed-1b-full-nobaseline-2026-11-23.json):
# SIGTERM -> committed emergency checkpoint of a 21.0 GB full fine-tuning state in 34.98 s (the raw write path
# alone did 0.89 GB/s: h100-ckpt-write-21gb-2026-11-23.json). A local NVMe is faster, a network volume slower.
DISK_WRITE_GBPS = 0.6
# Time from the termination notice to the machine going away, as each provider documents it: the same
# figures the notice watcher uses for its deadlines.
NOTICE_S = {"runpod": RUNPOD_GRACE_S, "gcp": GCP_NOTICE_S, "azure": AZURE_MIN_NOTICE_S, "aws": AWS_DEFAULT_NOTICE_S}


def render_checkpoint(plan: Plan) -> list[str]:
    """Size of one checkpoint, disk needed, and whether an emergency checkpoint beats each provider's notice."""
    if not plan.checkpoint:
        return []
    total = sum(plan.checkpoint.values())
    unit, div = ("GB", 1e9) if total >= 1e9 else ("MB", 1e6)
    parts = ", ".join(f"{k} {v / div:.1f}" for k, v in plan.checkpoint.items() if v)
    secs = total / 1e9 / DISK_WRITE_GBPS
    fits = [f"{k} {v:g} s" for k, v in NOTICE_S.items() if secs <= v]
    late = [f"{k} {v:g} s" for k, v in NOTICE_S.items() if secs > v]
    lines = ["", f"Checkpoint: {total / div:.1f} {unit} each ({parts} {unit})"]
    if plan.keep_last:
        lines.append(
            f"  disk: up to {(plan.keep_last + 1) * total / div:.1f} {unit} "
            f"(checkpoint.keep_last {plan.keep_last} + the one being written)"
        )
    line = f"  emergency checkpoint: ~{max(secs, 0.1):.1f} s at {DISK_WRITE_GBPS:g} GB/s"
    if fits:
        line += f"; within the notice on {', '.join(fits)}"
    if late:
        line += (
            f"; longer than {', '.join(late)}: a preemption there redoes the work since the newest periodic "
            f"checkpoint (set checkpoint.every_minutes to bound it)"
        )
    lines.append(line)
    return lines
