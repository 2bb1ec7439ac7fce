"""Prediction writers: ``predict`` results to files as they come, batch by batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override


class JSONLWriter(BasePredictionWriter):
    """Writes each prediction (a dict: the input row plus ``generation``) as one JSON line.

    Lines are appended after every batch, so a long run leaves its finished part on disk.
    With several devices each rank writes ``<stem>.rank<k>.jsonl`` (Lightning's distributed
    sampler interleaves the rows, so the files are not in input order then).

    Args:
        output: The JSONL file, replaced at the start of ``predict``.
    """

    def __init__(self, output: str = "predictions.jsonl"):
        super().__init__(write_interval="batch")
        self.output = output
        self.path: Optional[Path] = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        path = Path(self.output)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self.path = path

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for row in prediction:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
