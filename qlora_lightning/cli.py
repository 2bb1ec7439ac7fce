"""``python -m qlora_lightning fit|validate|test|predict --config configs/X.yaml``."""

from __future__ import annotations

import importlib
import logging
import re
import sys
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from qlora_lightning.data.base import SFTDataModule
from qlora_lightning.errors import UserError
from qlora_lightning.model import tokenizer_source
from qlora_lightning.modules.base import QLoRAModule
from qlora_lightning.progress import count_steps
from qlora_lightning.reliability import AtomicCheckpointIO


class QLoRACLI(LightningCLI):
    """LightningCLI with the data's tokenizer taken from the model, adapter checkpoints
    written atomically every ``checkpoint.every_n_train_steps``, values checked at parse time, and a
    progress bar that counts optimizer steps (``progress.py``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.base", "data.init_args.tokenizer", compute_fn=tokenizer_source)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # save_on_train_epoch_end: a step that ends an epoch is saved right then. Otherwise Lightning
        # defers it to a validation it expects next (which val_check_interval may not run) and saves
        # after the next micro-batch instead, in the middle of an accumulation, which no resume can repeat.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 3,
                             "checkpoint.monitor": "step", "checkpoint.mode": "max",
                             "checkpoint.every_n_train_steps": 50, "checkpoint.save_on_train_epoch_end": True})

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        optimizer = config.model.init_args.get("optimizer")
        # Without an `optimizer` key the default is a plain function, with no init_args to check.
        lr = optimizer.get("init_args", {}).get("lr") if hasattr(optimizer, "get") else None
        if lr is not None and lr <= 0:
            raise UserError(f"model.init_args.optimizer.init_args.lr must be > 0, got {lr}")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        count_steps(trainer)
        return trainer

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # The `checkpoint` group above always builds a ModelCheckpoint, which the Trainer refuses
        # beside `enable_checkpointing: false`: that setting drops it instead.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        ckpt = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt == "last" and self.trainer.checkpoint_callback.dirpath is None:
            self.config_init[self.subcommand]["ckpt_path"] = latest_checkpoint(self.trainer)


def latest_checkpoint(trainer) -> str:
    """The newest ``last.ckpt`` among the logger's earlier versions (each run logs to a new one)."""
    root = Path(trainer.logger.root_dir if trainer.logger else trainer.default_root_dir)
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"--ckpt_path last: no last.ckpt under {root}/version_*/checkpoints")
    return str(found[-1])


def trainer_defaults() -> dict:
    """bf16 mixed precision on a GPU (fp32 on the CPU, where bf16 autocast is slow); atomic checkpoints."""
    return {"precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
            "plugins": [AtomicCheckpointIO()]}


def one_line(message: str) -> str:
    """The actionable line of a jsonargparse error: which key, and what is wrong with it."""
    key = ".".join(re.findall(r'Parser key "([^"]+)"', message))
    noise = ("Does not validate", "Problem with given class_path", "Expected a <class 'NoneType'>",
             "Given value", "Errors:", "Subtypes:", "Parser key")
    lines = [ln.strip(" -") for ln in message.splitlines()]
    reasons = [ln for ln in lines if ln and not ln.startswith(noise)] or lines[:1]
    # A value that fits none of a Union's types (e.g. `true|false|offload`) names them all.
    expected = [_type_name(ln[len("Expected a "):]) for ln in reasons if ln.startswith("Expected a ")]
    reason = "expected " + " or ".join(expected) if len(expected) > 1 else reasons[0]
    return f"{key}: {reason}" if key else reason


def _type_name(text: str) -> str:
    """``<class 'bool'>`` -> ``bool``; ``typing.Literal['offload']`` -> ``'offload'``."""
    return re.sub(r"typing\.Literal\[(.*)\]", r"\1", re.sub(r"<class '([\w.]+)'>", r"\1", text))


def make_cli(args: list[str] | None = None, run: bool = True) -> QLoRACLI:
    """The CLI that ``main`` runs; ``run=False`` parses and instantiates without running (tests)."""
    return QLoRACLI(QLoRAModule, SFTDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    trainer_defaults=trainer_defaults(), args=args, run=run, save_config_kwargs={"overwrite": True},
                    parser_kwargs={"exit_on_error": False})


# Subcommands that build no Trainer and load no training data: plain argparse CLIs of their own.
_TOOLS = {"merge": "qlora_lightning.merge", "estimate": "qlora_lightning.estimate"}


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] and argv[0] in _TOOLS:
            importlib.import_module(_TOOLS[argv[0]]).main(argv[1:])
            return
        make_cli(args)
    except ArgumentError as err:
        sys.exit(f"error: {one_line(str(err))} (see --help)")
    except UserError as err:
        sys.exit(f"error: {err}")
