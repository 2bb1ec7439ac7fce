"""The 4-bit base layer's matmul written in torch operations, for compiled decoder layers.

bitsandbytes reaches its CUDA kernels through Python: each 4-bit matmul of a training step (the
forward, the recomputation, the backward) is a custom operator whose Python body dequantizes the
nested quantization constants, then the weights, then calls the matmul, several host calls and
three or four kernel launches. At 7B scale that is 224 projections, about 670 such calls per
step, and where the GPU's kernels are short (small batches, the backward's narrow matmuls) the
GPU waits for them. Written as torch operations instead, inside a layer that ``torch.compile``
already compiles, the whole dequantization (nested constants included) becomes one generated
kernel launched from compiled code, followed by the matmul. On an H200, Mistral-7B at 1 x 512
tokens ran 16% faster with it, at 1 x 2048 15% slower (measured before the shift below replaced
a stack that compiled into a kernel of its own); at 8 x 1024 as fast as bitsandbytes' kernels, and
3.5% faster with ``linear_4bit_lora`` (``LoraSpec.compiled_dequant_tokens``).

The arithmetic is bitsandbytes' own (``backends/default/ops.py``, bit for bit): each byte holds
two 4-bit codes, high nibble first; a code maps through the 16-value table ``quant_state.code``
and is multiplied in fp32 by its block's scale; with double quantization the block scales are
themselves 8-bit codes through ``state2.code``, times their own block's scale, plus ``offset``.
"""

from __future__ import annotations

from math import prod
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(n,) values times the scale of their block of ``blocksize`` (the last block may be short)."""
    # Each value indexes its block's scale; a padded (blocks x blocksize) view of the values did
    # the same, but compiled (with the concatenated weight below) it lost every block of double
    # quantization's scales past the first, on the CPU.
    per_value = scales.view(-1, 1).expand(-1, blocksize).reshape(-1)[: values.numel()]
    return values * per_value


def dequantize_4bit(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype,
    nested_code: Optional[torch.Tensor] = None,
    nested_absmax: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """The ``shape`` weight that bitsandbytes' ``dequantize_4bit`` returns, in ``dtype``."""
    packed = packed.view(torch.uint8).view(-1, 1)
    # High nibble first. A broadcast shift, not a stack of the two halves: compiled, the stack
    # becomes a buffer of its own, where the shift fuses into the kernel that writes the weight.
    shifts = torch.tensor([4, 0], dtype=torch.uint8, device=packed.device)
    codes = ((packed >> shifts) & 0xF).view(-1)[: prod(shape)]
    if nested_code is not None:  # double quantization: the block scales are 8-bit codes themselves
        absmax = _blockwise(nested_code[absmax.long()], nested_absmax, nested_blocksize) + offset
    return _blockwise(code[codes.long()], absmax, blocksize).to(dtype).view(shape)


def supports(layer: torch.nn.Module) -> bool:
    """Whether ``linear_4bit`` computes ``layer``'s output: a bitsandbytes NF4 ``Linear4bit`` with
    its quant state, a compute dtype and no trainable bias."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    bias = getattr(layer, "bias", None)
    return (
        state is not None
        and state.quant_type == "nf4"
        and len(state.shape) == 2
        and getattr(layer, "compute_dtype", None) is not None
        and (bias is None or not bias.requires_grad)
    )


def linear_4bit(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes' ``Linear4bit`` ``layer`` returns for ``x`` (see ``supports``), in torch
    operations.

    For compiled graphs. The dequantization is checkpointed, which there tags its operations
    must-recompute: the backward dequantizes again instead of keeping the 16-bit weight (the
    partitioner would otherwise keep it, since the backward's matmul needs it whole). Run eagerly,
    the matmul's autograd keeps the 16-bit weight until the backward.
    """
    state = layer.weight.quant_state
    nested = (
        (state.state2.code, state.state2.absmax, state.offset, state.state2.blocksize)
        if state.nested
        else ()
    )
    weight = checkpoint(
        dequantize_4bit,
        layer.weight,
        state.code,
        state.absmax,
        tuple(state.shape),
        state.blocksize,
        layer.compute_dtype,
        *nested,
        use_reentrant=False,
    )
    bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
    return F.linear(x.to(layer.compute_dtype), weight, bias).to(x.dtype)


def linear_4bit_lora(
    layer: torch.nn.Module, x: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``layer(x) + scaling * h @ lora_B^T`` for a ``supports``-ed ``layer``, as one matmul over a
    longer inner dimension: ``[x | scaling * h] @ [W | lora_B]^T``. For compiled graphs.

    Added after the base matmul, the adapter's product is a pass of its own over the (tokens x
    out_features) output, which ``addmm`` in a compiled graph precedes with a copy of it. Here it
    rides on the base matmul (r more columns of the inner dimension: 0.4% more FLOPs at r = 16,
    K = 4096), at the cost of a copy of ``x`` into the longer input: a win where the output is at
    least as wide as the input. The backward dequantizes the weight again rather than keep it in
    16 bits, as bitsandbytes' own backward does.
    """
    state = layer.weight.quant_state
    dtype = layer.compute_dtype
    quantized: tuple[torch.Tensor, ...] = (layer.weight, state.code, state.absmax)
    if state.nested:
        quantized += (state.state2.code, state.state2.absmax, state.offset)
    layout = (
        tuple(state.shape),
        state.blocksize,
        dtype,
        state.state2.blocksize if state.nested else 0,
    )
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return _ConcatenatedLinear.apply(
        x.to(dtype), (h * scaling).to(dtype), lora_B, bias, layout, *quantized
    )


def _dequantized(layout: tuple, quantized: tuple) -> torch.Tensor:
    shape, blocksize, dtype, nested_blocksize = layout
    packed, code, absmax, *nested = quantized
    return dequantize_4bit(
        packed,
        code,
        absmax,
        shape,
        blocksize,
        dtype,
        *nested,
        **({"nested_blocksize": nested_blocksize} if nested else {}),
    )


class _ConcatenatedLinear(torch.autograd.Function):
    """``[x | hs] @ [W | lora_B]^T + bias`` with ``W = dequantize(*quantized)``; gradients for
    ``x``, ``hs`` and ``lora_B`` only (the base is frozen)."""

    @staticmethod
    def forward(ctx, x, hs, lora_B, bias, layout, *quantized):
        ctx.layout = layout
        ctx.save_for_backward(hs, lora_B, *quantized)
        weight_and_adapter = torch.cat(
            [_dequantized(layout, quantized), lora_B.to(hs.dtype)], dim=1
        )
        return F.linear(torch.cat([x, hs], dim=-1), weight_and_adapter, bias)

    @staticmethod
    def backward(ctx, grad):
        # Not one matmul over [W | lora_B] as in the forward: slicing x's gradient out of the
        # product costs more than the second read of the gradient it saves
        # (benchmarks/lora_gemm.py).
        hs, lora_B, *quantized = ctx.saved_tensors
        weight = _dequantized(ctx.layout, quantized)
        grad_hs = grad @ lora_B.to(grad.dtype)
        # As addmm's backward orients it: (r x tokens) @ (tokens x out_features), then transposed.
        grad_B = (hs.reshape(-1, hs.shape[-1]).t() @ grad.reshape(-1, grad.shape[-1])).t()
        return (
            grad @ weight,
            grad_hs,
            grad_B.to(lora_B.dtype),
            None,
            None,
            *[None] * len(quantized),
        )
