"""The 4-bit base layer's matmul written in torch operations, for compiled decoder layers.

bitsandbytes reaches its CUDA kernels through Python: each 4-bit matmul of a training step (the
forward, the recomputation, the backward) is a custom operator whose Python body dequantizes the
nested quantization constants, then the weights, then calls the matmul, several host calls and
three or four kernel launches. At 7B scale that is 224 projections, about 670 such calls per
step, and where the GPU's kernels are short (small batches, the backward's narrow matmuls) the
GPU waits for them. Written as torch operations instead, inside a layer that ``torch.compile``
already compiles, the whole dequantization (nested constants included) becomes one generated
kernel launched from compiled code, followed by the matmul. The generated kernel is slower than
bitsandbytes' own, so this pays only where the host sets the pace: on an H200, Mistral-7B at
1 x 512 tokens ran 16% faster with it, at 1 x 2048 15% slower (``LoraSpec.compiled_dequant_tokens``;
measured before the shift below replaced a stack that compiled into a kernel of its own).

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
    n = values.numel()
    padded = F.pad(values, (0, -n % blocksize))
    return (padded.view(-1, blocksize) * scales.view(-1, 1)).view(-1)[:n]


def dequantize_4bit(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                    blocksize: int, dtype: torch.dtype, nested_code: Optional[torch.Tensor] = None,
                    nested_absmax: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                    nested_blocksize: int = 256) -> torch.Tensor:
    """The ``shape`` weight that bitsandbytes' ``dequantize_4bit`` returns, in ``dtype``."""
    packed = packed.view(torch.uint8).view(-1, 1)
    # High nibble first. A broadcast shift, not a stack of the two halves: compiled, the stack
    # becomes a buffer of its own, where the shift fuses into the kernel that writes the weight.
    shifts = torch.tensor([4, 0], dtype=torch.uint8, device=packed.device)
    codes = ((packed >> shifts) & 0xF).view(-1)[:prod(shape)]
    if nested_code is not None:  # double quantization: the block scales are 8-bit codes themselves
        absmax = _blockwise(nested_code[absmax.long()], nested_absmax, nested_blocksize) + offset
    return _blockwise(code[codes.long()], absmax, blocksize).to(dtype).view(shape)


def supports(layer: torch.nn.Module) -> bool:
    """Whether ``linear_4bit`` computes ``layer``'s output: a bitsandbytes NF4 ``Linear4bit`` with its
    quant state, a compute dtype and no trainable bias."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    bias = getattr(layer, "bias", None)
    return (state is not None and state.quant_type == "nf4" and len(state.shape) == 2
            and getattr(layer, "compute_dtype", None) is not None and (bias is None or not bias.requires_grad))


def linear_4bit(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes' ``Linear4bit`` ``layer`` returns for ``x`` (see ``supports``), in torch operations.

    For compiled graphs. The dequantization is checkpointed, which there tags its operations
    must-recompute: the backward dequantizes again instead of keeping the 16-bit weight (the
    partitioner would otherwise keep it, since the backward's matmul needs it whole). Run eagerly,
    the matmul's autograd keeps the 16-bit weight until the backward.
    """
    state = layer.weight.quant_state
    nested = (state.state2.code, state.state2.absmax, state.offset, state.state2.blocksize) if state.nested else ()
    weight = checkpoint(dequantize_4bit, layer.weight, state.code, state.absmax, tuple(state.shape),
                        state.blocksize, layer.compute_dtype, *nested, use_reentrant=False)
    bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
    return F.linear(x.to(layer.compute_dtype), weight, bias).to(x.dtype)
