"""Building the module's model: its training plan, the 4-bit PEFT model the plan says, what to do
when it does not fit, and the optimizer and learning-rate schedule over the adapter."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from qlora_lightning.errors import UserError
from qlora_lightning.model.adapters import attach_adapters
from qlora_lightning.model.build import build_model
from qlora_lightning.model.distributed import (
    cast_frozen_for_fsdp,
    check_fsdp_precision,
    is_fsdp,
    replicates_adapters,
)
from qlora_lightning.model.plan import (
    TrainingPlan,
    declared_micro_batch,
    load_model_config,
    optimizer_kind,
    resolve_plan,
)

log = logging.getLogger(__name__)


def paged_adamw_8bit(params, lr: float = 2e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The QLoRA paper's optimizer: 8-bit AdamW whose state pages to CPU memory under pressure."""
    import bitsandbytes as bnb  # deferred: importing it costs a second and logs about CUDA

    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)


# What it builds, for the plan's optimizer kind (``plan.optimizer_kind``), without building one.
setattr(paged_adamw_8bit, "optimizer_class", "bitsandbytes.optim.PagedAdamW8bit")


class Building(LightningModule):
    """``configure_model`` (the plan, then the model it says) and ``configure_optimizers``; the
    settings they read are ``QLoRAModule``'s."""

    # Sequences in the model's forward per example of a micro-batch (DPO: a chosen and a rejected
    # one).
    sequences_per_example = 1

    plan: Optional[TrainingPlan]
    model: Optional[torch.nn.Module]

    def plan_training(
        self,
        estimate: bool = False,
        gradient_checkpointing: Any = None,
        datamodule: Any = None,
        on_gpu: bool = False,
        model_config=None,
    ) -> TrainingPlan:
        """This module's plan on its trainer's device and strategy, for its DataModule's
        micro-batches.

        Args:
            estimate: Also price the plan (``TrainingPlan.peak_gib``); needs the DataModule's shape.
            gradient_checkpointing: A setting to plan instead of the module's own.
            datamodule: The data to plan for, where no trainer holds it (the ``estimate`` command).
            on_gpu: Plan for a CUDA device not known here (``estimate``), not this trainer's.
            model_config: The base's transformers config, where the caller has it already.
        """
        strategy, device = self._placement()
        setting = (
            self.gradient_checkpointing
            if gradient_checkpointing is None
            else gradient_checkpointing
        )
        data = datamodule if datamodule is not None else getattr(self._trainer, "datamodule", None)
        return resolve_plan(
            self.base,
            self.lora,
            setting,
            memory_budget_gib=self.memory_budget_gib,
            loss_chunk_size=self.loss_chunk_size,
            optimizer=optimizer_kind(self.optimizer_factory),
            device=None if on_gpu else device,
            strategy=strategy,
            micro_batch=lambda: declared_micro_batch(data, self.sequences_per_example),
            estimate=estimate,
            model_config=model_config,
        )

    def _placement(self) -> tuple[Optional[Strategy], torch.device]:
        """The trainer's strategy, and this rank's device (the CPU without a trainer)."""
        strategy = self._trainer.strategy if self._trainer else None
        # Each rank loads the 4-bit base onto its own device (DDP keeps that copy; FSDP shards it).
        return strategy, strategy.root_device if strategy else torch.device("cpu")

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy, device = self._placement()
        compute_dtype = getattr(torch, self.base.compute_dtype)
        if is_fsdp(strategy) and self.base.quantization in ("nf4", "fp4"):
            # Checked before the minutes-long load.
            check_fsdp_precision(strategy, str(self.trainer.precision), compute_dtype)
        self.plan = self.plan_training()
        if rank_zero_only.rank == 0:
            log.info(self.plan.line())
        try:
            self.model = build_model(self.base, self.lora, self.plan, device)
        except torch.cuda.OutOfMemoryError:
            raise UserError(self._out_of_memory_message(device)) from None
        if self.adapters:
            attach_adapters(self.model, self.adapters)
        if is_fsdp(strategy):
            cast_frozen_for_fsdp(self.model, compute_dtype)
        if replicates_adapters(strategy):
            # FSDP leaves them alone; reduce_replicated_gradients averages them.
            strategy.kwargs["ignored_states"] = self._trainable()

    def _out_of_memory_message(self, device: torch.device) -> str:
        """What did not fit, what the estimator expected, what the GPU had, and what to lower."""
        free, total = torch.cuda.mem_get_info(device)
        try:
            data = getattr(self._trainer, "datamodule", None)
            assert self.plan is not None  # resolved in configure_model, before the model loads
            shape = self.plan.micro_batch or declared_micro_batch(data, self.sequences_per_example)
            plan = replace(self.plan, micro_batch=shape)
            gib = plan.peak_gib
            if gib is None:
                gib = plan.estimate(load_model_config(self.base), self.base, self.lora)["total_gib"]
            estimate = f"about {gib:.1f} GiB estimated for batch {plan.micro_batch} tokens"
        except Exception:  # no estimate for an architecture or data the estimator cannot read
            estimate = "no estimate for this architecture or data"
        return (
            f"out of GPU memory loading '{self.base.name_or_path}' ({estimate}; {free / 2**30:.1f} "
            f"of {total / 2**30:.1f} GiB free on {device}): use base.quantization nf4, lower "
            "data.batch_size or data.max_seq_length, keep gradient_checkpointing on, or free the "
            "GPU"
        )

    @override
    def configure_optimizers(self) -> Any:
        # Its module imports peft: seconds of a config's parse (model/build.py)
        from transformers import (
            get_scheduler,
        )

        params = self._trainable()
        optimizer = self.optimizer_factory(params)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_scheduler(
            self.lr_scheduler if self.lr_scheduler != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=int(self.warmup_ratio * total),
            num_training_steps=total,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
