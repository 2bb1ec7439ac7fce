"""``python -m qlora_lightning fit|validate|test|predict --config configs/X.yaml``."""

from __future__ import annotations

import sys

import torch
from lightning.pytorch.cli import LightningCLI

from qlora_lightning.data.base import SFTDataModule
from qlora_lightning.errors import UserError
from qlora_lightning.modules.base import QLoRAModule


def _tokenizer_of(base) -> str:
    return base.tokenizer or base.name_or_path


class QLoRACLI(LightningCLI):
    """LightningCLI with the data's tokenizer taken from the model's base spec."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.base", "data.init_args.tokenizer", compute_fn=_tokenizer_of)


def trainer_defaults() -> dict:
    """bf16 mixed precision on a GPU; fp32 on the CPU, where bf16 autocast is slow."""
    return {"precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"}


def main(args: list[str] | None = None) -> None:
    try:
        QLoRACLI(QLoRAModule, SFTDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 trainer_defaults=trainer_defaults(), args=args, save_config_kwargs={"overwrite": True})
    except UserError as err:
        sys.exit(f"error: {err}")
