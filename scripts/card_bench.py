"""The card presets on one big GPU, each under its card's memory: real tokens/s, peak memory, fit, plan's prediction.

For each preset of trainer/config/presets/ that names a card (`# card:` line), this trains the preset with the CLI
(`python -m trainer train <preset> --set model.name_or_path=<local dir> --set data.path=<jsonl> ...`) inside a
wrapper process that first caps torch's allocator with `torch.cuda.set_per_process_memory_fraction`, so the run
sees the card's memory, not the H200's. The cap is the card's memory in plan's GPU table (trainer/plan/tables/
gpus.yaml) less the CUDA context that plan counts outside torch's allocator (0.75 GiB): what a real card leaves
to torch. `model.memory_budget_gb` is set to the same figure, so `checkpoint_layers: auto` and the pre-flight
check plan for the card. The device has no network: each preset's hub model is replaced by a local directory of
the same shape with random bf16 weights (made on the GPU) and a WordLevel tokenizer with the model's vocabulary
(scripts/bench.py's), and the data is generated (bench.py's log-normal prompt/completion rows, packed).

Also: the fp16 path (the T4 preset, LLM.int8 base, GradScaler): SIGTERM mid-run (exit 75, emergency checkpoint),
resume, and the loss scaler's state in each checkpoint's optimizer.json; a run that passes the pre-flight check and
runs out of memory in a step (exit 3, the one-line message); the pre-flight refusal (exit 2) of a preset on a
card it cannot fit; DeepSpeed ZeRO-2 offload on one GPU when deepspeed imports.

  python scripts/card_bench.py --out $OUT --parts 4070ti,4090,oom-preflight,oom,4050     # on the device
  python scripts/card_bench.py --out $OUT --parts t4,zero2,4090-nocap --ds-site /tmp/ds-site   # on the device
  python scripts/card_bench.py --cpu --out /tmp/cards --work /tmp/cards-work             # smoke test here

Prints each command it ran and what it measured; writes card_bench.json (and run logs) under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402  (build_tokenizer, write_rows, sample_lengths: the same tokenizer and data)

GIB = 2**30
CUDA_CONTEXT_GIB = 0.75  # trainer.plan.memory.CUDA_CONTEXT_BYTES: outside torch's allocator, inside the card

# config.json shape fields, as in trainer/plan/tables/models.yaml (each preset's hub id)
LLAMA3_ROPE = {"rope_type": "default", "rope_theta": 500000.0}
LLAMA32_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES = {
    "llama3-8b": dict(  # meta-llama/Meta-Llama-3-8B
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_parameters=LLAMA3_ROPE,
        tie_word_embeddings=False,
    ),
    "llama2-7b": dict(  # meta-llama/Llama-2-7b-hf
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    ),
    "llama32-3b": dict(  # meta-llama/Llama-3.2-3B
        hidden_size=3072,
        head_dim=128,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters=LLAMA32_ROPE,
        tie_word_embeddings=True,
    ),
    "llama32-1b": dict(  # meta-llama/Llama-3.2-1B
        hidden_size=2048,
        head_dim=64,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters=LLAMA32_ROPE,
        tie_word_embeddings=True,
    ),
}
TINY = dict(hidden_size=64, head_dim=16, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@dataclass
class Case:
    name: str
    preset: str
    shape: str
    gpu: str  # plan's GPU table name: the card whose memory caps the run
    steps: int  # train.max_steps
    what: str = ""
    extra: list[str] = field(default_factory=list)  # more --set overrides
    budget: bool = True  # set model.memory_budget_gb to the cap
    expect: tuple[int, ...] = (0,)
    sigterm_after: int | None = None  # SIGTERM once this many steps are logged, then resume to the end
    kill_after: int | None = None  # SIGKILL once this many steps are logged (no checkpoint written)
    deepspeed: bool = False
    cap: bool = True  # False: no allocator cap (the same budget), to see what the cap itself costs
    plan_gpus: int = 1  # GPUs of the preset's card line, for the README's figure
    timeout: float = 300


CASES = {
    c.name: c
    for c in [
        Case("4070ti", "llama3-8b-qlora-4070ti", "llama3-8b", "RTX 4070 Ti", 12, "the preset"),
        Case("4090", "llama3-8b-lora-4090", "llama3-8b", "RTX 4090", 16, "the preset"),
        Case(
            "oom-preflight",
            "llama3-8b-lora-4090",
            "llama3-8b",
            "RTX 4070 Ti",
            2,
            "8B LoRA (4090 preset) under the 4070 Ti's cap: the pre-flight check refuses it",
            expect=(2,),
            timeout=120,
        ),
        Case(
            "oom",
            "llama3-8b-lora-4090",
            "llama3-8b",
            "RTX 4090",
            2,
            "4090 preset, no layer checkpointed (model.checkpoint_layers=0), micro-batch 4 x 1024: passes the "
            "pre-flight check (which assumes checkpointing) and runs out of memory in its first step",
            extra=["model.checkpoint_layers=0", "train.micro_batch_size=4", "train.grad_accum=4"],
            expect=(3,),
            timeout=180,
        ),
        Case("4050", "llama32-3b-qlora-4050", "llama32-3b", "RTX 4050 Laptop", 12, "the preset"),
        Case(
            "t4",
            "llama2-7b-int8-t4",
            "llama2-7b",
            "T4",
            5,
            "the preset (fp16 + GradScaler); SIGTERM after 3 steps, then resumed to step 5",
            expect=(75, 0),
            sigterm_after=3,
            timeout=300,
        ),
        Case(
            "zero2",
            "llama32-1b-full-zero2-offload",
            "llama32-1b",
            "RTX 3090",
            100,
            "the preset on 1 GPU (global batch 32 = micro-batch 2 x 16), 24 GB cap; stopped by SIGKILL after 3 "
            "steps (a full checkpoint is ~17 GB)",
            kill_after=3,
            deepspeed=True,
            plan_gpus=2,
            expect=(-9,),
            timeout=420,
        ),
        Case(
            "4090-nocap",
            "llama3-8b-lora-4090",
            "llama3-8b",
            "RTX 4090",
            8,
            "the 4090 preset with the same memory_budget_gb but no allocator cap: what the cap itself costs",
            cap=False,
        ),
    ]
}
EST_S = {"4070ti": 90, "4090": 60, "oom-preflight": 15, "oom": 40, "4050": 60, "t4": 200, "zero2": 150}
EST_S["4090-nocap"] = 140  # with the 8B model's build


# ---------------------------------------------------------------- model dirs and data


def build_model(shape: str, path: Path, device: str, tiny: bool) -> dict:
    """Random-weight Llama of `shape` (made on `device`), bf16 safetensors, with a WordLevel tokenizer."""
    from transformers import LlamaConfig

    t0 = time.time()
    fields = dict(SHAPES[shape])
    if tiny:
        kv = 4 if fields["num_key_value_heads"] == fields["num_attention_heads"] else 2
        fields.update(TINY, num_key_value_heads=kv)
    cfg = LlamaConfig(**fields, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False)
    n_params = bench.save_random_llama(cfg, path, device)
    bench.VOCAB = cfg.vocab_size
    bench.build_tokenizer().save_pretrained(path)
    return {"shape": shape, "params": n_params, "tied": cfg.tie_word_embeddings, "seconds": round(time.time() - t0, 1)}


def write_data(path: Path, vocab: int, rows: int) -> dict:
    """bench.py's rows (log-normal lengths, median 250, clipped 16..2048) over token ids < vocab."""
    import numpy as np

    bench.VOCAB = vocab
    rng = np.random.default_rng(1234)
    lengths = bench.sample_lengths(rng, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    bench.write_rows(path, lengths, rng)
    return {"rows": rows, "tokens": int(lengths.sum()), "vocab": vocab}


# ---------------------------------------------------------------- the capped trainer process


def capped_main(argv: list[str]) -> None:
    """`_run MEMFILE CAP_GIB train ...`: cap torch's allocator, dump peak memory (every second and at exit), then run
    the CLI in this process."""
    import atexit
    import runpy
    import threading

    import torch

    memfile, cap = Path(argv[0]), float(argv[1])
    cuda = torch.cuda.is_available()
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    if cuda and cap > 0:
        torch.cuda.set_per_process_memory_fraction(cap * GIB / total, 0)

    nvml: list = []

    def this_process_gib() -> float | None:
        """This process's device memory as the driver counts it (CUDA context included), where NVML tells."""
        try:
            import pynvml

            if not nvml:
                pynvml.nvmlInit()
                nvml.append(pynvml.nvmlDeviceGetHandleByIndex(0))
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(nvml[0]):
                if p.pid == os.getpid() and p.usedGpuMemory:
                    return p.usedGpuMemory / GIB
        except Exception:
            return None
        return None

    def dump() -> None:
        if not cuda:
            return
        free, tot = torch.cuda.mem_get_info(0)
        rec = {
            "cap_gib": cap,
            "fraction": cap * GIB / total if cap > 0 else None,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(0) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(0) / GIB,
            # the allocator's retries (cached blocks freed to fit under the cap), OOMs and cudaMalloc/cudaFree calls
            **{
                k: v
                for k, v in torch.cuda.memory_stats(0).items()
                if k in ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free")
            },
            "reserved_now_gib": torch.cuda.memory_reserved(0) / GIB,
            "device_used_now_gib": (tot - free) / GIB,
            "nvml_process_gib": this_process_gib(),
            "time": time.time(),
        }
        tmp = memfile.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, memfile)

    def loop() -> None:
        while True:
            time.sleep(1.0)
            try:
                dump()
            except Exception:
                pass

    threading.Thread(target=loop, daemon=True).start()
    atexit.register(dump)
    sys.argv = ["trainer", *argv[2:]]
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)


