"""Packing: several examples per row, with attention and loss that never cross an example.

Layout of a packed batch (both modes): ``input_ids`` and ``labels`` of the examples laid end to
end, ``position_ids`` that restart at 0 at each example, and *no* ``attention_mask``. Given
position ids and no mask, transformers (5.x, ``masking_utils.find_packed_sequence_indices``)
reads the example boundaries from the restarts and:

- ``sdpa`` / ``eager`` / ``flex_attention``: builds a block-diagonal causal mask, row by row
  (exact on the CPU and the GPU; sdpa and eager compute the full T x T scores);
- ``flash_attention_2`` / ``_3``: calls the varlen kernel with one segment per example, which
  computes only the blocks on the diagonal; it does so only for a single row (batch size 1),
  hence the ``padding_free`` layout, which also carries ``cu_seq_lens_*`` / ``max_length_*``
  computed on the CPU so that the kernel needs no device-to-host sync in every layer.

Labels are -100 at the first token of every example: its "previous token" is the last token of
the example before, so without this each pack would teach the model to predict one example's
first token from another's last.

Packs are formed by best-fit decreasing (``trl.pack_dataset(strategy="bfd")``), which leaves
examples whole; rows are already cut to ``max_seq_length`` by the tokenizer step, so nothing is
truncated here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from qlora_lightning.errors import UserError
from qlora_lightning.losses import IGNORE_INDEX

# trl (and through it peft, bitsandbytes, datasets) is imported where a pack is made: parsing a
# config, which imports this module, then stays seconds shorter (benchmarks/startup.py).
if TYPE_CHECKING:
    import datasets

PackingMode = Literal["off", "padded", "padding_free"]

# Batch keys that are model inputs (the rest, e.g. labels and counts, are for the loss and logs).
MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)


def pack_examples(ds: datasets.Dataset, max_seq_length: int) -> datasets.Dataset:
    """Tokenized examples -> packs of at most ``max_seq_length`` tokens, by best-fit decreasing.

    Args:
        ds: Rows of ``input_ids`` and ``labels`` (equal-length lists), each at most
            ``max_seq_length`` long.
        max_seq_length: Capacity of a pack in tokens.

    Returns:
        Rows of concatenated ``input_ids`` / ``labels`` plus ``seq_lengths``, the length of each
        example in the pack (from which the position ids are rebuilt).
    """
    from trl import pack_dataset

    # One map batch packs all rows together: packing in chunks would leave a half-empty pack per
    # chunk.
    return pack_dataset(
        ds.select_columns(["input_ids", "labels"]),
        max_seq_length,
        strategy="bfd",
        map_kwargs={"batch_size": max(len(ds), 1), "desc": "packing"},
    )


def collate_packs(
    packs: list[dict], pad_id: int, padding_free: bool, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Packs -> one batch: (B, T) right-padded rows, or with ``padding_free`` one (1, sum of
    lengths) row.

    Right padding (padded mode, or up to ``pad_to_multiple_of``) gets position id 0 on every pad
    token, so that each one is a one-token "example" of its own that no real token attends to.

    Args:
        packs: Rows from :func:`pack_examples`.
        pad_id: Token id written at padding positions (never attended to, never a target).
        padding_free: Flatten the packs into a single row (for varlen attention kernels).
        pad_to_multiple_of: Round the row length up to a multiple of this.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (plus the varlen ``cu_seq_lens_*`` /
        ``max_length_*`` when padding-free), and the Python ints ``num_real_tokens`` and
        ``num_examples`` for throughput logs: a packed batch has no attention mask to count.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(
        pad_token_id=pad_id,
        padding_free=padding_free,
        return_position_ids=True,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    batch = collator(packs)
    batch.pop("seq_idx", None)  # for the short convolutions of linear-attention layers; none here
    if not padding_free:
        # The collator's mask would switch transformers off the position-id (packed) path and
        # let examples of one row see each other; the padding-free branch already does this.
        batch.pop("attention_mask")
        batch["labels"][batch["position_ids"] == 0] = IGNORE_INDEX
    batch["num_real_tokens"] = sum(len(p["input_ids"]) for p in packs)
    batch["num_examples"] = sum(len(p["seq_lengths"]) for p in packs)
    return batch


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a padded or packed batch that the model's forward takes."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def check_packing_backend(packing: str, attn_implementation: str | None) -> None:
    """Refuse a packing mode whose examples the attention backend would let see each other.

    Flash attention finds example boundaries in position ids only for a single row; with
    several packed rows it would attend across examples without a word.

    Args:
        packing: The DataModule's packing mode.
        attn_implementation: The model's attention backend (``config._attn_implementation``).

    Raises:
        UserError: for ``padded`` packing under flash attention.
    """
    if packing == "padded" and "flash" in (attn_implementation or ""):
        raise UserError(
            f"data.packing 'padded' does not keep examples apart under {attn_implementation} "
            "(its varlen path needs one row): use data.packing 'padding_free'"
        )


def real_tokens_and_examples(batch: dict[str, Any]) -> tuple[int | torch.Tensor, int]:
    """Non-pad tokens and examples in a batch: packed batches carry the counts, padded ones a mask.

    Counted from a mask, the tokens are a 0-d tensor on the mask's device: reading it on the host
    would wait for the GPU, so callers sum it there and read it late (``lagged``).
    """
    if "num_real_tokens" in batch:
        return int(batch["num_real_tokens"]), int(batch["num_examples"])
    mask = batch["attention_mask"]
    return mask.sum(), mask.shape[0]
