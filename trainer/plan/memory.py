"""Per-GPU memory model of one training step: weights, adapters, gradients, optimizer, activations, logits.

Every number is bytes. The activation terms count what autograd saves in a Hugging Face Llama-style decoder
(RMSNorm, gated SiLU MLP, rotary attention through SDPA/flash, no s^2 term; `eager` adds it) and were checked
tensor by tensor against `torch.autograd.graph.saved_tensors_hooks` (tests/unit/plan/test_planner.py). The same
functions size `spot-trainer plan`'s table and `model.checkpoint_layers: auto` (trainer.speed) on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# the shapes live in trainer.plan.shape; re-exported, since the memory model's callers import them from here
from trainer.plan.shape import LinearShape, ModelShape, llama_shape, shape_from_config, target_linears  # noqa: F401

GIB = 1024**3

# NF4 stores two weights a byte; blockwise absmax per 64 weights is fp32 (4 B), or with double quantization
# an 8-bit absmax (1 B per 64) plus one fp32 second-level constant per 256 blocks (~0.127 bits/param in all).
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
INT8_BYTES = 1.0 + 4 / 4096  # LLM.int8: one byte per weight plus fp32 row statistics
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


# ---------------------------------------------------------------- activations


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
      LoRA, per adapted linear with input width n: dropout mask*n; lora_A's input, which is the fp32 dropout
        output (4n), or its bf16 autocast copy (b*n); lora_A's output (4r or b*r) for lora_B. Without dropout
        and without casts, adapters on one input share it (so do QLoRA's under autocast on a bf16 input: peft's
        4-bit LoRA layer skips its fp32 cast then).
    Measured on an H200 (torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50.2, liger-kernel 0.8.5;
    allocated bytes after the forward, 4 minus 2 layers of an 8B-shaped Llama, 4096 tokens): LoRA and QLoRA,
    with and without Liger and dropout, bf16-frozen and fp32-upcast QLoRA, within 0.4% of this count.
    """
    s, b, h, inter = setup.seq_len, setup.compute_bytes, shape.hidden_size, shape.intermediate_size
    rb = setup.residual_bytes
    ad, kvd = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    full = setup.method == "full"
    eager = setup.attention == "eager"
    kv_width = ad if (setup.repeat_kv or eager) else kvd
    norm = rb * h + 4 if setup.liger else 4 * h + 4 + (rb * h if full else 0)
    total = 2 * norm
    total += b * (2 * ad + 2 * kv_width) + 4 * shape.num_heads
    if eager:
        total += (4 + b) * shape.num_heads * s + (b * ad if full else 0)
    # bitsandbytes casts a 4-bit linear's output back to its input's dtype: fp32 residual -> fp32 MLP tensors
    mb = rb if setup.method == "qlora" else b
    total += (2 if setup.liger else 3) * mb * inter
    if full:
        return total + 2 * b * h + b * inter

    def width(source: str) -> int:
        return inter if source == "mlp_act" else h

    def input_bytes(source: str) -> int:
        return rb if source in ("attn_in", "mlp_in") else (mb if source == "mlp_act" else b)

    kept = set()  # inputs held for the 4-bit linears' backward
    if setup.method == "qlora" and setup.kbit_keeps_input:
        kept = {_input_of(lin, shape) for lin in shape.layer_linears} - {"attn_out"}  # out: saved by SDPA
        total += sum(input_bytes(source) * width(source) for source in kept)
    ab = b if setup.amp else setup.adapter_bytes  # what lora_A saves: autocast re-casts its input to bf16
    shared_inputs = set()
    for lin in target_linears(shape, setup.lora_targets):
        n, source = lin.in_features, _input_of(lin, shape)
        if setup.lora_dropout > 0:
            total += setup.dropout_mask_bytes * n + ab * n
        elif setup.amp and setup.method == "qlora" and input_bytes(source) == b:
            shared_inputs.add(source)  # peft's 4-bit LoRA layer skips its fp32 cast under autocast: x itself
        elif setup.amp or input_bytes(source) != setup.adapter_bytes:
            total += ab * n  # a cast of its own per adapter
        else:
            shared_inputs.add(source)
        total += ab * setup.lora_r
    shared_inputs -= kept | {"attn_out"}  # out: saved by SDPA
    return total + sum(input_bytes(source) * width(source) for source in shared_inputs)


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
    """Per token, what a checkpointed decoder layer keeps: its input (the residual stream)."""
    return setup.residual_bytes * shape.hidden_size


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
    """Gradients in flight inside one layer's backward, plus that layer's recomputed activations."""
    tokens = setup.micro_batch_size * setup.seq_len
    work = tokens * setup.compute_bytes * (2 * shape.hidden_size + 2 * shape.intermediate_size)
    if setup.gradient_checkpointing:
        work += tokens * layer_activation_bytes(shape, setup)
    return work


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
        Component("autocast copies", casts, "bf16 copies of fp32 weights, kept for backward" if casts else ""),
        Component(
            "activations",
            saved,
            "layer inputs (gradient checkpointing)" if setup.gradient_checkpointing else "saved for backward",
        ),
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
    rest = "fp32" if setup.weight_bytes == 4 else ("bf16" if setup.weight_bytes == 2 else "")
    if setup.method == "qlora":
        dq = " + double quant" if setup.double_quant else ""
        return f"NF4{dq} decoder linears; embeddings, lm_head, norms in {rest}"
    if setup.method == "full" and setup.amp:
        return "fp32 (the master copy; autocast computes in bf16)"
    return f"{rest} base weights"
