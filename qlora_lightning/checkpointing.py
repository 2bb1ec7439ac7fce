"""Activation checkpointing of the decoder layers, optionally with each layer's input offloaded to CPU memory.

With checkpointing on, a decoder layer keeps nothing from its forward but its input (the residual
stream, B x T x hidden) and recomputes the rest in the backward. Those inputs, one per layer, are
then the largest activations that outlive the forward: 2 GiB for Mistral-7B at 8 x 1024 tokens in
bf16, 8 GiB at 1 x 32768. ``offload`` parks them in pinned CPU memory until the backward needs them.
"""

from __future__ import annotations

import functools
import weakref
from typing import Literal, Optional, Union

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

    Unlike ``torch.autograd.graph.save_on_cpu``, neither copy blocks the host or the compute
    stream: both run on a side stream (``_copy_stream``). The copy out waits only for the kernel
    that wrote the tensor, and the tensor's GPU block is not reused before the copy is done
    (``record_stream``). The backward unpacks the layers in reverse order, so unpacking one layer's
    input starts copying in the one packed before it, which the next recomputation needs: the
    copies overlap the backward instead of stalling it (one layer input more on the GPU).
    """

    # The most recently packed tensor, weakly: each new one links to it, so the backward can
    # prefetch in reverse order without keeping anything alive that autograd has dropped.
    _last: Optional[weakref.ref] = None

    def __init__(self):
        super().__init__(self.pack, self.unpack)

    @staticmethod
    def pack(tensor: torch.Tensor):
        if tensor.device.type != "cuda" or tensor.numel() == 0:
            return tensor  # nothing to gain off the GPU
        parked = _Parked(tensor, OffloadToCpu._last)
        OffloadToCpu._last = weakref.ref(parked)
        return parked

    @staticmethod
    def unpack(packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        tensor = packed.fetch()
        before = packed.before()
        if before is not None:
            before.prefetch()
        return tensor


class _Parked:
    """One saved tensor in pinned CPU memory, copied back to its device on demand or ahead of time."""

    __slots__ = ("host", "device", "before", "back", "ready", "__weakref__")

    def __init__(self, tensor: torch.Tensor, before: Optional[weakref.ref]):
        stream = _copy_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the kernel that wrote it
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its block is not handed out again until the copy is done
        self.device, self.before = tensor.device, before or _dead
        self.back: Optional[torch.Tensor] = None
        self.ready: Optional[torch.cuda.Event] = None

    def prefetch(self) -> None:
        """Queue the copy back on the side stream (after the copy out, which is queued there too)."""
        if self.back is not None:
            return
        compute, stream = torch.cuda.current_stream(self.device), _copy_stream(self.device)
        # Allocated for the compute stream, which uses it; the side stream must not write into the
        # block before the compute work queued so far (maybe its last user) is done.
        self.back = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            self.back.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        return self.back


def _dead() -> None:
    return None


@functools.lru_cache(maxsize=None)
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the copies to and from CPU memory."""
    return torch.cuda.Stream(device)
