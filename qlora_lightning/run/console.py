"""What a command prints: the project's own lines (one per phase, warnings marked), and none of the
third-party notices this project knows to be harmless. ``--verbose`` shows everything."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Warnings (message start, category) that say nothing a user of this project can act on.
_HARMLESS_WARNINGS = (
    # torchdata's StatefulDataLoader calls a deprecated torch API each time it builds a loader.
    (r"'set_vital' is deprecated", UserWarning),
    # PEFT reads transformers' renamed `is_gradient_checkpointing` when it wraps a model.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # Lightning's own pytree helper trips a deprecation inside torch.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
    # The modules override `transfer_batch_to_device` on purpose (pinned, non-blocking copies).
    (r"You have overridden `transfer_batch_to_device`", Warning),
)

# Log records (logger, message start) of the same kind.
_HARMLESS_RECORDS = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip"),  # an advertisement for a hosted logger
    (
        "lightning.pytorch.utilities.rank_zero",
        "TPU available",
    ),  # TPUs are not a target of this project
    # `datasets` fails to read a JSON file with rows of clashing types as one table and says so at
    # ERROR level; the project then reads it row by row and counts each bad row in data_report.json.
    ("datasets.packaged_modules.json.json", "Failed to load JSON from file"),
    # lm-eval (`eval`) on a --max_gen_toks the project passes on purpose, and on every task that
    # loads its own data.
    ("lm_eval.evaluator", "generation_kwargs:"),
    ("lm_eval.api.task", "gsm8k_local: Custom kwargs"),
)


class _DropRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class _ProjectFormatter(logging.Formatter):
    """``message`` for progress lines, ``warning: message`` (or ``error:``) for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return (
            message
            if record.levelno < logging.WARNING
            else f"{record.levelname.lower()}: {message}"
        )


def configure(verbose: bool = False) -> None:
    """The project's INFO lines to stderr; third-party noise off unless ``verbose``."""
    project = logging.getLogger("qlora_lightning")
    if not any(getattr(h, "_qlora_console", False) for h in project.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_ProjectFormatter())
        setattr(
            handler, "_qlora_console", True
        )  # configure() may run more than once in a process (tests)
        project.addHandler(handler)
    project.setLevel(logging.INFO)
    if verbose:
        return
    for message, category in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in {name for name, _ in _HARMLESS_RECORDS}:
        logging.getLogger(name).addFilter(
            _DropRecords(tuple(p for n, p in _HARMLESS_RECORDS if n == name))
        )
    _quiet_progress_bars()


def _quiet_progress_bars() -> None:
    """`datasets`' per-split bars and transformers' weight-loading bar: a line each per phase,
    seconds long."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # `datasets` reads its setting from the environment when imported, which a config's parse does
    # not (it would cost a second there); a process that has it loaded already is told directly.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
