"""Activation checkpointing of the decoder layers, optionally with what it keeps offloaded to CPU
memory.

``CheckpointMode`` names the modes by what they do; ``TrainingPlan`` (``model/plan.py``) picks one
and ``enable_checkpointing`` puts it on a model.

With recomputation on, a decoder layer keeps nothing from its forward but its input (the residual
stream, B x T x hidden) and recomputes the rest in the backward. Those inputs, one per layer, are
then the largest activations that outlive the forward, growing with the tokens of a micro-batch;
``RECOMPUTE_LAYERS_OFFLOAD_INPUTS`` parks them in pinned CPU memory until the backward needs them.

``OFFLOAD_SAVED_NO_RECOMPUTE`` recomputes nothing: every activation a layer saves for its backward
waits in CPU memory instead. Where the host, not the GPU, sets the pace (small micro-batches, whose
GPU work is a fraction of the step), the recomputation's second forward costs host time the GPU
waits for, while the copies run beside the compute on the copy engines. At large micro-batches the
copies (all a layer saves, each way, every step) outgrow the compute, and offloading the layer
inputs alone fits better. The measured steps are in ``benchmarks/results/``.

``RECOMPUTE_HALVES_OFFLOAD_INPUTS`` checkpoints the attention and the MLP of each layer apart, each
with its input offloaded (twice the copies of offloading the layer inputs). The recomputation of a
half stops once it has every tensor the backward needs, so with the half's last projection computed
base matmul last (``lora_forward.BaseLastLoraLinear4bit``) it never redoes ``o_proj``'s base matmul,
as the whole layer's never redoes ``down_proj``'s. Llama-style layers only (``HALVES``); others
checkpoint whole.
"""

from __future__ import annotations

import functools
import logging
import weakref
from enum import Enum
from typing import Literal, Optional, Union

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

log = logging.getLogger(__name__)

# Saved tensors smaller than this stay on the GPU: a pinned block, two copies and an event cost
# tens of microseconds of host time each, which a few kilobytes of memory are not worth.
MIN_OFFLOAD_BYTES = 2**20

# What a config writes for ``gradient_checkpointing`` (besides ``auto``, which the plan resolves).
Checkpointing = Union[bool, Literal["offload", "offload_halves", "offload_all"]]

# Decoder layers whose forward is x + attn(norm1(x)) = h, then h + mlp(norm2(h)), children so named.
HALVES = frozenset(
    {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "GemmaDecoderLayer"}
)


class CheckpointMode(Enum):
    """Where the backward finds the activations of the decoder layers, named by what it does.

    Each member's value is what a config writes for it (``gradient_checkpointing: offload``), so
    ``CheckpointMode(value)`` (or ``of``, which also takes a member) maps a config to a mode.
    """

    KEEP_ACTIVATIONS = False  # no checkpointing: the most memory, no recomputation
    RECOMPUTE_LAYERS = True  # each layer keeps its input on the GPU and recomputes the rest
    RECOMPUTE_LAYERS_OFFLOAD_INPUTS = "offload"  # the same, with the inputs in CPU memory
    # The same per attention and MLP (Llama-style)
    RECOMPUTE_HALVES_OFFLOAD_INPUTS = "offload_halves"
    # No recomputation: all a layer saves waits in CPU memory.
    OFFLOAD_SAVED_NO_RECOMPUTE = "offload_all"

    @classmethod
    def of(cls, value: Union["CheckpointMode", Checkpointing]) -> "CheckpointMode":
        """The mode a config value (``false``, ``true``, ``offload``, ...) names; a mode is
        itself."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(str(m.value).lower() for m in cls)
            raise ValueError(
                f"gradient_checkpointing {value!r} is none of {names} (or auto)"
            ) from None

    @property
    def checkpoints(self) -> bool:
        """Whether transformers' per-layer checkpointing hook is on (every mode but keeping
        activations)."""
        return self is not CheckpointMode.KEEP_ACTIVATIONS

    @property
    def recomputes(self) -> bool:
        """Whether the backward recomputes (part of) each layer's forward."""
        return self in (
            CheckpointMode.RECOMPUTE_LAYERS,
            CheckpointMode.RECOMPUTE_LAYERS_OFFLOAD_INPUTS,
            CheckpointMode.RECOMPUTE_HALVES_OFFLOAD_INPUTS,
        )

    @property
    def offloads(self) -> str:
        """What waits in CPU memory for the backward."""
        return {
            CheckpointMode.RECOMPUTE_LAYERS_OFFLOAD_INPUTS: "layer inputs",
            CheckpointMode.RECOMPUTE_HALVES_OFFLOAD_INPUTS: "attention and MLP inputs",
            CheckpointMode.OFFLOAD_SAVED_NO_RECOMPUTE: "all the layers save",
        }.get(self, "nothing")

    @property
    def offloads_inputs(self) -> bool:
        """Whether it recomputes with the checkpointed inputs waiting in CPU memory."""
        return self in (
            CheckpointMode.RECOMPUTE_LAYERS_OFFLOAD_INPUTS,
            CheckpointMode.RECOMPUTE_HALVES_OFFLOAD_INPUTS,
        )

    @property
    def splits_halves(self) -> bool:
        """Whether Llama-style layers are checkpointed per attention and MLP (``HALVES``)."""
        return self is CheckpointMode.RECOMPUTE_HALVES_OFFLOAD_INPUTS


