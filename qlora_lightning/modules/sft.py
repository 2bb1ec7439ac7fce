"""Supervised fine-tuning: causal-LM loss on response tokens only."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from typing_extensions import override

from qlora_lightning.data.packing import check_packing_backend, model_inputs
from qlora_lightning.losses import chunked_lm_loss_sum, lm_loss_sum
from qlora_lightning.modules.base import LOSS_POSITIONS, QLoRAModule


class SFTModule(QLoRAModule):
    """Causal-LM loss on the response tokens, normalized per optimizer step.

    Each micro-batch contributes its *summed* token loss; before the optimizer step the
    gradients are divided by the number of response tokens in the whole step (over all
    micro-batches and ranks). The loss and the update are therefore the same however the
    tokens of a step are split into micro-batches and accumulation steps.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._step_nll = 0.0  # summed over the micro-batches of the current optimizer step
        self._step_tokens = 0

    @override
    def on_fit_start(self) -> None:
        # The data picks the batch layout and the model the attention kernel: only here are both
        # known.
        check_packing_backend(
            getattr(self.trainer.datamodule, "packing", "off"),
            self.model.config._attn_implementation,
        )

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll, n = self.loss_sum(batch)
        self._step_nll += nll.detach()
        self._step_tokens += n
        # Lightning divides by accumulate_grad_batches; on_before_optimizer_step undoes that.
        return nll

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        self.reduce_replicated_gradients()
        tokens = self.trainer.strategy.reduce(
            torch.as_tensor(self._step_tokens, device=self.device, dtype=torch.float32),
            reduce_op="sum",
        )
        nll = self.trainer.strategy.reduce(
            torch.as_tensor(self._step_nll, device=self.device, dtype=torch.float32),
            reduce_op="sum",
        )
        tokens = tokens.clamp(min=1.0)
        self._step_nll, self._step_tokens = 0.0, 0
        proceed = self.guard_nonfinite(nll, optimizer)
        self.log("train/skipped_steps", self._skipped_steps.float())
        if not proceed:
            return
        # Gradients hold (1 / (accumulation * world size)) * sum over the step; make it a per-token
        # mean.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens
        grads = self.step_gradients(optimizer)
        # One multi-tensor kernel, not one launch per tensor (they add up at small batches)
        if grads:
            torch._foreach_mul_(grads, scale)
        self.log("train/loss", nll / tokens)
        self.show_in_progress_bar("loss", nll / tokens)
        self.log("train/loss_tokens", tokens)

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL over the batch's labelled tokens, and their count (chunked per
        ``loss_chunk_size``)."""
        if self.loss_chunk_size is None:
            return lm_loss_sum(self(**model_inputs(batch)), batch["labels"])
        return chunked_lm_loss_sum(
            self.final_hidden(**model_inputs(batch)),
            self.logits_head(),
            batch["labels"],
            self.loss_chunk_size,
            batch.get(LOSS_POSITIONS),
        )

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss, "test")

    def _eval_step(self, batch: dict, metric: MeanMetric, stage: str) -> None:
        nll, n = self.loss_sum(batch)
        metric.update(nll / n.clamp(min=1), weight=n)  # token-weighted mean over the whole split
        self.log(f"{stage}/loss", metric, prog_bar=True, batch_size=int(n))

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_ppl(self.val_loss, "val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_ppl(self.test_loss, "test")

    def _log_ppl(self, metric: MeanMetric, stage: str) -> None:
        loss = metric.compute()
        self.log(f"{stage}/ppl", torch.exp(loss))
