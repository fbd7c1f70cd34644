"""The one FLOP count per trained token: plan's time estimate and scripts/bench.py's MFU/HFU both use it.

Per token, N = parameters in matrix products (every weight but the embedding lookup; lm_head included),
P = trainable LoRA adapter parameters, A = causal attention's forward (scores and mixing: 2 x layers x query
width x attention length, the length being the row length for padded rows or E[len^2]/E[len] for documents
attended one by one):
  full fine-tuning: 3 x forward = 6N + 3A (forward, input gradients, weight gradients)
  LoRA / QLoRA: frozen base 4N (forward 2N + input gradients 2N, no weight gradients) + 3A + adapters 6P
  model FLOPs (MFU) stop there; hardware FLOPs (HFU) add what gradient checkpointing recomputes: one forward
  of each checkpointed decoder layer, 2 x (decoder linears + adapters) + A, times the checkpointed fraction
  (lm_head and the loss sit outside the layers and are not recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.plan.memory import ModelShape, TrainingSetup, lora_params


@dataclass(frozen=True)
class TokenFlops:
    model: float  # the math of one training step per token (MFU counts these)
    hardware: float  # model FLOPs plus the recompute of checkpointed layers (HFU; what the GPU executes)


def token_flops(
    *,
    matmul_params: float,
    layer_params: float,
    num_layers: int,
    attention_width: int,
    attention_len: float,
    full: bool,
    adapter_params: float = 0,
    ckpt_fraction: float = 0.0,
) -> TokenFlops:
    """FLOPs per token from the counts (see the module doc); layer_params: the decoder layers' linear weights."""
    attn = 2 * num_layers * attention_width * attention_len
    forward = 2 * matmul_params + attn
    if full:
        model = 3 * forward
    else:
        model = forward + 2 * matmul_params + 2 * attn + 6 * adapter_params
    recompute = 2 * (layer_params + adapter_params) + attn
    return TokenFlops(model=model, hardware=model + ckpt_fraction * recompute)


def shape_flops(
    shape: ModelShape, setup: TrainingSetup, attention_len: float | None = None, ckpt_fraction: float | None = None
) -> TokenFlops:
    """FLOPs per token of `setup` on `shape`: attention over setup.seq_len (padded rows) unless given, and every
    layer recomputed when setup.gradient_checkpointing unless a fraction is given."""
    full = setup.method == "full"
    return token_flops(
        matmul_params=shape.params_matmul,
        layer_params=shape.params_layer_linear,
        num_layers=shape.num_layers,
        attention_width=shape.attention_width,
        attention_len=setup.seq_len if attention_len is None else attention_len,
        full=full,
        adapter_params=0 if full else lora_params(shape, setup),
        ckpt_fraction=(1.0 if setup.gradient_checkpointing else 0.0) if ckpt_fraction is None else ckpt_fraction,
    )


def flops_per_token(shape: ModelShape, setup: TrainingSetup) -> float:
    """Training FLOPs per token as the GPU executes them (recompute included): what plan's efficiency applies to."""
    return shape_flops(shape, setup).hardware


def params_flops(params: float, method: str, gradient_checkpointing: bool) -> float:
    """The same count when only a model's parameter count is known (a measured record of another model):
    attention, adapters and lm_head unknown, so every parameter counts as a decoder-layer weight."""
    return token_flops(
        matmul_params=params,
        layer_params=params,
        num_layers=0,
        attention_width=0,
        attention_len=0,
        full=method == "full",
        ckpt_fraction=1.0 if gradient_checkpointing else 0.0,
    ).hardware
