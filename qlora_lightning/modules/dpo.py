"""Preference tuning on one 4-bit base: DPO (and IPO, hinge) against a reference; ORPO and SimPO
without one.

The policy is the base with the trainable adapter. The reference is the same base with the
adapter switched off or, when DPO starts from an SFT adapter, a frozen copy of that adapter
loaded beside the trainable one and switched in for the reference forward. Either way the base
weights exist once in memory. ORPO and SimPO need no reference: one forward per pair, none built.
``PreferenceModule`` holds what DPO and KTO (``modules/kto.py``) share.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Optional

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from torchmetrics import MeanMetric
from typing_extensions import override

from qlora_lightning.bounds import LabelSmoothing
from qlora_lightning.errors import UserError
from qlora_lightning.losses import (
    REFERENCE_FREE,
    PreferenceLossType,
    chunked_sequence_logps,
    dpo_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)
from qlora_lightning.model.build import add_frozen_adapter, trainable_state_dict
from qlora_lightning.model.distributed import is_fsdp
from qlora_lightning.modules.base import LOSS_POSITIONS, QLoRAModule

REFERENCE_ADAPTER = "reference"


def reference_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every weight but the trainable ones: the base and any frozen reference adapter."""
    trainable = set(trainable_state_dict(model))
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name not in trainable:
            digest.update(name.encode())
            digest.update(
                tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
            )
    return digest.hexdigest()


