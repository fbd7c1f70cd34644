"""`spot-trainer plan`: will this run fit on a GPU, how long will it take, and what will it cost on demand vs spot."""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import statistics
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import yaml

from trainer.spot.notices import AWS_DEFAULT_NOTICE_S, AZURE_MIN_NOTICE_S, GCP_NOTICE_S, RUNPOD_GRACE_S
from trainer.config.schema import Config
from trainer.errors import ConfigError
from trainer.plan.memory import GIB, MemoryEstimate, ModelShape, TrainingSetup, checkpoint_bytes, estimate_memory, \
    shape_from_config

log = logging.getLogger(__name__)

DATA_DIR = Path(str(resources.files("trainer") / "data"))
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
TIGHT = 0.90  # above this share of the card the verdict is "tight": measured peaks varied by about 10%
# Hardware-FLOPs utilization (recompute included) measured with this trainer's model code on an H100:
# full 0.25-0.31, LoRA 0.15-0.29, QLoRA 0.16-0.29 at 2k-8k tokens per micro-batch (big models at the top;
# 512-token micro-batches ran at 0.06). Defaults sit in the middle: expect +-30%.
EFFICIENCY = {"full": 0.30, "lora": 0.25, "qlora": 0.25}
MAX_MICRO_BATCH = 4096


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    bf16_tflops: float
    memory_bandwidth_gbs: float
    aliases: tuple[str, ...] = ()
    no_bf16: bool = False
    fp32_tflops: float | None = None  # None: TF32 tensor cores at half the bf16 rate
    note: str = ""


@dataclass
class Throughput:
    tokens_per_second: float
    flops_per_token: float
    efficiency: float
    source: str


@dataclass
class GpuFit:
    gpu: GpuSpec
    peak_gib: float
    verdict: str  # fits | tight | no
    max_micro_batch: int  # 0: not even one sample fits
    hours: float | None = None
    cheapest_spot: tuple[str, float] | None = None  # (provider, total USD)


@dataclass
class CostRow:
    provider: str
    on_demand_per_hour: float | None
    spot_per_hour: float | None
    on_demand_total: float | None
    spot_total: float | None

    @property
    def savings(self) -> float | None:
        if self.on_demand_total and self.spot_total is not None:
            return 1 - self.spot_total / self.on_demand_total
        return None


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


# ---------------------------------------------------------------- tables


@functools.lru_cache(maxsize=8)
def load_gpus(path: Path | None = None) -> tuple[GpuSpec, ...]:
    data = yaml.safe_load((path or DATA_DIR / "gpus.yaml").read_text())
    return tuple(GpuSpec(name=g["name"], memory_gib=float(g["memory_gib"]), bf16_tflops=float(g["bf16_tflops"]),
                    memory_bandwidth_gbs=float(g["memory_bandwidth_gbs"]),
                    aliases=tuple(str(a) for a in g.get("aliases", ())), no_bf16=bool(g.get("no_bf16", False)),
                    fp32_tflops=g.get("fp32_tflops"), note=g.get("note", "")) for g in data["gpus"])


def _key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def find_gpu(name: str, gpus: tuple[GpuSpec, ...] | None = None) -> GpuSpec:
    """A GPU by name or alias, ignoring case, spaces and dashes ("4090", "rtx4090", "H100")."""
    gpus = gpus if gpus is not None else load_gpus()
    keys = {}
    for g in gpus:
        for n in (g.name, *g.aliases):
            keys.setdefault(_key(n), g)
    if _key(name) in keys:
        return keys[_key(name)]
    near = difflib.get_close_matches(_key(name), list(keys), n=3, cutoff=0.5)
    names = list(dict.fromkeys(keys[k].name for k in near)) or [g.name for g in gpus]
    raise ConfigError(f"--gpu {name!r}: unknown GPU; did you mean {', '.join(names)}? "
                      f"(add a row to {DATA_DIR / 'gpus.yaml'} for another card)")


def load_prices(path: Path | None = None) -> dict:
    path = Path(path) if path else DATA_DIR / "prices.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--prices {path}: cannot read a price table ({e})") from None
    if not isinstance(data, dict) or "gpus" not in data:
        raise ConfigError(f"--prices {path}: expected 'date:' and 'gpus:' mappings (see {DATA_DIR / 'prices.yaml'})")
    return data


# ---------------------------------------------------------------- config -> model and setup


