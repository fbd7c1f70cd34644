"""Activation terms of the memory model: what autograd keeps per token in a Llama-style decoder layer, the head and
the loss, and the working sets of backward. Split from trainer/plan/memory.py (which re-exports them): the same
functions size `spot-trainer plan` and `model.checkpoint_layers: auto`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from trainer.plan import int8
from trainer.plan.shape import LinearShape, ModelShape, target_linears

if TYPE_CHECKING:
    from trainer.plan.memory import TrainingSetup


def layer_activation_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Bytes autograd saves per token in one decoder layer (no checkpointing).

    Per token; b = compute bytes, r = residual-stream bytes (4 when embeddings are fp32), h = hidden,
    I = intermediate, a/kv = query/kv heads of size d:
      each RMSNorm: 4h (its fp32 input) + 4 (rsqrt) [+ r*h normalized input when its weight trains];
        Liger's: r*h (its input) + 4 (fp32 rstd)
      attention (SDPA/flash): b*(a*d + 2*kv'*d + a*d) for q, k, v, out + 4a (logsumexp), kv' = a when k/v heads
        are repeated for a padded batch; o_proj's input is a view of out. eager adds (4+b)*a*s (fp32 softmax
        and its cast) and a contiguous copy of out.
      MLP: 3*b*I (gate out, SiLU out, up out) [+ b*I, down's input, when down's weight trains]; 3*r*I for
        QLoRA, whose 4-bit linears return their input's dtype; Liger's SwiGLU keeps gate and up only (2 of 3)
      full fine-tuning: the two norm outputs as linear inputs, b*h each
      QLoRA with kbit_keeps_input: each distinct input of the 4-bit linears (attention's and the MLP's normed
        input, r*h each, and down's input), o_proj's being attention's saved output already
      8-bit (LLM.int8) QLoRA: those same inputs, always (bitsandbytes' MatMul8bitLt keeps A on its ctx), and
        each int8 linear's copy of its input's outlier columns (trainer.plan.int8)
      LoRA, per adapted linear with input width n: dropout mask*n; lora_A's input, which is the fp32 dropout
        output (4n), or its bf16 autocast copy (b*n); lora_A's output (4r or b*r) for lora_B. Without dropout
        and without casts, adapters on one input share it (so do QLoRA's under autocast on a bf16 input: peft's
        4-bit LoRA layer skips its fp32 cast then).
    Measured on an H200 (torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50.2, liger-kernel 0.8.5;
    allocated bytes after the forward, 4 minus 2 layers of an 8B-shaped Llama, 4096 tokens): LoRA and QLoRA,
    with and without Liger and dropout, bf16-frozen and fp32-upcast QLoRA, within 0.4% of this count.
    """
    return sum(layer_region_bytes(shape, setup).values())


# where each linear's input comes from -> the part of the layer that saves it
_REGION_OF = {"attn_in": "attention", "attn_out": "attention", "mlp_in": "mlp", "mlp_act": "mlp"}
CHECKPOINT_PARTS = ("layer", "attention", "mlp")  # model.checkpoint_parts; attention/mlp: that submodule only


