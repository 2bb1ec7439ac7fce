"""``python -m qlora_lightning export --format gguf``: a merged model (or an adapter, merged first
by ``merge``) -> one GGUF file that llama.cpp, Ollama and LM Studio load, with its tokenizer.

Written with the ``gguf`` package's own writer, constants and tensor-name map (``GGUFWriter``,
``MODEL_ARCH``, ``get_tensor_name_map``) and its quantizers (``gguf.quants``), the way llama.cpp's
converter lays a Llama out:

- architecture ``llama`` for Llama and Mistral checkpoints (llama.cpp runs Mistral as ``llama``:
  its sliding window is not used, as in transformers' Llama, which is what reads the file back);
- the query and key projections permuted per head from the Hugging Face rotary layout (halves) to
  llama.cpp's (interleaved pairs), which transformers' GGUF reader undoes on load;
- 1-D tensors (norms) in F32; 2-D ones in ``--dtype``: ``bf16`` and ``f16`` round each weight once,
  ``q8_0`` stores blocks of 32 weights as 8-bit integers with one f16 scale (8.5 bits a weight); a
  matrix whose rows are no multiple of 32 stays F16, as llama.cpp's converter does;
- the tokenizer's vocabulary, merges, token types, special ids, BOS/EOS flags and chat template
  under the keys llama.cpp and transformers' GGUF reader read (``tokenizer_metadata``): byte-level
  BPE (GPT-2, SmolLM2, Llama 3) as ``gpt2``, sentencepiece-style BPE (Llama 2, Mistral) as
  ``llama``.

The file is written tensor by tensor (one tensor converted in memory at a time) to
``<file>.partial``, renamed into place when whole. The folder gets a ``README.md`` model card
(``card.py``) and, with ``--push_to_hub ORG/NAME``, is uploaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from qlora_lightning.errors import OneLineParser, UserError, first_line

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[real]'"

# --dtype -> (GGML type of the 2-D weights, general.file_type, file name label)
DTYPES = {
    "bf16": ("BF16", "MOSTLY_BF16", "BF16"),
    "f16": ("F16", "MOSTLY_F16", "F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", "Q8_0"),
}
# transformers model_type -> GGUF architecture
SUPPORTED = {"llama": "llama", "mistral": "llama"}
F16_MAX = float(np.finfo(np.float16).max)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError(f"GGUF export needs the gguf package: {INSTALL_HINT}") from None
    return gguf


# ---- the model -----------------------------------------------------------------------------------


def check_architecture(config) -> str:
    """The GGUF architecture to write ``config``'s model as.

    Raises:
        UserError: one line naming what the exporter does not support (the architecture, a rope
            scaling, an activation, biases) and what it does.
    """
    model_type = getattr(config, "model_type", None)
    names = ", ".join(getattr(config, "architectures", None) or []) or model_type
    if model_type not in SUPPORTED:
        raise UserError(
            f"GGUF export: architecture '{model_type}' ({names}) is not supported; "
            f"supported: {', '.join(SUPPORTED)} (written as GGUF architecture 'llama')"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(
            f"GGUF export: hidden_act '{config.hidden_act}' is not supported (llama.cpp's llama "
            "uses silu)"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(
            f"GGUF export: rope scaling '{rope_type}' is not supported yet (only unscaled rope): "
            f"the file would compute other positions than the model"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(
            "GGUF export: attention or MLP biases are not supported (Llama and Mistral have none)"
        )
    return SUPPORTED[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A query or key projection (or its bias) from the Hugging Face rotary layout to llama.cpp's.

    Hugging Face rotates the two halves of each head's dimensions against each other; llama.cpp
    rotates adjacent pairs. Per head, row ``h * d + p * d/2 + i`` (half ``p``, index ``i``) moves to
    ``h * d + 2 * i + p``; transformers' GGUF reader (``LlamaTensorProcessor``) moves it back.
    """
    shape = weight.shape
    return (
        weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)
    )


@dataclass
class Planned:
    """One tensor of the file: its GGUF name, where its values come from and how it is stored."""

    name: str
    source: str  # key in the model's state dict
    heads: Optional[int]  # query/key: heads to permute over
    qtype: "object"  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]


