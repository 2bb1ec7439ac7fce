"""Pure loss functions over (B, T, V) logits and (B, T) labels; -100 marks tokens without loss."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shift_for_next_token(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with token t+1: (B, T-1, V) logits and (B, T-1) targets."""
    return logits[:, :-1], labels[:, 1:]


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over labelled tokens, and how many tokens were labelled.

    Returning the sum (not the mean) lets the caller normalize by the token count of a
    whole optimizer step, so the loss does not depend on how tokens fall into micro-batches.
    """
    logits, targets = shift_for_next_token(logits, labels)
    # Fp32 for a stable log-softmax.
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (targets != IGNORE_INDEX).sum()


def count_loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss in a (B, T) label batch (the first position never does)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Indices of the labelled positions among the flattened (B*(T-1),) next-token targets.

    On a GPU tensor this waits for the GPU (how many there are decides the result's size);
    computed from the batch's host copy before it moves (``QLoRAModule.transfer_batch_to_device``),
    it costs no wait.
    """
    return (labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().squeeze(1)


def _chunk_nll(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """(N,) NLL of one chunk: (N, H) hidden -> (N, V) logits -> cross-entropy in fp32 (or wider)."""
    logits = head(hidden)
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none"
    )


def chunked_token_nll(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int,
    positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL of each labelled position, without ever holding the full (B, T, V) logits.

    Only labelled positions go through ``head`` (prompt and padding tokens cost nothing), in
    chunks of ``chunk_size`` tokens; each chunk is checkpointed, so its (chunk, V) logits are
    freed after the forward and recomputed one chunk at a time in the backward.

    Args:
        hidden: (B, T, H) final hidden states (after the last norm).
        head: Maps (N, H) hidden states to (N, V) logits, e.g. the output embedding
            (plus any logit soft-capping the model applies).
        labels: (B, T) token ids, ``IGNORE_INDEX`` where there is no loss.
        chunk_size: Tokens per chunk; peak logits memory is chunk_size x V x (2 + 4 + 4) bytes
            (bf16 logits, fp32 copy, fp32 log-softmax).
        positions: ``labelled_positions(labels)``, on ``hidden``'s device; found there when not
            given.

    Returns:
        (N,) NLL of the N labelled positions in row-major order, and the (B, T-1) mask of those
        positions among the shifted targets.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    hidden, targets = shift_for_next_token(hidden, labels)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    # Gathered by index: the backward of a boolean-mask gather would find the positions again,
    # a second wait for the GPU.
    if positions is None:
        positions = labelled_positions(labels)
    hidden, targets = (
        hidden.flatten(0, 1).index_select(0, positions),
        targets.flatten().index_select(0, positions),
    )
    # Empty, but attached to the graph even when N == 0, so that backward still runs.
    chunks = [hidden[:0].sum(dim=-1, dtype=torch.promote_types(hidden.dtype, torch.float32))]
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        chunks.append(
            checkpoint(
                partial(_chunk_nll, head),
                hidden[start:stop],
                targets[start:stop],
                use_reentrant=False,
            )
        )
    return torch.cat(chunks), keep


def chunked_lm_loss_sum(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int,
    positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_loss_sum(head(hidden), labels)`` through ``chunked_token_nll``: the same up to summation
    order."""
    nll, keep = chunked_token_nll(hidden, head, labels, chunk_size, positions)
    return nll.sum(), keep.sum()


def chunked_sequence_logps(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_size: int,
    positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps(head(hidden), labels)`` through ``chunked_token_nll``: (B,) log-probs, (B,)
    counts."""
    if positions is None:
        positions = labelled_positions(labels)
    nll, keep = chunked_token_nll(hidden, head, labels, chunk_size, positions)
    # The sequence of each labelled position.
    rows = positions.div(keep.shape[1], rounding_mode="floor")
    return -nll.new_zeros(keep.shape[0]).index_add(0, rows, nll), keep.sum(-1)


PreferenceLossType = Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"]
# Losses of the policy alone: no reference model is built or run for them.
REFERENCE_FREE = ("orpo", "simpo")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labelled tokens, and how many there are.

    Args:
        logits: (B, T, V) next-token logits.
        labels: (B, T) token ids, ``IGNORE_INDEX`` on the prompt and on padding.

    Returns:
        (B,) log-probs (fp32, or fp64 for fp64 logits) and (B,) labelled-token counts.
    """
    logits, targets = shift_for_next_token(logits, labels)
    # Bf16 -> fp32 for a stable log-softmax.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # (B*(T-1),) NLL, 0 at ignored positions
    nll = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.view_as(targets).sum(-1), (targets != IGNORE_INDEX).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: PreferenceLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Optional[torch.Tensor] = None,
    rejected_tokens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards, as TRL's ``DPOTrainer`` (1.16) defines them.

    Args:
        policy_chosen: (B,) summed response log-probs of the chosen responses under the policy.
        policy_rejected: (B,) the same for the rejected responses.
        ref_chosen: (B,) the chosen responses under the reference.
        ref_rejected: (B,) the rejected responses under the reference.
        beta: ``sigmoid`` / ``hinge``: inverse temperature of the implicit reward; ``ipo``: the
            regularization strength tau (the target margin is ``1 / (2 beta)``).
        loss_type: ``sigmoid`` (DPO), ``ipo`` or ``hinge`` (SLiC).
        label_smoothing: ``sigmoid`` only: the assumed probability that a pair's label is flipped
            (conservative DPO); 0 is plain DPO.
        chosen_tokens: (B,) response token counts of the chosen responses; ``ipo`` needs them.
        rejected_tokens: (B,) the same for the rejected responses.

    Returns:
        (B,) losses, and the (B,) detached rewards ``beta * (log pi - log pi_ref)`` of the chosen
        and of the rejected responses.
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(
            beta * margin
        ) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs chosen_tokens and rejected_tokens")
        # Per-token log-ratios, so that the squared loss does not grow with response length (TRL's
        # choice, confirmed with the IPO authors; their reported results use it).
        delta = chosen_logratios / chosen_tokens.clamp(
            min=1
        ) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (use sigmoid, ipo or hinge)")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term per pair (add it to the NLL of the chosen responses), as TRL's
    ``ORPOTrainer``.

    Args:
        chosen_avg: (B,) mean per-token log-probs of the chosen responses (ORPO's likelihoods are
            per token).
        rejected_avg: (B,) the same for the rejected responses.
        beta: Weight of the odds-ratio term (the paper's lambda).

    Returns:
        (B,) ``-beta * log sigmoid(log odds(chosen) - log odds(rejected))``, and the detached
        rewards
        ``beta * chosen_avg`` and ``beta * rejected_avg``.
    """
    chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds), beta * chosen_avg.detach(), beta * rejected_avg.detach()


def simpo_loss(
    chosen_avg: torch.Tensor,
    rejected_avg: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO per pair (length-normalised, no reference), as TRL's ``CPOTrainer`` with
    ``loss_type="simpo"``.

    Args:
        chosen_avg: (B,) mean per-token log-probs of the chosen responses.
        rejected_avg: (B,) the same for the rejected responses.
        beta: Scale of the reward ``beta * mean log-prob``.
        gamma: Target reward margin (TRL's ``simpo_gamma``).
        label_smoothing: Assumed probability that a pair's label is flipped.

    Returns:
        (B,) losses and the detached rewards ``beta * chosen_avg`` and ``beta * rejected_avg``.
    """
    margin = beta * (chosen_avg - rejected_avg) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


UnpairedLossType = Literal["kto", "apo_zero_unpaired"]


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_logratio: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: UnpairedLossType = "kto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row KTO losses on unpaired rows, as TRL's ``KTOTrainer`` (1.16) defines them.

    Args:
        policy_logps: (B,) summed completion log-probs under the policy.
        ref_logps: (B,) the same under the reference.
        desirable: (B,) bool, True for a desirable (thumbs-up) row.
        kl_logratio: The batch's mean ``log pi - log pi_ref`` over mismatched (prompt, completion)
            pairs: KTO's estimate of KL(pi || pi_ref), the reference point z0 that rewards are
            compared with. Unused by ``apo_zero_unpaired``, whose reference point is 0.
        beta: Inverse temperature of the implicit reward.
        desirable_weight: Weight of the desirable rows' losses (to balance unequal counts).
        undesirable_weight: Weight of the undesirable rows' losses.
        loss_type: ``kto`` (the KTO paper's eq. 7) or ``apo_zero_unpaired`` (APO-zero's unpaired
            variant).

    Returns:
        (B,) weighted losses (the loss is their mean), the (B,) detached rewards
        ``beta * (log pi - log pi_ref)``, and the reference point used: the KL estimate clamped
        at 0 and detached (TRL takes no gradient through it), 0 for ``apo_zero_unpaired``.
    """
    logratios = policy_logps - ref_logps
    if loss_type == "kto":
        kl = kl_logratio.detach().clamp(min=0)
        desirable_losses = 1 - torch.sigmoid(beta * (logratios - kl))
        undesirable_losses = 1 - torch.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        kl = torch.zeros((), dtype=logratios.dtype, device=logratios.device)
        desirable_losses = 1 - torch.sigmoid(beta * logratios)
        undesirable_losses = torch.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (use kto or apo_zero_unpaired)")
    losses = torch.where(
        desirable, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses
    )
    return losses, beta * logratios.detach(), kl