def layer_region_bytes(shape: ModelShape, setup: TrainingSetup) -> dict[str, float]:
    """layer_activation_bytes by the part of the layer that saves it: "norms" (both RMSNorms), "attention"
    (self_attn from its normed input on: q/k/v/o, the attention kernel, their adapters), "mlp" (the MLP and its
    adapters) and "int8" (LLM.int8's outlier columns); the terms are the ones in layer_activation_bytes' doc."""
    s, b, h, inter = setup.seq_len, setup.compute_bytes, shape.hidden_size, shape.intermediate_size
    rb = setup.residual_bytes
    ad, kvd = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    full = setup.method == "full"
    eager = setup.attention == "eager"
    kv_width = ad if (setup.repeat_kv or eager) else kvd
    norm = rb * h + 4 if setup.liger else 4 * h + 4 + (rb * h if full else 0)
    region = {"norms": 2.0 * norm, "attention": 0.0, "mlp": 0.0, "int8": 0.0}
    region["attention"] += b * (2 * ad + 2 * kv_width) + 4 * shape.num_heads
    if eager:
        region["attention"] += (4 + b) * shape.num_heads * s + (b * ad if full else 0)
    # bitsandbytes casts a 4-bit linear's output back to its input's dtype: fp32 residual -> fp32 MLP tensors
    mb = rb if setup.method == "qlora" else b
    region["mlp"] += (2 if setup.liger else 3) * mb * inter
    if full:
        region["attention"] += b * h
        region["mlp"] += b * h + b * inter
        return region

    width = {_input_of(lin, shape): lin.in_features for lin in shape.layer_linears}

    def input_bytes(source: str) -> int:
        return _input_bytes(source, setup)

    kept = set()  # inputs held for the k-bit linears' backward
    if setup.method == "qlora" and (setup.kbit_keeps_input or setup.int8):
        kept = set(width) - {"attn_out"}  # out: saved by SDPA
        for source in kept:
            region[_REGION_OF[source]] += input_bytes(source) * width[source]
    if setup.int8:
        region["int8"] += int8.outlier_bytes(shape, setup, lambda lin: input_bytes(_input_of(lin, shape)))
    ab = b if setup.amp else setup.adapter_bytes  # what lora_A saves: autocast re-casts its input to bf16
    shared_inputs = set()
    for lin in target_linears(shape, setup.lora_targets):
        n, source = lin.in_features, _input_of(lin, shape)
        own = 0
        if setup.lora_dropout > 0:
            own += setup.dropout_mask_bytes * n + ab * n
        elif setup.amp and setup.method == "qlora" and input_bytes(source) == b:
            shared_inputs.add(source)  # peft's 4-bit LoRA layer skips its fp32 cast under autocast: x itself
        elif setup.amp or input_bytes(source) != setup.adapter_bytes:
            own += ab * n  # a cast of its own per adapter
        else:
            shared_inputs.add(source)
        region[_REGION_OF[source]] += own + ab * setup.lora_r
    shared_inputs -= kept | {"attn_out"}  # out: saved by SDPA
    for source in shared_inputs:
        region[_REGION_OF[source]] += input_bytes(source) * width[source]
    return region


def part_checkpointed_layer_bytes(shape: ModelShape, setup: TrainingSetup, part: str) -> float:
    """Per token, what a decoder layer keeps when only its `part` ("attention": self_attn, "mlp": the MLP) is
    checkpointed: the rest of the layer as saved without checkpointing, plus the part's input (its normed input,
    which the checkpoint holds for the recompute); "layer" is checkpointed_layer_bytes."""
    if part == "layer":
        return checkpointed_layer_bytes(shape, setup)
    if part not in CHECKPOINT_PARTS:
        raise ValueError(f"checkpoint part {part!r}: one of {', '.join(CHECKPOINT_PARTS)}")
    if setup.int8:  # bitsandbytes holds the int8 linears' inputs on the node, out of a checkpoint's reach
        raise ValueError("checkpointing part of a layer is not modelled for an LLM.int8 base; use layer")
    region = layer_region_bytes(shape, setup)
    source = "attn_in" if part == "attention" else "mlp_in"
    return sum(region.values()) - region[part] + _input_bytes(source, setup) * shape.hidden_size


def _input_bytes(source: str, setup: TrainingSetup) -> int:
    """Bytes per element of what a decoder linear reads: the normed inputs are in the residual stream's dtype,
    attention's output in the compute dtype, the MLP activation in the MLP's (QLoRA: its input's, as
    bitsandbytes casts a k-bit linear's output back to its input's dtype)."""
    if source in ("attn_in", "mlp_in"):
        return setup.residual_bytes
    if source == "mlp_act" and setup.method == "qlora":
        return setup.residual_bytes
    return setup.compute_bytes


def _input_of(lin: LinearShape, shape: ModelShape) -> str:
    """Which tensor a decoder linear reads: attention's or the MLP's normed input, attention's output (the last
    attention linear back to hidden: o_proj, even where q_proj is hidden x hidden too), or the MLP activation."""
    attn = [x for x in shape.layer_linears if "attn" in x.name]
    if lin in attn and lin == next((x for x in reversed(attn) if x.out_features == shape.hidden_size), None):
        return "attn_out"
    if lin.in_features == shape.intermediate_size and lin.in_features != shape.hidden_size:
        return "mlp_act"
    return "attn_in" if "attn" in lin.name else "mlp_in"


