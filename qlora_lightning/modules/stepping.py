"""Around each optimizer step: the adapter's gradients (averaged where FSDP leaves them to the
module, clipped where FSDP must do it), the guard that skips or stops on a non-finite loss or
gradient, and progress-bar values shown once they reach the host, so that no step waits for the
GPU."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import LightningModule
from typing_extensions import override

from qlora_lightning.model.distributed import average_gradients, is_fsdp, replicates_adapters
from qlora_lightning.modules.reliability import NonFiniteLossError
from qlora_lightning.speed.lagged import HostReadings

log = logging.getLogger(__name__)


class Stepping(LightningModule):
    """The step's gradients and precision guards of ``QLoRAModule``."""

    nonfinite: str  # "skip" or "stop"
    _skipped_steps: torch.Tensor  # on the GPU once training runs: counted without waiting for it
    _skip_flags: HostReadings  # (step, skipped?) on their way to the host
    _bar_values: HostReadings  # progress-bar values on their way to the host
    _skips_warned: int

    @override
    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        if (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and is_fsdp(self.trainer.strategy)
        ):
            # Lightning's FSDP precision plugin refuses norm clipping (it holds no handle on the
            # FSDP root); the root's clip_grad_norm_ takes the norm over every rank's shard.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @staticmethod
    def step_gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The gradients ``optimizer`` is about to apply.

        Found through its parameter groups, not the model: walking a 4-bit PEFT 7B model's
        thousands of modules takes milliseconds of host time, which the GPU waits for at every step.
        """
        optimizer = getattr(optimizer, "optimizer", optimizer)  # under a LightningOptimizer
        return [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]

    def reduce_replicated_gradients(self) -> None:
        """Before an optimizer step: average the adapter's gradients over the ranks where FSDP
        leaves them to the module (``replicates_adapters``); a no-op elsewhere."""
        if replicates_adapters(self.trainer.strategy):
            average_gradients(self._trainable(), self.trainer.world_size)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss or gradient (reading it waits for the
        GPU)."""
        return int(self._skipped_steps)

    def guard_nonfinite(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Before an optimizer step: True when the step may proceed.

        A non-finite loss or gradient skips the step (weights and moments untouched) or stops the
        run, per ``nonfinite``. An optimizer that can skip on the GPU (torch's fused Adam family,
        as under a ``GradScaler``) is told there, so the step never waits for the GPU; the warning
        comes a step or so late. Others are asked on the host: the step's gradients are dropped,
        and optimizers skip parameters without one.
        """
        grads = self.step_gradients(optimizer)
        # One multi-tensor kernel for all the adapter's gradients, not one launch per tensor.
        norm = (
            torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        )
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        # A bad gradient on any rank spoils the averaged one: every rank skips.
        bad = self.trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        self._skipped_steps = self._skipped_steps.to(bad.device) + bad
        optimizer = getattr(optimizer, "optimizer", optimizer)  # under a LightningOptimizer
        if self.nonfinite == "skip" and getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = bad.float()
            self._skip_flags.push(self.global_step, bad)
            self._report_skips()
            return True
        if not bool(bad):
            return True
        if self.nonfinite == "stop":
            last = (
                getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
            )
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {self.global_step}; "
                f"stopped before applying it (last checkpoint: {last})"
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._warn_skipped(self.global_step)
        return False

    def _report_skips(self, wait: bool = False) -> None:
        """Warn of the steps the GPU skipped, as their flags reach the host."""
        for step, bad in self._skip_flags.arrived(wait):
            if bool(bad):
                self._warn_skipped(step)

    def _warn_skipped(self, step: int) -> None:
        self._skips_warned += 1
        log.warning(
            "non-finite loss or gradient at step %d: step skipped (%d so far)",
            step,
            self._skips_warned,
        )

    def show_in_progress_bar(self, name: str, value: torch.Tensor) -> None:
        """Show ``value`` in the progress bar once it has reached the host (a step or so late).

        A metric logged with ``prog_bar=True`` is read with ``.item()`` after every batch, which
        makes the host wait for the GPU; this one is logged as a CPU copy when it has arrived.
        """
        self._bar_values.push(name, value.detach())
        for name, arrived in self._bar_values.arrived():
            self.log(name, arrived, prog_bar=True, logger=False)

    @override
    def on_train_end(self) -> None:
        self._report_skips(wait=True)