def enable_checkpointing(
    model: torch.nn.Module, mode: Union[CheckpointMode, Checkpointing]
) -> None:
    """Turn on transformers' (non-reentrant) checkpointing of each decoder layer, offloaded per
    ``mode``.

    ``OFFLOAD_SAVED_NO_RECOMPUTE`` takes over the same hook (transformers calls it for each layer in
    training only) to run the layer once under the offloading instead.
    """
    mode = CheckpointMode.of(mode)
    if not mode.checkpoints:
        return
    # transformers >= 5.2x renamed it; older 5.x has the old name only.
    enable = (
        getattr(model, "activation_checkpointing_enable", None)
        or model.gradient_checkpointing_enable
    )
    enable({"use_reentrant": False})
    whole = set()  # kinds of layer the halves mode cannot split
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):  # the layers transformers checkpoints
            if mode is CheckpointMode.RECOMPUTE_LAYERS_OFFLOAD_INPUTS:
                module._gradient_checkpointing_func = offloaded_checkpoint
            elif mode is CheckpointMode.OFFLOAD_SAVED_NO_RECOMPUTE:
                module._gradient_checkpointing_func = functools.partial(offloaded_layer, module)
            elif mode.splits_halves and type(module).__name__ in HALVES:
                module._gradient_checkpointing_func = functools.partial(offloaded_halves, module)
            elif mode.splits_halves:
                module._gradient_checkpointing_func = offloaded_checkpoint
                # Not the model, which holds the flag too.
                if isinstance(module, GradientCheckpointingLayer):
                    whole.add(type(module).__name__)
    if whole:
        log.warning(
            "gradient_checkpointing offload_halves: %s not split into attention and MLP (not "
            "Llama-style); checkpointed whole with offloaded inputs, as under offload",
            ", ".join(sorted(whole)),
        )


def offloaded_checkpoint(function, *args, **kwargs):
    """``checkpoint(function, *args)`` whose saved inputs wait for the backward in CPU memory.

    A non-reentrant checkpoint saves nothing inside the layer; its own save of the layer's inputs
    happens outside its hooks, so ``OffloadToCpu`` catches exactly that one.
    """
    with OffloadToCpu():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def offloaded_halves(layer: torch.nn.Module, function, hidden_states: torch.Tensor) -> torch.Tensor:
    """``function(hidden_states)`` (``layer``'s forward, a ``partial`` holding its keyword
    arguments) as two checkpoints, attention then MLP, whose inputs (the residual stream) wait in
    CPU memory."""
    kwargs = function.keywords
    with OffloadToCpu():
        hidden_states = hidden_states + checkpoint(
            _attention_half, layer, hidden_states, use_reentrant=False, **kwargs
        )
        return hidden_states + checkpoint(_mlp_half, layer, hidden_states, use_reentrant=False)


def _attention_half(layer: torch.nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    return layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)[0]


