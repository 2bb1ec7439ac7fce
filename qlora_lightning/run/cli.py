"""``python -m qlora_lightning fit|validate|test|predict --config configs/X.yaml``."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from qlora_lightning.data.base import SFTDataModule
from qlora_lightning.errors import UserError
from qlora_lightning.evaluate.card import check_repo_id, push_folder
from qlora_lightning.evaluate.tracking import continue_run, run_root
from qlora_lightning.model.build import tokenizer_source
from qlora_lightning.modules.base import QLoRAModule
from qlora_lightning.modules.reliability import AtomicCheckpointIO
from qlora_lightning.modules.resume import (
    RunFolderGuard,
    StepCheckpoint,
    check_resume,
    find_last,
    run_folder,
    run_record,
)
from qlora_lightning.run import config_check, console, help_cache
from qlora_lightning.run.progress import count_steps
from qlora_lightning.run.tracking import RunReport
from qlora_lightning.run.tracking import Trainer as RunTrainer

log = logging.getLogger(__name__)


class QLoRACLI(LightningCLI):
    """LightningCLI with the data's tokenizer taken from the model, adapter checkpoints
    written atomically every ``checkpoint.every_n_train_steps``, values checked at parse time, and a
    progress bar that counts optimizer steps (``progress.py``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            "model.init_args.base", "data.init_args.tokenizer", compute_fn=tokenizer_source
        )
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.add_argument(
            "--allow_config_changes",
            type=bool,
            default=False,
            help="fit --ckpt_path: resume under a config that differs from the one that wrote the "
            "checkpoint (more steps, a new learning rate); the differences are logged",
        )
        parser.add_argument(
            "--push_to_hub",
            type=Optional[str],
            default=None,
            help="fit: upload the saved adapter folder (with its README.md model card) to this "
            "Hugging Face model repository, ORG/NAME (created if absent)",
        )
        # save_on_train_epoch_end: a step that ends an epoch is saved right then. Otherwise
        # Lightning defers it to a validation it expects next (which val_check_interval may not run)
        # and saves after the next micro-batch instead, in the middle of an accumulation, which no
        # resume can repeat. enable_version_counter false: a resumed run overwrites last.ckpt (and
        # the files of steps it repeats) rather than writing last-v1.ckpt beside a stale last.ckpt
        # that `--ckpt_path last` would take.
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 3,
                "checkpoint.monitor": "step",
                "checkpoint.mode": "max",
                "checkpoint.every_n_train_steps": 50,
                "checkpoint.save_on_train_epoch_end": True,
                "checkpoint.enable_version_counter": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        if self.subcommand:
            config_check.record(self.subcommand, config)
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
        # Atomic checkpoints, added here rather than as a trainer default: a plugin instance among
        # the defaults cannot be written to the run's config.yaml, which must rerun the run.
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks + [RunFolderGuard(), RunReport()])

    def _parse_ckpt_path(self) -> None:
        """For ``fit``, nothing. LightningCLI's own replaces the config's model with the
        hyperparameters stored in the checkpoint (its class included): a resume runs the config, and
        ``before_fit`` checks the checkpoint against it."""
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def run_record(self) -> dict:
        """This run's config as plain values (``resume.run_record``), as its checkpoints record
        it."""
        dump = self.parser.dump(
            self.config, skip_link_targets=False, skip_none=False, format="yaml"
        )
        return run_record(yaml.safe_load(dump)[self.subcommand])

    def before_fit(self) -> None:
        record = self.run_record()
        self.model.run_record = record
        repo_id = self.config[self.subcommand].get("push_to_hub")
        if repo_id:
            check_repo_id(repo_id)  # now, not after the training
            self.model.push_to_hub = repo_id
        ckpt = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt is None:
            return
        io = AtomicCheckpointIO()
        # Found without starting a W&B or MLflow run.
        root = run_root(self.trainer.logger, self.trainer.default_root_dir)
        dirpath = (
            self.trainer.checkpoint_callback.dirpath if self.trainer.checkpoint_callback else None
        )
        if ckpt == "last":
            ckpt = (
                str(Path(dirpath) / "last.ckpt")
                if dirpath
                else find_last(root, record, io.load_checkpoint)
            )
        checkpoint = io.load_checkpoint(ckpt)
        changes = check_resume(
            ckpt,
            checkpoint.get("run_record"),
            record,
            self.config[self.subcommand].get("allow_config_changes"),
        )
        if changes:
            log.warning("resuming %s under a changed config: %s", ckpt, "; ".join(changes))
        self.config_init[self.subcommand]["ckpt_path"] = ckpt
        # The run folder's config.yaml is the run's config, not how it was resumed: it reruns the
        # run.
        self.config[self.subcommand]["ckpt_path"] = None
        continue_run_folder(self.trainer, ckpt, root, checkpoint["global_step"])

    def after_fit(self) -> None:
        repo_id = self.config[self.subcommand].get("push_to_hub")
        if repo_id and self.trainer.is_global_zero and self.model.saved_adapter_dir is not None:
            push_folder(
                self.model.saved_adapter_dir,
                repo_id,
                f"adapter trained by {type(self.model).__name__}",
            )


