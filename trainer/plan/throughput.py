"""Tokens per second on a GPU (measured where we have runs, else FLOPs x an efficiency) and tokens per run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from trainer.config.schema import Config
from trainer.plan.flops import flops_per_token, params_flops
from trainer.plan.memory import ModelShape, TrainingSetup
from trainer.plan.tables import GpuSpec, gpu_name

# Hardware-FLOPs utilization (recompute included) measured with this trainer's model code on an H100:
# full 0.25-0.31, LoRA 0.15-0.29, QLoRA 0.16-0.29 at 2k-8k tokens per micro-batch (big models at the top;
# 512-token micro-batches ran at 0.06). Defaults sit in the middle: expect +-30%.
EFFICIENCY = {"full": 0.30, "lora": 0.25, "qlora": 0.25}


@dataclass
class Throughput:
    tokens_per_second: float
    flops_per_token: float
    efficiency: float
    source: str


def grad_accum(cfg: Config, num_gpus: int) -> int:
    """The trainer's own rule (trainer.distributed), so plan refuses what training would refuse."""
    from trainer.distributed import resolve_grad_accum

    return resolve_grad_accum(cfg, num_gpus)


def peak_tflops(gpu: GpuSpec, setup: TrainingSetup) -> float:
    return gpu.bf16_tflops if setup.compute_bytes == 2 else (gpu.fp32_tflops or gpu.bf16_tflops / 2)


def estimate_throughput(
    shape: ModelShape,
    setup: TrainingSetup,
    gpu: GpuSpec,
    model_name: str,
    num_gpus: int,
    bench: list[dict],
    efficiency: float | None = None,
) -> Throughput:
    """Tokens/s from our own bench results when there are any for this GPU and method, else from FLOPs."""
    fpt = flops_per_token(shape, setup)
    tflops = peak_tflops(gpu, setup)
    peak = tflops * 1e12
    same = [r for r in bench if gpu_name(r.get("gpu")) == gpu.name and r.get("method", setup.method) == setup.method]
    exact = [r for r in same if _model_key(str(r.get("model", ""))) == _model_key(model_name)]
    if exact and efficiency is None:
        tps = statistics.median(float(r["tokens_per_second"]) for r in exact)
        files = ", ".join(sorted({r["_file"] for r in exact}))
        return Throughput(tps * num_gpus, fpt, tps * fpt / peak, f"measured ({files})")
    sized = [r for r in same if isinstance(r.get("params") or r.get("num_params"), (int, float))]
    if sized and efficiency is None:
        effs = [
            float(r["tokens_per_second"])
            * params_flops(
                float(r.get("params") or r.get("num_params")), setup.method, bool(r.get("gradient_checkpointing"))
            )
            / peak
            for r in sized
        ]
        eff = statistics.median(effs)
        src = f"efficiency {eff:.2f} implied by {', '.join(sorted({r['_file'] for r in sized}))}"
    else:
        eff = efficiency if efficiency is not None else EFFICIENCY[setup.method]
        src = f"{eff:.2f} x peak {tflops:g} TFLOP/s" + (" (given)" if efficiency is not None else " (default)")
    return Throughput(eff * peak / fpt * num_gpus, fpt, eff, src)


def _model_key(name: str) -> str:
    return name.rstrip("/").split("/")[-1].lower()  # a local dir and its hub id compare by their last part


def count_tokens(
    cfg: Config, num_gpus: int, dataset_tokens: int | None, dataset_rows: int | None
) -> tuple[int | None, str]:
    t = cfg.train
    if t.max_steps:
        batch = t.global_batch_size or t.micro_batch_size * grad_accum(cfg, num_gpus) * num_gpus
        return t.max_steps * batch * cfg.data.max_length, (
            f"{t.max_steps} steps x {batch} samples x {cfg.data.max_length} tokens (padded upper bound)"
        )
    if dataset_tokens:
        return int(dataset_tokens * t.epochs), f"{dataset_tokens:,} dataset tokens x {t.epochs:g} epochs"
    if dataset_rows:
        return (
            int(dataset_rows * cfg.data.max_length * t.epochs),
            f"{dataset_rows:,} rows x {cfg.data.max_length} tokens x {t.epochs:g} epochs (upper bound)",
        )
    return None, "unknown: set train.max_steps or pass the dataset size"


def step_seconds(cfg: Config, setup: TrainingSetup, tp: Throughput) -> float:
    batch = cfg.train.global_batch_size or setup.micro_batch_size * setup.grad_accum * setup.num_gpus
    return batch * setup.seq_len / tp.tokens_per_second
