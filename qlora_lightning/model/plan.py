"""The training plan: every speed and memory lever of a run, decided once, before the model is
built.

``resolve_plan`` reads the module's settings (the base and adapter specs,
``gradient_checkpointing``, ``memory_budget_gib``, ``loss_chunk_size``, the optimizer), the data's
declared micro-batch shape and the device and strategy. It decides the checkpointing mode (``auto``
through the memory estimator) and with it what waits in CPU memory, whether and how the decoder
layers compile, where the base matmul goes last, where the input embeddings live, and which
optimizer state to plan for. ``build_model`` applies the plan, ``TrainingPlan.estimate`` prices it,
and ``configure_model`` and the ``estimate`` command print it; nothing downstream decides again.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

import torch

from qlora_lightning.errors import UserError, first_line
from qlora_lightning.model.distributed import fsdp_checkpoints_activations, is_fsdp
from qlora_lightning.model.hub import check_hub_id
from qlora_lightning.speed.checkpointing import HALVES, Checkpointing, CheckpointMode
from qlora_lightning.speed.estimate import GIB, choose_checkpointing, estimate_peak_memory

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

    from qlora_lightning.model.build import BaseModelSpec, LoraSpec

log = logging.getLogger(__name__)

# The share of the GPU's memory ``auto`` plans for without a budget: room for the CUDA context,
# the allocator's cached blocks and the estimator's error.
BUDGET_SHARE = 0.8

# What a factory that names no optimizer class is planned as: fp32 moments, the most an Adam keeps.
FALLBACK_OPTIMIZER = "AdamW"


@dataclass(frozen=True)
class MicroBatch:
    """The largest micro-batch of the model's forward: ``sequences`` of up to ``tokens`` tokens."""

    sequences: int
    tokens: int

    @property
    def total(self) -> int:
        return self.sequences * self.tokens

    def __str__(self) -> str:
        return f"{self.sequences} x {self.tokens}"


def declared_micro_batch(
    datamodule: Any, sequences_per_example: int = 1, name: Optional[str] = None
) -> MicroBatch:
    """What ``datamodule`` declares: ``batch_size`` examples of up to ``max_seq_length`` tokens,
    each ``sequences_per_example`` sequences in the forward (a DPO pair: its chosen and rejected).

    Args:
        name: The DataModule's class name, where ``datamodule`` stands in for one.

    Raises:
        UserError: One line naming the DataModule, where it declares no shape or there is none.
    """
    if datamodule is None:
        raise UserError(
            "gradient_checkpointing auto plans memory for the data's micro-batches, and "
            "there is no DataModule: fit with one that declares batch_size and "
            "max_seq_length, or set gradient_checkpointing to a mode"
        )
    missing = [
        key
        for key in ("batch_size", "max_seq_length")
        if not isinstance(getattr(datamodule, key, None), int)
    ]
    if missing:
        raise UserError(
            f"{name or type(datamodule).__name__} declares no {' or '.join(missing)}: "
            "the memory plan needs the micro-batch shape; give the DataModule that "
            "attribute, or set gradient_checkpointing to a mode"
        )
    return MicroBatch(datamodule.batch_size * sequences_per_example, datamodule.max_seq_length)


def optimizer_kind(factory: Any) -> str:
    """The class name of the optimizer ``factory`` builds, read without building one.

    A config's ``optimizer: {class_path: ...}`` reaches the module as a ``functools.partial``
    holding the class (jsonargparse's); a class, a partial of one, a dotted class path, or a
    function declaring ``optimizer_class`` (``paged_adamw_8bit``) names it. Anything else (a
    lambda, a plain function) is planned as ``FALLBACK_OPTIMIZER``.
    """
    while isinstance(factory, functools.partial):
        classes = [arg for arg in (factory.func, *factory.args) if isinstance(arg, type)]
        if classes:
            return classes[0].__name__
        factory = factory.func
    if isinstance(factory, type):
        return factory.__name__
    path = factory if isinstance(factory, str) else getattr(factory, "optimizer_class", None)
    return path.rsplit(".", 1)[-1] if path else FALLBACK_OPTIMIZER


