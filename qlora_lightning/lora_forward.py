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

It applies in training, under autocast, with one plain LoRA adapter active; anything else
(generation, a disabled or merged adapter, mixed-adapter batches, DoRA, adapters that FSDP wraps
as units of their own) goes through PEFT's own forward unchanged.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.bnb import Linear4bit


class LeanLoraLinear4bit(Linear4bit):
    """PEFT's LoRA layer on a bitsandbytes 4-bit linear, with the adapter's update fused into one ``addmm``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._lean_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        h = self.lora_A[name](self.lora_dropout[name](x))
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                          self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return out.view(result.shape)

    def _lean_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict):
        """The one active adapter when the lean path computes what PEFT would, else None."""
        if (args or kwargs or not self.training or self.disable_adapters or self.merged
                or not torch.is_autocast_enabled(x.device.type) or len(self.active_adapters) != 1):
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A.keys() or name in self.lora_variant:
            return None
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        plain = type(lora_A) is torch.nn.Linear and type(lora_B) is torch.nn.Linear  # not an FSDP unit
        return name if plain and lora_B.bias is None else None


def use_lean_lora(model: torch.nn.Module) -> None:
    """Give every PEFT 4-bit LoRA layer of ``model`` the lean forward, in place."""
    for layer in [m for m in model.modules() if type(m) is Linear4bit]:
        layer.__class__ = LeanLoraLinear4bit  # a subclass adding no state: only the forward changes
