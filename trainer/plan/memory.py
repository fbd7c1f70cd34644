"""Per-GPU memory model of one training step: weights, adapters, gradients, optimizer, activations, logits.

Every number is bytes. The activation terms count what autograd saves in a Hugging Face Llama-style decoder
(RMSNorm, gated SiLU MLP, rotary attention through SDPA/flash, no s^2 term; `eager` adds it) and were checked
tensor by tensor against `torch.autograd.graph.saved_tensors_hooks` (tests/unit/plan/test_planner.py). The same
functions size `spot-trainer plan`'s table and `model.checkpoint_layers: auto` (trainer.speed) on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# the shapes live in trainer.plan.shape; re-exported, since the memory model's callers import them from here
from trainer.plan.shape import LinearShape, ModelShape, llama_shape, shape_from_config, target_linears  # noqa: F401

GIB = 1024**3

# NF4 stores two weights a byte; blockwise absmax per 64 weights is fp32 (4 B), or with double quantization
# an 8-bit absmax (1 B per 64) plus one fp32 second-level constant per 256 blocks (~0.127 bits/param in all).
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
INT8_BYTES = 1.0 + 4 / 4096  # LLM.int8: one byte per weight plus an fp32 scale per row (SCB)
# bitsandbytes 8-bit Adam: two 8-bit moments plus an fp32 absmax per 2048-element block each
OPTIMIZER_STATE_BYTES = {"adamw_8bit": 2.0 + 8 / 2048, "paged_adamw_8bit": 2.0 + 8 / 2048}
# Measured on an H100 (torch 2.11, CUDA 13): device memory in use minus torch's reserved memory was 0.75 GiB
# (CUDA context, cuBLAS and kernel images), and reserved exceeded allocated by 2-22% (mean ~9%) over 14 runs.
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
ALLOCATOR_SLACK = 0.08
DEEPSPEED_BUFFER_BYTES = int(4.5 * 2e8 * 2)  # DeepSpeed's rule of thumb: 4.5 x bucket (2e8 bf16) with overlap_comm


@dataclass(frozen=True)
class TrainingSetup:
    """The knobs of a run that change memory, in the memory model's own terms.

    Defaults follow trainer/model.py and trainer/loop.py: accelerate's bf16 autocast; full fine-tuning keeps
    fp32 weights (they are the master copy) and fused fp32 AdamW; LoRA trains fp32 adapters on a bf16 base;
    QLoRA goes through peft.prepare_model_for_kbit_training, which casts embeddings, lm_head and norms to fp32.
    """

    method: str  # full | lora | qlora
    compute_bytes: int = 2  # bf16/fp16 = 2, fp32 = 4
    half: str = "bf16"  # which 2-byte type (model.dtype fp16: fp16); names only, the bytes are the same
    micro_batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    quant_bits: int = 4
    double_quant: bool = True
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.05
    attention: str = "sdpa"  # sdpa | flash_attention_2 | eager
    repeat_kv: bool = True  # padded batches: transformers' SDPA repeats k/v heads (no mask: native GQA)
    deepspeed: str | None = None  # None | zero2 | zero2_offload
    num_gpus: int = 1
    grad_accum: int = 1
    autocast: bool = True  # accelerate mixed precision: matmuls in compute dtype, outputs converted to fp32
    upcast_non_quantized: bool = True  # QLoRA: embeddings, lm_head and norms in fp32 (prepare_model_for_kbit_training)
    adapter_bytes: int = 4  # LoRA adapters train in fp32
    dropout_mask_bytes: int = 1  # CUDA dropout keeps a bool mask; CPU keeps one of the input dtype
    # Liger kernels (trainer.speed.apply_liger): RMSNorm keeps its input and an fp32 rstd per row, SwiGLU keeps
    # gate and up only, and the fused linear cross-entropy never builds the full-vocabulary logits
    liger: bool = False
    # QLoRA: the 4-bit linears keep their (compute-dtype) input for backward. bitsandbytes releases that saved
    # it (MatMul4Bit's ctx.tensors = (A, B)) do; 0.50.2 keeps only the weight (ctx.tensors = (None, B)), and
    # an H200 measurement of the bf16-frozen path agrees (off). trainer.speed's first estimate had it on, from
    # an H100 peak taken in eval mode with the full logits (bench/README.md, run 1).
    kbit_keeps_input: bool = False

    @property
    def amp(self) -> bool:
        """Autocast changes anything only when the compute dtype is half precision."""
        return self.autocast and self.compute_bytes == 2 and not self.deepspeed

    @property
    def int8(self) -> bool:
        """An LLM.int8 base (bitsandbytes Linear8bitLt): more than its weights, see trainer.plan.int8."""
        return self.method == "qlora" and self.quant_bits == 8

    @property
    def weight_bytes(self) -> int:
        """Bytes per unquantized base weight as loaded."""
        if self.method == "full":
            return 4 if self.amp else self.compute_bytes  # amp: fp32 weights, bf16 copies made by autocast
        if self.method == "qlora" and self.upcast_non_quantized:
            return 4
        return self.compute_bytes

    @property
    def residual_bytes(self) -> int:
        """fp32 embeddings make the residual stream fp32 (a bf16 branch added to fp32 promotes)."""
        return self.weight_bytes


@dataclass
class Component:
    name: str
    bytes: float
    note: str = ""
    in_peak: bool = True  # False: allocated at another moment than the peak (the table shows it apart)


@dataclass
class MemoryEstimate:
    """Peak memory of one GPU, by component, plus host RAM for offloaded state."""

    components: list[Component]
    peak_bytes: float
    cpu_bytes: float
    trainable_params: int
    saved_activation_bytes: float  # what autograd keeps between forward and backward
    phase: str  # which phase sets the peak: "forward/backward" or "optimizer step"
    notes: list[str] = field(default_factory=list)

    def get(self, name: str) -> float:
        return sum(c.bytes for c in self.components if c.name == name)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


# ---------------------------------------------------------------- parameters


def lora_params(shape: ModelShape, setup: TrainingSetup) -> int:
    """LoRA adds A (r x in) and B (out x r) to every targeted linear of every layer."""
    per_layer = sum(
        setup.lora_r * (lin.in_features + lin.out_features) for lin in target_linears(shape, setup.lora_targets)
    )
    return per_layer * shape.num_layers


def weight_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Resident base-model weights on one GPU (replicated under ZeRO-2); adapters not included."""
    if setup.method != "qlora":
        return shape.params_total * setup.weight_bytes
    per_param = NF4_BYTES[setup.double_quant] if setup.quant_bits == 4 else INT8_BYTES
    return shape.params_layer_linear * per_param + (shape.params_total - shape.params_layer_linear) * setup.weight_bytes