def should_compile(setting: Union[bool, Literal["auto"]], device: Union[str, torch.device]) -> bool:
    """``compile_layers``: true, false, or ``auto``: on a CUDA device where Triton can build
    kernels.

    Triton compiles a small C launcher per kernel, so ``auto`` also wants a C compiler; without
    one it trains eagerly (and says so) rather than fail at the first step.
    """
    if setting != "auto":
        return bool(setting)
    if torch.device(device).type != "cuda":
        return False
    compilers = [os.environ.get("CC"), "cc", "gcc", "clang"]
    missing = [
        what
        for what, ok in (
            ("triton", importlib.util.find_spec("triton") is not None),
            ("a C compiler (cc, gcc or clang)", any(c and shutil.which(c) for c in compilers)),
        )
        if not ok
    ]
    if missing:
        log.warning(
            "base.compile_layers auto: running eagerly, %s not found", " and ".join(missing)
        )
    return not missing


def load_model_config(base: BaseModelSpec):
    """The transformers config of ``base`` (overrides applied), which the estimate reads."""
    from transformers import AutoConfig

    check_hub_id(base.checkpoint)  # offline: one line at once, not a minute of retries
    return AutoConfig.from_pretrained(base.checkpoint, **base.config_overrides)


@dataclass(frozen=True)
class TrainingPlan:
    """Every speed and memory lever of a run, as ``resolve_plan`` decided it.

    Attributes:
        checkpointing: Where the backward finds the decoder layers' activations.
        compile: Whether the decoder layers (or their parts) are ``torch.compile``d.
        compile_scope: One graph per ``parts`` of a layer (attention, MLP, norms), or per ``layer``.
        skip_last_recompute: ``lora.skip_last_recompute``; ``base_last`` says where it applies.
        loss_chunk_size: Tokens per chunk of the loss; None: the plain loss over the full logits.
        cpu_embeddings: Whether the input embedding table stays in CPU memory.
        optimizer: The optimizer's class name (its state counts in the estimate).
        micro_batch: Sequences x tokens of the largest micro-batch, where planning needed it.
        budget_gib: The GPU memory ``auto`` planned for.
        peak_gib: The estimated peak of this plan, where one was computed.
        reason: One line: what set the checkpointing mode, or what ``auto`` chose and why.
    """

    checkpointing: CheckpointMode
    compile: bool = False
    compile_scope: Literal["parts", "layer"] = "parts"
    skip_last_recompute: bool = True
    loss_chunk_size: Optional[int] = None
    cpu_embeddings: bool = False
    optimizer: str = FALLBACK_OPTIMIZER
    micro_batch: Optional[MicroBatch] = None
    budget_gib: Optional[float] = None
    peak_gib: Optional[float] = None
    reason: str = "set in the config"

    @property
    def offload(self) -> str:
        """What waits in CPU memory for the backward."""
        return self.checkpointing.offloads

    @property
    def base_last(self) -> Literal["nowhere", "decoder layers", "attention and MLP"]:
        """Which modules compute their last projection's base matmul last, so that recomputing them
        stops before it: ``skip_last_recompute`` where the mode recomputes (per attention and MLP
        for the halves mode, whose layers ``HALVES`` does not list stay whole)."""
        if not (self.skip_last_recompute and self.checkpointing.recomputes):
            return "nowhere"
        return "attention and MLP" if self.checkpointing.splits_halves else "decoder layers"

    @property
    def compile_split(self) -> frozenset[str]:
        """Layer classes compiled per part whatever ``compile_scope``: the halves mode calls their
        attention and MLP, never the layer."""
        return HALVES if self.compile and self.checkpointing.splits_halves else frozenset()

    @property
    def embeddings(self) -> Literal["device", "cpu"]:
        """Where the input embedding table lives."""
        return "cpu" if self.cpu_embeddings else "device"

    def estimate(self, config, base: BaseModelSpec, lora: LoraSpec) -> dict[str, float]:
        """``estimate_peak_memory`` of this plan, for the base's transformers ``config`` and
        specs."""
        if self.micro_batch is None:
            raise ValueError("a plan without a micro-batch shape has no memory estimate")
        return estimate_peak_memory(
            config,
            self.micro_batch.sequences,
            self.micro_batch.tokens,
            lora.r,
            self.checkpointing,
            loss_chunk_size=self.loss_chunk_size,
            quantization=base.quantization,
            double_quant=base.double_quant,
            lora_dropout=lora.dropout,
            optimizer=self.optimizer,
            upcast_frozen=base.upcast_frozen,
            liger_kernel=base.liger_kernel,
            attn_implementation=base.attn_implementation,
            cpu_embeddings=self.cpu_embeddings,
            lean_forward=lora.lean_forward,
        )

    def items(self) -> list[tuple[str, str]]:
        """Every field, and what follows from them, as the ``estimate`` command prints them."""
        compiled = "off"
        if self.compile:
            compiled = self.compile_scope + (
                " (Llama-style layers per part)" if self.compile_split else ""
            )
        return [
            ("checkpointing", f"{_as_written(self.checkpointing)} = {self.checkpointing.name}"),
            ("offloaded to CPU memory", self.offload),
            ("compiled", compiled),
            ("base matmul last in", self.base_last),
            ("loss chunk size", str(self.loss_chunk_size or "off (full logits)")),
            ("input embeddings on", self.embeddings),
            ("optimizer", self.optimizer),
            ("micro-batch", f"{self.micro_batch} tokens" if self.micro_batch else "not needed"),
            (
                "memory budget",
                f"{self.budget_gib:.2f} GiB" if self.budget_gib is not None else "none",
            ),
            (
                "estimated peak",
                f"{self.peak_gib:.2f} GiB" if self.peak_gib is not None else "not estimated",
            ),
            ("reason", self.reason),
        ]

    def line(self) -> str:
        """The plan in one line for the log: the mode and why, then the levers that are on."""
        levers = [
            f"gradient_checkpointing {_as_written(self.checkpointing)} ({self.reason})",
            f"compiled {self.compile_scope}" if self.compile else "eager",
        ]
        if self.base_last != "nowhere":
            levers.append(f"base matmul last in {self.base_last}")
        if self.loss_chunk_size:
            levers.append(f"loss chunks of {self.loss_chunk_size}")
        if self.cpu_embeddings:
            levers.append("embeddings in CPU memory")
        return "plan: " + ", ".join([*levers, self.optimizer])

    def as_dict(self) -> dict:
        """Plain values, for run summaries."""
        return {
            "checkpointing": self.checkpointing.value,
            "mode": self.checkpointing.name,
            "offload": self.offload,
            "compile": self.compile,
            "compile_scope": self.compile_scope,
            "base_last": self.base_last,
            "loss_chunk_size": self.loss_chunk_size,
            "embeddings": self.embeddings,
            "optimizer": self.optimizer,
            "micro_batch": str(self.micro_batch) if self.micro_batch else None,
            "budget_gib": self.budget_gib,
            "peak_gib": self.peak_gib,
            "reason": self.reason,
        }