def _mlp_half(layer: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return layer.mlp(layer.post_attention_layernorm(hidden_states))


def offloaded_layer(layer: torch.nn.Module, function, *args, **kwargs):
    """``function(*args)`` (``layer``'s forward), with every tensor it saves for the backward in CPU
    memory but ``layer``'s own weights, which stay where they are anyway."""
    with OffloadToCpu(keep=frozenset(t.untyped_storage().data_ptr() for t in _weights(layer))):
        return function(*args, **kwargs)


def _weights(layer: torch.nn.Module):
    """The layer's parameters and the quantization constants of its 4-bit ones (bitsandbytes'
    QuantState)."""
    for param in layer.parameters():
        yield param
        state = getattr(param, "quant_state", None)
        while state is not None:
            yield state.absmax
            state = state.state2 if state.nested else None


class OffloadToCpu(torch.autograd.graph.saved_tensors_hooks):
    """Saved CUDA tensors go to pinned CPU memory and come back when the backward unpacks them.

    Unlike ``torch.autograd.graph.save_on_cpu``, neither copy blocks the host or the compute
    stream: both run on a side stream (``_copy_stream``). The copy out waits only for the kernel
    that wrote the tensor, and the tensor's GPU block is not reused before the copy is done
    (``record_stream``). The backward unpacks the layers in reverse order, so unpacking one layer's
    input starts copying in the one packed before it, which the next recomputation needs: the
    copies overlap the backward instead of stalling it (one layer input more on the GPU).
    """

    # The most recently packed tensor, weakly: each new one links to it, so the backward can
    # prefetch in reverse order without keeping anything alive that autograd has dropped.
    _last: Optional[weakref.ref] = None

    def __init__(self, keep: frozenset[int] = frozenset()):
        """``keep``: storage addresses of tensors to leave on the device (weights, which stay there
        anyway)."""
        super().__init__(functools.partial(self.pack, keep=keep), self.unpack)

    # Both hooks run eagerly, never traced: autograd calls them from inside compiled code, such as
    # a compiled LayerNorm's (Phi-2), where the compiler would otherwise trace them as a frame of
    # their own and fail on the side stream's record_stream.
    @staticmethod
    @torch.compiler.disable
    def pack(tensor: torch.Tensor, keep: frozenset[int] = frozenset()):
        if not _worth_offloading(tensor, keep):
            return tensor
        # With the tensor's strides (empty_like keeps them where the elements fill their memory
        # densely): compiled backward graphs check the strides of what they saved.
        host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        if host.stride() != tensor.stride():
            return tensor  # a view with gaps, rare: left where it is
        parked = _Parked(tensor, host, OffloadToCpu._last)
        OffloadToCpu._last = weakref.ref(parked)
        return parked

    @staticmethod
    @torch.compiler.disable
    def unpack(packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        tensor = packed.fetch()
        before = packed.before()
        if before is not None:
            before.prefetch()
        return tensor


def _worth_offloading(tensor: torch.Tensor, keep: frozenset[int]) -> bool:
    """A CUDA tensor of at least ``MIN_OFFLOAD_BYTES`` whose storage is not in ``keep``."""
    return (
        tensor.device.type == "cuda"
        and tensor.numel() * tensor.element_size() >= MIN_OFFLOAD_BYTES
        and tensor.untyped_storage().data_ptr() not in keep
    )


class _Parked:
    """One saved tensor in pinned CPU memory, copied back to its device on demand or ahead of
    time."""

    __slots__ = ("host", "device", "before", "back", "ready", "__weakref__")

    def __init__(self, tensor: torch.Tensor, host: torch.Tensor, before: Optional[weakref.ref]):
        """``host``: pinned memory of ``tensor``'s shape and strides to copy it into."""
        stream = _copy_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the kernel that wrote it
        self.host = host
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its block is not handed out again until the copy is done
        self.device, self.before = tensor.device, before or _dead
        self.back: Optional[torch.Tensor] = None
        self.ready: Optional[torch.cuda.Event] = None

    def prefetch(self) -> None:
        """Queue the copy back on the side stream (after the copy out, which is queued there
        too)."""
        if self.back is not None:
            return
        compute, stream = torch.cuda.current_stream(self.device), _copy_stream(self.device)
        # Allocated for the compute stream, which uses it; the side stream must not write into the
        # block before the compute work queued so far (maybe its last user) is done.
        self.back = torch.empty_like(self.host, device=self.device)
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            self.back.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        compute = torch.cuda.current_stream(self.device)
        start = COPY_WAITS.mark(compute)
        compute.wait_event(self.ready)
        COPY_WAITS.add(start, compute)
        return self.back


class CopyWaits:
    """How long the compute stream waited for tensors coming back from CPU memory, where ``enabled``
    (``PerfMonitor`` turns it on): an event pair around each wait, whose elapsed time is the wait
    alone, as the stream reaches the first once the work before it is done."""

    def __init__(self):
        self.enabled = False
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def mark(self, stream: torch.cuda.Stream) -> Optional[torch.cuda.Event]:
        if not self.enabled:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        return start

    def add(self, start: Optional[torch.cuda.Event], stream: torch.cuda.Stream) -> None:
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            self._pairs.append((start, end))

    def take(self) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
        """The pairs recorded since the last call."""
        pairs, self._pairs = self._pairs, []
        return pairs

    @staticmethod
    def seconds(pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> float:
        """Their waits added up (each pair's events must have completed)."""
        return sum(start.elapsed_time(end) for start, end in pairs) / 1e3


COPY_WAITS = CopyWaits()


def _dead() -> None:
    return None


@functools.lru_cache(maxsize=None)
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the copies to and from CPU memory."""
    return torch.cuda.Stream(device)