def autocast_copy_bytes(shape: ModelShape, setup: TrainingSetup, trainable: int) -> float:
    """bf16 copies of fp32 weights that autocast makes for matmuls; autograd keeps them for backward."""
    if not setup.amp:
        return 0.0
    if setup.method == "full":
        return 2 * shape.params_matmul
    lm_head = shape.vocab_size * shape.hidden_size if setup.weight_bytes == 4 else 0  # QLoRA's fp32 lm_head
    return 2 * (trainable + lm_head)


# the activation terms (trainer/plan/activations.py), here with the rest of the model for its callers
from trainer.plan.activations import (  # noqa: E402, F401
    CHECKPOINT_PARTS,
    backward_working_bytes,
    checkpointed_layer_bytes,
    head_activation_bytes,
    layer_activation_bytes,
    layer_region_bytes,
    liger_loss_chunk,
    logits_dtype_bytes,
    logits_working_bytes,
    part_checkpointed_layer_bytes,
    saved_activation_bytes,
)

# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class StateBytes:
    """What one GPU keeps for the whole run, and the host for ZeRO offload; per_param: optimizer-state bytes per
    trainable param, train_bytes: bytes per trainable weight, shards: ZeRO-2 partitions."""

    trainable: int
    train_bytes: int
    per_param: float
    shards: int
    weights: float
    adapters: float
    master: float
    grads: float
    optim: float
    cpu: float