def _as_written(mode: CheckpointMode) -> str:
    """The mode as a config writes it: ``false``, ``offload``, ..."""
    return str(mode.value).lower()


ShapeSource = Union[MicroBatch, Callable[[], MicroBatch], None]


def resolve_plan(
    base: BaseModelSpec,
    lora: LoraSpec,
    gradient_checkpointing: Union[Checkpointing, CheckpointMode, Literal["auto"]] = True,
    *,
    memory_budget_gib: Optional[float] = None,
    loss_chunk_size: Optional[int] = None,
    optimizer: str = FALLBACK_OPTIMIZER,
    device: Union[str, torch.device, None] = "cpu",
    strategy: Optional[Strategy] = None,
    micro_batch: ShapeSource = None,
    estimate: bool = False,
    model_config=None,
) -> TrainingPlan:
    """The plan of a run: its settings, the data's micro-batch shape, the device and the strategy.

    FSDP's own activation checkpointing (an ``activation_checkpointing_policy``) turns transformers'
    off: inside it, every layer would be recomputed twice. ``auto`` takes the fastest mode whose
    estimated peak fits ``memory_budget_gib`` (default ``BUDGET_SHARE`` of the GPU's memory; on a
    CPU without a budget, it keeps the activations: the estimator plans GPU memory).

    Args:
        device: Where the model trains; None: a CUDA device not known here (the ``estimate``
            command), for which ``auto`` needs a budget and ``compile_layers: auto`` counts as on.
        micro_batch: The data's declared shape, or a function asking the data for it, called only
            where planning needs it (``auto``, ``estimate``).
        estimate: Also price the chosen mode (``peak_gib``), as ``auto`` always does.
        model_config: The base's transformers config, where the caller has it already.

    Raises:
        UserError: ``cpu_embeddings`` or ``compile_layers: true`` under FSDP; ``auto`` without a
            budget on an unknown device; data that declares no micro-batch shape where one is
            needed.
    """
    fsdp = is_fsdp(strategy)
    if fsdp and base.cpu_embeddings:
        raise UserError(
            "model.base.cpu_embeddings does not work under FSDP (it would shard a table that "
            "is not on the device): set it to false, or use ddp"
        )
    if fsdp and base.compile_layers is True:
        # Untested: FSDP swaps the layers' weights for views of its flat parameters, and compiling
        # FSDP (1) models needs use_orig_params, which these configs leave off. ``auto`` leaves it
        # out.
        raise UserError(
            "model.base.compile_layers does not work under FSDP: set it to false, or use ddp"
        )
    if fsdp:
        compiled = False
    elif device is None:
        compiled = bool(base.compile_layers)
    else:
        compiled = should_compile(base.compile_layers, device)
    plan = TrainingPlan(
        CheckpointMode.KEEP_ACTIVATIONS,
        compile=compiled,
        compile_scope=base.compile_scope,
        skip_last_recompute=lora.skip_last_recompute,
        loss_chunk_size=loss_chunk_size,
        cpu_embeddings=base.cpu_embeddings,
        optimizer=optimizer,
    )
    if fsdp_checkpoints_activations(strategy):
        plan = replace(plan, reason="FSDP's activation_checkpointing_policy recomputes each layer")
    elif isinstance(gradient_checkpointing, str) and gradient_checkpointing == "auto":
        plan = _auto(plan, base, lora, memory_budget_gib, device, micro_batch, model_config)
    else:
        try:
            plan = replace(plan, checkpointing=CheckpointMode.of(gradient_checkpointing))
        except ValueError as err:
            raise UserError(f"model.{err}") from None
    if estimate and plan.peak_gib is None:
        plan = replace(plan, micro_batch=plan.micro_batch or _shape(micro_batch))
        config = load_model_config(base) if model_config is None else model_config
        plan = replace(plan, peak_gib=plan.estimate(config, base, lora)["total_gib"])
    return plan