def model_config(cfg: Config, vocab_size: int | None = None):
    """The transformers config of cfg.model (builtin, local dir or hub id); never loads weights."""
    from trainer.model import builtin_config, is_builtin, model_config as trainer_model_config

    if is_builtin(cfg) and vocab_size is not None:
        return builtin_config(cfg, vocab_size)
    return trainer_model_config(cfg)


def grad_accum(cfg: Config, num_gpus: int) -> int:
    """The trainer's own rule (trainer.distributed), so plan refuses what training would refuse."""
    from trainer.distributed import resolve_grad_accum

    return resolve_grad_accum(cfg, num_gpus)


def setup_from_config(cfg: Config, num_gpus: int = 1, gpu: GpuSpec | None = None) -> TrainingSetup:
    """The memory model's view of a Config, for the trainer's GPU path (bf16 autocast unless dtype is fp32)."""
    ds = cfg.distributed.deepspeed
    if ds and ds not in ("zero2", "zero2_offload"):
        ds = "zero2_offload" if "offload" in ds else "zero2"  # a JSON path: read as plain ZeRO-2
    targets = cfg.lora.target_modules
    # model.dtype auto is bf16 where the GPU has it and fp32 elsewhere (trainer.model.resolve_dtype): a T4 runs fp32
    fp32 = cfg.model.dtype == "fp32" or (cfg.model.dtype == "auto" and gpu is not None and gpu.no_bf16)
    return TrainingSetup(
        method=cfg.model.method, compute_bytes=4 if fp32 else 2,
        micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.max_length,
        gradient_checkpointing=cfg.model.gradient_checkpointing, optimizer=cfg.train.optimizer,
        quant_bits=cfg.quant.bits, double_quant=cfg.quant.double_quant, lora_r=cfg.lora.r,
        lora_targets=targets if isinstance(targets, str) else tuple(targets), lora_dropout=cfg.lora.dropout,
        attention=cfg.model.attn_implementation or "sdpa", repeat_kv=not cfg.data.packing, deepspeed=ds,
        num_gpus=num_gpus, grad_accum=grad_accum(cfg, num_gpus))


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
        out.append(f"train.micro_batch_size={mb} (x{k} train.grad_accum keeps the batch): "
                   f"{peak(micro_batch_size=mb):.1f} GiB")
    if not setup.gradient_checkpointing:
        ck = replace(setup, gradient_checkpointing=True)
        mb_ck = largest_micro_batch(shape, ck, gpu)
        if mb_ck:
            use = min(mb_ck, setup.micro_batch_size)
            out.append(f"model.gradient_checkpointing=true with micro-batch {use}: "
                       f"{peak(gradient_checkpointing=True, micro_batch_size=use):.1f} GiB (~30% slower)")
    for ckpt in sorted({setup.gradient_checkpointing, True}):
        seq = setup.seq_len // 2
        while seq >= 128:
            if peak(seq_len=seq, micro_batch_size=1, gradient_checkpointing=ckpt) <= cap:
                extra = " with gradient checkpointing" if ckpt and not setup.gradient_checkpointing else ""
                out.append(f"data.max_length={seq}{extra} at micro-batch 1: "
                           f"{peak(seq_len=seq, micro_batch_size=1, gradient_checkpointing=ckpt):.1f} GiB")
                break
            seq //= 2
    if setup.method == "full" and peak(method="lora", micro_batch_size=1, gradient_checkpointing=True) <= cap:
        out.append("model.method=lora (frozen bf16 base, fp32 adapters)")
    qlora_peak = peak(method="qlora", micro_batch_size=1, gradient_checkpointing=True)
    if setup.method in ("full", "lora") and qlora_peak <= cap:
        out.append("model.method=qlora (4-bit base)")
    if setup.method == "full" and setup.optimizer == "adamw":
        out.append(f"train.optimizer=paged_adamw_8bit: {peak(optimizer='paged_adamw_8bit'):.1f} GiB")
    if setup.method == "full" and setup.num_gpus > 1 and setup.deepspeed != "zero2_offload":
        out.append(f"distributed.deepspeed=zero2_offload: {peak(deepspeed='zero2_offload'):.1f} GiB per GPU")
    bigger = [f.gpu.name for f in table if f.verdict == "fits" and f.gpu.memory_gib > gpu.memory_gib]
    if bigger:
        out.append(f"a larger GPU: {', '.join(bigger[:4])}")
    return out


