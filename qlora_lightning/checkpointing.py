"""Activation checkpointing of the decoder layers, optionally with each layer's input offloaded to CPU memory.

With checkpointing on, a decoder layer keeps nothing from its forward but its input (the residual
stream, B x T x hidden) and recomputes the rest in the backward. Those inputs, one per layer, are
then the largest activations that outlive the forward: 2 GiB for Mistral-7B at 8 x 1024 tokens in
bf16, 8 GiB at 1 x 32768. ``offload`` parks them in pinned CPU memory until the backward needs them.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from torch.utils.checkpoint import checkpoint

# Off, on (each layer's input stays on the GPU), or on with each layer's input offloaded.
Checkpointing = Union[bool, Literal["offload"]]


def enable_checkpointing(model: torch.nn.Module, mode: Checkpointing) -> None:
    """Turn on transformers' (non-reentrant) checkpointing of each decoder layer, offloaded per ``mode``."""
    if not mode:
        return
    # transformers >= 5.2x renamed it; older 5.x has the old name only.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    if mode == "offload":
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False):  # the layers transformers checkpoints
                module._gradient_checkpointing_func = offloaded_checkpoint


def offloaded_checkpoint(function, *args, **kwargs):
    """``checkpoint(function, *args)`` whose saved inputs wait for the backward in CPU memory.

    A non-reentrant checkpoint saves nothing inside the layer; its own save of the layer's inputs
    happens outside its hooks, so ``OffloadToCpu`` catches exactly that one.
    """
    with OffloadToCpu():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


class OffloadToCpu(torch.autograd.graph.saved_tensors_hooks):
    """Saved CUDA tensors go to pinned CPU memory and come back when the backward unpacks them.

    Unlike ``torch.autograd.graph.save_on_cpu``, the copy out does not block the host: both copies
    are queued on the current stream, in order with the kernels that write and read the tensor
    (the allocator reuses the freed GPU block only for work queued after the copy, and pinned
    blocks are not reused before their copies finish).
    """

    def __init__(self):
        super().__init__(self.pack, self.unpack)

    @staticmethod
    def pack(tensor: torch.Tensor):
        if tensor.device.type != "cuda" or tensor.numel() == 0:
            return tensor  # nothing to gain off the GPU
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    @staticmethod
    def unpack(packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)
