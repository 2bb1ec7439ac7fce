"""KTO on one 4-bit base: unpaired thumbs-up / thumbs-down rows against a reference, as TRL's
KTOTrainer.

Each row's completion is scored by the policy and the reference (the adapter off, or a frozen SFT
adapter: ``PreferenceModule``). KTO compares each row's implied reward with a reference point,
its estimate of KL(policy || reference): the batch's mean log-ratio over mismatched (prompt,
completion) pairs, which ``KTODataModule`` builds. That estimate takes no gradient (TRL's
choice), so its policy forward runs without one: per step, one forward with gradients and three
without (the KL pairs under the policy, the rows and the KL pairs under the reference).
"""

from __future__ import annotations

from typing import Optional

import torch
from jsonargparse.typing import PositiveFloat
from typing_extensions import override

from qlora_lightning.errors import UserError
from qlora_lightning.losses import UnpairedLossType, kto_loss
from qlora_lightning.modules.dpo import PreferenceModule


class KTOModule(PreferenceModule):
    """KTO (or APO-zero's unpaired variant) on unpaired rows, with batches laid out by
    ``KTODataModule``.

    Logs, as TRL's KTOTrainer does, ``loss``, ``kl`` (the reference point), ``rewards/chosen`` and
    ``logps/chosen`` (means over the desirable rows), ``rewards/rejected`` and ``logps/rejected``
    (the undesirable rows), ``rewards/margin`` (the first minus the second, for batches holding
    both), plus ``rewards/accuracy``: the share of rows whose reward falls on their label's side
    of the reference point (above it for desirable rows, below for undesirable ones), which is
    where each row's loss is below 0.5. Rewards are ``beta * (log pi - log pi_ref)``.

    Args:
        beta: Inverse temperature of the implicit reward.
        loss_type: ``kto`` (the KTO paper) or ``apo_zero_unpaired`` (APO-zero's unpaired variant,
            whose reference point is 0: it runs no KL forwards).
        desirable_weight: Weight of the desirable rows' losses; with unequal counts of desirable
            (D) and undesirable (U) rows, the KTO paper advises ``desirable_weight * D /
            (undesirable_weight * U)`` in [1, 4/3].
        undesirable_weight: Weight of the undesirable rows' losses.
        sft_adapter: Directory of an SFT adapter: frozen as the reference and the policy's start
            (see ``PreferenceModule``). Without it the reference is the bare base.
    """

    metric_names = (
        "loss",
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
    )

    def __init__(
        self,
        *args,
        beta: PositiveFloat = 0.1,
        loss_type: UnpairedLossType = "kto",
        desirable_weight: PositiveFloat = 1.0,
        undesirable_weight: PositiveFloat = 1.0,
        sft_adapter: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(*args, beta=beta, sft_adapter=sft_adapter, **kwargs)
        self.loss_type, self.desirable_weight, self.undesirable_weight = (
            loss_type,
            desirable_weight,
            undesirable_weight,
        )

    def describe(self) -> dict:
        return {
            **super().describe(),
            "kto": {
                "beta": self.beta,
                "loss_type": self.loss_type,
                "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight,
                "sft_adapter": self.sft_adapter,
            },
        }

    @override
    def on_fit_start(self) -> None:
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if self.loss_type == "kto" and batch_size is not None and batch_size < 2:
            # One row's only mismatched pair is itself: the KL estimate would be its own reward.
            raise UserError(
                "loss_type kto estimates its KL term from the other rows of a batch: "
                f"set data.batch_size to 2 or more (got {batch_size})"
            )

    def kl_logratio(self, batch: dict) -> torch.Tensor:
        """The mean ``log pi - log pi_ref`` over the batch's mismatched pairs, averaged over ranks
        as TRL does."""
        mismatched = {
            name: batch[f"kl_{name}"] for name in ("input_ids", "attention_mask", "labels")
        }
        reference = self.reference_logps(mismatched)
        with torch.no_grad():  # in train mode, as TRL runs it: only the gradient is spared
            policy = self.response_logps(mismatched)[0]
        logratio = (policy - reference).mean()
        if self._trainer is not None and self.trainer.world_size > 1:
            logratio = self.all_gather(logratio).mean()
        return logratio

    def batch_metrics(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss and metrics of one batch of B rows; see the class docstring."""
        desirable = batch["label"]
        kl_logratio = self.kl_logratio(batch) if self.loss_type == "kto" else torch.zeros(())
        # The reference first, so that its logits are freed before the policy's forward.
        reference = self.reference_logps(batch)
        logps = self.response_logps(batch)[0]
        losses, rewards, kl = kto_loss(
            logps,
            reference,
            desirable,
            kl_logratio,
            self.beta,
            self.desirable_weight,
            self.undesirable_weight,
            self.loss_type,
        )
        on_their_side = torch.where(desirable, rewards > self.beta * kl, rewards < self.beta * kl)
        metrics = {"loss": losses.mean(), "kl": kl, "rewards/accuracy": on_their_side.float()}
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            if rows.any():
                metrics[f"rewards/{name}"], metrics[f"logps/{name}"] = (
                    rewards[rows],
                    logps[rows].detach(),
                )
        if desirable.any() and not desirable.all():
            metrics["rewards/margin"] = (
                metrics["rewards/chosen"].mean() - metrics["rewards/rejected"].mean()
            )
        return metrics
