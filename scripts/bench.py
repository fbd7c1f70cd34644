"""Training throughput: the seed QLoRA recipe (HF Trainer + PEFT + bitsandbytes) against spot-trainer.

Both train the same random-weight Llama shape on the same generated data, on the same GPU, in one call:
variable-length prompt/completion samples (log-normal lengths) and fixed 1024-token rows. Reports real
(non-padding) tokens/s, peak GPU memory, MFU, the ratio to the seed recipe, checkpoint stall and SIGTERM-to-commit.

  python scripts/bench.py --shape 8b --out $OUT          # on the GPU machine (device tool)
  python scripts/bench.py --shape tiny --cpu --out /tmp/b  # smoke test here, on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128256
SHAPES = {
    "8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336
    ),
    "1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA = dict(r=16, alpha=32, dropout=0.05)
PEAK_BF16 = 989.4e12  # H100/H200 SXM dense bf16 (datasheet); MFU is quoted against it
GIB = 1024**3


# ---------------------------------------------------------------- model, tokenizer, data


def build_tokenizer():
    """WordLevel over 't<id>' words, 128256 entries: token counts are exact by construction."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special)}
    vocab.update({f"t{i}": i for i in range(len(special), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=8192,
    )


def save_random_llama(cfg, path: Path, device: str) -> int:
    """A Llama of `cfg` made on `device` (meta, then empty), random normal(0, 0.02) weights with unit norms, saved as
    bf16 safetensors in `path`; its parameter count. Tied embeddings stay one tensor. (scripts/card_bench.py too.)"""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty gave the tied pair two tensors
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    n_params = sum(p.numel() for p in model.parameters())
    model.config.dtype = "bfloat16"
    model.save_pretrained(path, max_shard_size="4GB")
    return n_params


def build_model(shape: str, path: Path, device: str) -> dict:
    """Random bf16 Llama of `shape` (made on `device`, never on the CPU for big shapes), saved as safetensors."""
    from transformers import LlamaConfig

    t0 = time.time()
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        **SHAPES[shape],
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
    )
    n_params = save_random_llama(cfg, path, device)
    build_tokenizer().save_pretrained(path)
    return {"params": n_params, "seconds": round(time.time() - t0, 1)}


def sample_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sample lengths in tokens (bos and eos included): log-normal, median 250, sigma 0.7, clipped to 16..2048."""
    return np.clip(np.round(rng.lognormal(np.log(250), 0.7, n)), 16, 2048).astype(int)


def write_rows(path: Path, lengths: np.ndarray, rng: np.random.Generator) -> None:
    """prompt/completion jsonl; a row of length n tokenizes to bos + prompt + completion + eos = n tokens."""
    with open(path, "w") as f:
        for n in lengths:
            body = int(n) - 2
            p = int(np.clip(round(body * rng.uniform(0.3, 0.7)), 1, body - 1))
            ids = rng.integers(4, VOCAB, body)
            f.write(
                json.dumps(
                    {"prompt": " ".join(f"t{i}" for i in ids[:p]), "completion": " ".join(f"t{i}" for i in ids[p:])}
                )
                + "\n"
            )


def write_data(data_dir: Path, n_var: int, n_fixed: int) -> dict:
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    var = sample_lengths(rng, n_var)
    write_rows(data_dir / "var.jsonl", var, rng)
    fixed = np.full(n_fixed, 1024)
    write_rows(data_dir / "fixed.jsonl", fixed, rng)
    return {
        "var": {
            "rows": n_var,
            "tokens": int(var.sum()),
            "median": float(np.median(var)),
            "mean": round(float(var.mean()), 1),
            "max": int(var.max()),
            "sum_sq": float((var.astype(float) ** 2).sum()),
        },
        "fixed": {"rows": n_fixed, "tokens": int(fixed.sum()), "sum_sq": float((fixed.astype(float) ** 2).sum())},
    }


# ---------------------------------------------------------------- FLOPs


def model_shape(shape: str):
    """The trainer.plan ModelShape of a bench shape (a Llama decoder, untied lm_head)."""
    import types

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from trainer.plan.shape import llama_shape

    return llama_shape(types.SimpleNamespace(vocab_size=VOCAB, tie_word_embeddings=False, **SHAPES[shape]), shape)


def flops_per_token(shape: str, mean_sq_over_mean: float, ckpt_fraction: float) -> dict:
    """Per real token, trainer.plan.flops's count (plan's too) for QLoRA r16 on q/k/v/o: frozen base 4N, adapters
    6P, causal attention over documents of E[len^2]/E[len] tokens (forward 2x, backward 2x that); hardware FLOPs
    add the recompute of the checkpointed fraction of the decoder layers."""
    model = model_shape(shape)  # puts the repo on sys.path
    from trainer.plan.flops import shape_flops
    from trainer.plan.memory import TrainingSetup

    setup = TrainingSetup(method="qlora", lora_r=LORA["r"], lora_targets=tuple(TARGETS))
    f = shape_flops(model, setup, attention_len=mean_sq_over_mean, ckpt_fraction=ckpt_fraction)
    return {"model": f.model, "hardware": f.hardware}


# ---------------------------------------------------------------- the seed recipe (HF Trainer)


def informed_attention(cuda: bool) -> str:
    """The attention an informed HF user gets for padding-free rows: flash_attention_2 where the flash-attn
    package is installed, else SDPA, for which transformers builds a per-document mask from the position ids."""
    if cuda:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def seed_main(a) -> None:
    """One process: load once, train the variable then the fixed data with HF Trainer, write JSON.

    a.recipe "seed": padded micro-batches (DataCollatorForSeq2Seq). "informed": the same Trainer, LoRA, 4-bit base,
    optimizer and rows per step, padding-free (DataCollatorWithFlattening: each micro-batch one row, position ids
    restarting per document) with Liger's kernels (use_liger_kernel, on a GPU with liger-kernel installed)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    sys.path.insert(0, str(ROOT))
    from trainer.data import tokenize_row

    cuda = not a.cpu
    informed = a.recipe == "informed"
    tok = AutoTokenizer.from_pretrained(a.model)
    t0 = time.time()
    setup: dict = {"recipe": a.recipe}
    extra = {}
    if informed:
        setup["attn_implementation"] = extra["attn_implementation"] = informed_attention(cuda)
        setup["liger"] = cuda and _installed("liger-kernel")
        if not setup["liger"]:
            print(f"informed: without Liger ({'CPU' if not cuda else 'liger-kernel not installed'})", flush=True)
        print(f"informed: attention {setup['attn_implementation']}, padding-free rows", flush=True)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        a.model,
        quantization_config=q,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device_map={"": 0} if cuda else {"": "cpu"},
        **extra,
    )
    # no KV cache: with one, transformers skips the per-document mask that SDPA needs for the flattened rows
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        ),
    )
    load_s = time.time() - t0
    results = {"load_s": round(load_s, 1), "setup": setup}
    for name in a.data.split(","):
        rows = [json.loads(x) for x in open(Path(a.data_dir) / f"{name}.jsonl")]
        rows = [tokenize_row(tok, r, "completion", 4096) for r in rows]
        ds = datasets.Dataset.from_list(rows)
        if informed:  # one row per micro-batch, no padding: computed tokens = real tokens
            collate = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
        else:
            collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
        batches: list[tuple[int, int, float]] = []  # (real tokens, computed tokens, sum of squared lengths)

        def counting(features, collate=collate, batches=batches):
            lens = [len(f["input_ids"]) for f in features]
            batch = collate(features)
            batches.append((sum(lens), batch["input_ids"].numel(), float(sum(x * x for x in lens))))
            return batch

        ends: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, ends=ends, **kw):
                if cuda:
                    torch.cuda.synchronize()
                ends.append(time.time())

        args = TrainingArguments(
            output_dir=str(Path(a.work) / f"hf-{name}"),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
            max_steps=a.steps,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            bf16=cuda,
            optim="paged_adamw_8bit" if cuda else "adamw_torch",
            gradient_checkpointing=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=42,
            dataloader_num_workers=0,
            use_cpu=not cuda,
            use_liger_kernel=bool(setup.get("liger")) and not results.get("liger_applied"),
        )
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counting, callbacks=[Clock()])
        results["liger_applied"] = results.get("liger_applied") or args.use_liger_kernel  # patched once, kept
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t_start = time.time()
        trainer.train()
        w = a.warmup
        per_step = [sum(b[0] for b in batches[s * 4 : (s + 1) * 4]) for s in range(len(ends))]
        padded = [sum(b[1] for b in batches[s * 4 : (s + 1) * 4]) for s in range(len(ends))]
        sq = sum(b[2] for b in batches[w * 4 : len(ends) * 4])
        window = ends[-1] - ends[w - 1]
        real = sum(per_step[w:])
        res = {
            "steps": len(ends),
            "warmup_steps": w,
            "tokens_per_s": real / window,
            "tokens_per_step": real / (len(ends) - w),
            "padding_efficiency": real / sum(padded[w:]),
            "mean_sq_over_mean": sq / real,
            "step_s": window / (len(ends) - w),
            "first_step_s": ends[0] - t_start,
            "loss_last": [x["loss"] for x in trainer.state.log_history if "loss" in x][-1:] or None,
        }
        if cuda:
            res["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        results[name] = res
        print(
            f"{a.recipe} {name}: {res['tokens_per_s']:.0f} real tokens/s, "
            f"peak {res.get('peak_allocated_gib', 0):.2f} GiB",
            flush=True,
        )
        del trainer
        import gc

        gc.collect()
    Path(a.result).write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------- spot-trainer (its CLI, as users run it)


def spotcli_main(argv: list[str]) -> None:
    """`python -m trainer train ...` in this process, dumping CUDA peak memory at exit."""
    import atexit
    import runpy

    memfile = argv[0]

    def dump():
        import torch

        if torch.cuda.is_available():
            Path(memfile).write_text(
                json.dumps(
                    {
                        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                    }
                )
            )

    atexit.register(dump)
    sys.path.insert(0, str(ROOT))
    sys.argv = ["trainer", "train", *argv[1:]]
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)