def state_bytes(shape: ModelShape, setup: TrainingSetup) -> StateBytes:
    full = setup.method == "full"
    trainable, train_bytes, per_param, master_per_param = _trainable_state(shape, setup)
    zero = setup.deepspeed in ("zero2", "zero2_offload")
    shards = setup.num_gpus if zero else 1
    master = trainable * master_per_param / shards
    grads = trainable * train_bytes / shards
    optim = trainable * per_param / shards
    cpu = 0.0
    if setup.deepspeed == "zero2_offload":
        cpu = trainable * (per_param + 4 + 4)  # whole node: optimizer state, fp32 master and fp32 gradients
        optim, master, grads = 0.0, 0.0, 0.0  # gradients stream to the host bucket by bucket
    return StateBytes(
        trainable,
        train_bytes,
        per_param,
        shards,
        weight_bytes(shape, setup),
        0.0 if full else trainable * train_bytes,
        master,
        grads,
        optim,
        cpu,
    )


def layer_independent_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """The forward/backward peak less the weights, the adapters and what the decoder layers save: gradients,
    optimizer state, ZeRO's master copy, autocast copies, the activations outside the layers, and the larger of
    the loss's working set and one layer's gradients in flight (its recompute not included). trainer.speed
    plans checkpoint_layers with this plus the per-layer bytes of layer_activation_bytes."""
    st = state_bytes(shape, setup)
    tokens = setup.micro_batch_size * setup.seq_len
    plain = replace(setup, gradient_checkpointing=False)
    return (
        st.grads
        + st.optim
        + st.master
        + autocast_copy_bytes(shape, setup, st.trainable)
        + tokens * head_activation_bytes(shape, setup)
        + max(logits_working_bytes(shape, setup), backward_working_bytes(shape, plain))
    )