# ---------------------------------------------------------------- one run


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def env(a, deepspeed: bool) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=str(Path(a.work) / "torch-ext"))
    paths = [str(ROOT)]
    if deepspeed and a.ds_site:
        paths.append(a.ds_site)
    e["PYTHONPATH"] = ":".join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p])
    return e


def run_once(a, name: str, argv: list[str], cap: float, out: Path, case: Case, stop_after: int | None, sig) -> dict:
    """One trainer process under the cap; SIGTERM/SIGKILL (`sig`) once `stop_after` steps are logged."""
    memfile, log = out.parent / f"{name}.mem.json", out.parent / f"{name}.log"
    memfile.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_run", str(memfile), str(cap), *argv]
    shown = "python -m trainer " + " ".join(argv)
    where = f"torch allocator capped at {cap:.2f} GiB" if cap > 0 else "no cap"
    print(f"\n$ {shown}\n  (in scripts/card_bench.py's wrapper: {where})", flush=True)
    left = a.deadline_at - time.time() - 15
    timeout = max(20.0, min(case.timeout, left))
    t0 = time.time()
    sent, killed_for_time = None, False
    n_before = len(read_jsonl(out / "metrics.jsonl"))
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(a, case.deepspeed), stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if time.time() - t0 > timeout:
                killed_for_time = True
                break
            if stop_after is not None and sent is None:
                if len(read_jsonl(out / "metrics.jsonl")) - n_before >= stop_after:
                    sent = time.time()
                    proc.send_signal(sig)
            time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        rc = proc.wait()
    text = log.read_text(errors="replace")
    res = {
        "command": shown,
        "cap_gib": cap,
        "exit_code": rc,
        "wall_s": round(time.time() - t0, 1),
        "timed_out": killed_for_time,
        "signal_sent": None if sent is None else signal.Signals(sig).name,
        "signal_after_s": None if sent is None else round(sent - t0, 1),
    }
    m = read_jsonl(out / "metrics.jsonl")[n_before:]
    m = [x for x in m if "loss" in x and "tokens" in x]
    res["steps_logged"] = [x["step"] for x in m]
    res["losses"] = [x["loss"] for x in m]
    res["step_time_s"] = [x["step_time_s"] for x in m]
    res["metrics_memory_gb_max"] = max((x.get("memory_gb", 0) for x in m), default=None)
    w = a.warmup
    timed = m[w:]
    if timed:
        toks, secs = sum(x["tokens"] for x in timed), sum(x["step_time_s"] for x in timed)
        res.update(
            timed_steps=len(timed),
            warmup_steps=w,
            tokens_per_s=toks / secs,
            tokens_per_step=toks / len(timed),
            step_s=secs / len(timed),
        )
        if len(m) > w and w >= 1 and "time" in m[0]:
            window = m[-1]["time"] - m[w - 1]["time"]
            if window > 0 and len(timed) > 0:
                res["tokens_per_s_wall"] = toks / window
    plan = re.search(r"gradient checkpointing on (\d+)/(\d+) layers.*", text)
    res["checkpoint_plan"] = plan.group(0) if plan else None
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    res["error_line"] = errors[-1] if errors else None
    if memfile.exists():
        mem = json.loads(memfile.read_text())
        res["memory"] = mem
        ctx = None
        if mem.get("nvml_process_gib"):
            ctx = mem["nvml_process_gib"] - mem["reserved_now_gib"]
        res["context_gib"] = ctx
    if rc not in case.expect or rc not in (0, 75):
        res["log_tail"] = text[-2500:]
    ev = read_jsonl(out / "events.jsonl")
    res["events"] = [
        {k: e.get(k) for k in ("event", "step", "status", "reason", "stop_to_commit_s", "committed_step", "message")}
        for e in ev
        if e.get("event") in ("preempt", "oom", "train_end", "resume", "train_start")
    ]
    return res