def head_activation_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Bytes saved per token outside the decoder layers: the final norm, what the loss keeps, labels and positions.

    Unfused loss: the final RMSNorm as in a layer [+ its normalized input and lm_head's input when they train]
    and cross-entropy's fp32 log-softmax (4 B per vocabulary entry). Liger: its RMSNorm, and the fused linear
    cross-entropy's fp32 gradient of its input (4h), computed in the forward chunk by chunk.
    """
    b, h, rb = setup.compute_bytes, shape.hidden_size, setup.residual_bytes
    if setup.liger:
        return rb * h + 4 + 4 * h + 16
    full = setup.method == "full"
    final_norm = 4 * h + 4 + ((rb + b) * h if full else 0)  # normalized input and lm_head's input when they train
    log_softmax = 4 * shape.vocab_size  # cross-entropy keeps its fp32 log-softmax output
    return final_norm + log_softmax + 16  # 16: labels and position ids (int64)


def saved_activation_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Everything autograd holds at the end of the forward pass, micro-batch and sequence included."""
    tokens = setup.micro_batch_size * setup.seq_len
    if setup.gradient_checkpointing:
        layers = shape.num_layers * checkpointed_layer_bytes(shape, setup)  # the rest is recomputed in backward
    else:
        layers = shape.num_layers * layer_activation_bytes(shape, setup)
    return tokens * (layers + head_activation_bytes(shape, setup))


def checkpointed_layer_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Per token, what a checkpointed decoder layer keeps: its input (the residual stream). An LLM.int8 layer
    keeps the input of each of its int8 linears as well, attention's output included, and their outlier columns:
    bitsandbytes holds them on the autograd node, where checkpointing does not reach (trainer.plan.int8)."""
    own = setup.residual_bytes * shape.hidden_size
    if not setup.int8:
        return own
    inputs = {_input_of(lin, shape): lin.in_features for lin in shape.layer_linears}
    own += sum(_input_bytes(source, setup) * n for source, n in inputs.items())
    return own + int8.outlier_bytes(shape, setup, lambda lin: _input_bytes(_input_of(lin, shape), setup))


def logits_dtype_bytes(setup: TrainingSetup) -> int:
    """accelerate converts autocast outputs to fp32; without it the logits take lm_head's dtype."""
    return 4 if setup.amp else setup.weight_bytes


def liger_loss_chunk(tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Rows per chunk of Liger's fused linear cross-entropy: a power of two near tokens / (vocab / hidden)."""
    return 1 << max(0, math.ceil(math.log2(max(1, tokens // max(1, vocab_size // hidden_size)))))


def logits_working_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Loss working set beyond the saved log-softmax, at the start of backward (unfused HF loss).

    The model output keeps the logits (2 or 4 B per token and vocab entry); log-softmax backward holds the
    incoming gradient and its result (4 + 4); the saved log-softmax (4) is counted with the activations.
    Liger's fused loss instead holds one chunk's fp32 logits and their gradient, in the forward.
    """
    tokens = setup.micro_batch_size * setup.seq_len
    if setup.liger:
        return 2 * liger_loss_chunk(tokens, shape.vocab_size, shape.hidden_size) * shape.vocab_size * 4
    return tokens * shape.vocab_size * (logits_dtype_bytes(setup) + 8)


def backward_working_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Gradients in flight inside one layer's backward, plus that layer's recomputed activations; an LLM.int8
    layer adds its largest int8 linear's temporaries (the weight dequantized for the input's gradient)."""
    tokens = setup.micro_batch_size * setup.seq_len
    work = tokens * setup.compute_bytes * (2 * shape.hidden_size + 2 * shape.intermediate_size)
    if setup.gradient_checkpointing:
        work += tokens * layer_activation_bytes(shape, setup)
    if setup.int8:
        work += int8.transient_bytes(shape, setup, lambda lin: _input_bytes(_input_of(lin, shape), setup))
    return work