def plan_tensors(state: dict[str, torch.Tensor], config, dtype: str) -> list[Planned]:
    """Each tensor's GGUF name (from ``gguf``'s tensor-name map for the architecture) and storage
    type.

    Raises:
        UserError: a tensor that llama.cpp's architecture has no place for.
    """
    gguf = _gguf()
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    known = set(gguf.MODEL_TENSORS[arch])
    qtype = getattr(gguf.GGMLQuantizationType, DTYPES[dtype][0])
    tied = getattr(config, "tie_word_embeddings", False)
    planned = []
    for key, value in state.items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in known:
            raise UserError(
                f"GGUF export: tensor '{key}' has no place in llama.cpp's llama architecture"
            )
        kind, name = found
        heads = {
            gguf.MODEL_TENSOR.ATTN_Q: config.num_attention_heads,
            gguf.MODEL_TENSOR.ATTN_K: config.num_key_value_heads,
        }.get(kind)
        stored = qtype if value.ndim == 2 else gguf.GGMLQuantizationType.F32
        if (
            stored == gguf.GGMLQuantizationType.Q8_0
            and value.shape[-1] % gguf.GGML_QUANT_SIZES[stored][0]
        ):
            log.warning(
                "%s: rows of %d are no multiple of Q8_0's 32-weight blocks: stored as F16",
                name,
                value.shape[-1],
            )
            stored = gguf.GGMLQuantizationType.F16
        planned.append(Planned(name, key, heads, stored, tuple(value.shape)))
    return planned


def encode_tensor(value: torch.Tensor, planned: Planned) -> np.ndarray:
    """The bytes (as a numpy array) that the file stores for ``value``."""
    gguf = _gguf()
    if planned.heads:
        value = permute_for_llama_cpp(value, planned.heads)
    data = value.detach().to(torch.float32).cpu().numpy()
    if (
        planned.qtype == gguf.GGMLQuantizationType.F16
        and data.size
        and np.abs(data).max() > F16_MAX
    ):
        raise UserError(
            f"GGUF export: {planned.source} holds values beyond float16's range ({F16_MAX:g}): "
            f"use --dtype bf16"
        )
    return gguf.quants.quantize(data, planned.qtype)


def stored_nbytes(planned: Planned) -> tuple[tuple[int, ...], "np.dtype", int]:
    """What ``add_tensor_info`` takes for a planned tensor: (shape, numpy dtype, bytes)."""
    gguf = _gguf()
    if planned.qtype == gguf.GGMLQuantizationType.F32:
        return planned.shape, np.dtype(np.float32), 4 * math.prod(planned.shape)
    if planned.qtype == gguf.GGMLQuantizationType.F16:
        return planned.shape, np.dtype(np.float16), 2 * math.prod(planned.shape)
    byte_shape = gguf.quant_shape_to_byte_shape(planned.shape, planned.qtype)
    return tuple(byte_shape), np.dtype(np.uint8), math.prod(byte_shape)


# ---- the tokenizer -------------------------------------------------------------------------------