def scaler_states(out: Path) -> dict:
    """loss_scaler of optimizer.json in each committed checkpoint."""
    found = {}
    for d in sorted((out / "checkpoints").glob("step-*")):
        f = d / "optimizer.json"
        if (d / "manifest.json").exists() and f.exists():
            found[d.name] = json.loads(f.read_text()).get("loss_scaler")
    return found


# ---------------------------------------------------------------- plan's prediction


def plan_figures(preset: str, overrides: list[str], gpu: str, num_gpus: int) -> dict:
    from trainer.config.loader import load_config
    from trainer.plan.planner import make_plan

    p = make_plan(load_config(preset, overrides), gpu=gpu, num_gpus=num_gpus)
    comp = {c.name: round(c.bytes / GIB, 3) for c in p.memory.components if c.in_peak}
    allocated = p.memory.peak_bytes / GIB - comp.get("allocator slack", 0) - comp.get("cuda context", 0)
    return {
        "peak_gib": round(p.memory.peak_gib, 3),
        "allocated_gib": round(allocated, 3),
        "verdict": p.verdict,
        "components": comp,
    }


def auto_predicted(preset: str, overrides: list[str], layers: int, liger: bool) -> dict:
    """What the trainer's memory model (the one `checkpoint_layers: auto` plans with) predicts torch allocates with
    `layers` decoder layers checkpointed, for the setup the GPU run had (Liger, QLoRA without the fp32 upcast,
    per-document attention unless packed_attention is mask, bf16 available): weights + adapters + the
    layer-independent part + the un-checkpointed layers' activations + the checkpointed layers' inputs + one layer
    rebuilt. trainer.speed.plan_checkpointing adds its margins (x1.15 per layer, 6% of the budget) on top."""
    from dataclasses import replace

    from trainer import speed
    from trainer.config.loader import load_config
    from trainer.plan.memory import (
        checkpointed_layer_bytes,
        estimate_memory,
        layer_activation_bytes,
        layer_independent_bytes,
    )
    from trainer.plan.planner import model_config

    cfg = load_config(preset, overrides)
    varlen = cfg.data.packing and cfg.model.packed_attention != "mask"
    shape, setup = speed.run_setup(
        cfg,
        model_config(cfg),
        liger=liger,
        upcast_kbit=cfg.model.method == "qlora" and not cfg.model.kbit_bf16_frozen,
        varlen=varlen,
        no_bf16=False,
        num_gpus=1,
    )
    setup = replace(setup, gradient_checkpointing=True)
    est = estimate_memory(shape, setup)
    tokens = setup.micro_batch_size * setup.seq_len
    per = layer_activation_bytes(shape, setup) * tokens
    kept = checkpointed_layer_bytes(shape, setup) * tokens
    n = shape.num_layers
    total = est.get("weights") + est.get("adapters") + layer_independent_bytes(shape, setup)
    total += (n - layers) * per + layers * kept + per
    return {"layers": layers, "of": n, "allocated_gib": round(total / GIB, 3), "liger": liger}


