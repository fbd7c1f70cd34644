"""The memory model of an 8-bit (LLM.int8) base against bitsandbytes' own MatMul8bitLt, run on the CPU.

bitsandbytes picks its CPU-only MatMul8bitFp when training on a CPU; the tests call MatMul8bitLt, the function a
CUDA run uses, through its device-agnostic Python (the int8 ops have default CPU kernels).
"""

from __future__ import annotations

from dataclasses import replace

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from trainer import speed
from trainer.config.loader import load_config
from trainer.plan import int8, memory
from trainer.plan.planner import make_plan, model_config

GIB = 1024**3
TINY = dict(
    hidden_size=48,
    intermediate_size=136,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


@pytest.fixture
def lt_matmul(monkeypatch):
    """Linear8bitLt calls bnb.matmul, which picks MatMul8bitFp on a CPU: take the CUDA path's function."""
    monkeypatch.setattr(
        bnb,
        "matmul",
        lambda A, B, out=None, state=None, threshold=0.0, bias=None: MatMul8bitLt.apply(A, B, out, bias, state),
    )


def int8_lora_model(dropout: float, ckpt: bool):
    """A tiny fp16 Llama whose decoder linears are LLM.int8 Linear8bitLt, LoRA r4 on q/v, as trainer.model builds it
    (frozen base, inputs that carry gradients, torch's non-reentrant checkpointing)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.float16)
    model.config._attn_implementation = "sdpa"
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, lin in list(block.named_children()):
                if isinstance(lin, nn.Linear):
                    q = bnb.nn.Linear8bitLt(
                        lin.in_features, lin.out_features, bias=False, has_fp16_weights=False, threshold=6.0
                    )
                    q.weight = bnb.nn.Int8Params(
                        lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False
                    ).cpu()
                    setattr(block, name, q)
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    )
    model.enable_input_require_grads()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def kept_bytes(model, tokens: torch.Tensor) -> tuple[int, int]:
    """(bytes autograd's saved-tensor hooks see, bytes held for backward in all): the second adds what
    MatMul8bitLt keeps on its ctx (ctx.tensors), which the hooks (and so checkpointing) never see."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(input_ids=tokens, labels=tokens).loss
    hooked = sum(seen.values())
    stack, visited = [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        if type(fn).__name__ == "MatMul8bitLtBackward":
            for t in fn.tensors:
                if t is not None:
                    keep(t)
        stack.extend(f for f, _ in fn.next_functions)
    return hooked, sum(seen.values())


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_int8_activations_match_what_bitsandbytes_keeps(lt_matmul, dropout, ckpt):
    model = int8_lora_model(dropout, ckpt)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 24))
    hooked, kept = kept_bytes(model, tokens)
    assert kept > hooked  # the int8 linears' inputs are held outside autograd's saved tensors
    setup = memory.TrainingSetup(
        method="qlora",
        quant_bits=8,
        micro_batch_size=2,
        seq_len=24,
        lora_r=4,
        lora_targets=("q_proj", "v_proj"),
        lora_dropout=dropout,
        gradient_checkpointing=ckpt,
        # CPU specifics: no autocast, so peft casts the adapters' input to fp32 and dropout keeps an fp32 mask
        autocast=False,
        upcast_non_quantized=False,
        repeat_kv=False,
        dropout_mask_bytes=4,
    )
    predicted = memory.saved_activation_bytes(memory.shape_from_config(LlamaConfig(**TINY)), setup)
    # within 3%: the model also counts outlier columns (1% of each input, ceil), which this random model lacks
    assert abs(predicted - kept) / kept < 0.03, (predicted, kept, hooked)


class _Outputs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((tuple(t.shape), t.dtype))
        return out


def test_int8_backward_dequantizes_the_whole_weight():
    """The backward term of trainer.plan.int8: the input's gradient goes through the weight dequantized to the
    input's dtype, out x in, and that is the largest temporary for a weight larger than the micro-batch."""
    torch.manual_seed(0)
    n, m, tokens = 64, 96, 8
    state = MatmulLtState()
    state.CB, state.SCB, _ = bnb.functional.int8_vectorwise_quant(torch.randn(m, n, dtype=torch.float16))
    state.threshold, state.has_fp16_weights, state.is_training = 6.0, False, True
    x = torch.randn(tokens, n, dtype=torch.float16, requires_grad=True)
    out = MatMul8bitLt.apply(x, state.CB, None, None, state)
    with _Outputs() as seen:
        out.backward(torch.ones_like(out))
    assert ((m, n), torch.float16) in seen.seen
    lin = memory.LinearShape("mlp.up_proj", n, m)
    assert (
        int8.linear_transient_bytes(lin, tokens, 2, fp16=True) == m * n * 2 + 4 * m
    )  # the dequantized weight dominates


def test_int8_terms_are_all_that_separates_it_from_4bit():
    """4-bit numbers stay those the H100/H200 tests calibrate; 8-bit adds exactly the int8 terms."""
    shape = memory.llama_shape(LlamaConfig(**{**TINY, "hidden_size": 4096, "intermediate_size": 14336}))
    four = memory.TrainingSetup(method="qlora", seq_len=2048, lora_r=8, lora_targets=("q_proj", "v_proj"))
    eight = replace(four, quant_bits=8)
    assert not four.int8 and eight.int8
    kept_4bit = memory.layer_activation_bytes(shape, replace(four, kbit_keeps_input=True))

    # peft's fp32 upcast (the default): fp32 residual stream, so fp32 linear inputs; attention's output is bf16
    def input_bytes(lin):
        return 2 if lin.name == "self_attn.o_proj" else 4

    outliers = int8.outlier_bytes(shape, eight, input_bytes)
    assert memory.layer_activation_bytes(shape, eight) == kept_4bit + outliers
    h, inter, ad = shape.hidden_size, shape.intermediate_size, shape.attention_width
    # a checkpointed layer: its input, and what its int8 linears keep (attention's output is o_proj's input)
    assert memory.checkpointed_layer_bytes(shape, four) == 4 * h
    assert memory.checkpointed_layer_bytes(shape, eight) == 4 * h + 4 * h + 2 * ad + 4 * h + 4 * inter + outliers
    ckpt4, ckpt8 = replace(four, gradient_checkpointing=True), replace(eight, gradient_checkpointing=True)
    transient = int8.transient_bytes(shape, eight, input_bytes)
    extra_recompute = 2048 * (memory.layer_activation_bytes(shape, eight) - memory.layer_activation_bytes(shape, four))
    assert memory.backward_working_bytes(shape, ckpt8) == (
        memory.backward_working_bytes(shape, ckpt4) + extra_recompute + transient
    )
    assert transient == 14336 * 4096 * 4 + 4 * 14336  # fp32 input: an MLP weight dequantized to fp32


# Reported from the GPU (issue 16): the T4 recipe (8-bit base, LoRA r8 q/v, fp16, 2048-token packed rows,
# micro-batch 1) under a 16 GiB cap with model.memory_budget_gb 15.5 ran out of memory in its first step, with
# checkpoint_layers auto having planned 18 of 32 layers. The GPU path there: no Liger kernels, no fp32 upcast
# (kbit_bf16_frozen auto), packed rows through the mask for Mistral's sliding window.
@pytest.mark.parametrize("model", ["meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1"])
def test_t4_recipe_checkpoints_more_layers_than_the_run_that_ran_out(model):
    cfg = load_config("llama2-7b-int8-t4", [f"model.name_or_path={model}", "model.memory_budget_gb=15.5"])
    shape, setup = speed.run_setup(cfg, model_config(cfg), liger=False, upcast_kbit=False, varlen=False)
    assert setup.int8 and setup.compute_bytes == 2 and setup.seq_len == 2048 and setup.micro_batch_size == 1
    est = memory.estimate_memory(shape, setup)
    cp = speed.plan_checkpoint_layers(
        shape,
        setup,
        free_bytes=130 * GIB,  # the cap is a memory fraction: torch.cuda.mem_get_info still sees the whole H200
        reserved_bytes=0,
        allocated_bytes=int(est.get("weights") + est.get("adapters")),
        budget_gb=cfg.model.memory_budget_gb,
    )
    assert cp.layers > 18, cp.describe()
    assert make_plan(cfg, gpu="T4").setup == setup  # and `plan` models the very same run