class PreferenceModule(QLoRAModule):
    """What DPO and KTO share: the reference on the one 4-bit base, response log-probs, and
    per-batch metrics.

    A subclass gives ``batch_metrics(batch)``: each of ``metric_names`` -> a 0-d tensor (a mean
    over the batch's examples) or a 1-d one (a value per example it covers, e.g. KTO's desirable
    rows only; absent when it covers none). Training logs each per step as ``train/loss`` or its
    own name (TRL's); validation and test log means over the whole split as ``val/<name>`` and
    ``test/<name>``.

    Args:
        beta: Inverse temperature of the implicit reward ``beta * (log pi - log pi_ref)``.
        sft_adapter: Directory of the adapter an SFT run saved. It is loaded twice on the one
            base: frozen, as the reference, and trainable, as the policy's start (unless
            ``lora.init_adapter`` names another). Without it the reference is the bare base.
    """

    metric_names: tuple[str, ...] = ()

    def __init__(
        self, *args, beta: PositiveFloat = 0.1, sft_adapter: Optional[str] = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.beta, self.sft_adapter = beta, sft_adapter
        if sft_adapter and not self.lora.init_adapter:
            # The policy starts where SFT ended, so that at step 0 it equals the reference.
            self.lora = replace(self.lora, init_adapter=sft_adapter)
        self._step_loss = 0.0  # summed over the micro-batches of the current optimizer step
        self.eval_metrics = torch.nn.ModuleDict(
            {
                stage: torch.nn.ModuleDict({name: MeanMetric() for name in self.metric_names})
                for stage in ("val", "test")
            }
        )

    def batch_metrics(self, batch: dict) -> dict[str, torch.Tensor]:
        """The loss and metrics of one batch (see the class docstring)."""
        raise NotImplementedError

    @override
    def configure_model(self) -> None:
        super().configure_model()
        if self.sft_adapter and REFERENCE_ADAPTER not in self.model.peft_config:
            add_frozen_adapter(self.model, self.sft_adapter, REFERENCE_ADAPTER, "model.sft_adapter")

    # ---- the reference ---------------------------------------------------------------

    @contextmanager
    def as_reference(self) -> Iterator[None]:
        """Within this context the model is the frozen reference, in eval mode, without gradients.

        Eval mode turns every dropout off, so the reference gives the same log-probs whenever it
        is asked (precomputed or live, in training or validation).
        """
        # Trl imports peft: seconds of a config's parse (model/build.py)
        from trl.trainer.utils import (
            use_adapter,
        )

        was_training = self.model.training
        self.model.eval()
        try:
            with (
                torch.no_grad(),
                use_adapter(self.model, REFERENCE_ADAPTER if self.sft_adapter else None),
            ):
                yield
        finally:
            self.model.train(was_training)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(N,) summed response log-probs of a batch's N sequences under the reference."""
        with self.as_reference():
            return self.response_logps(batch)[0]

    def response_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) summed response log-probs of a batch's N sequences (``input_ids``,
        ``attention_mask``, ``labels``), and (N,) response token counts.

        Chunked per ``loss_chunk_size`` (the same values, never the full (N, T, V) logits).
        """
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.loss_chunk_size is None:
            return sequence_logps(self(**inputs), batch["labels"])
        return chunked_sequence_logps(
            self.final_hidden(**inputs),
            self.logits_head(),
            batch["labels"],
            self.loss_chunk_size,
            batch.get(LOSS_POSITIONS),
        )

    # ---- steps -----------------------------------------------------------------------

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        metrics = self.batch_metrics(batch)
        examples = batch["input_ids"].shape[0] // self.sequences_per_example
        for name, value in metrics.items():
            mean = value.detach().mean()
            self.log(
                "train/loss" if name == "loss" else name,
                mean,
                batch_size=examples if value.ndim == 0 else value.numel(),
            )
            if name in ("loss", "rewards/accuracy"):
                self.show_in_progress_bar(name.removeprefix("rewards/"), mean)
        self._step_loss += metrics["loss"].detach()
        return metrics["loss"]

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        self.reduce_replicated_gradients()
        loss, self._step_loss = self._step_loss, 0.0
        self.guard_nonfinite(torch.as_tensor(loss, device=self.device), optimizer)
        self.log("train/skipped_steps", self._skipped_steps.float())

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict, stage: str) -> None:
        examples = batch["input_ids"].shape[0] // self.sequences_per_example
        for name, value in self.batch_metrics(batch).items():
            metric = self.eval_metrics[stage][name]
            if value.ndim == 0:
                metric.update(value, weight=examples)  # a mean over all examples of the split
            else:
                metric.update(value)
            self.log(
                f"{stage}/{name}",
                metric,
                batch_size=examples,
                prog_bar=name in ("loss", "rewards/accuracy"),
            )


class DPOModule(PreferenceModule):
    """DPO (or IPO, hinge, ORPO, SimPO) on preference pairs, with batches laid out by
    ``PreferenceDataModule``.

    Each step runs chosen and rejected sequences through the policy in one (2B, T) forward; a
    sequence's log-prob is the sum over its response tokens. Logs ``loss``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy`` (share of pairs whose chosen
    reward is strictly higher), ``logps/chosen`` and ``logps/rejected`` under ``train/``, ``val/``
    and ``test/``; rewards are ``beta * (log pi - log pi_ref)``, as in TRL (ORPO, SimPO:
    ``beta`` times the mean per-token log-prob, as TRL's ORPO and CPO trainers log them).

    Args:
        beta: Inverse temperature of the implicit reward (``ipo``: the regularization tau; ``orpo``:
            the weight lambda of the odds-ratio term).
        loss_type: ``sigmoid`` (DPO), ``ipo`` (per-token log-ratios, as TRL), ``hinge``, ``orpo``
            (the chosen responses' NLL plus an odds-ratio term) or ``simpo`` (length-normalised
            rewards with a margin); the last two run no reference.
        label_smoothing: ``sigmoid`` and ``simpo``: assumed probability that a pair's label is
            flipped (conservative DPO); 0 is the plain loss.
        simpo_gamma: ``simpo``: the target margin between the chosen and rejected rewards.
        sft_adapter: Directory of the adapter an SFT run saved. It is loaded twice on the one
            base: frozen, as the reference, and trainable, as the policy's start (unless
            ``lora.init_adapter`` names another). Without it the reference is the bare base.
        precompute_ref_logps: Compute the reference log-probs of every pair once, before training,
            and cache them with the tokenized data; each step then runs the policy only. Without a
            ``fit`` (``validate``, ``test``), or for data without them, they are computed live.
        ref_batch_size: Pairs per forward when precomputing the reference log-probs.
    """

    sequences_per_example = 2  # the chosen and the rejected sequence of each pair, in one forward
    # TRL's names; the loss is logged as train/loss.
    metric_names = (
        "loss",
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
        loss_type: PreferenceLossType = "sigmoid",
        label_smoothing: LabelSmoothing = 0.0,
        simpo_gamma: float = 0.5,
        sft_adapter: Optional[str] = None,
        precompute_ref_logps: bool = False,
        ref_batch_size: PositiveInt = 4,
        **kwargs,
    ):
        super().__init__(*args, beta=beta, sft_adapter=sft_adapter, **kwargs)
        if label_smoothing and loss_type not in ("sigmoid", "simpo"):
            raise UserError(
                "model.label_smoothing applies to the sigmoid and simpo losses only, not "
                f"{loss_type}"
            )
        if loss_type in REFERENCE_FREE and (precompute_ref_logps or sft_adapter):
            raise UserError(
                f"loss_type {loss_type} runs no reference: drop model.precompute_ref_logps and "
                "model.sft_adapter (start from an SFT adapter with model.lora.init_adapter)"
            )
        self.loss_type, self.label_smoothing, self.simpo_gamma = (
            loss_type,
            label_smoothing,
            simpo_gamma,
        )
        self.precompute_ref_logps, self.ref_batch_size = precompute_ref_logps, ref_batch_size

    def describe(self) -> dict:
        return {
            **super().describe(),
            "dpo": {
                "beta": self.beta,
                "loss_type": self.loss_type,
                "label_smoothing": self.label_smoothing,
                "simpo_gamma": self.simpo_gamma,
                "sft_adapter": self.sft_adapter,
                "precompute_ref_logps": self.precompute_ref_logps,
            },
        }

    # ---- precomputed reference log-probs ---------------------------------------------

    @override
    def on_fit_start(self) -> None:
        if not self.precompute_ref_logps:
            return
        if is_fsdp(self.trainer.strategy):
            # Precomputing runs the reference outside a training step, where the FSDP root has not
            # gathered its own (sharded) weights, and fingerprints weights that no rank holds whole.
            raise UserError(
                "model.precompute_ref_logps does not work under FSDP: turn it off (the reference "
                "then runs live, on the same sharded base) or use the ddp strategy"
            )
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "add_reference_logps"):
            raise UserError("model.precompute_ref_logps needs a PreferenceDataModule as data")
        datamodule.add_reference_logps(
            self._reference_pair_logps, reference_fingerprint(self.model), self.ref_batch_size
        )

    def _reference_pair_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # The same autocast as inside a training step, so that precomputed and live values agree.
        with self.trainer.precision_plugin.forward_context():
            logps = self.reference_logps(batch).cpu()
        return logps.chunk(2)

    # ---- steps -----------------------------------------------------------------------

    def batch_metrics(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss and metrics (means over the batch's pairs) of one (2B, T) pair batch; see
        ``metric_names``."""
        if self.loss_type in REFERENCE_FREE:
            return self._reference_free_metrics(*self.response_logps(batch))
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            # First, so that its logits are freed before the policy's forward.
            ref_chosen, ref_rejected = self.reference_logps(batch).chunk(2)
        logps, tokens = self.response_logps(batch)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            self.beta,
            self.loss_type,
            self.label_smoothing,
            chosen_tokens,
            rejected_tokens,
        )
        return _metrics(losses.mean(), chosen_rewards, rejected_rewards, chosen, rejected)

    def _reference_free_metrics(
        self, logps: torch.Tensor, tokens: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """ORPO and SimPO score each response by its mean per-token log-prob."""
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        chosen_avg, rejected_avg = (
            chosen / chosen_tokens.clamp(min=1),
            rejected / rejected_tokens.clamp(min=1),
        )
        if self.loss_type == "orpo":
            odds, chosen_rewards, rejected_rewards = orpo_loss(chosen_avg, rejected_avg, self.beta)
            # The SFT term: the chosen responses' NLL per token over the batch, as TRL's
            # ORPOTrainer.
            loss = -chosen.sum() / chosen_tokens.sum().clamp(min=1) + odds.mean()
        else:
            losses, chosen_rewards, rejected_rewards = simpo_loss(
                chosen_avg, rejected_avg, self.beta, self.simpo_gamma, self.label_smoothing
            )
            loss = losses.mean()
        return _metrics(loss, chosen_rewards, rejected_rewards, chosen, rejected)


def _metrics(
    loss: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``DPOModule.metric_names`` of one batch: its loss, and means over its pairs."""
    return {
        "loss": loss,
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    }
