"""``fit --help`` (and validate/test/predict) answered from a file: rendering it builds
LightningCLI's parser, which imports torch, Lightning and transformers (~10 s on 2 cores); reading
the cached text imports none of them.

The text is kept under the cache folder, one file per command and terminal width (argparse wraps to
the width), with the key it was rendered under on its first line. The key covers what else the text
is made of: this package's source files (size and modification time), the versions of Python and of
the libraries that render it, and jsonargparse's settings in the environment.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from qlora_lightning.paths import PACKAGE_DIR, cache_dir

# The subcommands whose help the project renders (cli.project_help); merge and estimate answer at
# once.
COMMANDS = ("fit", "validate", "test", "predict")
# Signatures, docstrings and type names in the help come from these, and its layout from
# jsonargparse.
_RENDERERS = ("jsonargparse", "lightning", "torch", "transformers")


def asked_for(argv: list[str]) -> Optional[str]:
    """The command of ``COMMAND --help``, else None (any other argument gets LightningCLI's own
    answer)."""
    return (
        argv[0] if len(argv) == 2 and argv[0] in COMMANDS and argv[1] in ("-h", "--help") else None
    )


def source_key() -> str:
    """What the cached answers were made of: a change to any part discards them."""
    sources = sorted(
        (str(p.relative_to(PACKAGE_DIR)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in PACKAGE_DIR.rglob("*.py")
    )
    versions = [_version(name) for name in _RENDERERS]
    # E.g. env names in help.
    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith("JSONARGPARSE_"))
    return hashlib.sha256(repr((sys.version, versions, settings, sources)).encode()).hexdigest()


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _path(command: str) -> Path:
    return cache_dir() / "help" / f"{command}-{shutil.get_terminal_size().columns}.txt"


def read(command: str) -> Optional[str]:
    """The cached help of ``command``, if it was rendered under the current key."""
    try:
        key, _, text = _path(command).read_text().partition("\n")
    except OSError:
        return None
    return text if key == source_key() else None


def write(command: str, text: str) -> None:
    """Keep ``text`` for ``read``: written beside and renamed into place, so a concurrent reader
    never sees half a file. A cache folder that cannot be written costs only the next help's
    speed."""
    path = _path(command)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            tmp.write(f"{source_key()}\n{text}")
        os.replace(tmp.name, path)
    except OSError:
        pass
