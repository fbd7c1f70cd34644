"""Speed features for GPU runs: Liger kernels, per-document flash attention for packed rows, QLoRA without fp32
upcasts, and gradient checkpointing on only as many layers as the GPU memory needs.

Each feature is a config key under `model:` whose "auto" means: on where it is known to be safe and faster (a CUDA
GPU, a supported architecture), off elsewhere. On the CPU every "auto" is off, so CPU runs are unchanged.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

VARLEN = "spot_varlen"  # the attention implementation name registered with transformers
GIB = 1024**3
# Architectures whose attention is plain causal self-attention (no sliding window, no softcap, no sinks):
# per-document flash attention computes exactly what the per-document mask computes for them.
VARLEN_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
# Activation bytes that each un-checkpointed decoder layer holds per token come from trainer.plan.memory (the
# model `spot-trainer plan` uses); the factor keeps a margin for allocator rounding.
SAFETY = 1.15


def _auto(value, on_gpu: bool) -> bool:
    return on_gpu if value == "auto" else bool(value)


# ---------------------------------------------------------------- Liger kernels


def use_liger(cfg, device: torch.device) -> bool:
    """True when Liger kernels should be applied (config `model.liger_kernels`)."""
    want = getattr(cfg.model, "liger_kernels", False)
    # auto: adapters on a frozen bf16/4-bit base only; full fine-tuning keeps fp32 master weights that the
    # fused kernels were not checked with here
    if not _auto(want, device.type == "cuda" and cfg.model.method in ("lora", "qlora")):
        return False
    if device.type != "cuda":
        log.warning("model.liger_kernels: Liger kernels need a CUDA GPU; running without them")
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        if want is True:
            log.warning(
                "model.liger_kernels: liger-kernel is not installed (pip install liger-kernel); running without it"
            )
        return False
    return True


def apply_liger(model) -> bool:
    """Patch RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy (no full-vocabulary logits) into `model`."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.info("liger-kernel has no kernels for model type %s; running without them", model_type)
        return False
    _apply_liger_kernel_to_instance(model=model)
    return True


# ---------------------------------------------------------------- per-document flash attention


def use_varlen(cfg, device: torch.device, get_model_config) -> bool:
    """True when packed rows should attend per document through flash varlen (config `model.packed_attention`)."""
    want = getattr(cfg.model, "packed_attention", "mask")
    if want == "mask" or not cfg.data.packing or device.type != "cuda":
        return False
    model_config = get_model_config()
    ok = (
        getattr(model_config, "model_type", None) in VARLEN_MODEL_TYPES
        and not getattr(model_config, "sliding_window", None)
        and not getattr(model_config, "use_sliding_window", False)
        and not getattr(model_config, "attention_dropout", 0.0)
    )
    if not ok:
        if want == "varlen":
            log.warning(
                "model.packed_attention varlen: model type %s is not supported; using the per-document mask",
                getattr(model_config, "model_type", None),
            )
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):  # torch's flash kernels need Ampere or newer (not a T4)
        if want == "varlen":
            log.warning("model.packed_attention varlen: a GPU before Ampere has no flash attention; using the mask")
        return False
    return hasattr(torch.ops.aten, "_flash_attention_forward")