def plans_for(case: Case, overrides: list[str], ckpt_line: str | None = None, liger: bool = False) -> dict:
    """README's figure (the preset as plan reads it: Liger off, every layer checkpointed, the card line's GPUs),
    the same config as run (local model dir, 1 GPU), and that with Liger on (which the run had)."""
    out = {}
    keep = [o for o in overrides if not o.startswith(("data.path", "model.name_or_path"))]
    try:
        out["readme"] = plan_figures(case.preset, [], case.gpu, case.plan_gpus)
        out["as_run"] = plan_figures(case.preset, overrides, case.gpu, 1)
        out["as_run_liger"] = plan_figures(case.preset, [*overrides, "model.liger_kernels=true"], case.gpu, 1)
        out["hub_shape_same"] = plan_figures(case.preset, keep, case.gpu, 1)["peak_gib"] == out["as_run"]["peak_gib"]
        m = re.search(r"checkpointing on (\d+)/(\d+) layers", ckpt_line or "")
        layers = int(m.group(1)) if m else None
        if layers is None and "model.checkpoint_layers=null" in overrides:
            layers = SHAPES[case.shape]["num_hidden_layers"]
        if layers is not None:
            out["auto_model"] = auto_predicted(case.preset, overrides, layers, liger)
    except Exception as e:  # record, do not lose the measurement
        out["error"] = f"{type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------------- orchestration


