"""``python -m qlora_lightning estimate --config X.yaml [--KEY VALUE ...]``: the training plan a
config makes on a GPU (what ``gradient_checkpointing: auto`` picks, and why), then its predicted
peak GPU memory piece by piece (``speed/estimate.py``), without a GPU or the model's weights."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from jsonargparse import ArgumentError

from qlora_lightning.errors import UserError, first_line
from qlora_lightning.model.plan import TrainingPlan, load_model_config


def estimate_from_yaml(config_path: str, overrides: Optional[list[tuple[str, str]]] = None) -> dict:
    """A training YAML's plan (``plan``) and predicted peak (GiB per component), with ``key value``
    overrides: the model and data ``fit`` would build from it, planned for a CUDA device."""
    # The parse `fit` runs: torch and Lightning.
    from qlora_lightning.run.cli import configured_classes

    args = [
        "--config",
        config_path,
        *(arg for key, value in overrides or [] for arg in (f"--{key}", value)),
    ]
    module, data = configured_classes(args)
    try:
        config = load_model_config(module.base)
    except OSError as err:
        raise UserError(f"model '{module.base.name_or_path}': {first_line(err)}") from None
    plan = module.plan_training(estimate=True, datamodule=data, on_gpu=True, model_config=config)
    return {
        "model": module.base.name_or_path,
        "plan": plan,
        "batch_size": plan.micro_batch.sequences,
        "max_seq_length": plan.micro_batch.tokens,
        "gradient_checkpointing": plan.checkpointing.value,
        "chosen_by_auto": module.gradient_checkpointing == "auto",
        **plan.estimate(config, module.base, module.lora),
    }


def print_plan(plan: TrainingPlan) -> None:
    print("training plan (for a CUDA device; every lever of the run reads it):")
    for name, value in plan.items():
        print(f"  {name:<36} {value}")


def main(argv: list[str]) -> None:
    """``estimate --config X.yaml [--model.init_args.lora.r 16 ...]``: print the plan and the
    predicted peak."""
    parser = argparse.ArgumentParser(
        prog="qlora-lightning estimate",
        usage="%(prog)s --config FILE [--KEY VALUE ...]",
        description="The training plan of a config (what gradient_checkpointing auto picks, and "
        "why) and its predicted peak GPU memory, piece by piece (the 4-bit weights, LoRA and its "
        "optimizer state, activations, logits), without a GPU or the model's weights.",
        epilog="Any key of the config can be overridden as --KEY VALUE, e.g. "
        "--data.init_args.batch_size 8 --data.init_args.max_seq_length 1024 "
        "--model.init_args.lora.r 64 --model.init_args.loss_chunk_size 1024. With "
        "--model.init_args.gradient_checkpointing auto, add --model.init_args.memory_budget_gib "
        "GIB: the estimate then says which mode auto picks for that budget.",
    )
    parser.add_argument(
        "--config", required=True, help="the YAML given to `fit` (its model and data sections)"
    )
    args, rest = parser.parse_known_args(argv)
    if len(rest) % 2 or any(not k.startswith("--") for k in rest[::2]):
        parser.error("overrides come as pairs: --model.init_args.lora.r 16")
    try:
        result = estimate_from_yaml(
            args.config, [(k[2:], v) for k, v in zip(rest[::2], rest[1::2])]
        )
    except UserError as err:
        sys.exit(f"error: {err}")
    except ArgumentError as err:  # the config's parse, as fit's
        from qlora_lightning.run.cli import one_line

        sys.exit(f"error: {one_line(str(err))}")
    print_plan(result["plan"])
    print(
        f"{result['model']}, {result['batch_size']} sequences x {result['max_seq_length']} tokens "
        "per micro-batch, gradient_checkpointing "
        f"{result['gradient_checkpointing']}"
        f"{' (what auto picks for this budget)' if result['chosen_by_auto'] else ''}:"
    )
    for key, value in result.items():
        if key.endswith("_gib") and key not in (
            "total_gib",
            "paged_optimizer_state_gib",
            "offloaded_to_cpu_gib",
        ):
            print(f"  {key[:-4]:<36} {value:7.2f} GiB")
    print(f"  {'predicted peak (allocated)':<36} {result['total_gib']:7.2f} GiB")
    if result["paged_optimizer_state_gib"]:
        print(
            f"  {'optimizer state (paged, not counted)':<36} "
            f"{result['paged_optimizer_state_gib']:7.2f} GiB"
        )
    if result["offloaded_to_cpu_gib"]:
        print(f"  {'kept in CPU memory':<36} {result['offloaded_to_cpu_gib']:7.2f} GiB")