class _FlashVarlen(torch.autograd.Function):
    """Causal flash attention over documents laid end to end: (T, H, D) tensors, cumulative lengths `cu`."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len: int, scale: float):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            cu,
            cu,
            ctx.max_len,
            ctx.max_len,
            0.0,
            True,
            seed,
            offset,
            scale=ctx.scale,
        )
        return dq, dk, dv, None, None, None


def document_bounds(position_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """(cumulative document lengths as int32, longest document) of rows flattened end to end.

    A document starts at each row start and wherever the position does not follow the previous one by 1, as in
    transformers' packed-sequence detection; padding (position 0) is thus a run of one-token documents.
    """
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    seq = pos.shape[1]
    flat = pos.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1] + 1
    start[::seq] = True
    idx = torch.nonzero(start).flatten()
    cu = torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def document_mask(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, 1, S, S) boolean mask: causal within each document, nothing across documents."""
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    doc = start.cumsum(-1)
    seq = pos.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=pos.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def _bounds_cached(position_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    # every layer (and the checkpoint recompute) gets the same position_ids object: compute the bounds once
    # per batch, keyed on the object itself so a new batch in reused memory can never see stale bounds
    cached = getattr(position_ids, "_spot_doc_bounds", None)
    if cached is None or cached[0] != batch:
        cached = (batch, *document_bounds(position_ids, batch))
        position_ids._spot_doc_bounds = cached
    return cached[1], cached[2]


_GQA_NATIVE = [True]  # flipped once if this torch's flash kernel refuses fewer KV heads than query heads


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: flash varlen for full, unmasked self-attention; SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, hq, s, d = query.shape
    if query.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")  # what SDPA would compute in under autocast as well
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if dropout or query.dtype not in (torch.float16, torch.bfloat16) or not query.is_cuda:
        # no flash kernel for this case: SDPA with the per-document mask (never plain causal across documents)
        mask = document_mask(position_ids, b)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    hk = key.shape[1]
    cu, max_len = _bounds_cached(position_ids, b)
    q = query.transpose(1, 2).reshape(b * s, hq, d)
    k = key.transpose(1, 2).reshape(b * s, hk, d)
    v = value.transpose(1, 2).reshape(b * s, hk, d)
    scale = scaling if scaling is not None else d**-0.5
    if hk != hq and _GQA_NATIVE[0]:
        try:
            out = _FlashVarlen.apply(q, k, v, cu, max_len, scale)
            return out.view(b, s, hq, d), None
        except RuntimeError as e:
            log.info("flash varlen without native grouped-query support (%s); repeating KV heads", e)
            _GQA_NATIVE[0] = False
    if hk != hq:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    out = _FlashVarlen.apply(q, k, v, cu, max_len, scale)
    return out.view(b, s, hq, d), None


def varlen_mask(*args, **kwargs):
    """Mask interface for VARLEN: None (attention follows position_ids) unless padding or a cache needs a mask."""
    from transformers.masking_utils import sdpa_mask

    mask = kwargs.get("attention_mask")
    cache_position = kwargs.get("cache_position")
    q_len = kwargs.get("q_length", cache_position.shape[0] if cache_position is not None else None)
    kv_len = kwargs.get("kv_length")
    if q_len is not None and q_len == kv_len and not kwargs.get("local_size") and (mask is None or bool(mask.all())):
        return None
    return sdpa_mask(*args, **kwargs)


def register_varlen() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    return VARLEN


# ---------------------------------------------------------------- QLoRA without fp32 copies


def upcast_kbit(cfg, device: torch.device) -> bool:
    """peft's prepare_model_for_kbit_training keeps fp32 copies of norms, embeddings and lm_head; on a GPU with
    bf16 autocast they cost ~2 GiB on an 8B model and a cast per step, while norms compute in fp32 anyway."""
    return not _auto(getattr(cfg.model, "kbit_bf16_frozen", False), device.type == "cuda")


def prepare_kbit_bf16(model, gradient_checkpointing: bool, gc_kwargs: dict) -> None:
    """prepare_model_for_kbit_training without the fp32 upcast: freeze, checkpoint, inputs that carry grads."""
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()


# ---------------------------------------------------------------- gradient checkpointing from free memory


@dataclass
class CheckpointPlan:
    layers: int  # decoder layers that recompute their activations in backward
    total: int
    tokens: int  # tokens per micro-batch the plan was made for
    layer_bytes_per_token: float  # trainer.plan.memory.layer_activation_bytes of the run's setup
    budget_bytes: int
    parts: str = "layer"  # model.checkpoint_parts: what a checkpointed layer recomputes
    whole: int | None = None  # of `layers`, how many (the first) recompute the whole layer; None: all of them

    @property
    def whole_layers(self) -> int:
        return self.layers if self.parts == "layer" or self.whole is None else self.whole

    def describe(self) -> str:
        split = (
            ""
            if self.parts == "layer"
            else f" (whole {self.whole_layers}, {self.parts} {self.layers - self.whole_layers})"
        )
        return (
            f"gradient checkpointing on {self.layers}/{self.total} layers for {self.tokens} tokens per "
            f"micro-batch ({self.layer_bytes_per_token / 1024:.0f} KiB/token/layer, budget "
            f"{self.budget_bytes / GIB:.1f} GiB){split}"
        )


def layer_bytes_per_token(model_config, lora_targets, lora_dropout: float, liger: bool, method: str) -> float:
    """Activation bytes one un-checkpointed decoder layer keeps per token on the GPU path: the memory model's
    layer_activation_bytes for a bf16 run whose packed rows attend per document, QLoRA without the fp32 upcast."""
    from trainer.plan.memory import TrainingSetup, layer_activation_bytes, llama_shape

    setup = TrainingSetup(
        method=method,
        lora_targets=lora_targets if isinstance(lora_targets, str) else tuple(lora_targets),
        lora_dropout=lora_dropout,
        liger=liger,
        repeat_kv=False,
        upcast_non_quantized=False,
    )
    return layer_activation_bytes(llama_shape(model_config), setup)


def plan_checkpointing(
    n_layers: int,
    tokens: int,
    per_token_layer: float,
    budget_bytes: int,
    fixed_bytes: int,
    hidden: int,
    input_bytes: float = 2,
    *,
    parts: str = "layer",
    part_bytes_per_token: float | None = None,
) -> CheckpointPlan:
    """The fewest checkpointed layers whose activations fit `budget_bytes` after `fixed_bytes`.

    With parts attention/mlp a checkpointed layer recomputes only that part and keeps `part_bytes_per_token`;
    when every layer so checkpointed does not fit either, the first layers are checkpointed whole, fewest first."""
    per_layer = int(per_token_layer * tokens * SAFETY)
    whole = tokens * hidden * input_bytes  # a layer checkpointed whole keeps its input (hidden x input_bytes)
    part = whole if parts == "layer" else int(part_bytes_per_token * tokens * SAFETY)
    # one layer's activations are rebuilt at a time
    room = budget_bytes - fixed_bytes - per_layer
    for ckpt in range(n_layers + 1):
        if (n_layers - ckpt) * per_layer + ckpt * part <= room:
            return CheckpointPlan(ckpt, n_layers, tokens, per_token_layer, budget_bytes, parts, 0)
    if parts != "layer":
        for w in range(1, n_layers + 1):
            if w * whole + (n_layers - w) * part <= room:
                return CheckpointPlan(n_layers, n_layers, tokens, per_token_layer, budget_bytes, parts, w)
    return CheckpointPlan(n_layers, n_layers, tokens, per_token_layer, budget_bytes, parts, n_layers)


def run_setup(
    cfg, model_config, *, liger: bool, upcast_kbit: bool, varlen: bool, no_bf16: bool = False, num_gpus: int = 1
):
    """(ModelShape, TrainingSetup) of this run for trainer.plan.memory: the Config -> setup rule that
    `spot-trainer plan` uses, told what this process turned on (Liger, the fp32 upcast, per-document attention)."""
    from trainer.plan.memory import shape_from_config
    from trainer.plan.run_setup import setup_from_config

    shape = shape_from_config(model_config, cfg.model.name_or_path)
    setup = setup_from_config(
        cfg,
        num_gpus,
        liger=liger,
        upcast_kbit=upcast_kbit,
        repeat_kv=not (cfg.data.packing and varlen),
        no_bf16=no_bf16,
    )
    return shape, setup


def plan_checkpoint_layers(
    shape,
    setup,
    *,
    free_bytes: int,
    reserved_bytes: int,
    allocated_bytes: int,
    n_layers: int | None = None,
    budget_gb: float | None = None,
    parts: str = "layer",
) -> CheckpointPlan:
    """The fewest checkpointed layers for `setup`, from the GPU's memory given as numbers (free on the device,
    reserved and allocated by this process), so it plans the same on a CPU. Per layer and everything else
    come from trainer.plan.memory, as in `spot-trainer plan`; the weights and adapters are in `allocated_bytes`."""
    from trainer.plan.memory import (
        checkpointed_layer_bytes,
        layer_activation_bytes,
        layer_independent_bytes,
        part_checkpointed_layer_bytes,
    )

    tokens = setup.micro_batch_size * setup.seq_len
    per_token = layer_activation_bytes(shape, setup)
    usable = free_bytes + reserved_bytes - int(0.5 * GIB)  # what this process can hold in all
    budget = usable if budget_gb is None else min(usable, int(budget_gb * GIB))
    fixed = allocated_bytes + int(layer_independent_bytes(shape, setup)) + int(0.06 * budget)
    split = {}
    if parts != "layer":
        try:
            split = dict(parts=parts, part_bytes_per_token=part_checkpointed_layer_bytes(shape, setup, parts))
        except ValueError as e:
            raise ConfigError(f"model.checkpoint_parts {parts}: {e}") from None
    return plan_checkpointing(
        n_layers or shape.num_layers,
        tokens,
        per_token,
        budget,
        fixed,
        shape.hidden_size,
        # per hidden unit: an LLM.int8 layer keeps more than its input (its int8 linears' inputs), not a multiple
        input_bytes=checkpointed_layer_bytes(shape, setup) / shape.hidden_size,
        **split,
    )


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


PART_MODULES = {"attention": "self_attn", "mlp": "mlp"}  # the decoder layer's submodule of each part


def set_checkpoint_layers(model, n: int, gc_kwargs: dict, parts: str = "layer", whole: int | None = None) -> None:
    """Checkpoint the first `n` decoder layers, keep the rest; the last layers' activations are freed first
    in backward, so recomputing the early layers never overlaps them. With parts attention/mlp only that
    submodule of a checkpointed layer is recomputed, except in the first `whole` layers (default: none)."""
    layers = decoder_layers(model)
    whole = n if parts == "layer" else min(whole or 0, n)
    if whole > 0:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not all(getattr(m, "_gradient_checkpointing_func", None) for m in layers):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    elif n > 0 and gc_kwargs.get("use_reentrant"):
        model.enable_input_require_grads()  # a reentrant checkpoint passes gradients only to inputs that need them
    for idx, m in enumerate(layers):
        m.gradient_checkpointing = idx < whole
        for part, attr in PART_MODULES.items():
            sub = getattr(m, attr, None)
            on = part == parts and whole <= idx < n
            if on and sub is None:
                raise ConfigError(
                    f"model.checkpoint_parts {parts}: {type(m).__name__} has no {attr} submodule; use layer"
                )
            if on or getattr(sub, "_spot_checkpoint", None) is not None:
                _checkpoint_submodule(sub, gc_kwargs)._spot_checkpoint = on


def _checkpoint_submodule(module, gc_kwargs: dict):
    """Make `module` recompute its forward in backward while its `_spot_checkpoint` is true (training with
    grads only); the module tree and parameter names stay as they are."""
    if getattr(module, "_spot_checkpoint", None) is not None:
        return module
    from torch.utils.checkpoint import checkpoint

    forward = module.forward

    def checkpointed(*args, **kwargs):
        if not (module._spot_checkpoint and module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        if not args:  # the decoder layer passes everything by keyword: the hidden states go first, positionally
            args = (kwargs.pop("hidden_states"),)
        return checkpoint(functools.partial(forward, **kwargs), *args, **gc_kwargs)

    module.forward = checkpointed
    module._spot_checkpoint = False
    return module


def auto_checkpoint_plan(model, cfg, device: torch.device, liger: bool) -> CheckpointPlan:
    """Plan from the memory free now (or `model.memory_budget_gb`), for max_length x micro_batch_size tokens."""
    from trainer.distributed import world_size_from_env

    varlen = getattr(model.config, "_attn_implementation", None) in (VARLEN, "flash_attention_2")
    shape, setup = run_setup(
        cfg,
        model.config,
        liger=liger,
        upcast_kbit=upcast_kbit(cfg, device),
        varlen=varlen,
        no_bf16=not torch.cuda.is_bf16_supported(),
        num_gpus=world_size_from_env(),
    )
    free, _ = torch.cuda.mem_get_info(device)
    return plan_checkpoint_layers(
        shape,
        setup,
        free_bytes=free,
        reserved_bytes=torch.cuda.memory_reserved(device),
        allocated_bytes=torch.cuda.memory_allocated(device),
        n_layers=len(decoder_layers(model)),
        budget_gb=cfg.model.memory_budget_gb,
        parts=getattr(cfg.model, "checkpoint_parts", "layer"),
    )


def resolve_checkpoint_layers(cfg, device: torch.device) -> int | str | None:
    """'auto' on a GPU; an int as given; None where the plain gradient_checkpointing flag decides."""
    value = getattr(cfg.model, "checkpoint_layers", None)
    if value == "auto":
        return "auto" if device.type == "cuda" else None
    return value
