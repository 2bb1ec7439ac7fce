"""What Lightning's ``DDPStrategy`` and ``FSDPStrategy`` need to know about a 4-bit PEFT model.

DDP needs nothing special: each rank builds the quantized base on its own ``root_device``
(``configure_model``) and DDP all-reduces the gradients of the adapter, the only trainable part.

FSDP flattens the parameters of each wrapped unit into one tensor, which must have one dtype.
A QLoRA model mixes three kinds of parameters: packed 4-bit weights (stored as the compute
dtype, ``bnb_4bit_quant_storage``), frozen 16-bit ones (norms, embeddings, the head: fp32 with
``base.upcast_frozen``) and trainable fp32 adapters. So:

* ``DecoderLayerPolicy`` wraps each decoder layer (found from the model's ``_no_split_modules``)
  and, on its own, every leaf module with trainable weights (``lora_A``, ``lora_B``, ...); or,
  with ``adapters: false``, leaves the adapters out of FSDP altogether: each rank then holds the
  whole (small) adapter, FSDP ignores it, and ``average_gradients`` averages its gradients over
  the ranks in one collective per step (32 units for Mistral instead of 32 + 448);
* ``cast_frozen_for_fsdp`` puts the frozen weights of each decoder layer back in the compute
  dtype (lossless, see there), so that each layer's unit is uniform;
* mixed precision is left to autocast (``precision: bf16-mixed``) with FSDP's own casting off
  (``mixed_precision: MixedPrecision()``): casting parameters would round RoPE's fp32
  ``inv_freq`` buffers to bf16, and ``check_fsdp_precision`` refuses any setting that would
  convert the packed 4-bit bytes to another dtype. See ``configs/mistral_fsdp.yaml``.

Adapter weights are sharded under FSDP: ``full_state_dict`` gathers them (all ranks take part,
rank 0 receives) and ``save_adapter`` writes them in the PEFT format.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE, clean_tensor_name
from transformers import PreTrainedModel

from qlora_lightning.errors import UserError
from qlora_lightning.model.build import decoder_layer_names

if TYPE_CHECKING:  # a hint only: peft costs seconds of a config's parse (build.py)
    from peft import PeftModel


def _is_trainable_leaf(module: torch.nn.Module) -> bool:
    return next(module.children(), None) is None and any(
        p.requires_grad for p in module.parameters(recurse=False)
    )


class DecoderLayerPolicy:
    """An FSDP policy for ``auto_wrap_policy`` or ``activation_checkpointing_policy``.

    Selects the model's decoder layers and, with ``adapters``, every leaf module with trainable
    weights, so that the fp32 adapters form FSDP units of their own, apart from the layers'
    frozen compute-dtype weights. The layer classes are the ``_no_split_modules`` of the
    transformers model being wrapped, read as the walk passes it (FSDP and activation
    checkpointing visit a module before its children), so one policy serves every architecture.

    Args:
        adapters: Also select trainable leaf modules. For wrapping: true makes each adapter matrix
            an FSDP unit (sharded), false keeps the adapters whole on every rank, outside FSDP
            (``replicates_adapters``). For checkpointing, leave it off.
    """

    def __init__(self, adapters: bool = True):
        self.adapters = adapters
        self._layers: set[str] = set()

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        """FSDP's wrap-policy protocol: ``recurse`` asks whether to descend, otherwise whether to
        wrap."""
        if recurse:
            if isinstance(module, PreTrainedModel):
                self._layers.update(getattr(module, "_no_split_modules", None) or [])
            return True
        return type(module).__name__ in self._layers or (
            self.adapters and _is_trainable_leaf(module)
        )


def replicates_adapters(strategy: Optional[Strategy]) -> bool:
    """True under FSDP whose auto-wrap policy is ``DecoderLayerPolicy(adapters=False)``.

    Then the module hands FSDP the adapter's parameters as ``ignored_states`` (each rank keeps
    them whole) and averages their gradients itself (``average_gradients``).
    """
    policy = getattr(strategy, "kwargs", {}).get("auto_wrap_policy") if is_fsdp(strategy) else None
    return isinstance(policy, DecoderLayerPolicy) and not policy.adapters


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over the ranks, in place, with one all-reduce.

    Every rank must call it with the same parameters in the same order (a missing gradient
    counts as zeros), as DDP's own reduction would.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)  # a sum: gloo has no average
    flat /= world_size
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).to(p.dtype)


def strategy_from_config(
    path: Union[str, Path], strategy_class: type[Strategy] = FSDPStrategy, **overrides: Any
) -> Strategy:
    """The strategy that a config's ``trainer.strategy.init_args`` describe, parsed as the CLI
    parses them.

    For scripts that build their own Trainer (benchmarks, tests) with a config's strategy settings.

    Args:
        path: A YAML config whose ``trainer.strategy`` has ``class_path`` and ``init_args``.
        strategy_class: The class to build (the config's own, or a subclass of it).
        overrides: Init arguments to set on top of the config's.
    """
    import yaml
    from jsonargparse import ArgumentParser

    init_args = yaml.safe_load(Path(path).read_text())["trainer"]["strategy"].get("init_args", {})
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(strategy_class, "strategy")
    config = parser.parse_object({"strategy": {**init_args, **overrides}})
    return parser.instantiate_classes(config).strategy


def is_fsdp(strategy: Optional[Strategy]) -> bool:
    """True under Lightning's ``FSDPStrategy`` (parameters sharded across ranks)."""
    return isinstance(strategy, FSDPStrategy)


def fsdp_checkpoints_activations(strategy: Optional[Strategy]) -> bool:
    """True when ``strategy`` is FSDP with an ``activation_checkpointing_policy``."""
    # Lightning keeps the parsed policy in this attribute and applies it after wrapping.
    return is_fsdp(strategy) and bool(getattr(strategy, "_activation_checkpointing_kwargs", None))


# What Lightning's FSDP precision plugin casts the whole module to before wrapping it.
_TRUE_PRECISION_DTYPES = {
    "64-true": torch.float64,
    "32-true": torch.float32,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
}


def check_fsdp_precision(strategy: FSDPStrategy, precision: str, dtype: torch.dtype) -> None:
    """Refuse FSDP settings that would convert (not reinterpret) the packed 4-bit weights.

    The packed weights are bytes stored as ``dtype`` (``bnb_4bit_quant_storage``): casting them
    to another dtype changes the bytes, and the model computes garbage without an error.

    Args:
        strategy: The FSDP strategy, whose ``mixed_precision`` casts parameters to ``param_dtype``.
        precision: The Trainer's precision; ``*-true`` precisions cast the whole model first.
        dtype: The compute dtype, which the 4-bit weights are stored as.

    Raises:
        UserError: Either cast would change the 4-bit weights' dtype.
    """
    true_dtype = _TRUE_PRECISION_DTYPES.get(precision)
    if true_dtype is not None and true_dtype != dtype:
        raise UserError(
            f"under FSDP, trainer.precision {precision} casts every weight to {true_dtype}, the "
            f"packed 4-bit ones (stored as {dtype}) included: use bf16-mixed, or set "
            "base.compute_dtype to match"
        )
    param_dtype = getattr(strategy.mixed_precision_config, "param_dtype", None)
    if param_dtype is not None and param_dtype != dtype:
        raise UserError(
            f"FSDP's mixed precision casts parameters to {param_dtype}, the packed 4-bit ones "
            f"(stored as {dtype}) included: set the strategy's mixed_precision to "
            "torch.distributed.fsdp.MixedPrecision with no param_dtype (autocast does the rest)"
        )


def cast_frozen_for_fsdp(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the frozen weights of each decoder layer the dtype of its packed 4-bit weights, in
    place.

    FSDP flattens a layer's frozen parameters (``DecoderLayerPolicy`` puts the trainable adapters
    in units of their own) into one tensor of one dtype, but ``base.upcast_frozen`` puts the norms
    in fp32 and a frozen adapter (a DPO reference) is fp32. Casting them is
    lossless where it matters: the norms were loaded in ``dtype``, and their product with the
    fp32 residual stream is still taken in fp32; a frozen adapter's matmuls run in ``dtype``
    under autocast anyway. Outside the layers (embeddings, final norm, head) nothing changes, so
    the residual stream keeps the dtype it has on one device.

    Raises:
        UserError: A frozen weight is not floating point (8-bit ``Int8Params``): FSDP cannot
            flatten it with the rest.
    """
    layers = decoder_layer_names(model)
    for layer in (m for m in model.modules() if type(m).__name__ in layers):
        for name, param in layer.named_parameters():
            if param.requires_grad:
                continue
            if not param.dtype.is_floating_point:
                raise UserError(
                    f"FSDP cannot shard {type(layer).__name__}.{name} ({param.dtype}): use "
                    "quantization nf4/fp4 (stored as the compute dtype) or none, or the ddp "
                    "strategy"
                )
            if param.dtype != dtype and type(param).__name__ != "Params4bit":
                param.data = param.data.to(dtype)


def full_state_dict(strategy: Strategy) -> Optional[dict[str, torch.Tensor]]:
    """The LightningModule's unsharded state dict on rank 0 under FSDP (``{}`` on other ranks).

    Every rank must call this (FSDP all-gathers unit by unit); the tensors land on the CPU.
    Returns None for strategies that do not shard, where ``module.state_dict()`` is already whole.
    """
    if not is_fsdp(strategy):
        return None
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # On a CPU device torch's FSDP "offloads" by keeping the gathered tensor and then freeing it.
    config = FullStateDictConfig(offload_to_cpu=strategy.root_device.type != "cpu", rank0_only=True)
    with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, config):
        return strategy.model.state_dict()


def save_adapter(
    model: PeftModel, path: Path, state_dict: Optional[dict[str, torch.Tensor]] = None
) -> None:
    """Save ``model``'s active adapter in the PEFT format, from ``state_dict`` when given (FSDP).

    Args:
        model: The PEFT model (under FSDP, with its wrapped units inside).
        path: Directory to write ``adapter_config.json`` and ``adapter_model.safetensors`` into.
        state_dict: Unsharded tensors keyed as ``model.state_dict()`` names them, without wrappers
            (``full_state_dict``); None reads the model's own parameters (one device, DDP).

    Raises:
        RuntimeError: The file does not hold one tensor per trainable parameter (an adapter that
            would load as its initialization, silently).
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    adapters = [model.active_adapter]
    weights = Path(path) / SAFETENSORS_WEIGHTS_NAME
    if state_dict is None:
        model.save_pretrained(path, selected_adapters=adapters)
    else:
        # PEFT selects the adapter's tensors by the names of the modules holding them and then
        # drops the adapter name (``lora_A.default.weight`` -> ``lora_A.weight``). FSDP's wrappers
        # put their names into those module names, the gathered state dict has none: key each
        # tensor as the wrapped model names it, less a wrapper right around its own module (which
        # would hide the adapter name from PEFT), then drop the remaining wrapper names.
        names = (name for name, _ in chain(model.named_parameters(), model.named_buffers()))
        wrapped = {
            _unwrap_leaf(name): state_dict[clean_name(name)]
            for name in names
            if clean_name(name) in state_dict
        }
        model.save_pretrained(path, selected_adapters=adapters, state_dict=wrapped)
        save_file(
            {clean_name(k): v for k, v in load_file(weights).items()},
            weights,
            metadata={"format": "pt"},
        )
    saved, trainable = len(load_file(weights)), sum(p.requires_grad for p in model.parameters())
    if saved != trainable:
        raise RuntimeError(f"{weights} holds {saved} tensors for {trainable} trainable parameters")


def _unwrap_leaf(name: str) -> str:
    module, _, tensor = name.rpartition(".")
    return f"{module.removesuffix('.' + FSDP_WRAPPED_MODULE)}.{tensor}"


def clean_name(name: str) -> str:
    """A parameter name without the segments FSDP and activation checkpointing wrappers insert."""
    return clean_tensor_name(name)
