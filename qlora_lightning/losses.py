"""Pure loss functions over (B, T, V) logits and (B, T) labels; -100 marks tokens without loss."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with token t+1: (B, T-1, V) logits and (B, T-1) targets."""
    return logits[:, :-1], labels[:, 1:]


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over labelled tokens, and how many tokens were labelled.

    Returning the sum (not the mean) lets the caller normalize by the token count of a
    whole optimizer step, so the loss does not depend on how tokens fall into micro-batches.
    """
    logits, targets = shift_for_next_token(logits, labels)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="sum")  # fp32 for a stable log-softmax
    return nll, (targets != IGNORE_INDEX).sum()


def count_loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss in a (B, T) label batch (the first position never does)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _chunk_nll(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of one chunk: (N, H) hidden -> (N, V) logits -> fp32 cross-entropy."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_lm_loss_sum(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                        chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_loss_sum(head(hidden), labels)`` without ever holding the full (B, T, V) logits.

    Only labelled positions go through ``head`` (prompt and padding tokens cost nothing), in
    chunks of ``chunk_size`` tokens; each chunk is checkpointed, so its (chunk, V) logits are
    freed after the forward and recomputed one chunk at a time in the backward. The result is
    the same sum as the plain loss up to floating-point summation order.

    Args:
        hidden: (B, T, H) final hidden states (after the last norm).
        head: Maps (N, H) hidden states to (N, V) logits, e.g. the output embedding
            (plus any logit soft-capping the model applies).
        labels: (B, T) token ids, ``IGNORE_INDEX`` where there is no loss.
        chunk_size: Tokens per chunk; peak logits memory is chunk_size x V x (2 + 4 + 4) bytes
            (bf16 logits, fp32 copy, fp32 log-softmax).

    Returns:
        The summed NLL (fp32 scalar) and the number of labelled tokens.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    hidden, targets = shift_for_next_token(hidden, labels)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    hidden, targets = hidden[keep], targets[keep]  # (N, H), (N,)
    total = hidden[:0].sum(dtype=torch.float32)  # 0.0, but attached to the graph even when N == 0
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        total = total + checkpoint(partial(_chunk_nll, head), hidden[start:stop], targets[start:stop],
                                   use_reentrant=False)
    return total, keep.sum()