# ---------------------------------------------------------------- time


def flops_per_token(shape: ModelShape, setup: TrainingSetup) -> float:
    """Training FLOPs per token, recompute included.

    forward = 2N + 2*L*h*s (N: parameters in matrix products; causal attention scores and mixing);
    full fine-tuning = 3 x forward (6N: weight and input gradients); LoRA/QLoRA = forward + 2N + 4*L*h*s
    (frozen weights need no weight gradient: ~4N); gradient checkpointing adds one more forward.
    """
    fwd = 2 * shape.params_matmul + 2 * shape.num_layers * shape.hidden_size * setup.seq_len
    attn = 2 * shape.num_layers * shape.hidden_size * setup.seq_len
    total = 3 * fwd if setup.method == "full" else fwd + 2 * shape.params_matmul + 2 * attn
    return total + (fwd if setup.gradient_checkpointing else 0)


def read_bench_results(bench_dir: Path | None = None) -> list[dict]:
    """Measured runs from bench/results/*.json (a dict or a list of dicts each); unreadable files are skipped."""
    bench_dir = Path(bench_dir) if bench_dir else BENCH_DIR
    out = []
    for path in sorted(bench_dir.glob("*.json")) if bench_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("bench result %s skipped: %s", path, e)
            continue
        for rec in data if isinstance(data, list) else [data]:
            if isinstance(rec, dict) and isinstance(rec.get("tokens_per_second"), (int, float)) and rec.get("gpu"):
                out.append({**rec, "_file": path.name})
    return out


def estimate_throughput(shape: ModelShape, setup: TrainingSetup, gpu: GpuSpec, model_name: str, num_gpus: int,
                        bench: list[dict], efficiency: float | None = None) -> Throughput:
    """Tokens/s from our own bench results when there are any for this GPU and method, else from FLOPs."""
    fpt = flops_per_token(shape, setup)
    tflops = gpu.bf16_tflops if setup.compute_bytes == 2 else (gpu.fp32_tflops or gpu.bf16_tflops / 2)
    peak = tflops * 1e12
    same = [r for r in bench if _gpu_name(r.get("gpu")) == gpu.name and r.get("method", setup.method) == setup.method]
    exact = [r for r in same if _model_key(str(r.get("model", ""))) == _model_key(model_name)]
    if exact and efficiency is None:
        tps = statistics.median(float(r["tokens_per_second"]) for r in exact)
        files = ", ".join(sorted({r["_file"] for r in exact}))
        return Throughput(tps * num_gpus, fpt, tps * fpt / peak, f"measured ({files})")
    sized = [r for r in same if isinstance(r.get("params") or r.get("num_params"), (int, float))]
    if sized and efficiency is None:
        effs = []
        for r in sized:
            k = 6 if setup.method == "full" else 4
            k += 2 if r.get("gradient_checkpointing") else 0
            effs.append(float(r["tokens_per_second"]) * k * float(r.get("params") or r.get("num_params")) / peak)
        eff = statistics.median(effs)
        src = f"efficiency {eff:.2f} implied by {', '.join(sorted({r['_file'] for r in sized}))}"
    else:
        eff = efficiency if efficiency is not None else EFFICIENCY[setup.method]
        src = f"{eff:.2f} x peak {tflops:g} TFLOP/s" + (" (given)" if efficiency is not None else " (default)")
    return Throughput(eff * peak / fpt * num_gpus, fpt, eff, src)


def _gpu_name(name) -> str | None:
    try:
        return find_gpu(str(name)).name
    except ConfigError:
        return None


def _model_key(name: str) -> str:
    return name.rstrip("/").split("/")[-1].lower()  # a local dir and its hub id compare by their last part


def count_tokens(cfg: Config, num_gpus: int, dataset_tokens: int | None,
                 dataset_rows: int | None) -> tuple[int | None, str]:
    t = cfg.train
    if t.max_steps:
        batch = t.global_batch_size or t.micro_batch_size * grad_accum(cfg, num_gpus) * num_gpus
        return t.max_steps * batch * cfg.data.max_length, (
            f"{t.max_steps} steps x {batch} samples x {cfg.data.max_length} tokens (padded upper bound)")
    if dataset_tokens:
        return int(dataset_tokens * t.epochs), f"{dataset_tokens:,} dataset tokens x {t.epochs:g} epochs"
    if dataset_rows:
        return (int(dataset_rows * cfg.data.max_length * t.epochs),
                f"{dataset_rows:,} rows x {cfg.data.max_length} tokens x {t.epochs:g} epochs (upper bound)")
    return None, "unknown: set train.max_steps or pass the dataset size"