def _shape(micro_batch: ShapeSource) -> MicroBatch:
    shape = micro_batch() if callable(micro_batch) else micro_batch
    if shape is None:
        return declared_micro_batch(None)  # raises, saying there is no DataModule
    return shape


def _auto(
    plan: TrainingPlan,
    base: BaseModelSpec,
    lora: LoraSpec,
    budget: Optional[float],
    device: Union[str, torch.device, None],
    micro_batch: ShapeSource,
    model_config,
) -> TrainingPlan:
    """``gradient_checkpointing: auto``: the fastest mode whose estimated peak fits the budget."""
    if budget is None and device is None:
        raise UserError(
            "gradient_checkpointing auto plans for the GPU's memory, which this machine does not "
            "know: add --model.init_args.memory_budget_gib GIB"
        )
    if budget is None and torch.device(device).type != "cuda":
        return replace(plan, reason="auto: no memory budget on a CPU, activations kept")
    source = ""
    if budget is None:
        budget = BUDGET_SHARE * torch.cuda.get_device_properties(device).total_memory / GIB
        source = f" ({BUDGET_SHARE:.0%} of {device})"
    shape = _shape(micro_batch)
    plan = replace(plan, micro_batch=shape, budget_gib=budget)
    try:
        config = load_model_config(base) if model_config is None else model_config

        def peak(mode: CheckpointMode) -> float:
            return replace(plan, checkpointing=mode).estimate(config, base, lora)["total_gib"]

        mode, gib = choose_checkpointing(budget, shape.total, peak)
    except (
        OSError,
        ValueError,
        AttributeError,
    ) as err:  # an architecture the estimator cannot read
        log.warning(
            "gradient_checkpointing auto: no memory estimate for '%s' (%s); checkpointing with "
            "offloaded layer inputs",
            base.name_or_path,
            first_line(err),
        )
        return replace(
            plan,
            checkpointing=CheckpointMode.RECOMPUTE_LAYERS_OFFLOAD_INPUTS,
            reason="auto: no estimate for this architecture, layer inputs offloaded",
        )
    if gib <= budget:
        reason = f"auto: the fastest that fits, {gib:.2f} of {budget:.2f} GiB{source} at {shape}"
    else:
        log.warning(
            "gradient_checkpointing auto: no mode fits %.2f GiB at %s tokens; %s, the leanest, is "
            "estimated at %.2f GiB (lower data.batch_size or data.max_seq_length)",
            budget,
            shape,
            mode.value,
            gib,
        )
        reason = (
            f"auto: no mode fits {budget:.2f} GiB{source} at {shape}, the leanest needs {gib:.2f}"
        )
    return replace(plan, checkpointing=mode, peak_gib=gib, reason=reason)
