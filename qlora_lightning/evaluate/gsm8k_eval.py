"""GSM8K exact match during ``fit`` (every N steps) and in ``validate`` / ``test``, as a callback.

A callback, not a module's step, so that any objective (SFT, DPO) gets it, several can run
side by side (one per task and adapter), and ``fit`` decides how often to pay for generation.
The prompts are the data module's own tokenized rows cut before their last response, so the
model is asked exactly as it was trained (template, BOS, chat template).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from typing_extensions import override

from qlora_lightning.errors import UserError
from qlora_lightning.evaluate.evaluation import examples_in_batch, is_correct, split_prompt_response
from qlora_lightning.evaluate.generation import greedy_generate, stop_token_ids
from qlora_lightning.evaluate.tracking import is_mlflow, is_wandb, log_table
from qlora_lightning.model.adapters import using_adapter

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One evaluated example."""

    prompt: str
    generation: str
    reference: str
    correct: bool


class GSM8KEval(Callback):
    """Accuracy of greedy generations whose final number (``#### N``, else the last number) matches.

    In ``fit`` it scores the first ``num_samples`` examples of the validation split before the
    first optimizer step and every ``every_n_steps`` steps, logging ``val/<name>_acc``; in
    ``validate`` and ``test`` it scores the whole split, logging ``val/…`` or ``test/<name>_acc``.
    A few prompts and generations go to TensorBoard as text and to W&B and MLflow as a table
    (``<stage>/<name>_samples``).
    With several devices each scores a shard and the counts are summed (DDP; a sharded model,
    FSDP, would need every rank in every forward and is not supported).

    Args:
        every_n_steps: Optimizer steps between evaluations during ``fit``.
        num_samples: Examples scored during ``fit`` (the first of the split); all when None.
        max_new_tokens: Longest generation in tokens (a GSM8K solution takes ~100-200).
        batch_size: Prompts per generation batch.
        name: Metric name: ``<stage>/<name>_acc``.
        adapter: Name of the adapter to score (see ``model.adapters``); the active one when None.
        data: A data module to take the examples from instead of the trainer's (e.g. another task);
            its tokenizer defaults to the model's.
        eval_at_start: In ``fit``, also score before the first optimizer step (the baseline).
        num_text_samples: Prompts and generations written to TensorBoard per evaluation.
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 200,
        num_samples: Optional[PositiveInt] = 128,
        max_new_tokens: PositiveInt = 256,
        batch_size: PositiveInt = 16,
        name: str = "gsm8k",
        adapter: Optional[str] = None,
        data: Optional[LightningDataModule] = None,
        eval_at_start: bool = True,
        num_text_samples: NonNegativeInt = 4,
    ):
        super().__init__()
        if every_n_steps < 1 or max_new_tokens < 1 or batch_size < 1:
            raise UserError("GSM8KEval: every_n_steps, max_new_tokens and batch_size must be >= 1")
        if num_samples is not None and num_samples < 1:
            raise UserError(f"GSM8KEval: num_samples must be >= 1 or null, got {num_samples}")
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.name, self.adapter, self.data = name, adapter, data
        self.eval_at_start, self.num_text_samples = eval_at_start, num_text_samples
        self.history: list[dict] = []  # {"stage", "step", "accuracy", "total"} per evaluation
        self._examples: dict[
            str, list[tuple[list[int], str]]
        ] = {}  # stage -> (prompt ids, reference text)
        self._last_step: Optional[int] = None

    # ---- Lightning hooks -------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.data is not None:
            if getattr(self.data, "tokenizer", None) is None:
                self.data.tokenizer = pl_module.tokenizer
            self.data.setup(stage)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if self.eval_at_start and trainer.global_step == 0:
            self._evaluate_in_fit(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._evaluate_in_fit(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":  # during fit, `every_n_steps` decides
            pl_module.log(f"val/{self.name}_acc", self.evaluate(trainer, pl_module, "val"))

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log(f"test/{self.name}_acc", self.evaluate(trainer, pl_module, "test"))

    # ---- pieces ----------------------------------------------------------------------

    def _evaluate_in_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_step == trainer.global_step:  # gradient accumulation: once per optimizer step
            return
        self._last_step = trainer.global_step
        accuracy = self.evaluate(trainer, pl_module, "val", self.num_samples)
        key = f"val/{self.name}_acc"
        # Straight to the loggers: `self.log` in a training hook would wait for `log_every_n_steps`.
        for logger in trainer.loggers:
            logger.log_metrics({key: accuracy}, step=trainer.global_step)
        # For checkpoint monitors and the bar.
        pl_module.log(key, accuracy, logger=False, prog_bar=True)

    def evaluate(
        self, trainer: Trainer, pl_module: LightningModule, stage: str, limit: Optional[int] = None
    ) -> float:
        """Score this rank's share of the first ``limit`` examples; return the accuracy over all
        ranks."""
        examples = self._stage_examples(trainer, stage)[:limit]
        mine = examples[trainer.global_rank :: trainer.world_size]
        scored = self.score(pl_module, mine)
        counts = torch.tensor(
            [sum(s.correct for s in scored), len(scored)],
            dtype=torch.float64,
            device=pl_module.device,
        )
        correct, total = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        accuracy = correct / max(total, 1.0)
        self.history.append(
            {"stage": stage, "step": trainer.global_step, "accuracy": accuracy, "total": int(total)}
        )
        log.info(
            "%s/%s_acc = %.4f (%d of %d) at step %d",
            stage,
            self.name,
            accuracy,
            correct,
            total,
            trainer.global_step,
        )
        self._log_text(trainer, stage, scored[: self.num_text_samples])
        return accuracy

    def score(
        self, pl_module: LightningModule, examples: list[tuple[list[int], str]]
    ) -> list[Scored]:
        """Generate greedily for each (prompt ids, reference) with ``adapter`` active and judge the
        answers."""
        if not examples:
            return []
        tokenizer, model = pl_module.tokenizer, pl_module.model
        # The trainer's precision (bf16 autocast under bf16-mixed), as in training: hooks run
        # outside it.
        with (
            pl_module.trainer.precision_plugin.forward_context(),
            using_adapter(model, self.adapter),
        ):
            tokens = greedy_generate(
                model,
                [p for p, _ in examples],
                tokenizer.pad_token_id,
                stop_token_ids(model, tokenizer),
                self.max_new_tokens,
                self.batch_size,
            )
        generations = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        prompts = tokenizer.batch_decode([p for p, _ in examples], skip_special_tokens=True)
        return [
            Scored(prompt, generation, reference, is_correct(generation, reference))
            for prompt, generation, (_, reference) in zip(prompts, generations, examples)
        ]

    def _stage_examples(self, trainer: Trainer, stage: str) -> list[tuple[list[int], str]]:
        """(prompt ids, reference text) of every example of the split, read once per stage."""
        if stage not in self._examples:
            datamodule = self.data or trainer.datamodule
            if datamodule is None:
                raise UserError("GSM8KEval needs a data module (the trainer's or its own `data`)")
            tokenizer = trainer.lightning_module.tokenizer
            loader = (
                datamodule.test_dataloader() if stage == "test" else datamodule.val_dataloader()
            )
            examples = []
            for batch in loader:
                if "labels" not in batch:
                    raise UserError(
                        f"GSM8KEval reads SFT batches (input_ids, labels), not {sorted(batch)}: "
                        "give it an SFT data module as `data`"
                    )
                for ids, labels in examples_in_batch(batch):
                    prompt, response = split_prompt_response(ids, labels)
                    if prompt:  # a row that is all response has nothing to continue from
                        examples.append(
                            (prompt, tokenizer.decode(response, skip_special_tokens=True))
                        )
            self._examples[stage] = examples
        return self._examples[stage]

    def _log_text(self, trainer: Trainer, stage: str, scored: list[Scored]) -> None:
        if not scored or not trainer.is_global_zero:
            return
        text = "\n\n---\n\n".join(
            f"**{'correct' if s.correct else 'wrong'}**\n\n```\n{s.prompt}\n```\n\n"
            f"**generation**\n\n```\n{s.generation}\n```\n\n"
            f"**reference**\n\n```\n{s.reference}\n```"
            for s in scored
        )
        for logger in trainer.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if add_text is not None:  # TensorBoard's SummaryWriter
                add_text(f"{stage}/{self.name}_samples", text, trainer.global_step)
        # W&B and MLflow: a table (TensorBoard has the text above).
        rows = [[s.correct, s.prompt, s.generation, s.reference] for s in scored]
        log_table(
            [lg for lg in trainer.loggers if is_wandb(lg) or is_mlflow(lg)],
            f"{stage}/{self.name}_samples",
            ["correct", "prompt", "generation", "reference"],
            rows,
            trainer.global_step,
        )
