"""Activation bytes per token per decoder layer on a GPU, against the memory model (trainer/plan/memory.py).

For each case: an 8B-shaped Llama (hidden 4096, MLP 14336, 32/8 heads, vocab 32000, random weights) with 4 and
with 2 decoder layers, built the way the trainer builds it (LoRA r16 adapters in fp32 on a bf16 base, or QLoRA on
NF4 with or without peft's fp32 upcast, with or without Liger), model.train(), one row of 4096 tokens, a bf16-autocast
forward with labels; `torch.cuda.memory_allocated` after minus before. (4 layers - 2 layers) / 2 / tokens = bytes
per token per layer, which is what `model.checkpoint_layers: auto` and `plan` count. One process a measurement.

    python scripts/measure_layer_bytes.py --out bench/results/h200-layer-bytes-2026-12-01.json   # on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `trainer` for predicted() when the project is not installed (the GPU machine)
Q4 = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name: (method, targets, dropout, liger, fp32 upcast of the non-quantized weights)
CASES = {
    "lora-qkvo-dropout": ("lora", Q4, 0.05, False, True),
    "lora-qkvo": ("lora", Q4, 0.0, False, True),
    "lora-all-liger": ("lora", "all-linear", 0.0, True, True),
    "qlora-bf16-qkvo-dropout-liger": ("qlora", Q4, 0.05, True, False),
    "qlora-bf16-qkvo-liger": ("qlora", Q4, 0.0, True, False),
    "qlora-bf16-all-liger": ("qlora", "all-linear", 0.0, True, False),
    "qlora-bf16-qkvo-dropout": ("qlora", Q4, 0.05, False, False),
    "qlora-upcast-qkvo-dropout": ("qlora", Q4, 0.05, False, True),
    "qlora-upcast-all-dropout": ("qlora", "all-linear", 0.05, False, True),
    "qlora-upcast-qkvo": ("qlora", Q4, 0.0, False, True),
    "qlora-upcast-qkvo-dropout-liger": ("qlora", Q4, 0.05, True, True),
}
SHAPE = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
TOKENS = 4096


def measure(case: str, layers: int) -> int:
    """Bytes allocated by one forward (what autograd keeps for backward) with `layers` decoder layers."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from trainer import speed

    method, targets, dropout, liger, upcast = CASES[case]
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    if method == "lora":
        with torch.device("cuda"):  # random init on the GPU: on the CPU it takes longer than the forward
            model = LlamaForCausalLM(config).to(torch.bfloat16)
    else:
        with tempfile.TemporaryDirectory() as d:  # quantized as the trainer loads a base: from a saved model
            with torch.device("cuda"):
                LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(d)
            q = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            model = AutoModelForCausalLM.from_pretrained(
                d, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}
            )
    model.config.use_cache = False
    if liger:
        speed.apply_liger(model)
    if method == "qlora" and upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif method == "qlora":
        speed.prepare_kbit_bf16(model, False, {})
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    ids = torch.randint(0, SHAPE["vocab_size"], (1, TOKENS), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    del out
    return kept


def predicted(case: str) -> int:
    """What the memory model says for the same run (the number the checkpoint-layer planner uses)."""
    from transformers import LlamaConfig

    from trainer.plan import memory

    method, targets, dropout, liger, upcast = CASES[case]
    shape = memory.llama_shape(LlamaConfig(num_hidden_layers=32, **SHAPE))
    setup = memory.TrainingSetup(
        method=method,
        seq_len=TOKENS,
        lora_r=16,
        lora_dropout=dropout,
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        repeat_kv=False,
        liger=liger,
        upcast_non_quantized=upcast,
    )
    return int(memory.layer_activation_bytes(shape, setup))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: print only)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--_one", nargs=2, metavar=("CASE", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps({"bytes": measure(args._one[0], int(args._one[1]))}))
        return 0
    import torch

    rows = []
    for case in args.cases.split(","):
        kept = {}
        for layers in (4, 2):  # one process each: nothing cached from the other measurement
            p = subprocess.run(
                [sys.executable, __file__, "--_one", case, str(layers)],
                capture_output=True,
                text=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")),
            )
            if p.returncode != 0:
                print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
                return 1
            kept[layers] = json.loads(p.stdout.strip().splitlines()[-1])["bytes"]
        per = (kept[4] - kept[2]) / 2 / TOKENS
        pred = predicted(case)
        rows.append(
            {
                "case": case,
                "method": CASES[case][0],
                "targets": CASES[case][1],
                "dropout": CASES[case][2],
                "liger": CASES[case][3],
                "fp32_upcast": CASES[case][4],
                "bytes_per_token_per_layer": round(per),
                "memory_model": pred,
                "error": round(pred / per - 1, 4),
            }
        )
        print(f"{case:34s} measured {per:9.0f}  memory model {pred:9d}  ({pred / per - 1:+.2%})", flush=True)
    result = {
        "what": "activation bytes per token per decoder layer, 8B Llama shape, 4096 tokens, bf16 autocast",
        "command": "python scripts/measure_layer_bytes.py " + " ".join(sys.argv[1:]),
        "gpu": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d"),
        "versions": _versions(),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
