"""Paths into the files shipped inside the package (the tiny model, tokenizer and examples).

Configs name them as ``qlora_lightning/assets/...``, which is right from the repository root;
from anywhere else such a path is looked up in the installed package instead.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_PREFIX = "qlora_lightning/assets/"


def shipped(path: str) -> str:
    """``path`` itself if it exists (or is no shipped asset); else the asset of that name in the package."""
    if not path.startswith(_PREFIX) or Path(path).exists():
        return path
    return str(PACKAGE_DIR / "assets" / path[len(_PREFIX):])
