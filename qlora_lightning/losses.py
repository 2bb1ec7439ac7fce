"""Pure loss functions over (B, T, V) logits and (B, T) labels; -100 marks tokens without loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