def _pre_tokenizer_name(pre: Optional[dict]) -> Optional[str]:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE pre-tokenizer, or None if
    unknown.

    The regex splits are matched against transformers' own table of them
    (``GGUF_PRE_TOKENIZER_SPLITS``), so that the file reads back as the tokenizer it came from.
    """
    try:  # an internal table of transformers (tests/test_private_symbols.py)
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = {}
    steps = (
        pre.get("pretokenizers", [pre])
        if pre and pre.get("type") == "Sequence"
        else [pre]
        if pre
        else []
    )
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"  # SmolLM's own tokenizer: each digit alone, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return next(
            (name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex), None
        )
    return None


def _describe(pre: Optional[dict]) -> str:
    if not pre:
        return "none"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return " + ".join(step.get("type", "?") for step in steps)


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """What the GGUF file says of ``tokenizer`` (a transformers fast tokenizer), as plain values.

    Keys: ``model`` (``gpt2`` or ``llama``), ``pre``, ``tokens`` (by id, padded to ``vocab_size``),
    ``token_types``, ``scores`` (sentencepiece-style only: the negative rank of the merge that makes
    each token, the order llama.cpp's merging follows), ``merges``, the special token ids,
    ``add_bos``/``add_eos``, ``add_space_prefix`` and ``chat_template``.

    Raises:
        UserError: a tokenizer that is not BPE, a pre-tokenizer llama.cpp has no name for, or more
            tokens than the model's embedding has rows.
    """
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"GGUF export: tokenizer {type(tokenizer).__name__} has no tokenizers backend "
            f"(tokenizer.json) to read the vocabulary from"
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(
            f"GGUF export: tokenizer model '{model.get('type')}' is not supported (only BPE: "
            f"byte-level like GPT-2 and Llama 3, or sentencepiece-style like Llama 2 and Mistral)"
        )
    pre = spec.get("pre_tokenizer")
    steps = (
        pre.get("pretokenizers", [pre])
        if pre and pre.get("type") == "Sequence"
        else [pre]
        if pre
        else []
    )
    byte_level = any(step.get("type") == "ByteLevel" for step in steps)
    metaspace = next((s for s in steps if s.get("type") == "Metaspace"), None)
    # Older sentencepiece-style files (Llama 2's own tokenizer.json): no pre-tokenizer, the "▁"
    # comes from a normalizer that prepends it and replaces spaces with it.
    norm = spec.get("normalizer") or {}
    norm_steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    prepends = any(s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in norm_steps)
    replaces = any(s.get("type") == "Replace" and s.get("content") == "\u2581" for s in norm_steps)
    if byte_level:
        kind, pre_name = "gpt2", _pre_tokenizer_name(pre)
        if pre_name is None:
            raise UserError(
                f"GGUF export: byte-level pre-tokenizer ({_describe(pre)}) has no llama.cpp name "
                f"this exporter knows; llama.cpp would split the text differently"
            )
        add_space_prefix = any(
            s.get("add_prefix_space") for s in steps if s.get("type") == "ByteLevel"
        )
    elif metaspace is not None and model.get("byte_fallback"):
        kind, pre_name = "llama", "default"
        add_space_prefix = metaspace.get("prepend_scheme", "always") != "never"
    elif not steps and replaces and model.get("byte_fallback"):
        kind, pre_name, add_space_prefix = "llama", "default", prepends
    else:
        raise UserError(
            f"GGUF export: tokenizer with pre-tokenizer {_describe(pre)} is not supported (only "
            f"byte-level BPE, or sentencepiece-style BPE with byte fallback)"
        )

    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    if size > vocab_size:
        raise UserError(
            f"GGUF export: the tokenizer has {size} tokens, more than the model's {vocab_size} "
            "embeddings"
        )
    tokens: list[Optional[str]] = [None] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    types = [gguf.TokenType.NORMAL] * vocab_size
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index], types[index] = f"[PAD{index}]", gguf.TokenType.UNUSED
        elif (
            kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        ):
            types[index] = gguf.TokenType.BYTE
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    if tokenizer.unk_token_id is not None and kind == "llama":
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN

    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m for m in model.get("merges", [])]
    scores = None
    # llama.cpp merges sentencepiece-style by the score of the token a merge makes.
    if kind == "llama":
        rank: dict[str, int] = {}
        for r, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), r)
        scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]

    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {
        "model": kind,
        "pre": pre_name,
        "tokens": tokens,
        "token_types": [int(t) for t in types],
        "scores": scores,
        "merges": merges,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "unk_token_id": tokenizer.unk_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "add_bos": tokenizer.bos_token_id is not None
        and full[:1] == [tokenizer.bos_token_id] != plain[:1],
        "add_eos": tokenizer.eos_token_id is not None
        and full[-1:] == [tokenizer.eos_token_id] != plain[-1:],
        "add_space_prefix": add_space_prefix,
        "chat_template": template,
    }


def add_tokenizer(writer, meta: dict) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    if meta["scores"] is not None:
        writer.add_token_scores(meta["scores"])
    if meta["merges"]:
        writer.add_token_merges(meta["merges"])
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if meta[key] is not None:
            add(meta[key])
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    writer.add_add_space_prefix(meta["add_space_prefix"])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


# ---- the file ------------------------------------------------------------------------------------


def write_gguf(
    model: torch.nn.Module,
    tokenizer,
    path: Union[str, Path],
    dtype: str = "bf16",
    name: Optional[str] = None,
) -> Path:
    """Write ``model`` (a transformers Llama or Mistral) and ``tokenizer`` as one GGUF file at
    ``path``.

    Args:
        model: The model; its weights are read in their own dtype and rounded once to ``dtype``.
        tokenizer: Its fast tokenizer.
        path: The ``.gguf`` file, replaced when whole.
        dtype: ``bf16``, ``f16`` or ``q8_0`` for the 2-D weights (norms stay F32).
        name: ``general.name``; default the file's stem.
    """
    gguf = _gguf()
    if dtype not in DTYPES:
        raise UserError(f"GGUF export: unknown dtype '{dtype}' (one of: {', '.join(DTYPES)})")
    config = model.config
    arch = check_architecture(config)
    state = model.state_dict()
    planned = plan_tensors(state, config, dtype)
    meta = tokenizer_metadata(tokenizer, config.vocab_size)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    try:
        # transformers' GGUF reader takes a llama file named exactly "mistral" for its own Mistral
        # class, which it then cannot map to tensors: any other spelling reads as Llama.
        name = name or path.stem
        writer.add_name("Mistral" if name == "mistral" else name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(getattr(gguf.LlamaFileType, DTYPES[dtype][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(head_dim(config))
        writer.add_rope_freq_base(rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        if head_dim(config) != config.hidden_size // config.num_attention_heads:
            writer.add_key_length(head_dim(config))
            writer.add_value_length(head_dim(config))
        add_tokenizer(writer, meta)
        for item in planned:
            shape, np_dtype, nbytes = stored_nbytes(item)
            writer.add_tensor_info(
                item.name,
                shape,
                np_dtype,
                nbytes,
                raw_dtype=None if np_dtype != np.uint8 else item.qtype,
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in planned:  # one converted tensor in memory at a time
            writer.write_tensor_data(encode_tensor(state[item.source], item))
        writer.close()
        partial.replace(path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


def load_merged(folder: Union[str, Path]):
    """The model and tokenizer of a merged (or any Llama/Mistral) folder, checked before the weights
    load.

    Raises:
        UserError: no such folder, no model in it (an adapter folder is named as such), an
            unsupported architecture, or a load that fails.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder '{folder}' does not exist")
    if not (folder / "config.json").is_file():
        hint = (
            ": it is an adapter, use --adapter"
            if (folder / "adapter_config.json").is_file()
            else " (a merged model folder, as merge --output writes)"
        )
        raise UserError(f"'{folder}' holds no config.json{hint}")
    try:
        check_architecture(AutoConfig.from_pretrained(folder))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map={"": "cpu"})
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"model folder '{folder}': {first_line(err)}") from None
    return model, tokenizer


