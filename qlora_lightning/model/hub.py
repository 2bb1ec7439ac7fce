"""Hub ids on a machine without a network: one quick check, then no retries, and one line that says
what to do.

Without this, transformers and huggingface_hub retry an unreachable hub for about a minute (24
warnings) before an error that names whichever file they tried first.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
from huggingface_hub import constants

from qlora_lightning.errors import UserError


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub opens within 3 seconds (asked once per process and
    endpoint)."""
    url = urlparse(endpoint)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3
        ).close()
        return True
    except OSError:
        return False


def _cached(repo_id: str) -> bool:
    try:
        huggingface_hub.snapshot_download(repo_id=repo_id, local_files_only=True)
        return True
    except (OSError, ValueError):  # not in the cache, or not a valid repo id at all
        return False


def check_hub_id(name: str, what: str = "model") -> None:
    """Return when ``name`` is a local folder, the hub answers, or the hub's cache holds it (the hub
    libraries are then put offline, so they read the cache without retrying the network).

    Raises:
        UserError: ``name`` is none of these: one line naming it and how to point at a local copy.
    """
    if Path(name).expanduser().exists():
        return
    if not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT):
        return
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
    # And by processes this one starts (DataLoader workers, DDP ranks)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if not _cached(name):
        raise UserError(
            f"{what} '{name}' is not a local folder, the hub ({constants.ENDPOINT}) cannot be "
            "reached and no copy of it is cached: point base.name_or_path at a local folder "
            "holding the model's config, weights and tokenizer (or connect and run once to cache "
            "it)"
        )