def spot_config(a, data: str, overrides: dict) -> dict:
    cfg = {
        "model": {"name_or_path": a.model, "method": "qlora", "gradient_checkpointing": False},
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"], "target_modules": TARGETS},
        "data": {
            "path": str(Path(a.data_dir) / f"{data}.jsonl"),
            "format": "completion",
            "eval_split": None,
            "packing": True,
        },
        # fused AdamW: 13.6M LoRA parameters cost 0.1 GiB of state; (bitsandbytes 8-bit state does not fit
        # the trainer's checkpoint format yet)
        "train": {
            "max_steps": 100000,
            "optimizer": "adamw",
            "lr": 2e-4,
            "lr_scheduler": "cosine",
            "log_every_steps": 1,
            "warmup_steps": 0,
        },
        "eval": {"before_training": False, "generate": False, "every_steps": None},
        "checkpoint": {"every_steps": a.ckpt_every, "keep_last": 2},
        "preemption": {"watch": "none"},
    }
    for key, value in overrides.items():
        node = cfg
        *head, last = key.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg


def recompute_fraction(shape: str, plan: str) -> float:
    """The share of the decoder layers' forward that a checkpoint plan recomputes (for HFU), from the trainer's
    line "gradient checkpointing on N/T layers ... (whole W, attention|mlp P)": a whole layer counts 1, an
    attention or MLP part its share of the layer's linear weights (attention's own FLOPs left out)."""
    n, total = (int(x) for x in re.search(r"on (\d+)/(\d+) layers", plan).groups())
    parts = re.search(r"\(whole (\d+), (attention|mlp) (\d+)\)", plan)
    if not parts:
        return n / total
    s = SHAPES[shape]
    h, d = s["hidden_size"], s["hidden_size"] // s["num_attention_heads"]
    attn = 2 * h * h + 2 * h * s["num_key_value_heads"] * d
    mlp = 3 * h * s["intermediate_size"]
    share = (attn if parts.group(2) == "attention" else mlp) / (attn + mlp)
    return (int(parts.group(1)) + share * int(parts.group(3))) / total


