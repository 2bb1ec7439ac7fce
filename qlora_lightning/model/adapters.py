"""Several named LoRA adapters on one (4-bit) base: load, combine, switch.

All of it is PEFT's own machinery (``load_adapter``, ``add_weighted_adapter``, ``set_adapter``,
mixed-adapter batches); this module gives it a config shape and restores state after a switch.
The module's own adapter (the one ``LoraSpec`` builds or loads) keeps PEFT's name ``default``;
a fresh ``default`` is the identity (LoRA's B starts at zero), i.e. the plain base model.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import torch

from qlora_lightning.errors import UserError
from qlora_lightning.model.build import BaseModelSpec, spec_dict

# PEFT models are typed as the torch Modules they are: build.py says why peft is not imported here.

# Written beside a saved adapter: how its base was loaded and quantized, which the merge must
# repeat.
BASE_SPEC_FILE = "qlora_base.json"

Combination = Literal[
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


@dataclass
class AdapterMix:
    """A new adapter made by combining loaded ones (PEFT ``add_weighted_adapter``).

    Args:
        name: Name of the combined adapter.
        adapters: Names of the adapters to combine.
        weights: One weight per adapter (negative subtracts).
        combination_type: ``linear`` (same ranks; fast, approximate), ``cat`` (exact: the rank is
            the sum of the ranks), ``svd`` (exact update, re-factorized to ``svd_rank``),
            ``ties``/``dare_*``/``magnitude_prune`` (sparsified task-vector merges; need
            ``density``).
        svd_rank: Rank of the result for the ``*svd`` types; the largest input rank when None.
        density: Fraction of entries kept by the pruning types (``ties``, ``dare_*``,
            ``magnitude_prune*``).
    """

    name: str
    adapters: list[str]
    weights: list[float]
    combination_type: Combination = "linear"
    svd_rank: Optional[int] = None
    density: Optional[float] = None

    def __post_init__(self):
        if len(self.adapters) != len(self.weights) or not self.adapters:
            raise UserError(
                f"adapter mix '{self.name}': give one weight per adapter "
                f"({len(self.adapters)} adapters, {len(self.weights)} weights)"
            )


@dataclass
class AdapterSet:
    """Named adapters loaded beside the module's own (``default``), for evaluation and serving.

    Args:
        paths: Adapter name -> directory of a saved PEFT adapter.
        mixes: Adapters built by combining loaded ones, in order (a mix may use an earlier mix).
        active: The adapter active after loading; the module's own (``default``) when None.
    """

    paths: dict[str, str] = field(default_factory=dict)
    mixes: list[AdapterMix] = field(default_factory=list)
    active: Optional[str] = None


def attach_adapters(model: torch.nn.Module, adapters: AdapterSet) -> torch.nn.Module:
    """Load ``adapters.paths`` into PEFT ``model`` under their names (frozen), add the mixes, set
    the active one."""
    for name, path in adapters.paths.items():
        if name in model.peft_config:
            raise UserError(
                f"adapter name '{name}' is already taken (the module's own adapter is 'default')"
            )
        if not Path(path, "adapter_config.json").is_file():
            raise UserError(
                f"adapter '{name}': '{path}' is not a PEFT adapter directory (no "
                "adapter_config.json)"
            )
        model.load_adapter(path, adapter_name=name, is_trainable=False)
    for mix in adapters.mixes:
        missing = [a for a in mix.adapters if a not in model.peft_config]
        if missing:
            raise UserError(
                f"adapter mix '{mix.name}': unknown adapter(s) {missing}; "
                f"loaded: {sorted(model.peft_config)}"
            )
        try:
            model.add_weighted_adapter(
                mix.adapters,
                mix.weights,
                mix.name,
                combination_type=mix.combination_type,
                svd_rank=mix.svd_rank,
                density=mix.density,
            )
        except ValueError as err:
            raise UserError(f"adapter mix '{mix.name}': {err}") from None
    if adapters.active is not None:
        if adapters.active not in model.peft_config:
            raise UserError(
                f"adapters.active '{adapters.active}' is not loaded; loaded: "
                f"{sorted(model.peft_config)}"
            )
        model.set_adapter(adapters.active, inference_mode=True)
    return model


@contextmanager
def using_adapter(model: torch.nn.Module, name: Optional[str]) -> Iterator[torch.nn.Module]:
    """Make ``name`` the active adapter for the duration (None: leave the model as it is).

    PEFT's ``set_adapter`` also flips ``requires_grad``; which parameters trained before is
    restored afterwards, so switching adapters for an evaluation in the middle of ``fit``
    does not freeze (or unfreeze) anything.
    """
    if name is None or model.active_adapter == name:
        yield model
        return
    if name not in model.peft_config:
        raise UserError(f"adapter '{name}' is not loaded; loaded: {sorted(model.peft_config)}")
    previous = model.active_adapter
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(previous, inference_mode=True)
        for p in trainable:
            p.requires_grad_(True)


def save_base_spec(spec: BaseModelSpec, adapter_dir: Union[str, Path]) -> None:
    """Record beside a saved adapter how its base was loaded and quantized (``merge`` reads it)."""
    Path(adapter_dir, BASE_SPEC_FILE).write_text(json.dumps(spec_dict(spec), indent=2) + "\n")


def read_base_spec(adapter_dir: Union[str, Path]) -> Optional[dict]:
    """The base spec saved with an adapter by ``fit``, or None for an adapter saved elsewhere."""
    path = Path(adapter_dir, BASE_SPEC_FILE)
    return json.loads(path.read_text()) if path.is_file() else None
