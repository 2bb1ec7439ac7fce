"""``python -m qlora_lightning estimate --config X.yaml [--KEY VALUE ...]``: the training plan a config
makes on a GPU (what ``gradient_checkpointing: auto`` picks, and why), then its predicted peak GPU
memory piece by piece (``speed/estimate.py``), without a GPU or the model's weights."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from types import SimpleNamespace
from typing import Any, Optional

import yaml

from qlora_lightning.errors import UserError, first_line
from qlora_lightning.model.build import BaseModelSpec, LoraSpec
from qlora_lightning.model.plan import (
    TrainingPlan,
    declared_micro_batch,
    load_model_config,
    optimizer_kind,
    resolve_plan,
)

MODEL_CLASS, DATA_CLASS = "qlora_lightning.QLoRAModule", "qlora_lightning.SFTDataModule"


def _set_dotted(tree: dict, key: str, value) -> None:
    node = tree
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def _class(path: str, section: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"{section}.class_path '{path}': {first_line(err)}") from None


def _settings(cls: type, init_args: dict, names: tuple[str, ...]) -> dict[str, Any]:
    """``names`` as the config sets them, else as ``cls`` (or the first class above it naming
    them, past ``**kwargs``) defaults them; a name no class defaults is left out."""
    found = {name: init_args[name] for name in names if name in init_args}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if name in names and name not in found and param.default is not param.empty:
                found[name] = param.default
    return found


def estimate_from_yaml(config_path: str, overrides: Optional[list[tuple[str, str]]] = None) -> dict:
    """A training YAML's plan (``plan``) and predicted peak (GiB per component), from its model and
    data sections plus ``key value`` overrides."""
    with open(config_path) as f:
        tree = yaml.safe_load(f) or {}
    for key, value in overrides or []:
        _set_dotted(tree, key, yaml.safe_load(value))
    model, data = tree.get("model") or {}, tree.get("data") or {}
    module_class = _class(model.get("class_path", MODEL_CLASS), "model")
    data_class = _class(data.get("class_path", DATA_CLASS), "data")
    settings = _settings(
        module_class,
        model.get("init_args") or {},
        (
            "base",
            "lora",
            "gradient_checkpointing",
            "memory_budget_gib",
            "loss_chunk_size",
            "optimizer",
        ),
    )
    try:
        base = (
            BaseModelSpec(**settings["base"])
            if isinstance(settings["base"], dict)
            else settings["base"]
        )
        lora = (
            LoraSpec(**settings["lora"]) if isinstance(settings["lora"], dict) else settings["lora"]
        )
    except TypeError as err:
        raise UserError(f"model.init_args: {first_line(err)}") from None
    try:
        config = load_model_config(base)
    except OSError as err:
        raise UserError(f"model '{base.name_or_path}': {first_line(err)}") from None
    optimizer = settings["optimizer"]
    optimizer = optimizer_kind(
        optimizer.get("class_path") if isinstance(optimizer, dict) else optimizer
    )
    # DPO runs each pair's chosen and rejected sequences in one forward: twice the sequences. KTO's one
    # forward with gradients holds its B rows; its KL and reference forwards keep no activations.
    shape = declared_micro_batch(
        SimpleNamespace(
            **_settings(data_class, data.get("init_args") or {}, ("batch_size", "max_seq_length"))
        ),
        module_class.sequences_per_example,
        name=data_class.__name__,
    )
    plan = resolve_plan(
        base,
        lora,
        settings["gradient_checkpointing"],
        memory_budget_gib=settings["memory_budget_gib"],
        loss_chunk_size=settings["loss_chunk_size"],
        optimizer=optimizer,
        device=None,
        micro_batch=shape,
        estimate=True,
        model_config=config,
    )
    return {
        "model": base.name_or_path,
        "plan": plan,
        "batch_size": shape.sequences,
        "max_seq_length": shape.tokens,
        "gradient_checkpointing": plan.checkpointing.value,
        "chosen_by_auto": settings["gradient_checkpointing"] == "auto",
        **plan.estimate(config, base, lora),
    }


def print_plan(plan: TrainingPlan) -> None:
    print("training plan (for a CUDA device; every lever of the run reads it):")
    for name, value in plan.items():
        print(f"  {name:<36} {value}")


def main(argv: list[str]) -> None:
    """``estimate --config X.yaml [--model.init_args.lora.r 16 ...]``: print the plan and the predicted peak."""
    parser = argparse.ArgumentParser(
        prog="qlora-lightning estimate",
        usage="%(prog)s --config FILE [--KEY VALUE ...]",
        description="The training plan of a config (what gradient_checkpointing auto picks, and why) and its "
        "predicted peak GPU memory, piece by piece (the 4-bit weights, LoRA and its optimizer "
        "state, activations, logits), without a GPU or the model's weights.",
        epilog="Any key of the config can be overridden as --KEY VALUE, e.g. --data.init_args.batch_size 8 "
        "--data.init_args.max_seq_length 1024 --model.init_args.lora.r 64 --model.init_args.loss_chunk_size "
        "1024. With --model.init_args.gradient_checkpointing auto, add --model.init_args.memory_budget_gib "
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
    print_plan(result["plan"])
    print(
        f"{result['model']}, {result['batch_size']} sequences x {result['max_seq_length']} tokens per micro-batch, "
        f"gradient_checkpointing {result['gradient_checkpointing']}"
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
            f"  {'optimizer state (paged, not counted)':<36} {result['paged_optimizer_state_gib']:7.2f} GiB"
        )
    if result["offloaded_to_cpu_gib"]:
        print(f"  {'kept in CPU memory':<36} {result['offloaded_to_cpu_gib']:7.2f} GiB")
