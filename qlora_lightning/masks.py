"""Spares transformers' mask building its check for packed sequences where the positions count 0..T-1.

With no attention mask (an unpadded batch), transformers looks for packed sequences in the
position ids (``masking_utils.find_packed_sequence_indices``) and decides on the host whether it
found any: a wait for everything the GPU has queued, in every forward. When the caller passes no
position ids the model makes them itself, as ``arange(T)`` in every row: there is nothing to find.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from transformers import masking_utils

# Set while a forward runs on positions the model builds itself.
_MODEL_POSITIONS: contextvars.ContextVar[bool] = contextvars.ContextVar("model_positions", default=False)
_transformers_check = masking_utils.find_packed_sequence_indices


def _find_packed_sequence_indices(position_ids):
    if _MODEL_POSITIONS.get():
        return None  # what the check returns for rows that each hold one sequence
    return _transformers_check(position_ids)


@contextlib.contextmanager
def positions_from_the_model(model_builds_them: bool = True) -> Iterator[None]:
    """Within: a forward called without position ids skips the packed-sequence check
    (``model_builds_them=False``, for a packed batch's explicit positions: it runs as usual)."""
    token = _MODEL_POSITIONS.set(model_builds_them)
    try:
        yield
    finally:
        _MODEL_POSITIONS.reset(token)


# Installed once, on import; outside ``positions_from_the_model`` it is transformers' own check.
masking_utils.find_packed_sequence_indices = _find_packed_sequence_indices
