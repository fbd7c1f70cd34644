"""What an LLM.int8 base (quant.bits 8: bitsandbytes Linear8bitLt) allocates beyond its int8 weights.

Read from bitsandbytes 0.50.2, bitsandbytes/autograd/_functions.py (MatMul8bitLt) and backends/{cuda,default}/
ops.py (the int8 ops), for a frozen weight (has_fp16_weights=False, LLM.int8 threshold 6.0) whose input needs a
gradient, as every decoder linear's does under LoRA:

- forward keeps `ctx.tensors = (CAt, subA, A)`: A, the linear's input itself, and subA, a contiguous copy of its
  outlier columns (`A[:, outlier_cols]`, int8_mixed_scaled_mm). They are attributes of the autograd node, not
  saved tensors, so gradient checkpointing (torch's non-reentrant, the trainer's) does not drop them: a
  checkpointed layer still holds the inputs of its int8 linears, attention's output (o_proj's input) too.
  trainer.plan.activations counts A with the layer's activations; subA is outlier_bytes here.
- forward, per call: an fp16 copy of A unless A is fp16 (the int8 kernels take fp16), the int8 row-quantized CA
  (tokens x in) and, for the threshold, A.abs() in fp16 and its bool mask; then the int8 product's int32 result
  (tokens x out x 4 B), dequantized to fp16 and, for another input dtype, cast to it.
- backward (grad of the input): `state.CB.to(dtype_A, copy=True).mul_(SCB / 127)`, the whole weight dequantized
  to the input's dtype (out x in), then grad_output @ that.
Only one linear's temporaries live at a time: transient_bytes is the largest of them, on top of one layer's
backward working set.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from trainer.plan.shape import LinearShape, ModelShape

if TYPE_CHECKING:
    from trainer.plan.memory import TrainingSetup

# Input columns with any |x| >= 6.0 (LLM.int8's threshold) in a micro-batch: data-dependent. The LLM.int8 paper
# (Dettmers et al. 2022, section 4) found the outliers of 6.7B models in about 6 of 4096 hidden dimensions; 1% of
# a linear's input width leaves room for the MLP's inner activations and long packed rows. Small either way.
OUTLIER_FRACTION = 0.01


def outlier_columns(in_features: int) -> int:
    return math.ceil(OUTLIER_FRACTION * in_features)


def outlier_bytes(shape: ModelShape, setup: TrainingSetup, input_bytes) -> int:
    """Per token and layer: every int8 linear's own copy of its input's outlier columns (subA), kept until backward.
    input_bytes(lin) is the byte width of that linear's input."""
    return sum(outlier_columns(lin.in_features) * input_bytes(lin) for lin in shape.layer_linears)


def linear_transient_bytes(lin: LinearShape, tokens: int, a: int, fp16: bool) -> int:
    """The temporaries of one int8 linear's forward or backward, its output and input gradient not included;
    a: bytes per element of its input, fp16: whether the input is fp16 (bf16 and fp32 are cast)."""
    n, m = lin.in_features, lin.out_features
    cast = 0 if fp16 else 2  # A.to(float16); the dequantized output is fp16 before its cast back to A's dtype
    quantize = tokens * n * (cast + 1 + 2 + 1)  # fp16 copy, CA (int8), A.abs() (fp16), its outlier mask (bool)
    matmul = tokens * n + tokens * m * (4 + cast)  # CA, the int32 product, the fp16 dequantized result
    dequantized_weight = m * n * a + 4 * m  # backward: CB in A's dtype, and the row scales
    return max(quantize, matmul, dequantized_weight)


def transient_bytes(shape: ModelShape, setup: TrainingSetup, input_bytes) -> int:
    """The largest temporary set of any int8 linear of a layer, for one micro-batch."""
    tokens = setup.micro_batch_size * setup.seq_len

    def fp16(lin: LinearShape) -> bool:
        return input_bytes(lin) == 2 and setup.half == "fp16"

    return max(linear_transient_bytes(lin, tokens, input_bytes(lin), fp16(lin)) for lin in shape.layer_linears)