def continue_run_folder(trainer: Trainer, ckpt: str, root: Optional[Path], step: int) -> None:
    """Resuming from a checkpoint of ``root/<run>`` (``version_N``; a W&B or MLflow run id): log to
    that run, not a new one (``tracking.continue_run``).

    TensorBoard then shows one curve, with the events that the interrupted run logged from index
    ``step`` (the checkpoint's global step) on purged: Lightning logs an optimizer step's train
    metrics at its index minus one, so those the resumed run repeats. ``perf/*`` of the checkpoint's
    own step, logged at its index, goes too (``run_summary.json`` keeps it). Checkpoints and
    ``run_summary.json`` go where the run's are.
    """
    run = run_folder(ckpt, root)
    if run is not None:
        continue_run(trainer.logger, run, step)


def trainer_defaults() -> dict:
    """bf16 mixed precision on a GPU (fp32 on the CPU, where bf16 autocast is slow)."""
    return {"precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"}


def one_line(message: str) -> str:
    """The actionable line of a jsonargparse error: which key, and what is wrong with it."""
    key = ".".join(re.findall(r'Parser key "([^"]+)"', message))
    noise = (
        "Does not validate",
        "Problem with given class_path",
        "Expected a <class 'NoneType'>",
        "Given value",
        "Errors:",
        "Subtypes:",
    )
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", ln.strip(" -")) for ln in message.splitlines()]
    reasons = [ln for ln in lines if ln and not ln.startswith(noise)] or lines[:1]
    # A value that fits none of a Union's types (e.g. `true|false|offload`) names them all.
    expected = [
        _type_name(ln[len("Expected a ") :]) for ln in reasons if ln.startswith("Expected a ")
    ]
    reason = "expected " + " or ".join(expected) if len(expected) > 1 else reasons[0]
    return f"{key}: {reason}" if key else reason


def _type_name(text: str) -> str:
    """``<class 'bool'>`` -> ``bool``; ``typing.Literal['offload']`` -> ``'offload'``."""
    return re.sub(r"typing\.Literal\[(.*)\]", r"\1", re.sub(r"<class '([\w.]+)'>", r"\1", text))


def make_cli(
    args: list[str] | None = None, run: bool = True, cli_class: type[QLoRACLI] = QLoRACLI
) -> QLoRACLI:
    """The CLI that ``main`` runs; ``run=False`` parses and instantiates without running (tests)."""
    return cli_class(
        QLoRAModule,
        SFTDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        args=args,
        run=run,
        trainer_class=RunTrainer,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, "prog": "qlora-lightning"},
    )