# ---------------------------------------------------------------- cost


def preemption_overhead(preemptions_per_day: float, restart_latency_s: float, lost_work_s: float) -> float:
    """Fraction of spot wall time lost: each preemption costs the restart latency plus the work redone."""
    lost = preemptions_per_day * (restart_latency_s + lost_work_s) / 86400
    return min(lost, 0.95)


def cost_rows(gpu: GpuSpec, hours: float | None, num_gpus: int, prices: dict, overhead: float,
              price_per_hour: float | None, spot_price_per_hour: float | None) -> list[CostRow]:
    """On-demand and spot cost per provider; spot hours are stretched by the preemption overhead."""
    table = {}
    for name, row in (prices.get("gpus") or {}).items():
        if _key(name) == _key(gpu.name) or _gpu_name(name) == gpu.name:
            table = row or {}
    rows = [(prov, p.get("on_demand"), p.get("spot")) for prov, p in table.items() if isinstance(p, dict)]
    if price_per_hour is not None or spot_price_per_hour is not None:
        rows.insert(0, ("given", price_per_hour, spot_price_per_hour))
    out = []
    for prov, od, spot in rows:
        od_total = od * num_gpus * hours if (od is not None and hours is not None) else None
        spot_total = spot * num_gpus * hours / (1 - overhead) if (spot is not None and hours is not None) else None
        out.append(CostRow(prov, od, spot, od_total, spot_total))
    return out


# ---------------------------------------------------------------- the plan


def make_plan(cfg: Config, gpu: str | None = None, num_gpus: int = 1, dataset_tokens: int | None = None, *,
              dataset_rows: int | None = None, vocab_size: int | None = None, price_per_hour: float | None = None,
              spot_price_per_hour: float | None = None, prices_path: Path | None = None,
              bench_dir: Path | None = None, efficiency: float | None = None, preemptions_per_day: float = 2.0,
              restart_latency_s: float = 300.0, lost_work_s: float | None = None) -> Plan:
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
            step_s = _step_seconds(cfg, setup, tp)
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
    assumptions = [
        "memory: trainer's GPU path (bf16 autocast; full FT keeps fp32 weights + fused AdamW; LoRA adapters fp32;"
        " QLoRA via prepare_model_for_kbit_training, so embeddings/lm_head/norms fp32); unfused HF cross-entropy",
        f"verdict 'tight' above {TIGHT:.0%} of the card: H100 peaks measured 11% above to 4% below the prediction",
    ]
    if chosen:
        plan_verdict = verdict(memory.peak_gib, chosen)
        max_mb = largest_micro_batch(shape, setup, chosen)
        if plan_verdict != "fits":
            advice = suggestions(shape, setup, chosen, table)
        throughput = estimate_throughput(shape, setup, chosen, cfg.model.name_or_path, num_gpus, bench, efficiency)
        if chosen.no_bf16:
            assumptions.append(f"{chosen.name} has no bf16: model.dtype=auto trains in fp32 there "
                               f"({chosen.fp32_tflops} TFLOP/s); "
                               f"model.dtype=fp16 uses its {chosen.bf16_tflops:g} TFLOP/s fp16 tensor cores")
        if tokens is not None:
            hours = tokens / throughput.tokens_per_second / 3600
            overhead, lost_work = spot_overhead(throughput)
            assumptions.append(
                f"spot: {preemptions_per_day:g} preemptions/day x ({restart_latency_s:g} s restart + {lost_work:.0f} s "
                f"redone work) = {overhead:.1%} more wall time; redone work defaults to half a checkpoint interval, "
                f"an upper bound since the emergency checkpoint on a notice usually saves it")
        costs = cost_rows(chosen, hours, num_gpus, prices, overhead, price_per_hour, spot_price_per_hour)
    return Plan(model_name=cfg.model.name_or_path, shape=shape, setup=setup, memory=memory, gpu=chosen,
                num_gpus=num_gpus, verdict=plan_verdict, max_micro_batch=max_mb, suggestions=advice, table=table,
                tokens=tokens, tokens_source=tokens_source, throughput=throughput, hours=hours, costs=costs,
                prices_date=str(prices.get("date", "undated")), preemption_overhead=overhead,
                assumptions=assumptions, checkpoint=checkpoint_bytes(shape, setup), keep_last=cfg.checkpoint.keep_last)


