"""Surviving kills and bad steps: atomic checkpoint files, readable-or-refused loads."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from qlora_lightning.errors import UserError
from qlora_lightning.model.adapters import AdapterMix, AdapterSet
from qlora_lightning.model.build import BaseModelSpec, LoraSpec

# The only classes a checkpoint may hold besides tensors and plain values: the module's typed
# arguments, which ``save_hyperparameters`` stores as given when a module is built in Python (the
# CLI stores its config as plain values). Dataclasses of plain fields: rebuilding one runs no code.
CHECKPOINT_CLASSES = [BaseModelSpec, LoraSpec, AdapterSet, AdapterMix]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    A kill during a save leaves the previous file (``last.ckpt`` included) intact; a file
    that is nonetheless truncated or corrupt is refused on load with a one-line error.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None
    ) -> None:
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            # Remote stores are atomic per object.
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @override
    def load_checkpoint(
        self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> dict:
        if not Path(path).is_file():
            raise UserError(f"checkpoint '{path}' does not exist")
        try:
            # Tensors, plain values and CHECKPOINT_CLASSES only: loading never runs code a
            # checkpoint names.
            with torch.serialization.safe_globals(CHECKPOINT_CLASSES):
                checkpoint = super().load_checkpoint(
                    path, map_location=map_location, weights_only=True
                )
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            if found is None:
                raise UserError(
                    f"checkpoint '{path}' is truncated or corrupt (UnpicklingError); "
                    "resume from an earlier one"
                ) from None
            raise UserError(
                f"checkpoint '{path}' holds a {found.group(1)}, not only tensors and plain values "
                "(written by an older version, or not by this project): start a new run"
            ) from None
        except Exception as err:  # torch raises several types for truncated / garbled files
            raise UserError(
                f"checkpoint '{path}' is truncated or corrupt ({type(err).__name__}); "
                "resume from an earlier one"
            ) from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise UserError(f"checkpoint '{path}' is not a Lightning checkpoint (no state_dict)")
        return checkpoint


class NonFiniteLossError(UserError):
    """Training stopped on a non-finite loss or gradient (``nonfinite: stop``)."""