class _WithoutTrainer(QLoRACLI):
    """The parse and the classes of ``fit``, no Trainer: a GPU config builds on a machine without
    one."""

    def instantiate_trainer(self, **kwargs) -> None:
        return None


def configured_classes(args: list[str]) -> tuple[QLoRAModule, LightningDataModule]:
    """The model and data a config makes (``args``: ``--config FILE`` and overrides), parsed,
    checked and linked as ``fit`` does; nothing is loaded (the module builds its model in
    ``configure_model``, the data loads in ``setup``)."""
    # LightningCLI warns when given args beside a command line.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = make_cli([*args, "--seed_everything", "false"], run=False, cli_class=_WithoutTrainer)
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule


# The Trainer keys the shipped configs set; `--help` names them, `--help-all` lists all ~80.
_TRAINER_KEYS = (
    "max_steps",
    "max_epochs",
    "accumulate_grad_batches",
    "precision",
    "devices",
    "strategy",
    "gradient_clip_val",
    "val_check_interval",
    "log_every_n_steps",
    "callbacks",
    "default_root_dir",
)


def project_help(command: str) -> str:
    """``COMMAND --help``: the model's and the data's own keys first (for the classes in
    ``--config``, else SFTModule and SFTDataModule), then the Trainer keys the configs use;
    ``--help-all`` has the rest."""
    parts = [
        f"usage: qlora-lightning {command} --config FILE [--model.init_args.KEY VALUE] "
        "[--data.init_args.KEY VALUE] [--trainer.KEY VALUE] [--ckpt_path PATH]"
    ]
    for group, default in (
        ("model", "qlora_lightning.SFTModule"),
        ("data", "qlora_lightning.SFTDataModule"),
    ):
        out, argv = io.StringIO(), sys.argv
        sys.argv = argv[:1]  # LightningCLI warns when given args beside a command line
        try:
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                make_cli([command, f"--{group}.help", default], run=False)
        finally:
            sys.argv = argv
        text = out.getvalue()
        parts.append(text[text.find("Help for") :].strip() if "Help for" in text else text.strip())
    parts.append(
        "Trainer keys the configs use (--trainer.KEY VALUE): "
        + ", ".join(_TRAINER_KEYS)
        + f".\nAnother class's keys: --model.help qlora_lightning.DPOModule, --data.help "
        f"qlora_lightning.PreferenceDataModule. Every option, the Trainer's included: "
        f"qlora-lightning {command} --help-all"
    )
    return "\n\n".join(parts)


# Subcommands that build no Trainer and load no training data: plain argparse CLIs of their own.
_TOOLS = {
    "merge": "qlora_lightning.evaluate.merge",
    "estimate": "qlora_lightning.run.estimate",
    "export": "qlora_lightning.evaluate.export",
    "eval": "qlora_lightning.evaluate.lmeval",
}


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    console.configure(verbose="--verbose" in argv)
    argv = [arg for arg in argv if arg != "--verbose"]  # the project's flag, not LightningCLI's
    # MLflow 3.7+ refuses its file store (`--trainer.logger MLFlowLogger`'s default, ./mlruns)
    # unless told it may: a local store needs no server and no database package. Set to false to be
    # refused.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if args is None:
        # LightningCLI reads sys.argv itself (and warns when given a copy of it)
        sys.argv[1:] = argv
    try:
        command = help_cache.asked_for(argv)
        if command:
            text = project_help(command)
            help_cache.write(command, text)
            print(text)
            return
        if "--help-all" in argv:  # LightningCLI's own, complete help
            argv = ["--help" if arg == "--help-all" else arg for arg in argv]
            args = argv
        if argv[:1] and argv[0] in _TOOLS:
            importlib.import_module(_TOOLS[argv[0]]).main(argv[1:])
            return
        make_cli(None if args is None else argv)
    except ArgumentError as err:
        sys.exit(f"error: {one_line(str(err))} (see --help)")
    except UserError as err:
        sys.exit(f"error: {err}")