def _step_seconds(cfg: Config, setup: TrainingSetup, tp: Throughput) -> float:
    batch = cfg.train.global_batch_size or setup.micro_batch_size * setup.grad_accum * setup.num_gpus
    return batch * setup.seq_len / tp.tokens_per_second


# ---------------------------------------------------------------- rendering


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
    lines = [f"Plan: {plan.model_name} ({_fmt_params(sh.params_total)} params, {sh.num_layers} layers, "
             f"hidden {sh.hidden_size}, vocab {sh.vocab_size:,}), {s.method}, micro-batch {s.micro_batch_size} x "
             f"{s.seq_len} tokens, grad ckpt {'on' if s.gradient_checkpointing else 'off'}, {s.optimizer}"
             + (f", {s.deepspeed} on {plan.num_gpus} GPUs" if s.deepspeed else
                (f", {plan.num_gpus} GPUs (DDP)" if plan.num_gpus > 1 else "")),
             f"trainable parameters: {m.trainable_params:,}", "",
             "Memory per GPU (GiB)                   peak  note"]
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
        lines += ["", f"{g.name} ({g.memory_gib:g} GiB): {word} at {m.peak_gib:.1f} GiB; "
                      f"largest micro-batch that fits: {plan.max_micro_batch or 'none'}"]
        if plan.suggestions:
            lines.append("  to make it fit:")
            lines += [f"    - {x}" for x in plan.suggestions]
    each = f" (x{plan.num_gpus})" if plan.num_gpus > 1 else ""
    lines += ["", f"{'GPU' + each:<16}{'GiB':>6}  {'verdict':<7}{'max mb':>7}{'time':>10}  "
                  "cheapest spot, preemptions included"]
    for f in plan.table:
        spot = f"{_money(f.cheapest_spot[1])} ({f.cheapest_spot[0]})" if f.cheapest_spot else "-"
        mb = f">{MAX_MICRO_BATCH}" if f.max_micro_batch >= MAX_MICRO_BATCH else str(f.max_micro_batch)
        lines.append(f"{f.gpu.name:<16}{f.gpu.memory_gib:>6g}  {f.verdict:<7}{mb:>7}"
                     f"{_fmt_hours(f.hours):>10}  {spot}")
    lines += ["", f"Tokens: {plan.tokens:,} ({plan.tokens_source})" if plan.tokens else f"Tokens: {plan.tokens_source}"]
    if plan.throughput:
        tp = plan.throughput
        lines.append(f"Throughput on {plan.num_gpus} x {plan.gpu.name}: {tp.tokens_per_second:,.0f} tokens/s "
                     f"({tp.flops_per_token / 1e9:.1f} GFLOP/token; {tp.source})")
    if plan.hours is not None:
        spot_hours = plan.hours / (1 - plan.preemption_overhead)
        lines.append(f"Time: {_fmt_hours(plan.hours)} on demand, {_fmt_hours(spot_hours)}"
                     f" on spot (preemptions included)")
    if plan.costs:
        lines += ["", f"Cost (prices as of {plan.prices_date}, per GPU-hour)",
                  f"  {'provider':<18}{'on-demand':>10}{'spot':>8}{'total':>11}{'spot total':>12}{'saved':>7}"]
        for r in plan.costs:
            saved = f"{r.savings:.0%}" if r.savings is not None else "-"
            lines.append(f"  {r.provider:<18}{_money(r.on_demand_per_hour):>10}{_money(r.spot_per_hour):>8}"
                         f"{_money(r.on_demand_total):>11}{_money(r.spot_total):>12}{saved:>7}")
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
        lines.append(f"  disk: up to {(plan.keep_last + 1) * total / div:.1f} {unit} (checkpoint.keep_last {plan.keep_last}"
                     f" + the one being written)")
    line = f"  emergency checkpoint: ~{max(secs, 0.1):.1f} s at {DISK_WRITE_GBPS:g} GB/s"
    if fits:
        line += f"; within the notice on {', '.join(fits)}"
    if late:
        line += (f"; longer than {', '.join(late)}: a preemption there redoes the work since the newest periodic "
                 f"checkpoint (set checkpoint.every_minutes to bound it)")
    lines.append(line)
    return lines
