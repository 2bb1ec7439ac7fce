"""Spares transformers' mask building the questions about a batch that the host already answered.

Building the attention mask, transformers asks two questions of tensors on the GPU, each answered
on the host: a wait for everything the GPU has queued, in every forward.

- With no attention mask (an unpadded batch), it looks for packed sequences in the position ids
  (``masking_utils.find_packed_sequence_indices``). When the caller passes no position ids the
  model makes them itself, as ``arange(T)`` in every row: there is nothing to find.
- With a mask, SDPA's path asks whether the mask pads anything
  (``masking_utils._ignore_causal_mask_sdpa``): if not, it drops the mask for SDPA's own causal
  one. Whether a batch pads was known on the host before it reached the GPU; if it does, the
  answer is "keep the mask".

Within :func:`known_to_the_host` both questions take the host's answers; outside it, transformers
asks as usual, with its own functions in place.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from transformers import masking_utils

# Set while a forward runs on positions the model builds itself.
_MODEL_POSITIONS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "model_positions", default=False
)
# Set while a forward runs on an attention mask known to pad at least one token.
_PADDED: contextvars.ContextVar[bool] = contextvars.ContextVar("padded", default=False)
_transformers_packed_check = masking_utils.find_packed_sequence_indices
_transformers_padding_check = masking_utils._ignore_causal_mask_sdpa


def _find_packed_sequence_indices(position_ids):
    if _MODEL_POSITIONS.get():
        return None  # what the check returns for rows that each hold one sequence
    return _transformers_packed_check(position_ids)


def _ignore_causal_mask_sdpa(padding_mask, *args, **kwargs) -> bool:
    if padding_mask is not None and _PADDED.get():
        return False  # the padding must be in the mask, whatever else would allow dropping it
    return _transformers_padding_check(padding_mask, *args, **kwargs)


@contextlib.contextmanager
def known_to_the_host(model_positions: bool = True, padded: bool = False) -> Iterator[None]:
    """Within: a forward called without position ids skips the packed-sequence check
    (``model_positions=False``, for a packed batch's explicit positions: it runs as usual), and
    with ``padded`` one called with an attention mask keeps it without reading it.

    The two checks are replaced only while the outermost such context is open (importing the
    package changes nothing in transformers); other threads' forwards meanwhile see transformers'
    own answers, since the context variables are unset there."""
    tokens = _MODEL_POSITIONS.set(model_positions), _PADDED.set(padded)
    outermost = masking_utils.find_packed_sequence_indices is not _find_packed_sequence_indices
    if outermost:
        saved = masking_utils.find_packed_sequence_indices, masking_utils._ignore_causal_mask_sdpa
        masking_utils.find_packed_sequence_indices = _find_packed_sequence_indices
        masking_utils._ignore_causal_mask_sdpa = _ignore_causal_mask_sdpa
    try:
        yield
    finally:
        if outermost:
            masking_utils.find_packed_sequence_indices, masking_utils._ignore_causal_mask_sdpa = (
                saved
            )
        _PADDED.reset(tokens[1])
        _MODEL_POSITIONS.reset(tokens[0])
