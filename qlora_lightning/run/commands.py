"""The ``qlora-lightning`` / ``python -m qlora_lightning`` entry point: the command list, answered
without importing torch, and every command handed to the module that runs it."""

from __future__ import annotations

import sys
from typing import Optional

# Each command and what it is for, in the order a user meets them.
COMMANDS = {
    "fit": "train an adapter (SFT, DPO, ORPO, SimPO, KTO) from a YAML config",
    "validate": "validation loss and metrics of a model and adapter",
    "test": "test metrics, e.g. GSM8K exact match (configs/gsm8k_eval.yaml)",
    "predict": "generate for a file of prompts into JSONL (configs/predict_quickstart.yaml)",
    "eval": "lm-evaluation-harness tasks (gsm8k_local: local GSM8K) on an adapter as trained, or a "
    "merged model",
    "merge": "merge an adapter into its base as a standalone model, checked against "
    "adapter-on-4-bit",
    "export": "write a merged model (or an adapter, merged first) as a GGUF file for llama.cpp and "
    "Ollama",
    "estimate": "predict a config's peak GPU memory and what gradient_checkpointing auto picks",
}
USAGE = (
    "usage: qlora-lightning (or python -m qlora_lightning) COMMAND [--config FILE] [options] "
    "[--verbose]"
)


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        USAGE,
        "",
        "QLoRA fine-tuning of 2.7B-8B language models with Lightning.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {purpose}" for name, purpose in COMMANDS.items()]
    lines += [
        "",
        "COMMAND --help lists a command's options; --verbose shows third-party notices too.",
        "example: qlora-lightning fit --config configs/quickstart.yaml",
    ]
    return "\n".join(lines)


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        return
    if argv[0] not in COMMANDS:
        sys.exit(f"error: unknown command '{argv[0]}' (one of: {', '.join(COMMANDS)}; see --help)")
    # Not for the command list: reading package metadata takes a moment.
    from qlora_lightning.run import config_check, help_cache

    cached = help_cache.asked_for(argv) and help_cache.read(argv[0])
    if cached:
        print(cached)
        return
    problem = argv[0] in help_cache.COMMANDS and config_check.check(
        [a for a in argv if a != "--verbose"]
    )
    if problem:
        sys.exit(f"error: {problem} (see --help)")
    # Torch, transformers and Lightning load from here on.
    from qlora_lightning.run.cli import (
        main as run,
    )

    run(args)
