"""Optimizers for the adapter that keep the training step free of host-device synchronization.

A step that makes the host wait for the GPU leaves the GPU idle while the host then launches the
next work (the optimizer's per-tensor launches, Lightning's hooks, the next batch). Without such a
wait the host runs ahead and that time hides behind the GPU's.

* ``torch.optim.AdamW(fused=True)``: one kernel for all adapter tensors, and it skips a
  non-finite step on the GPU (``found_inf``), so the module's guard needs no host decision.
  Its fp32 moments take 8 bytes per adapter parameter on the GPU.
* :class:`AdamW8bit`: bitsandbytes' 8-bit AdamW (2 bytes per adapter parameter) without the
  device-wide synchronize that bitsandbytes issues after every tensor's update.
"""

from __future__ import annotations

import torch
from bitsandbytes.optim import AdamW8bit as _BnbAdamW8bit


class AdamW8bit(_BnbAdamW8bit):
    """bitsandbytes' 8-bit AdamW, the same updates, without a ``torch.cuda.synchronize()`` per
    tensor.

    bitsandbytes launches its kernels on the default CUDA stream, where training makes the
    gradients, so they run after them and in order; waiting for each before launching the next
    buys nothing there and, for LoRA's hundreds of small tensors, costs a host-device round trip
    each. On another stream this falls back to bitsandbytes' own step. Not paged: managed (paged)
    state is left to bitsandbytes' ``PagedAdamW8bit``, which keeps its synchronization.
    """

    @torch.no_grad()
    def step(self, closure=None):
        if torch.cuda.is_available() and torch.cuda.current_stream() != torch.cuda.default_stream():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)
        return loss
