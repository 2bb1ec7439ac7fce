"""Paths into the files shipped inside the package (the tiny model, tokenizer and examples), and the
cache.

Configs name them as ``qlora_lightning/assets/...``, which is right from the repository root;
from anywhere else such a path is looked up in the installed package instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

# A hint only: the help cache (help_cache.py) reads cache_dir without importing torch.
if TYPE_CHECKING:
    import torch

PACKAGE_DIR = Path(__file__).resolve().parent
_PREFIX = "qlora_lightning/assets/"


def shipped(path: str) -> str:
    """``path`` itself if it exists (or is no shipped asset); else the asset of that name in the
    package."""
    if not path.startswith(_PREFIX) or Path(path).exists():
        return path
    return str(PACKAGE_DIR / "assets" / path[len(_PREFIX) :])


def cache_dir() -> Path:
    """Where built checkpoints are kept (random-weight architectures, dequantized GGUF files):
    ``$QLORA_CACHE``, else ``qlora_lightning`` in the system's temporary directory."""
    return Path(os.environ.get("QLORA_CACHE", Path(tempfile.gettempdir()) / "qlora_lightning"))


def build_once(path: Path, write: Callable[[Path], None]) -> Path:
    """``path``, a cached folder that ``write`` fills the first time it is asked for.

    ``write`` fills a fresh temporary folder beside it, which is then renamed into place: atomic,
    so a concurrent or killed run never sees half a folder. Where another process (a DDP/FSDP
    rank) built the same folder first, its copy is kept.
    """
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent))
    try:
        write(tmp)
        tmp.rename(path)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left over when another won
    return path


def save_checkpoint(model: torch.nn.Module, folder: Path) -> None:
    """A transformers model's config and weights as a checkpoint ``from_pretrained`` reads.

    Not ``model.save_pretrained``: in a process group it writes on rank 0 only, and each rank
    builds its own copy of a cached checkpoint (``build_once`` keeps the first).
    """
    from safetensors.torch import save_model

    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
