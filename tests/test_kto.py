"""KTO: the loss against TRL's KTOTrainer, unpaired data (and pairs split into it), and a module that learns."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qlora_lightning.losses import IGNORE_INDEX, kto_loss, sequence_logps

# ---- the loss: TRL is the oracle ---------------------------------------------------------


def _policy(rows: int, seed: int, length: int = 14, vocab: int = 11):
    """Random fp64 logits and completion labels -> our (B,) log-probs and TRL's per-token log-probs."""
    torch.manual_seed(seed)
    logits = torch.randn(rows, length, vocab, dtype=torch.float64)
    ids = torch.randint(0, vocab, (rows, length))
    positions = torch.arange(length)
    completion = (positions >= torch.randint(2, 7, (rows, 1))) & (positions < torch.randint(9, length + 1, (rows, 1)))
    logps, _ = sequence_logps(logits, ids.masked_fill(~completion, IGNORE_INDEX))
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * completion[:, 1:]
    return logps, per_token, completion.long()


def _trl_kto(loss_type, beta, desirable_weight, undesirable_weight, label, per_token, completion, kl_per_token,
             kl_completion, ref, ref_kl):
    """TRL 1.16's ``KTOTrainer._compute_loss`` (the loss's least-private entry point: it sits inside the
    trainer's loss method) on given per-token policy log-probs and precomputed reference log-probs."""
    from trl import KTOTrainer

    metrics = defaultdict(lambda: defaultdict(list))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, loss_type=loss_type, calculate_KL=loss_type == "kto",
        precompute_ref_logps=True, aux_loss_enabled=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x))
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "KL_input_ids": torch.zeros_like(kl_completion),
              "KL_attention_mask": torch.ones_like(kl_completion), "KL_completion_mask": kl_completion,
              "label": label, "ref_logps": ref, "ref_KL_logps": ref_kl}

    def model(**kwargs):  # what TRL's fused LM head returns: per-token log-probs, 0 off the completion
        log_probs = kl_per_token if kwargs["input_ids"] is inputs["KL_input_ids"] else per_token
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)

    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[0] for name, values in metrics["train"].items()}


LABELS = {"mixed": [True, False, False, True, True, False, True], "desirable": [True] * 7, "undesirable": [False] * 7}


@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize("loss_type,beta,desirable_weight,undesirable_weight,kl_shift", [
    ("kto", 0.1, 1.0, 1.0, 0.7),     # a positive KL estimate: the reference point moves
    ("kto", 0.5, 1.33, 1.0, -0.7),   # a negative one: clamped to 0
    ("kto", 2.0, 1.0, 0.75, 0.2),
    ("apo_zero_unpaired", 0.3, 1.0, 1.2, 0.7),  # no KL term at all
])
def test_kto_loss_matches_trl(labels, loss_type, beta, desirable_weight, undesirable_weight, kl_shift):
    rows = len(LABELS[labels])
    label = torch.tensor(LABELS[labels])
    logps, per_token, completion = _policy(rows, seed=0)
    kl_logps, kl_per_token, kl_completion = _policy(rows, seed=1)
    torch.manual_seed(2)
    ref = logps - torch.randn(rows, dtype=torch.float64)  # log-ratios of either sign
    ref_kl = kl_logps - kl_shift - 0.1 * torch.randn(rows, dtype=torch.float64)

    losses, rewards, kl = kto_loss(logps, ref, label, (kl_logps - ref_kl).mean(), beta, desirable_weight,
                                   undesirable_weight, loss_type)
    trl_loss, trl = _trl_kto(loss_type, beta, desirable_weight, undesirable_weight, label, per_token, completion,
                             kl_per_token, kl_completion, ref, ref_kl)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert kl.item() == pytest.approx(trl["kl"], abs=1e-6)
    if loss_type == "kto":  # the settings reach both sides of the clamp
        assert (kl.item() > 0) == (kl_shift > 0)
    for name, rows_of in (("chosen", label), ("rejected", ~label)):
        if rows_of.any():
            assert rewards[rows_of].mean().item() == pytest.approx(trl[f"rewards/{name}"], abs=1e-6)
            assert logps[rows_of].mean().item() == pytest.approx(trl[f"logps/{name}"], abs=1e-6)
        else:
            assert f"rewards/{name}" not in trl
    if label.any() and (~label).any():
        margin = rewards[label].mean() - rewards[~label].mean()
        assert margin.item() == pytest.approx(trl["rewards/margins"], abs=1e-6)