def estimate_memory(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """Peak bytes on one GPU: the larger of the forward/backward peak and the optimizer-step peak."""
    notes: list[str] = []
    st = state_bytes(shape, setup)
    trainable, train_bytes, per_param, shards = st.trainable, st.train_bytes, st.per_param, st.shards
    weights, adapters, master, grads, optim, cpu = st.weights, st.adapters, st.master, st.grads, st.optim, st.cpu
    if setup.deepspeed == "zero2_offload":
        notes.append("ZeRO-2 offload: optimizer state, fp32 master weights and fp32 gradients live in CPU RAM")
    if setup.int8:
        notes.append(
            "LLM.int8 base: bitsandbytes keeps each int8 linear's input until backward, in checkpointed layers too,"
            " and dequantizes a layer's weight to compute its input's gradient (counted above)"
        )
    if setup.optimizer.startswith("paged"):
        notes.append("paged optimizer: its state can spill to CPU RAM under pressure (slower, not an OOM)")

    casts = autocast_copy_bytes(shape, setup, trainable)
    saved = saved_activation_bytes(shape, setup)
    logits = logits_working_bytes(shape, setup)
    backward = backward_working_bytes(shape, setup)
    act_phase = casts + saved + max(logits, backward)
    resident = weights + adapters + master + optim
    if setup.grad_accum > 1:  # gradients persist across micro-batches
        fwd_bwd = resident + grads + act_phase
    else:  # gradients fill while activations are freed: the larger of the two, not the sum
        fwd_bwd = resident + max(act_phase, grads)
    step = resident + grads
    ds_buffers = DEEPSPEED_BUFFER_BYTES if setup.deepspeed else 0
    allocated = max(fwd_bwd, step) + ds_buffers
    slack = ALLOCATOR_SLACK * allocated
    grad_note = f"{train_bytes} B/trainable param" + (f", 1/{shards} each (ZeRO-2)" if shards > 1 else "")
    components = [
        Component("weights", weights, _weights_note(setup)),
        Component("adapters", adapters, f"{trainable:,} LoRA params, fp32" if adapters else ""),
        Component("master weights", master, "fp32 copy in the ZeRO optimizer" if master else ""),
        Component("gradients", grads, grad_note if grads else ""),
        Component("optimizer state", optim, f"{setup.optimizer}: {per_param:.2f} B/param" if optim else ""),
        Component("autocast copies", casts, f"{setup.half} copies of fp32 weights, kept for backward" if casts else ""),
        Component("activations", saved, _activations_note(setup)),
        Component(
            "logits + loss",
            logits,
            "Liger fused cross-entropy, one chunk of rows" if setup.liger else "fp32 cross-entropy over the vocabulary",
        ),
        Component(
            "backward working set",
            backward,
            "one layer recomputed" if setup.gradient_checkpointing else "gradients in flight",
        ),
        Component("deepspeed buffers", ds_buffers, "ZeRO buckets" if ds_buffers else ""),
        Component("allocator slack", slack, f"{ALLOCATOR_SLACK:.0%} of allocated"),
        Component("cuda context", CUDA_CONTEXT_BYTES, "outside torch's allocator"),
    ]
    phase = "optimizer step" if step > fwd_bwd else "forward/backward"
    at_peak = {
        "weights",
        "adapters",
        "master weights",
        "optimizer state",
        "deepspeed buffers",
        "allocator slack",
        "cuda context",
    }
    if phase == "optimizer step" or setup.grad_accum > 1 or grads > act_phase:
        at_peak.add("gradients")
    if phase != "optimizer step" and (setup.grad_accum > 1 or grads <= act_phase):
        at_peak |= {"autocast copies", "activations", "logits + loss" if logits >= backward else "backward working set"}
    for c in components:
        c.in_peak = c.name in at_peak
    peak = allocated + slack + CUDA_CONTEXT_BYTES
    return MemoryEstimate(
        components=components,
        peak_bytes=peak,
        cpu_bytes=cpu,
        trainable_params=trainable,
        saved_activation_bytes=saved,
        phase=phase,
        notes=notes,
    )


def _trainable_state(shape: ModelShape, setup: TrainingSetup) -> tuple[int, int, float, float]:
    """(trainable params, bytes per trainable weight, optimizer-state bytes per param, master-copy bytes per
    param), all ranks together: what the GPU holds (sharded under ZeRO) and what a checkpoint stores."""
    full = setup.method == "full"
    trainable = shape.params_total if full else lora_params(shape, setup)
    zero = setup.deepspeed in ("zero2", "zero2_offload")
    train_bytes = setup.weight_bytes if full else setup.adapter_bytes
    fp_adam = setup.optimizer in ("adamw", "paged_adamw")
    state = 4 if (zero or train_bytes == 4) else train_bytes  # torch AdamW keeps moments in the param dtype
    per_param = 2 * state if fp_adam else OPTIMIZER_STATE_BYTES[setup.optimizer]
    # ZeRO keeps an fp32 master copy of bf16 weights in the optimizer; amp's fp32 weights are their own master
    master = 4.0 if (zero and train_bytes == 2) else 0.0
    return trainable, train_bytes, per_param, master


def checkpoint_bytes(shape: ModelShape, setup: TrainingSetup) -> dict[str, float]:
    """Bytes one checkpoint holds, all ranks together: trainable weights (adapters only for LoRA/QLoRA), the
    optimizer's moments, and ZeRO's fp32 master copy of bf16 weights. JSON, RNG and metrics are negligible."""
    trainable, train_bytes, per_param, master = _trainable_state(shape, setup)
    return {
        "weights": trainable * train_bytes,
        "optimizer state": trainable * per_param,
        "master weights": trainable * master,
    }


def _weights_note(setup: TrainingSetup) -> str:
    rest = "fp32" if setup.weight_bytes == 4 else (setup.half if setup.weight_bytes == 2 else "")
    if setup.int8:
        return f"LLM.int8 decoder linears (int8 + fp32 row scales); embeddings, lm_head, norms in {rest}"
    if setup.method == "qlora":
        dq = " + double quant" if setup.double_quant else ""
        return f"NF4{dq} decoder linears; embeddings, lm_head, norms in {rest}"
    if setup.method == "full" and setup.amp:
        return f"fp32 (the master copy; autocast computes in {setup.half})"
    return f"{rest} base weights"


def _activations_note(setup: TrainingSetup) -> str:
    if not setup.gradient_checkpointing:
        return "saved for backward"
    return "layer inputs" + (" and the int8 linears' inputs" if setup.int8 else "") + " (gradient checkpointing)"
