"""Predict the peak GPU memory of a QLoRA training step from a model config and a batch shape.

``TrainingPlan.estimate`` (``model/plan.py``) calls it with a plan's levers; the ``estimate``
command (``run/estimate.py``) prints the plan and this table for a config.

The model is counted piece by piece, with the dtypes this stack really uses (checked against the
library versions ``setup.cfg`` allows and against measured peaks: ``benchmarks/harness.py`` prints
the estimate beside each one, and ``benchmarks/results/`` keeps them):

* 4-bit linear weights: 0.5 byte per weight plus the quantization constants;
* everything else (embeddings, output head, norms, biases) in bf16, or in fp32 with
  ``base.upcast_frozen`` (PEFT's ``prepare_model_for_kbit_training`` upcast), where the fp32
  embeddings also make the residual stream fp32;
* LoRA matrices and their gradients in fp32; 8-bit AdamW state (paged: it lives in CUDA managed
  memory, which the PyTorch allocator's peak does not count, so it is reported apart);
* activations under bf16 autocast: for each LoRA linear the dropout mask and the bf16 LoRA input
  (the frozen 4-bit matmul keeps nothing: it needs no weight gradient); the attention kernel's
  bf16 inputs and output; the MLP intermediates (bf16, fp32 under the upcast); the norms' fp32
  copies of their inputs (Liger's norm keeps the 16-bit input). Products with
  tensors that need no gradient (rotary cos/sin, norm weights) keep nothing per token. With
  gradient checkpointing only each layer's input (the residual stream) stays, plus one layer
  recomputed in the backward with its gradient buffers (with PEFT's LoRA forward, also its copy of
  the widest projection's output and the update beside it; not with ``lora.lean_forward``);
  offloading moves those inputs to CPU memory;
* one dequantized bf16 weight in the forward and one in the backward (the largest linear);
* logits: (B, T, V) bf16 logits, their fp32 log-softmax and its gradients, or one chunk of them
  with ``loss_chunk_size``.

It is an estimate: allocator rounding and fragmentation are not modelled (the reserved peak is
higher), and architectures beyond Llama/Mistral/Gemma/Phi are counted as Llama-like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

from qlora_lightning.speed.checkpointing import Checkpointing, CheckpointMode

GIB = 2**30
BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
DQ_BLOCK = 256  # double quantization: one fp32 constant per 256 absmax values


@dataclass(frozen=True)
class Dims:
    """The shape facts of a decoder-only transformer that memory depends on."""

    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool  # gate/up/down (Llama, Mistral, Gemma) or fc1/fc2 (Phi)
    tied: bool
    bias: bool
    act: str
    sliding_window: Optional[int]

    @property
    def attn(self) -> int:
        """Width of the query/output projections (heads x head_dim)."""
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim


def dims_of(config) -> Dims:
    """Read the dims off a transformers ``PretrainedConfig``."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    return Dims(
        hidden=config.hidden_size,
        inter=config.intermediate_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        gated_mlp=config.model_type != "phi",
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        bias=config.model_type == "phi",
        act=str(act),
        sliding_window=getattr(config, "sliding_window", None),
    )