def overrides_for(a, case: Case, model_dir: Path, data: Path, budget: float) -> list[str]:
    o = [
        f"model.name_or_path={model_dir}",
        f"data.path={data}",
        "data.format=completion",
        "data.eval_split=null",
        f"train.max_steps={case.steps}",
        "train.log_every_steps=1",
        "eval.before_training=false",
        "eval.generate=false",
        "checkpoint.every_steps=1000",
        "preemption.watch=none",
    ]
    if case.budget and not a.cpu:
        o.append(f"model.memory_budget_gb={budget:.2f}")
    o += case.extra
    if a.cpu:  # no CUDA here: the smoke test runs the same code paths on what the CPU can train
        o += ["model.method=full" if case.deepspeed else "model.method=lora", "model.dtype=fp32"]
        o += ["train.optimizer=adamw", "train.grad_accum=2", "data.max_length=128"]
        if case.deepspeed:
            o = [x for x in o if not x.startswith("train.grad_accum")] + ["train.global_batch_size=4"]
        if case.name == "oom-preflight":
            o.append("model.memory_budget_gb=0.0001")  # the CPU's pre-flight check needs a budget
    return o


def run_case(a, case: Case, model_dir: Path, data: Path) -> dict:
    from trainer.plan.tables import find_gpu

    card = find_gpu(case.gpu).memory_gib
    budget = card - CUDA_CONTEXT_GIB
    cap = budget if case.cap and not a.cpu else 0.0
    out = Path(a.work) / "runs" / case.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ov = overrides_for(a, case, model_dir, data, budget)
    argv = ["train", case.preset, *[x for o in ov for x in ("--set", o)], "--output-dir", str(out)]
    res = {
        "name": case.name,
        "preset": case.preset,
        "what": case.what,
        "card": case.gpu,
        "card_gib": card,
        "cap_gib": cap,
        "budget_gib": budget,
        "overrides": ov,
    }
    if case.sigterm_after:
        first = run_once(a, case.name + "-1", argv, cap, out, case, case.sigterm_after, signal.SIGTERM)
        first["scaler_in_checkpoints"] = scaler_states(out)
        res["segments"] = [first]
        if first["exit_code"] == 75:
            second = run_once(a, case.name + "-2", argv, cap, out, case, None, signal.SIGTERM)
            second["scaler_in_checkpoints"] = scaler_states(out)
            res["segments"].append(second)
        res["exit_codes"] = [s["exit_code"] for s in res["segments"]]
        res["fit"] = all(s["exit_code"] in (0, 75) for s in res["segments"])
        res["expected"] = res["exit_codes"] == list(case.expect)
        segs = [s for s in res["segments"] if s.get("timed_steps")]
        if segs:
            toks = sum(s["tokens_per_step"] * s["timed_steps"] for s in segs)
            secs = sum(s["step_s"] * s["timed_steps"] for s in segs)
            res["tokens_per_s"] = toks / secs
            res["timed_steps"] = sum(s["timed_steps"] for s in segs)
        mems = [s["memory"] for s in res["segments"] if s.get("memory")]
        if mems:
            res["peak_allocated_gib"] = max(x["peak_allocated_gib"] for x in mems)
            res["peak_reserved_gib"] = max(x["peak_reserved_gib"] for x in mems)
        res["checkpoint_plan"] = res["segments"][0].get("checkpoint_plan")
        if len(res["segments"]) == 2:
            s1, s2 = res["segments"]
            res["resume"] = {
                "stopped_at_step": (s1["steps_logged"] or [None])[-1],
                "resumed_first_step": (s2["steps_logged"] or [None])[0],
                "resumed_losses": s2["losses"],
                "losses_finite": all(math.isfinite(x) for x in s1["losses"] + s2["losses"]),
                "preempt_events": [e for e in s1["events"] if e["event"] == "preempt"],
                "loss_scaler": s2["scaler_in_checkpoints"],
            }
    else:
        sig = signal.SIGKILL if case.kill_after else signal.SIGTERM
        r = run_once(a, case.name, argv, cap, out, case, case.kill_after, sig)
        res.update(r)
        res["fit"] = r["exit_code"] in (0, 75) or (case.kill_after is not None and r.get("signal_sent") == "SIGKILL")
        res["expected"] = r["exit_code"] in case.expect
        if r.get("memory"):
            res["peak_allocated_gib"] = r["memory"]["peak_allocated_gib"]
            res["peak_reserved_gib"] = r["memory"]["peak_reserved_gib"]
    liger = not a.cpu and "liger-kernel" in a.versions and load_method(case.preset, ov) in ("lora", "qlora")
    res["plan"] = plans_for(case, ov, res.get("checkpoint_plan"), liger)
    return res