def export_gguf(
    model_dir: Union[str, Path],
    output: Union[str, Path],
    dtype: str = "bf16",
    name: Optional[str] = None,
    repo_id: Optional[str] = None,
    source: Optional[Union[str, Path]] = None,
) -> Path:
    """Export a merged model folder to ``<output>/<name>-<DTYPE>.gguf`` and write the folder's model
    card.

    Args:
        repo_id: The hub repository the folder goes to, for the card's loading lines.
        source: What the card names as the export's source, and reads the training facts from
            (default ``model_dir``; an adapter when ``model_dir`` is its temporary merge).
    """
    from qlora_lightning.evaluate import card as model_card

    model, tokenizer = load_merged(model_dir)
    output = Path(output)
    name = name or default_name(Path(model_dir))
    path = output / f"{name}-{DTYPES[dtype][2]}.gguf"
    log.info("writing %s (%s) from %s", path, dtype, model_dir)
    write_gguf(model, tokenizer, path, dtype, name)
    del model
    model_card.write_gguf_card(output, Path(source or model_dir), name, repo_id)
    return path


def default_name(source: Path) -> str:
    """A name for the export of ``source``: its folder name (a run's ``adapter`` folder: the run's
    name)."""
    source = source.resolve()
    return source.parent.name if source.name == "adapter" else source.name


