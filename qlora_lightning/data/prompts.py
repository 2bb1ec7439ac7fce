"""Prompts to generate from (``predict``): one per row of a JSON / JSONL / CSV / text file."""

from __future__ import annotations

from typing import Optional

from torch.utils.data import DataLoader
from typing_extensions import override

from qlora_lightning.data.base import (
    ORIGIN,
    SFTDataModule,
    load_raw_dataset,
    resolve_tokenizer,
    without_origin,
)
from qlora_lightning.data.tokenize import RowError, required_str, tokenize_prompt
from qlora_lightning.errors import UserError


class PromptsDataModule(SFTDataModule):
    """Prompts rendered as a user turn of the training data, for ``predict``.

    Each prompt goes through the same ``user_template`` (or chat template) and BOS as in
    training, is cut from the left to ``max_seq_length``, and batches keep the file's order.
    The whole row is passed on, so the writer can echo ids and references next to the
    generation. A row without a prompt stops the run (a skipped row would shift the outputs).
    Only ``predict`` is served: ``num_samples`` takes the first rows; the base's split, shuffling
    and packing arguments do not apply.

    Args:
        prompt_column: Column holding the prompt (``text`` for a ``.txt`` file, one prompt per
            line).
        adapter_column: Column naming the adapter for its row (PEFT mixed-adapter batches, so rows
            of one batch may use different adapters); rows without one use the active adapter.
        split: Split to read (a local file has only ``train``).
    """

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        adapter_column: str = "adapter",
        split: str = "train",
        **kwargs,
    ):
        super().__init__(path=path, **kwargs)
        self.prompt_column, self.adapter_column, self.split = prompt_column, adapter_column, split
        self.prompts: list[dict] = []  # {"prompt_ids": [...], "record": row}

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self.prompts:
            return
        self.tokenizer = resolve_tokenizer(self.tokenizer)
        raw = load_raw_dataset(self.path, self.hub_config)
        if self.split not in raw:
            raise UserError(
                f"data '{self.path}' has no split '{self.split}' (it has: {', '.join(raw)})"
            )
        rows = raw[self.split]
        if self.num_samples is not None:
            rows = rows.select(range(min(self.num_samples, len(rows))))  # the first rows, in order
        for row in rows:
            try:
                origin, row = row[ORIGIN], without_origin(row)
                messages = [{"role": "user", "content": required_str(row, self.prompt_column)}]
            except RowError as err:
                raise UserError(f"prompt at {origin} of '{self.path}': {err}") from None
            ids = tokenize_prompt(
                messages,
                self.tokenizer,
                self.chat_format,
                self.max_seq_length,
                self.use_chat_template,
            )
            self.prompts.append({"prompt_ids": ids, "record": row})
        if not self.prompts:
            raise UserError(f"no prompts in '{self.path}'")

    @override
    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.prompts,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        raise UserError(
            "PromptsDataModule serves `predict` only; train with a dataset's DataModule"
        )

    val_dataloader = test_dataloader = train_dataloader

    def collate(self, rows: list[dict]) -> dict:
        """Prompt ids stay lists (generation left-pads them); ``adapter_names`` only when a row
        names one."""
        batch = {
            "prompt_ids": [r["prompt_ids"] for r in rows],
            "records": [r["record"] for r in rows],
        }
        named = [r["record"].get(self.adapter_column) for r in rows]
        if any(named):
            # None entries: filled with the active adapter by the module.
            batch["adapter_names"] = named
        return batch
