"""ORPO and SimPO: their losses against TRL's maintained implementations, and a module that never
builds nor runs a reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

# SimPO lives in TRL 1.x as CPO's loss_type="simpo".
from trl.experimental.cpo.cpo_trainer import (
    CPOTrainer,
)

# ORPO's maintained implementation in TRL 1.x.
from trl.experimental.orpo.orpo_trainer import (
    ORPOTrainer,
)

from qlora_lightning.errors import UserError
from qlora_lightning.losses import IGNORE_INDEX, orpo_loss, sequence_logps, simpo_loss
from tests.conftest import cpu_trainer, tiny_spec
from tests.test_dpo import dpo_module, preference_data

CPU = SimpleNamespace(device=torch.device("cpu"))


def _logits_and_labels(pairs: int = 6, length: int = 14, vocab: int = 11):
    torch.manual_seed(0)
    logits = torch.randn(2 * pairs, length, vocab, dtype=torch.float64)
    ids = torch.randint(0, vocab, (2 * pairs, length))
    positions = torch.arange(length)
    prompt = torch.randint(2, 7, (pairs,)).repeat(2)
    end = torch.randint(9, length + 1, (2 * pairs,))
    labels = ids.masked_fill(
        ~((positions >= prompt[:, None]) & (positions < end[:, None])), IGNORE_INDEX
    )
    return logits, labels


def test_mean_token_logps_are_trls():
    logits, labels = _logits_and_labels()
    logps, tokens = sequence_logps(logits, labels)
    # TRL's ORPO and CPO score a response by its mean per-token log-prob.
    theirs = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    torch.testing.assert_close(logps / tokens, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_orpo_odds_ratio_term_is_trls(beta):
    logits, labels = _logits_and_labels()
    logps, tokens = sequence_logps(logits, labels)
    chosen, rejected = (logps / tokens).chunk(2)
    odds, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, beta)
    trainer = SimpleNamespace(beta=beta, accelerator=CPU)
    trl_terms, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(
        trainer, chosen, rejected
    )
    # TRL's loss is `nll - terms.mean()`: the term enters with the opposite sign.
    torch.testing.assert_close(odds, -trl_terms, atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen_rewards, trl_chosen.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rejected_rewards, trl_rejected.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "beta,gamma,smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.5, 0.0, 0.1)]
)
def test_simpo_is_trls(beta, gamma, smoothing):
    logits, labels = _logits_and_labels()
    logps, tokens = sequence_logps(logits, labels)
    chosen, rejected = (logps / tokens).chunk(2)
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta, gamma, smoothing)
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=smoothing,
        loss_type="simpo",
        accelerator=CPU,
    )
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    for ours, theirs in (
        (losses, trl_losses),
        (chosen_rewards, trl_chosen),
        (rejected_rewards, trl_rejected),
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_modules_never_run_a_reference(loss_type, tmp_path, monkeypatch):
    module = dpo_module(loss_type=loss_type, beta=0.5 if loss_type == "simpo" else 0.1)
    module.configure_model()
    monkeypatch.setattr(
        type(module), "as_reference", lambda self: pytest.fail("a reference forward ran")
    )
    data = preference_data()
    batch = data.collate([data.splits["train"][i] for i in range(4)])
    metrics = module.batch_metrics(batch)
    logps, tokens = module.response_logps(batch)
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    if loss_type == "orpo":  # the chosen responses' NLL per token plus the mean odds-ratio term
        odds = orpo_loss(chosen / chosen_tokens, rejected / rejected_tokens, 0.1)[0]
        expected = -chosen.sum() / chosen_tokens.sum() + odds.mean()
    else:
        expected = simpo_loss(chosen / chosen_tokens, rejected / rejected_tokens, 0.5, 0.5)[
            0
        ].mean()
    torch.testing.assert_close(metrics["loss"], expected)
    cpu_trainer(tmp_path, max_steps=2, limit_val_batches=1).fit(module, datamodule=data)
    assert "reference" not in module.model.peft_config


def test_reference_free_losses_refuse_a_reference():
    for option in ({"precompute_ref_logps": True}, {"sft_adapter": "some/adapter"}):
        with pytest.raises(UserError, match="runs no reference"):
            dpo_module(base=tiny_spec(), loss_type="orpo", **option)