def load_method(preset: str, overrides: list[str]) -> str:
    from trainer.config.loader import load_config

    return load_config(preset, overrides).model.method


def summary_line(r: dict) -> str:
    def g(k, fmt):
        v = r.get(k)
        return "-" if v is None else format(v, fmt)

    plans = r.get("plan") or {}

    def peak(k):
        v = plans.get(k, {}).get("peak_gib")
        return "-" if v is None else f"{v:.2f}"

    exits = r.get("exit_codes", r.get("exit_code"))
    outcome = {2: "refused by the pre-flight check", 3: "OUT OF MEMORY in a step"}.get(
        exits if isinstance(exits, int) else -1, "fits" if r.get("fit") else "FAILED"
    )
    return (
        f"{r['name']:<14} cap {r['cap_gib']:6.2f} GiB  plan {peak('as_run'):>6} (Liger {peak('as_run_liger'):>6}) GiB  "
        f"alloc {g('peak_allocated_gib', '.2f'):>6}  reserved {g('peak_reserved_gib', '.2f'):>6}  "
        f"{g('tokens_per_s', ',.0f'):>7} tok/s  exit {exits}  {outcome}"
        f"{'' if r.get('expected') else ' (not the expected exit)'}  {r.get('checkpoint_plan') or ''}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        return capped_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        info = [build_model(s, Path(d), sys.argv[2], sys.argv[3] == "tiny") for s, d in zip(*[iter(sys.argv[4:])] * 2)]
        print(json.dumps(info), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/cards")
    ap.add_argument("--work", default="/tmp/card-bench")
    ap.add_argument("--parts", default=",".join(CASES))
    ap.add_argument("--cpu", action="store_true", help="smoke test: tiny shapes, LoRA fp32, no caps")
    ap.add_argument("--warmup", type=int, default=1, help="steps of each process left out of tokens/s")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--deadline", type=float, default=560, help="seconds for the whole script")
    ap.add_argument("--ds-site", default=None, help="a folder where deepspeed is installed (PYTHONPATH of zero2)")
    ap.add_argument("--ds-wait", default=None, help="a file whose existence says the deepspeed build has ended")
    ap.add_argument("--result", default="card_bench.json")
    a = ap.parse_args()
    t_all = time.time()
    a.deadline_at = t_all + a.deadline
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    parts = [p for p in a.parts.split(",") if p]
    unknown = [p for p in parts if p not in CASES]
    if unknown:
        sys.exit(f"unknown parts {unknown}; known: {', '.join(CASES)}")
    import importlib.metadata as md

    report: dict = {
        "command": "python scripts/card_bench.py " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "method": "each preset trained by `python -m trainer train` in a process whose torch allocator is capped "
        "(torch.cuda.set_per_process_memory_fraction) at the card's memory (plan's GPU table) less plan's 0.75 GiB "
        "CUDA context, model.memory_budget_gb = the cap; tokens/s = sum(tokens)/sum(step_time_s) of metrics.jsonl "
        f"after {a.warmup} warm-up step(s) of each process; peaks = torch.cuda.max_memory_allocated/reserved of "
        "the trainer process; random-weight models of each preset's shape, generated packed prompt/completion rows",
        "versions": {},
        "runs": [],
    }
    for p in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "deepspeed"):
        try:
            report["versions"][p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    if not a.cpu:
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        report["device"] = q.stdout.strip()
    a.versions = report["versions"]
    print(f"card_bench: {report['command']}\n  {report.get('device', 'cpu')}  {report['versions']}", flush=True)

    def save() -> None:
        report["total_s"] = round(time.time() - t_all, 1)
        (out / a.result).write_text(json.dumps(report, indent=1))

    data: dict[int, Path] = {}
    models: dict[str, Path] = {}
    needed = [CASES[p].shape for p in parts]
    for i, name in enumerate(parts):
        case = CASES[name]
        left = a.deadline_at - time.time()
        if left < EST_S[name] * (0.2 if a.cpu else 1.0):
            print(f"\nskipping {name}: {left:.0f} s left, it needs ~{EST_S[name]} s", flush=True)
            report["runs"].append({"name": name, "skipped": f"{left:.0f} s left of the deadline"})
            save()
            continue
        if case.deepspeed and not a.cpu:
            if a.ds_wait:  # the deepspeed build runs in the background of the device command
                t_wait = time.time()
                while not Path(a.ds_wait).exists() and time.time() - t_wait < 180:
                    time.sleep(1)
            ok = subprocess.run(
                [sys.executable, "-c", "import deepspeed"], env=env(a, True), capture_output=True, text=True
            )
            if ok.returncode != 0:
                why = (ok.stderr.strip().splitlines() or ["?"])[-1]
                print(f"\nskipping {name}: deepspeed does not import ({why})", flush=True)
                report["runs"].append({"name": name, "skipped": f"deepspeed does not import: {why}"})
                save()
                continue
        spec = SHAPES[case.shape]
        vocab = spec["vocab_size"]
        if vocab not in data:
            data[vocab] = work / f"data-{vocab}.jsonl"
            report.setdefault("data", {})[str(vocab)] = write_data(data[vocab], vocab, a.rows)
        if case.shape not in models:
            for s in list(models):  # free the disk: the 8B and 7B dirs are 16 and 13.5 GB
                if s not in needed[i:]:
                    shutil.rmtree(models.pop(s), ignore_errors=True)
            d = work / f"model-{case.shape}"
            shutil.rmtree(d, ignore_errors=True)
            t0 = time.time()
            built = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "_build",
                    "cpu" if a.cpu else "cuda",
                    "tiny" if a.cpu else "full",
                    case.shape,
                    str(d),
                ],
                cwd=ROOT,
                env=env(a, False),
                capture_output=True,
                text=True,
            )
            if built.returncode != 0:
                print(built.stdout[-2000:], built.stderr[-3000:], flush=True)
                report["runs"].append({"name": name, "skipped": f"model build failed: {built.stderr[-500:]}"})
                save()
                continue
            info = json.loads(built.stdout.strip().splitlines()[-1])[0]
            report.setdefault("models", {})[case.shape] = info
            print(f"\nmodel {case.shape}: {info} ({time.time() - t0:.0f} s with the process)", flush=True)
            models[case.shape] = d
        r = run_case(a, case, models[case.shape], data[vocab])
        report["runs"].append(r)
        print(summary_line(r), flush=True)
        if r.get("error_line"):
            print(f"  {r['error_line']}", flush=True)
        if r.get("resume"):
            print(f"  resume: {json.dumps(r['resume'])}", flush=True)
        save()
        first_exit = r.get("exit_codes", [r.get("exit_code")])[0]
        if first_exit == 3 and 3 not in case.expect:  # auto's plan ran out: the same run, every layer checkpointed
            if a.deadline_at - time.time() > EST_S[name]:
                again = Case(**{**case.__dict__, "name": case.name + "-allckpt"})
                again.extra = [*case.extra, "model.checkpoint_layers=null"]
                again.what = case.what + "; again with every layer checkpointed after an OOM"
                r = run_case(a, again, models[case.shape], data[vocab])
                report["runs"].append(r)
                print(summary_line(r), flush=True)
                if r.get("resume"):
                    print(f"  resume: {json.dumps(r['resume'])}", flush=True)
                save()
    import torch

    report["orchestrator_cuda_initialized"] = torch.cuda.is_initialized()
    save()
    with tarfile.open(out / "card_bench_logs.tar.gz", "w:gz") as tar:  # logs, metrics, events, memory dumps
        for p in sorted((work / "runs").glob("*")):
            if p.is_file():
                tar.add(p, arcname=f"runs/{p.name}")
            else:
                for f in ("metrics.jsonl", "events.jsonl"):
                    if (p / f).exists():
                        tar.add(p / f, arcname=f"runs/{p.name}/{f}")
                for f in p.glob("checkpoints/step-*/optimizer.json"):
                    tar.add(f, arcname=f"runs/{p.name}/{f.parent.name}-optimizer.json")
    print("\n" + "card | cap | plan (as run) | alloc | reserved | tok/s | exit | fit")
    for r in report["runs"]:
        print(summary_line(r) if "cap_gib" in r else f"{r['name']:<14} skipped: {r['skipped']}")
    print(f"\nwrote {out / a.result} ({report['total_s']} s)", flush=True)


if __name__ == "__main__":
    main()
