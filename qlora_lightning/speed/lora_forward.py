"""A leaner training forward for PEFT's LoRA layers on a 4-bit base.

PEFT computes ``base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``: a defensive copy of
the base output, the adapter output written out in full, then a scale and an add, each a pass
over a (tokens x out_features) tensor, in the forward and again in the recomputation. Here the
adapter's second matmul adds into the base output directly, ``addmm(base(x), h, B^T,
alpha=scaling)``, where ``h = lora_A(dropout(x))`` is only (tokens x r). Same math, same
parameters and state dict; fewer kernels and fewer full-size passes, which matter most
where nothing fuses them (eager layers).

Measured on an H200 (``benchmarks/results/2026-11-28_session4``): with compiled layers, which
fuse PEFT's scale and add already, Mistral-7B at 8 x 1024 ran 2% slower with it (10221 against
10450 tokens/s, one round each), so it is off unless ``lora.lean_forward`` is set.

In compiled layers (up to ``LoraSpec.compiled_dequant_tokens`` tokens per matmul, by default any
number), the lean forward also computes the base matmul itself, in torch operations (``nf4.py``),
instead of calling bitsandbytes' operator; where the output is at least as wide as the input, with
the adapter's update inside it: ``[x | scaling * h] @ [W | B]^T``.

``BaseLastLoraLinear4bit`` reorders the same sum for the last projection of each checkpointed
decoder layer (``down_proj``; Phi's ``fc2``): the adapter first, the frozen base matmul last and
outside any compiled graph. The backward of a layer needs nothing from that matmul (its output
only feeds the next layer), and a non-reentrant checkpoint's recomputation stops as soon as it
has recomputed every tensor the backward needs (torch's checkpoint early stop): with nothing
saved after it, the matmul is left out of the recomputation, a quarter of its FLOPs in Mistral-7B.

Both apply in training, under autocast, with one plain LoRA adapter active; anything else
(generation, a disabled or merged adapter, mixed-adapter batches, DoRA, adapters that FSDP wraps
as units of their own) goes through PEFT's own forward unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from peft.tuners.lora.bnb import Linear4bit

from qlora_lightning.speed import nf4


class LeanLoraLinear4bit(Linear4bit):
    """PEFT's LoRA layer on a bitsandbytes 4-bit linear, with the adapter's update added by one
    ``addmm`` or carried by the base matmul itself."""

    # Compiled, matmuls of at most this many tokens (None: any) dequantize in the graph
    # (LoraSpec.compiled_dequant_tokens, where the measurements are).
    compiled_dequant_tokens: Optional[int] = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._lean_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        h = self.lora_A[name](self.lora_dropout[name](x))
        lora_B, scaling = self.lora_B[name].weight, self.scaling[name]
        in_graph = _in_graph(self.base_layer, x, self.compiled_dequant_tokens)
        # The adapter on the inner dimension copies the input, where addmm copies the output: it
        # pays for the wide outputs (benchmarks/lora_gemm.py: gate_proj 12% faster, down_proj 4%
        # slower).
        if in_graph and self.out_features >= self.in_features:
            return nf4.linear_4bit_lora(self.base_layer, x, h, lora_B, scaling)
        result = nf4.linear_4bit(self.base_layer, x) if in_graph else self.base_layer(x)
        out = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            h.reshape(-1, h.shape[-1]),
            lora_B.t(),
            alpha=scaling,
        )
        return out.view(result.shape)

    def _lean_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict):
        """The one active adapter when the lean path computes what PEFT would, else None."""
        if (
            args
            or kwargs
            or not self.training
            or self.disable_adapters
            or self.merged
            or not torch.is_autocast_enabled(x.device.type)
            or len(self.active_adapters) != 1
        ):
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A.keys() or name in self.lora_variant:
            return None
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        # Not an FSDP unit.
        plain = type(lora_A) is torch.nn.Linear and type(lora_B) is torch.nn.Linear
        return name if plain and lora_B.bias is None else None


class BaseLastLoraLinear4bit(LeanLoraLinear4bit):
    """PEFT's LoRA layer on a bitsandbytes 4-bit linear, computing the adapter's update before the
    base matmul.

    Nothing is saved for the backward after the adapter, so a checkpoint's recomputation, which
    stops once it has every saved tensor back, never redoes the base matmul.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._lean_adapter(x, args, kwargs)
        if name is None:
            return Linear4bit.forward(self, x, *args, **kwargs)
        update = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
        return torch.add(_uncompiled_call(self.base_layer, x), update, alpha=self.scaling[name])


def _in_graph(
    base: torch.nn.Module, x: torch.Tensor, compiled_dequant_tokens: Optional[int]
) -> bool:
    # In a compiled graph, the 4-bit matmul as torch operations (nf4.py): one generated kernel
    # dequantizes the weight, where bitsandbytes' operator takes several host calls and launches
    # (what sets the pace at few tokens), and the adapter's update can ride on the base matmul (what
    # pays at many).
    return (
        torch.compiler.is_compiling()
        and nf4.supports(base)
        and (compiled_dequant_tokens is None or x.numel() // x.shape[-1] <= compiled_dequant_tokens)
    )


@torch.compiler.disable
def _uncompiled_call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Inside a compiled graph, whose saved tensors are all saved when the whole graph returns, the
    # recomputation could not stop before the base matmul: the break ends the graph ahead of it.
    return module(x)


def use_base_last(checkpointed: Iterable[torch.nn.Module]) -> None:
    """Give the last 4-bit LoRA projection of each checkpointed module (a decoder layer, or its
    attention and its MLP) the base-last forward, in place.

    Last in registration order, which is the order the forward calls them in for Llama, Mistral,
    Gemma and Phi; where it is not, the reordering costs nothing and merely saves nothing.
    """
    for module in checkpointed:
        projections = [m for m in module.modules() if isinstance(m, Linear4bit)]
        if projections:
            projections[-1].__class__ = BaseLastLoraLinear4bit


def use_lean_lora(
    model: torch.nn.Module,
    compiled_dequant_tokens: Optional[int] = LeanLoraLinear4bit.compiled_dequant_tokens,
) -> None:
    """Give every PEFT 4-bit LoRA layer of ``model`` the lean forward, in place."""
    for layer in [m for m in model.modules() if type(m) is Linear4bit]:
        # a subclass adding no parameters or buffers: only the forward changes
        layer.__class__ = LeanLoraLinear4bit
        layer.compiled_dequant_tokens = compiled_dequant_tokens