def layer_linears(d: Dims) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder layer; all of them get LoRA under
    ``all-linear``."""
    attn = [(d.hidden, d.attn), (d.hidden, d.kv), (d.hidden, d.kv), (d.attn, d.hidden)]
    mlp = [(d.hidden, d.inter)] * (2 if d.gated_mlp else 1) + [(d.inter, d.hidden)]
    return attn + mlp


def weight_bytes(
    d: Dims, quantization: str = "nf4", double_quant: bool = True, upcast_frozen: bool = False
) -> dict[str, float]:
    """Bytes of the frozen base: 4-bit linears (with their constants) and the 16-bit (or fp32)
    rest."""
    n = d.layers * sum(i * o for i, o in layer_linears(d))
    if quantization in ("nf4", "fp4"):
        constants = n / BLOCK * (1 + 4 / DQ_BLOCK) if double_quant else n / BLOCK * 4
        linear = n / 2 + constants
    elif quantization == "int8":
        linear = n + n / d.hidden * 4  # one fp32 scale per row, roughly
    else:
        linear = 2 * n  # bf16
    # Norms, biases.
    per_layer_other = 2 * d.hidden + (sum(o for _, o in layer_linears(d)) if d.bias else 0)
    other = (4 if upcast_frozen else 2) * (
        d.vocab * d.hidden * (1 if d.tied else 2) + d.layers * per_layer_other + d.hidden
    )
    return {"linear_weights": linear, "other_weights": other}


def lora_params(d: Dims, r: int) -> int:
    """Trainable LoRA parameters with ``all-linear`` targets: r x (in + out) per linear."""
    return d.layers * sum(r * (i + o) for i, o in layer_linears(d))


def layer_activation_bytes(
    d: Dims, dropout: bool = True, upcast_frozen: bool = False, liger_kernel: bool = False
) -> tuple[float, float]:
    """Bytes per token that one decoder layer saves for its backward pass (bf16 autocast): its
    attention half and its MLP half, each with its norm's input.

    Each LoRA linear keeps the dropout mask (1 byte per input feature) and the bf16 input of
    ``lora_A`` (2): 3 per input feature, 2 with dropout off. The MLP intermediates are bf16, or
    fp32 where the upcast weights make the residual stream fp32. Liger's RMSNorm keeps its 16-bit
    input (the Hugging Face norm an fp32 copy) and its SwiGLU/GeGLU recomputes the activation.
    Phi runs attention and MLP in parallel off one LayerNorm, counted with its attention.
    """
    lin = 3 if dropout else 2
    act = 4 if upcast_frozen else 2  # bytes of one saved MLP intermediate
    h, a, kv, i = d.hidden, d.attn, d.kv, d.inter
    norm = 2 * h if liger_kernel else 4 * h
    # The output projection.
    attention = (
        norm
        + 3 * lin * h  # q, k, v projections
        + 4 * a
        + 4 * kv  # bf16 q, k, v and the output kept by the attention kernel
        + lin * a
    )
    if d.gated_mlp:  # gate/up inputs, gate/act/up outputs (gate/up with Liger), down input
        mlp = norm + 2 * lin * h + (2 if liger_kernel else 3) * act * i + lin * i
    else:  # Phi: fc1, gelu_new (written as several elementwise ops that each keep a tensor), fc2
        mlp = lin * h + 4 * act * i + lin * i
    return attention, mlp


def logits_bytes(
    d: Dims,
    tokens: int,
    loss_chunk_size: Optional[int],
    loss_impl: Literal["project", "transformers"] = "project",
) -> float:
    """Peak bytes of the loss: logits, fp32 log-softmax and their gradients in the backward.

    The project's plain loss keeps the fp32 log-softmax (4 bytes/logit) and, in the backward, its
    gradient and the input gradient (4 + 4); transformers' model output also keeps the bf16 logits
    (2). The chunked loss recomputes one chunk at a time in the backward (bf16 logits, fp32
    log-softmax and its gradient) and holds a gathered copy of the hidden states.
    """
    if loss_chunk_size:
        return min(loss_chunk_size, tokens) * d.vocab * 10 + tokens * d.hidden * 4
    return tokens * d.vocab * (14 if loss_impl == "transformers" else 12)


def optimizer_state_bytes(optimizer: str) -> tuple[int, bool]:
    """Bytes of state per trainable parameter of an Adam-family optimizer, and whether it is paged.

    Two moments each, 8-bit (bitsandbytes ``*8bit``) or fp32; bitsandbytes' ``Paged*`` optimizers
    keep them in CUDA managed memory, which the allocator's peak does not count.
    """
    name = optimizer.rsplit(".", 1)[-1]
    return (2 if "8bit" in name else 8), name.startswith("Paged")


def estimate_peak_memory(
    config,
    batch: int,
    seq: int,
    r: int = 16,
    gradient_checkpointing: Union[CheckpointMode, Checkpointing] = True,
    loss_chunk_size: Optional[int] = None,
    quantization: str = "nf4",
    double_quant: bool = True,
    lora_dropout: float = 0.05,
    optimizer: str = "PagedAdamW8bit",
    loss_impl: Literal["project", "transformers"] = "project",
    upcast_frozen: bool = False,
    liger_kernel: bool = False,
    attn_implementation: Optional[str] = "sdpa",
    cpu_embeddings: bool = False,
    lean_forward: bool = False,
) -> dict[str, float]:
    """Predicted peak of the PyTorch allocator for one training step, by component, in GiB.

    Args:
        config: A transformers model config (``AutoConfig.from_pretrained(...)``).
        batch: Sequences per micro-batch.
        seq: Tokens per sequence.
        r: LoRA rank (``all-linear`` targets).
        gradient_checkpointing: A ``CheckpointMode``, or the config value naming one.
        loss_chunk_size: ``SFTModule.loss_chunk_size`` (None: the plain loss).
        quantization: ``nf4``, ``fp4``, ``int8`` or ``none``.
        double_quant: Whether the 4-bit constants are quantized too.
        lora_dropout: Adapter dropout (above zero it keeps a mask per LoRA input).
        optimizer: The optimizer's class name or path (``optimizer_state_bytes``).
        loss_impl: ``project`` (``SFTModule``) or ``transformers`` (loss from ``labels`` in the
            model).
        upcast_frozen: ``BaseModelSpec.upcast_frozen`` (the transformers + PEFT recipe's fp32
            upcast).
        liger_kernel: ``BaseModelSpec.liger_kernel``.
        attn_implementation: ``BaseModelSpec.attn_implementation``; ``sdpa`` and ``eager`` build a
            dense (B, 1, T, T) mask when a sliding window is shorter than the sequence.
        cpu_embeddings: ``BaseModelSpec.cpu_embeddings``: the input embedding table in CPU memory.
        lean_forward: ``LoraSpec.lean_forward``: the adapter's update added into each projection's
            output, without PEFT's copy of that output and its separate full-size update.

    Returns:
        GiB per component, ``total_gib`` (what ``torch.cuda.max_memory_allocated`` should read)
        ``paged_optimizer_state_gib`` (not in the total) and ``offloaded_to_cpu_gib``.
    """
    mode = CheckpointMode.of(gradient_checkpointing)
    d = dims_of(config)
    tokens = batch * seq
    parts = weight_bytes(d, quantization, double_quant, upcast_frozen)
    offloaded = 0.0
    if cpu_embeddings:
        table = d.vocab * d.hidden * (4 if upcast_frozen else 2)
        parts["other_weights"] -= table
        offloaded += table
    n_lora = lora_params(d, r)
    parts["lora_params_and_grads"] = n_lora * (4 + 4)
    state_bytes, paged = optimizer_state_bytes(optimizer)
    state = n_lora * float(state_bytes)
    if not paged:
        parts["optimizer_state"] = state
    attention, mlp = (
        tokens * b for b in layer_activation_bytes(d, lora_dropout > 0, upcast_frozen, liger_kernel)
    )
    if (
        d.sliding_window
        and seq > d.sliding_window
        and attn_implementation in ("sdpa", "eager", None)
    ):
        # A dense sliding-window mask: (B, 1, T, T) bool and its bf16 bias.
        attention += 3 * batch * seq * seq
    layer = attention + mlp
    # The halves mode checkpoints a Llama-style layer's attention and MLP apart (others whole): the
    # backward recomputes one at a time, and the residual stream between them waits in CPU memory
    # too.
    halves = mode.splits_halves and d.gated_mlp
    recomputed = max(attention, mlp) if halves else layer
    logits = logits_bytes(d, tokens, loss_chunk_size, loss_impl)
    # Bf16, forward + backward.
    parts["dequantized_weights"] = 2 * 2 * max(i * o for i, o in layer_linears(d))
    if mode.checkpoints:
        # The residual stream.
        layer_inputs = d.layers * tokens * d.hidden * (4 if upcast_frozen else 2)
        if mode is CheckpointMode.OFFLOAD_SAVED_NO_RECOMPUTE:
            offloaded += d.layers * layer
        elif mode.offloads_inputs:
            offloaded += layer_inputs * (2 if halves else 1)
        else:
            parts["checkpointed_layer_inputs"] = layer_inputs
        # The loss peaks at the end of the forward; the layer in the backward (recomputed or copied
        # back, plus its gradients) after it.
        # + the gradients of two MLP outputs (fp32 under the upcast)
        working = recomputed + tokens * (2 if upcast_frozen else 1) * (4 * d.inter + 4 * d.hidden)
        if lean_forward:
            # PEFT's forward holds a copy of the widest projection's output and its full-size update
            # beside it: two (tokens x intermediate) bf16 tensors, which the lean forward never
            # makes.
            working -= tokens * 2 * 2 * d.inter
        parts["peak_of_loss_or_recomputed_layer"] = max(logits, working)
    else:
        parts["activations"] = d.layers * layer
        parts["logits_and_loss"] = logits
    out = {f"{k}_gib": v / GIB for k, v in parts.items()}
    out["total_gib"] = sum(parts.values()) / GIB
    out["paged_optimizer_state_gib"] = state / GIB if paged else 0.0
    out["offloaded_to_cpu_gib"] = offloaded / GIB
    return out


# Micro-batches up to this many tokens are bound by the host's launch work rather than the GPU, and
# there no recomputation with everything offloaded beats recomputing; above it the offloaded
# activations outgrow the copy engines (the measured steps are in benchmarks/results/).
FEW_TOKENS = 1024


def choose_checkpointing(
    budget_gib: float, tokens: int, estimate_gib: Callable[[CheckpointMode], float]
) -> tuple[CheckpointMode, float]:
    """The fastest checkpointing mode whose estimated peak fits ``budget_gib``, and that estimate.

    Fastest first: keeping the activations; for micro-batches of at most ``FEW_TOKENS`` tokens,
    offloading all the layers save without recomputing; recomputing layers; recomputing layers with
    their inputs offloaded; the same per attention and MLP (measured faster still at large
    micro-batches, but not at every size, so tried only where whole layers do not fit; for layers it
    cannot split its estimate is the whole layers'). When nothing fits, the leaner of the last two.

    Args:
        budget_gib: The GPU memory the step may use.
        tokens: Tokens per micro-batch (sequences x length).
        estimate_gib: Predicted peak of a mode, in GiB (``TrainingPlan.estimate``'s ``total_gib``).
    """
    few = [CheckpointMode.OFFLOAD_SAVED_NO_RECOMPUTE] if tokens <= FEW_TOKENS else []
    modes = [
        CheckpointMode.KEEP_ACTIVATIONS,
        *few,
        CheckpointMode.RECOMPUTE_LAYERS,
        CheckpointMode.RECOMPUTE_LAYERS_OFFLOAD_INPUTS,
        CheckpointMode.RECOMPUTE_HALVES_OFFLOAD_INPUTS,
    ]
    estimates = []
    for mode in modes:
        estimates.append((mode, estimate_gib(mode)))
        if estimates[-1][1] <= budget_gib:
            return estimates[-1]
    # Of equals, the first: whole layers.
    return min(estimates[-2:], key=lambda mode_gib: mode_gib[1])