# ---- the command ---------------------------------------------------------------------------------


def parse_args(args: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m qlora_lightning export",
        description="A merged model (or an adapter, merged first as merge does) as one GGUF file "
        "for llama.cpp, Ollama and LM Studio, with its tokenizer and a README.md model card.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        help="a merged model folder (merge --output), or any Llama/Mistral checkpoint folder",
    )
    source.add_argument(
        "--adapter",
        help="a saved adapter: merged first (as merge does, checked against "
        "adapter-on-4-bit, in float32), then exported",
    )
    parser.add_argument(
        "--format", choices=["gguf"], default="gguf", help="file format (default: gguf)"
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="bf16",
        help="storage of the weight matrices: bf16 (exact for a bf16 merge), f16, or q8_0 "
        "(8.5 bits a weight); norms stay f32 (default: bf16)",
    )
    parser.add_argument(
        "--output", help="folder for the .gguf file and its README.md (default: exported/NAME)"
    )
    parser.add_argument(
        "--name",
        help="model name in the file and its file name (default: the source folder's name)",
    )
    parser.add_argument(
        "--push_to_hub",
        "--push-to-hub",
        dest="push_to_hub",
        metavar="ORG/NAME",
        help="upload the output folder to this Hugging Face model repository (created if absent)",
    )
    merging = parser.add_argument_group("with --adapter (as merge takes them)")
    merging.add_argument(
        "--into",
        choices=["dequantized", "original"],
        default="dequantized",
        help="merge into the dequantized 4-bit weights the adapter was trained against, or into "
        "the original 16-bit ones (default: dequantized)",
    )
    merging.add_argument(
        "--base", help="base model id or directory (default: the one the adapter records)"
    )
    merging.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to load and merge (default: cuda when available)",
    )
    merging.add_argument(
        "--allow-divergence",
        action="store_true",
        help="export even when merge's check against adapter-on-4-bit fails",
    )
    return parser.parse_args(args)


def main(args: Optional[Sequence[str]] = None) -> Path:
    """Run the export CLI; return the written file's path (bad input raises ``UserError``: exit
    1)."""
    from qlora_lightning.evaluate import card as model_card

    opts = parse_args(args)
    _gguf()
    if opts.push_to_hub:
        model_card.check_repo_id(opts.push_to_hub)
    source = Path(opts.model or opts.adapter)
    name = opts.name or default_name(source)
    output = Path(opts.output) if opts.output else Path("exported") / name
    if opts.model:
        path = export_gguf(source, output, opts.dtype, name, opts.push_to_hub)
    else:
        path = _export_adapter(opts, output, name)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    print(path)
    if opts.push_to_hub:
        model_card.push_folder(output, opts.push_to_hub, f"GGUF export ({opts.dtype}) of {name}")
    return path


def _export_adapter(opts: argparse.Namespace, output: Path, name: str) -> Path:
    """Merge the adapter through ``merge`` (checked, float32) into a temporary folder, then export
    that."""
    from qlora_lightning.evaluate.merge import base_spec_for, merge_and_check

    adapter = Path(opts.adapter)
    if not (adapter / "adapter_config.json").is_file():
        what = (
            "does not exist"
            if not adapter.exists()
            else "is not a PEFT adapter folder (no adapter_config.json)"
        )
        raise UserError(f"adapter '{adapter}' {what}")
    spec = base_spec_for(adapter, opts.base)
    output.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".merge-", dir=output))
    try:
        merged = scratch / name
        report = merge_and_check(
            adapter, merged, spec, opts.into, torch.float32, opts.device, opts.allow_divergence
        )
        check = {
            None: "none (16-bit base)",
            True: "passed",
            False: "failed, written anyway (--allow-divergence)",
        }
        log.info(
            "merged %s into its base (%s weights, float32); check against adapter-on-4-bit: %s",
            adapter,
            opts.into,
            check[report.get("passed")],
        )
        return export_gguf(merged, output, opts.dtype, name, opts.push_to_hub, source=adapter)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