def run_spot(a, name: str, data: str, overrides: dict, stop_after: int) -> dict:
    """Train with the CLI until `stop_after` steps are logged, SIGTERM it, read metrics/events/memory."""
    import yaml

    out = Path(a.work) / f"spot-{name}"
    subprocess.run(["rm", "-rf", str(out)], check=False)
    out.mkdir(parents=True)
    cfg_path = out.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(spot_config(a, data, overrides)))
    memfile, log = out.with_suffix(".mem.json"), out.with_suffix(".log")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, __file__, "_spotcli", str(memfile), str(cfg_path), "--output-dir", str(out)]
    t0 = time.time()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        metrics = out / "metrics.jsonl"
        sigterm_at = None
        while proc.poll() is None:
            if time.time() - t0 > a.run_timeout:
                break
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if len(lines) >= stop_after:
                break
            time.sleep(0.1)
        if proc.poll() is None:
            sigterm_at = time.time()
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    text = log.read_text()
    m = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    ev = (
        [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
        if (out / "events.jsonl").exists()
        else []
    )
    res = {
        "name": name,
        "data": data,
        "overrides": overrides,
        "exit_code": rc,
        "wall_s": round(time.time() - t0, 1),
        "steps": len(m),
    }
    plan = re.search(r"gradient checkpointing on (\d+)/(\d+) layers.*", text)
    res["checkpoint_plan"] = plan.group(0) if plan else None
    res["ckpt_fraction"] = (
        recompute_fraction(a.shape, plan.group(0))
        if plan
        else (1.0 if overrides.get("model.gradient_checkpointing") else 0.0)
    )
    w = a.warmup
    if len(m) > w + 1:
        window = m[-1]["time"] - m[w - 1]["time"]
        real = sum(x["tokens"] for x in m[w:])
        res.update(
            tokens_per_s=real / window,
            tokens_per_step=real / (len(m) - w),
            step_s=window / (len(m) - w),
            step_tokens_per_s_median=statistics.median(x["tokens_per_second"] for x in m[w:]),
            loss_last=m[-1]["loss"],
        )
    if memfile.exists():
        res.update(json.loads(memfile.read_text()))
    stalls = [e["stall_s"] for e in ev if e.get("event") == "checkpoint" and e.get("kind") == "periodic"]
    res["stall_s"] = stalls
    res["commit_s"] = [e["commit_s"] for e in ev if e.get("event") == "checkpoint"]
    pre = [e for e in ev if e.get("event") == "preempt"]
    if pre:
        res["stop_to_commit_s"] = pre[0]["stop_to_commit_s"]
        res["sigterm_to_commit_wall_s"] = round(pre[0]["time"] - sigterm_at, 3) if sigterm_at else None
    if rc not in (0, 75):
        res["log_tail"] = text[-3000:]
    print(
        f"spot {name}: rc {rc}, {res.get('tokens_per_s', 0):.0f} real tokens/s, "
        f"peak {res.get('peak_allocated_gib', 0):.2f} GiB, {res['checkpoint_plan']}",
        flush=True,
    )
    return res


# ---------------------------------------------------------------- kernels alone (attention, 4-bit linears)


def _time(fn, reps: int = 10, warm: int = 3) -> float:
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def micro_main(a) -> None:
    """Packed-row attention (flash varlen vs SDPA with the per-document mask) and bnb 4-bit vs bf16 linears."""
    import types

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sys.path.insert(0, str(ROOT))
    from trainer import speed

    s = SHAPES[a.shape]
    h, H, KV = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"]
    d = h // H
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    rng = np.random.default_rng(7)
    T = 2560
    lens, total = [], 0
    for n in sample_lengths(rng, 64):
        if total + n > T:
            break
        lens.append(int(n))
        total += int(n)
    lens.append(T - total)  # the rest as one more document
    pos = torch.cat([torch.arange(n) for n in lens])[None].cuda()
    mod = types.SimpleNamespace(num_key_value_groups=H // KV, is_causal=True, training=True)
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv():
        q = torch.randn(1, H, T, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(1, KV, T, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(1, KV, T, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        return q, k, v

    q, k, v = qkv()
    dout = torch.randn(1, T, H, d, device="cuda", dtype=torch.bfloat16, generator=g)
    o, _ = speed.varlen_attention(mod, q, k, v, None, position_ids=pos)
    o.backward(dout)
    got = [o.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    # reference: each document alone, fp32, plain causal SDPA
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        kk = kf[:, :, sl].repeat_interleave(H // KV, 1)
        vv = vf[:, :, sl].repeat_interleave(H // KV, 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qf[:, :, sl], kk, vv, is_causal=True))
        start += n
    ref = torch.cat(outs, 2).transpose(1, 2)
    ref.backward(dout.float())
    want = [ref.detach(), qf.grad, kf.grad, vf.grad]
    out["varlen_rel_err"] = {n: float((x - y).norm() / y.norm()) for n, x, y in zip("o dq dk dv".split(), got, want)}
    out["varlen_gqa_native"] = speed._GQA_NATIVE[0]
    mask = speed.document_mask(pos, 1)

    def run(fn):
        def step():
            q.grad = k.grad = v.grad = None
            o, _ = fn()
            o.backward(dout)

        return step

    out["attn_ms_fwd_bwd"] = {
        "flash_varlen": _time(run(lambda: speed.varlen_attention(mod, q, k, v, None, position_ids=pos))),
        "sdpa_document_mask": _time(run(lambda: sdpa_attention_forward(mod, q, k, v, mask))),
        "sdpa_causal_no_documents": _time(run(lambda: sdpa_attention_forward(mod, q, k, v, None, is_causal=True))),
    }
    out["attn_tokens"] = T
    out["attn_docs"] = len(lens)
    # bitsandbytes NF4 (double quant) vs bf16 linears of one decoder layer: forward + input gradient
    import bitsandbytes as bnb

    inter = s["intermediate_size"]
    shapes = [(h, H * d), (h, KV * d), (h, KV * d), (H * d, h), (h, inter), (h, inter), (inter, h)]
    lin = {}
    for kind in ("nf4", "bf16"):
        mods = []
        for i, o_ in shapes:
            if kind == "nf4":
                m = bnb.nn.Linear4bit(
                    i, o_, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
                )
                m.weight.data.normal_(0, 0.02)
                m = m.cuda()
            else:
                m = torch.nn.Linear(i, o_, bias=False, device="cuda", dtype=torch.bfloat16)
            m.requires_grad_(False)
            mods.append(m)
        lin[kind] = mods
    res = {}
    for tokens in (1024, 2048, 4096):
        xs = [torch.randn(tokens, i, device="cuda", dtype=torch.bfloat16, requires_grad=True) for i, _ in shapes]
        gs = [torch.randn(tokens, o_, device="cuda", dtype=torch.bfloat16) for _, o_ in shapes]
        for kind, mods in lin.items():

            def layer(mods=mods, xs=xs, gs=gs):
                for m, x, gr in zip(mods, xs, gs):
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        y = m(x)
                    y.backward(gr)

            res[f"{kind}_{tokens}"] = _time(layer)
    out["layer_linears_ms_fwd_bwd"] = res
    dq = lin["nf4"][4].weight
    out["dequant_gate_proj_ms"] = _time(lambda: bnb.functional.dequantize_4bit(dq.data, dq.quant_state))
    Path(a.result).write_text(json.dumps(out, indent=1))
    print("micro:", json.dumps(out), flush=True)


# ---------------------------------------------------------------- orchestration


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def sub(a, *args, timeout: int = 900) -> int:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, __file__, *args], env=env, cwd=ROOT, timeout=timeout).returncode


def summarize(shape: str, data_info: dict, seed: dict, spots: list[dict], informed: dict | None = None) -> list[dict]:
    """One row per run and data set; spot rows carry their ratios to the seed and to the informed setup."""
    rows = []
    informed = informed or {}
    for name in ("var", "fixed"):
        s, inf = seed.get(name), informed.get(name)
        msq = (s or inf or {}).get("mean_sq_over_mean") or data_info[name]["sum_sq"] / data_info[name]["tokens"]
        f_all = flops_per_token(shape, msq, 1.0)
        base = s["tokens_per_s"] if s else None
        mem = s.get("peak_allocated_gib") if s else None
        ibase = inf["tokens_per_s"] if inf else None
        imem = inf.get("peak_allocated_gib") if inf else None

        def ratio(x, y):
            return x / y if x and y else None

        for recipe, r in (("seed", s), ("informed", inf)):
            if not r:
                continue
            rows.append(
                dict(
                    run=f"{recipe}-{name}",
                    data=name,
                    tokens_per_s=r["tokens_per_s"],
                    peak_alloc=r.get("peak_allocated_gib"),
                    peak_res=r.get("peak_reserved_gib"),
                    mfu=r["tokens_per_s"] * f_all["model"] / PEAK_BF16,
                    hfu=r["tokens_per_s"] * f_all["hardware"] / PEAK_BF16,
                    ratio=ratio(r["tokens_per_s"], base),
                    mem_ratio=ratio(r.get("peak_allocated_gib"), mem),
                    ratio_informed=ratio(r["tokens_per_s"], ibase),
                    mem_ratio_informed=ratio(r.get("peak_allocated_gib"), imem),
                    tokens_per_step=r["tokens_per_step"],
                    ckpt="all",
                )
            )
        for r in spots:
            if r["data"] != name or "tokens_per_s" not in r:
                continue
            f = flops_per_token(shape, msq, r["ckpt_fraction"])
            rows.append(
                dict(
                    run=f"spot-{r['name']}",
                    data=name,
                    tokens_per_s=r["tokens_per_s"],
                    peak_alloc=r.get("peak_allocated_gib"),
                    peak_res=r.get("peak_reserved_gib"),
                    mfu=r["tokens_per_s"] * f["model"] / PEAK_BF16,
                    hfu=r["tokens_per_s"] * f["hardware"] / PEAK_BF16,
                    ratio=ratio(r["tokens_per_s"], base),
                    mem_ratio=ratio(r.get("peak_allocated_gib"), mem),
                    ratio_informed=ratio(r["tokens_per_s"], ibase),
                    mem_ratio_informed=ratio(r.get("peak_allocated_gib"), imem),
                    budget_gib=r["overrides"].get("model.memory_budget_gb"),
                    against=r.get("against"),
                    tokens_per_step=r["tokens_per_step"],
                    ckpt=f"{r['ckpt_fraction']:.2f}",
                    checkpoint_plan=r.get("checkpoint_plan"),
                    stall_s=max(r["stall_s"]) if r["stall_s"] else None,
                    stop_to_commit_s=r.get("stop_to_commit_s"),
                    sigterm_wall_s=r.get("sigterm_to_commit_wall_s"),
                    exit=r["exit_code"],
                )
            )
    return rows


GOAL_INFORMED = 2.5  # issue 14: >= 2.5x the informed HF setup's real tokens/s at no more than its peak memory


def against_informed(rows: list[dict]) -> list[dict]:
    """The goal line of each spot run planned under the informed setup's peak: its speed and memory ratios."""
    out = []
    for r in rows:
        if r.get("against") != "informed" or r.get("ratio_informed") is None:
            continue
        mem = r.get("mem_ratio_informed")
        met = r["ratio_informed"] >= GOAL_INFORMED and mem is not None and mem <= 1.0
        mem_text = "-" if mem is None else f"{mem:.2f}x"
        out.append(
            dict(
                run=r["run"],
                ratio=r["ratio_informed"],
                mem_ratio=mem,
                met=met,
                text=f"{r['run']}: {r['ratio_informed']:.2f}x the informed setup at {mem_text} its peak memory "
                f"(goal >= {GOAL_INFORMED}x at <= 1.00x): {'met' if met else 'not met'}",
            )
        )
    return out


def print_table(rows: list[dict]) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(
        f"{'run':<26}{'tok/s':>9}{'x seed':>8}{'x inf':>7}{'alloc GiB':>10}{'resv GiB':>9}{'x mem':>7}{'x mem inf':>10}"
        f"{'MFU':>7}{'HFU':>7}{'tok/step':>9}{'ckpt':>6}{'stall s':>8}{'stop s':>7}{'term s':>7}{'exit':>5}"
    )
    for r in rows:
        print(
            f"{r['run']:<26}{f(r['tokens_per_s'], '.0f'):>9}{f(r['ratio'], '.2f'):>8}{f(r['ratio_informed'], '.2f'):>7}"
            f"{f(r['peak_alloc'], '.2f'):>10}{f(r['peak_res'], '.2f'):>9}{f(r['mem_ratio'], '.2f'):>7}"
            f"{f(r['mem_ratio_informed'], '.2f'):>10}"
            f"{f(r['mfu'], '.1%'):>7}{f(r['hfu'], '.1%'):>7}{f(r['tokens_per_step'], '.0f'):>9}{r['ckpt']:>6}"
            f"{f(r.get('stall_s'), '.3f'):>8}{f(r.get('stop_to_commit_s'), '.2f'):>7}"
            f"{f(r.get('sigterm_wall_s'), '.2f'):>7}{str(r.get('exit', '')):>5}"
        )


def spot_runs(a, parts: set[str]) -> list[tuple[str, str, dict, str]]:
    """(name, data, config overrides, whose peak is the memory budget) of the spot-trainer runs: the budgets are
    filled in from the seed's peak, or the informed setup's for the runs that are compared at its memory."""
    var = {"data.max_length": a.var_length, "train.micro_batch_size": 1, "train.grad_accum": a.var_accum}
    fixed = {"data.max_length": 1024, "train.micro_batch_size": a.fixed_micro, "train.grad_accum": 16 // a.fixed_micro}
    runs = []
    if a.spot_at_seed:
        runs += [("var", "var", var, "seed"), ("fixed", "fixed", fixed, "seed")]
    if "informed" in parts:  # at the informed setup's peak, once per checkpoint_parts value
        for cp in a.informed_ckpt_parts.split(","):
            runs.append((f"var-inf-{cp}", "var", {**var, "model.checkpoint_parts": cp}, "informed"))
    if a.ablate:
        ablations = [
            ("var-mask-attn", "var", {**var, "model.packed_attention": "mask"}),
            ("var-no-liger", "var", {**var, "model.liger_kernels": False}),
            ("var-all-ckpt", "var", {**var, "model.checkpoint_layers": None, "model.gradient_checkpointing": True}),
        ]
        runs += [(*run, "seed") for run in ablations]
    return runs


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_spotcli":
        return spotcli_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="all", help="all | _seed | _micro | _build (internal)")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--model", default=None, help="model dir (built if missing)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--data", default="var,fixed")
    ap.add_argument("--parts", default="micro,seed,informed,spot")
    ap.add_argument("--cpu", action="store_true", help="smoke test without a GPU")
    ap.add_argument("--steps", type=int, default=8, help="seed recipe optimizer steps per data set")
    ap.add_argument("--spot-steps", type=int, default=12, help="spot-trainer steps before SIGTERM")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--ckpt-every", type=int, default=4)
    ap.add_argument("--var-length", type=int, default=5120, help="packed row length for the variable data")
    ap.add_argument("--var-accum", type=int, default=1)
    ap.add_argument("--fixed-micro", type=int, default=4)
    ap.add_argument("--var-budget", type=float, default=None, help="GiB; default: the seed's peak")
    ap.add_argument("--fixed-budget", type=float, default=None, help="GiB; default: 0.7 x the seed's peak")
    ap.add_argument("--ablate", action="store_true", help="also spot runs with one speed feature off")
    ap.add_argument(
        "--informed-ckpt-parts",
        default="layer,attention,mlp",
        help="with the informed part: a spot run at its peak memory for each model.checkpoint_parts value",
    )
    ap.add_argument(
        "--no-spot-at-seed",
        dest="spot_at_seed",
        action="store_false",
        help="leave out the spot runs at the seed's memory (var, fixed)",
    )
    ap.add_argument("--recipe", default="seed", choices=["seed", "informed"], help="(internal) the HF recipe")
    ap.add_argument("--run-timeout", type=float, default=240)
    ap.add_argument("--result", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    a.model = a.model or str(work / f"model-{a.shape}")
    a.data_dir = a.data_dir or str(work / "data")
    if a.mode == "_seed":
        return seed_main(a)
    if a.mode == "_micro":
        return micro_main(a)
    if a.mode == "_build":
        info = build_model(a.shape, Path(a.model), "cpu" if a.cpu else "cuda")
        Path(a.result).write_text(json.dumps(info))
        return
    t_all = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(a.parts.split(","))
    report: dict = {"shape": a.shape, "args": vars(a), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    import importlib.metadata as md

    report["versions"] = {
        p: md.version(p)
        for p in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel")
        if _installed(p)
    }
    if not a.cpu:  # no CUDA context in this process: the runs below get the whole GPU
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        report["device"] = q.stdout.strip()
    report["data"] = write_data(
        Path(a.data_dir), n_var=2000 if a.shape != "tiny" else 200, n_fixed=300 if a.shape != "tiny" else 40
    )
    res_file = work / "part.json"

    def save():
        report["total_s"] = round(time.time() - t_all, 1)
        (out / f"bench-{a.shape}.json").write_text(json.dumps(report, indent=1))

    if "micro" in parts and not a.cpu:
        rc = sub(a, "_micro", "--shape", a.shape, "--result", str(res_file), "--work", a.work, timeout=300)
        report["micro"] = json.loads(res_file.read_text()) if rc == 0 else {"error": rc}
        save()
    if not (Path(a.model) / "config.json").exists():
        rc = sub(
            a,
            "_build",
            "--shape",
            a.shape,
            "--model",
            a.model,
            "--result",
            str(res_file),
            "--work",
            a.work,
            *(["--cpu"] if a.cpu else []),
        )
        report["build"] = json.loads(res_file.read_text()) if rc == 0 else {"error": rc}
        print("model:", report["build"], flush=True)
    hf: dict[str, dict] = {"seed": {}, "informed": {}}
    for recipe in ("seed", "informed"):  # the HF Trainer recipes, one process each
        if recipe not in parts:
            continue
        res_file.unlink(missing_ok=True)
        rc = sub(
            a,
            "_seed",
            "--recipe",
            recipe,
            "--shape",
            a.shape,
            "--model",
            a.model,
            "--data-dir",
            a.data_dir,
            "--data",
            a.data,
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
            "--result",
            str(res_file),
            "--work",
            a.work,
            *(["--cpu"] if a.cpu else []),
        )
        hf[recipe] = json.loads(res_file.read_text()) if res_file.exists() else {"error": rc}
        report[recipe] = hf[recipe]
        save()
    seed = hf["seed"]
    spots = []
    if "spot" in parts:
        for name, data, ov, against in spot_runs(a, parts):
            if data not in a.data.split(","):
                continue
            ov = dict(ov)
            peak = (hf[against].get(data) or {}).get("peak_allocated_gib")
            if against == "informed":
                # its measured peak, rounded down: "at no more than its memory" is what the plan is given
                budget = math.floor(peak * 1000) / 1000 if peak else None
                if budget is None and not a.cpu:
                    print(f"spot {name}: skipped, the informed run measured no peak on {data}", flush=True)
                    continue
            else:
                budget = a.var_budget if data == "var" else a.fixed_budget
                if budget is None and peak:
                    budget = peak if data == "var" else 0.7 * peak
                budget = round(budget, 3) if budget else None  # GiB, like the peaks
            if budget and not a.cpu and "model.memory_budget_gb" not in ov:
                ov["model.memory_budget_gb"] = budget
            r = run_spot(a, name, data, ov, a.spot_steps)
            if r["exit_code"] not in (0, 75) and not a.cpu:  # keep the comparison: retry with the plain paths
                spots.append(r)
                safe = {**ov, "model.liger_kernels": False, "model.packed_attention": "mask"}
                r = run_spot(a, name + "-fallback", data, safe, a.spot_steps)
            r["against"] = against
            spots.append(r)
            report["spot"] = spots
            save()
    report["table"] = summarize(a.shape, report["data"], seed, spots, hf["informed"])
    report["against_informed"] = against_informed(report["table"])
    save()
    print()
    print(
        f"shape {a.shape} on {report.get('device', 'cpu')}; real tokens/s over steps after {a.warmup} warm-up "
        f"steps; MFU = model FLOPs (4N frozen + 6P LoRA + attention) / {PEAK_BF16 / 1e12:.0f} TFLOP/s"
    )
    print_table(report["table"])
    for line in report["against_informed"]:
        print(line["text"])


if __name__ == "__main__":
    main()
