"""What the memory model and the FLOP count need to know about an architecture: a ModelShape.

`shape_from_config` counts parameters exactly (the model built on the meta device: no memory, no weights);
`llama_shape` counts a Llama-style decoder from the config's dimensions alone (no transformers import needed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainer.errors import ConfigError


@dataclass(frozen=True)
class LinearShape:
    name: str  # relative to the decoder layer, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about an architecture."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    layer_linears: tuple[LinearShape, ...]  # the nn.Linear layers of one decoder layer
    params_total: int
    params_embedding: int  # input embeddings plus an untied lm_head
    params_layer_linear: int  # every nn.Linear inside the decoder layers (what bitsandbytes quantizes)

    @property
    def params_other(self) -> int:
        """Norms, biases and anything else that is neither embedding nor a decoder linear."""
        return self.params_total - self.params_embedding - self.params_layer_linear

    @property
    def params_matmul(self) -> int:
        """Parameters that take part in a matrix product per token (everything but the embedding lookup)."""
        return self.params_total - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)

    @property
    def attention_width(self) -> int:
        """Query heads x head size: the width of attention's score and mixing products."""
        return self.num_heads * self.head_dim


def shape_from_config(config, name: str = "model") -> ModelShape:
    """Count parameters exactly by building the model on the meta device (no memory, no weights)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture transformers cannot build here: count a Llama-style layer instead
        return llama_shape(config, name)
    layers = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    linears = tuple(
        LinearShape(n, m.in_features, m.out_features) for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)
    )
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    if out is not None and not tied:
        embedding += out.weight.numel()
    layer_linear = sum(
        p.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear) for p in m.parameters()
    )
    return _shape(config, name, linears, total, embedding, layer_linear, tied)


def _dims(config) -> tuple[int, int, int, int, int, int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    d = getattr(text, "head_dim", None) or h // heads
    inter = getattr(text, "intermediate_size", None) or 4 * h
    return h, text.num_hidden_layers, heads, kv, d, inter, text.vocab_size


def _shape(config, name, linears, total, embedding, layer_linear, tied) -> ModelShape:
    h, layers, heads, kv, d, inter, vocab = _dims(config)
    return ModelShape(
        name=name,
        hidden_size=h,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=d,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        layer_linears=linears,
        params_total=total,
        params_embedding=embedding,
        params_layer_linear=layer_linear,
    )


def llama_shape(config, name: str = "model") -> ModelShape:
    """A Llama-style decoder (q/k/v/o, gated MLP, two RMSNorms a layer, no biases) from the config's dimensions:
    any object with hidden_size, num_hidden_layers, num_attention_heads, vocab_size (and optionally
    num_key_value_heads, head_dim, intermediate_size, tie_word_embeddings)."""
    h, layers, heads, kv, d, inter, vocab = _dims(config)
    linears = (
        LinearShape("self_attn.q_proj", h, heads * d),
        LinearShape("self_attn.k_proj", h, kv * d),
        LinearShape("self_attn.v_proj", h, kv * d),
        LinearShape("self_attn.o_proj", heads * d, h),
        LinearShape("mlp.gate_proj", h, inter),
        LinearShape("mlp.up_proj", h, inter),
        LinearShape("mlp.down_proj", inter, h),
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    layer_linear = layers * sum(lin.in_features * lin.out_features for lin in linears)
    embedding = vocab * h * (1 if tied else 2)
    total = layer_linear + embedding + layers * 2 * h + h
    return _shape(config, name, linears, total, embedding, layer_linear, tied)


def target_linears(shape: ModelShape, targets: str | tuple[str, ...] | list[str]) -> list[LinearShape]:
    """The decoder linears that LoRA adapts, matched as peft does (all-linear, suffix names, or a regex)."""
    if targets == "all-linear":
        return list(shape.layer_linears)
    if isinstance(targets, str):
        pattern = re.compile(targets)
        found = [
            lin
            for lin in shape.layer_linears
            if pattern.fullmatch(lin.name) or pattern.fullmatch(f"model.layers.0.{lin.name}")
        ]
    else:
        found = [
            lin for lin in shape.layer_linears if any(lin.name == t or lin.name.endswith("." + t) for t in targets)
        ]
    if not found:
        names = ", ".join(lin.name.rsplit(".", 1)[-1] for lin in shape.layer_linears)
        raise ConfigError(
            f"lora.target_modules {targets!r}: matches no linear layer of {shape.name}; "
            f"its linear layers are {names} (or use all-linear)"
        )
    return found
