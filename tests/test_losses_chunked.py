"""The chunked loss equals the plain loss, in value and in gradients."""

import pytest
import torch

from qlora_lightning.losses import (
    IGNORE_INDEX,
    chunked_lm_loss_sum,
    chunked_sequence_logps,
    labelled_positions,
    lm_loss_sum,
    sequence_logps,
)
from qlora_lightning.modules.base import LOSS_POSITIONS


def _problem(seed: int = 0, batch: int = 3, length: int = 17, width: int = 64, vocab: int = 96):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(width, vocab, bias=False).double()
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[2, -4:] = IGNORE_INDEX  # padding
    return hidden, head, labels


def _loss_and_grads(loss_fn, hidden, head):
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad()
    nll, n = loss_fn(hidden)
    nll.backward()
    grad_head = head.weight.grad
    return nll.detach(), n, hidden.grad, None if grad_head is None else grad_head.clone()


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_chunked_matches_plain(chunk_size):
    hidden, head, labels = _problem()
    plain = _loss_and_grads(lambda h: lm_loss_sum(head(h), labels), hidden, head)
    chunked = _loss_and_grads(
        lambda h: chunked_lm_loss_sum(h, head, labels, chunk_size), hidden, head
    )
    assert chunked[1] == plain[1]
    for got, want in zip(chunked[:1] + chunked[2:], plain[:1] + plain[2:]):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_sequence_logps_match_plain(chunk_size):
    hidden, head, labels = _problem()
    labels[1] = IGNORE_INDEX  # a sequence with no labelled token: log-prob 0 from 0 tokens
    # A different gradient per sequence.
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    seen = {}

    def weighted(name, logps_fn):
        def loss(h):
            logps, tokens = seen[name] = logps_fn(h)
            return (logps * weights).sum(), tokens.sum()

        return loss

    plain = _loss_and_grads(
        weighted("plain", lambda h: sequence_logps(head(h), labels)), hidden, head
    )
    chunked = _loss_and_grads(
        weighted("chunked", lambda h: chunked_sequence_logps(h, head, labels, chunk_size)),
        hidden,
        head,
    )
    (plain_logps, plain_tokens), (chunked_logps, chunked_tokens) = seen["plain"], seen["chunked"]
    assert chunked_tokens.tolist() == plain_tokens.tolist() == [12, 0, 12]
    assert chunked_logps[1] == 0
    torch.testing.assert_close(chunked_logps.detach(), plain_logps.detach(), rtol=1e-9, atol=1e-9)
    for got, want in zip(chunked[2:], plain[2:]):  # gradients of the hidden states and the head
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_chunked_with_no_labelled_tokens_still_backpropagates():
    hidden, head, labels = _problem()
    labels[:] = IGNORE_INDEX
    nll, n, grad_hidden, grad_head = _loss_and_grads(
        lambda h: chunked_lm_loss_sum(h, head, labels, 4), hidden, head
    )
    assert n == 0 and nll == 0
    assert not grad_hidden.any()
    assert grad_head is None  # the head never ran: no labelled token reached it


def test_chunk_size_must_be_positive():
    hidden, head, labels = _problem()
    with pytest.raises(ValueError):
        chunked_lm_loss_sum(hidden, head, labels, 0)


def test_sft_module_chunked_loss_matches_plain_on_a_4bit_model():
    from tests.conftest import sft_module

    module = sft_module()
    module.configure_model()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][:, :4] = IGNORE_INDEX
    results = []
    # The last: the labelled positions found on the host copy as the batch moves, as in training.
    for chunk, moved in ((None, False), (5, False), (5, True)):
        module.loss_chunk_size = chunk
        module.model.zero_grad()
        nll, n = module.loss_sum(_moved(module, batch) if moved else batch)
        nll.backward()
        grads = [p.grad.clone() for p in module.model.parameters() if p.requires_grad]
        results.append((nll.detach(), n, grads))
    plain, n_plain, g_plain = results[0]
    for chunked, n_chunked, g_chunked in results[1:]:
        assert n_plain == n_chunked
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
        for got, want in zip(g_chunked, g_plain):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _moved(module, batch: dict) -> dict:
    moved = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    torch.testing.assert_close(moved[LOSS_POSITIONS], labelled_positions(batch["labels"]))
    return moved


def test_only_a_chunked_loss_gets_the_positions_found_on_the_host():
    from tests.conftest import sft_module

    module = sft_module()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    assert LOSS_POSITIONS not in module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    module.loss_chunk_size = 4
    assert LOSS_POSITIONS not in batch and LOSS_POSITIONS in module.transfer_batch_to_device(
        batch, torch.device("cpu"), 0
    )


def test_dpo_module_chunked_logps_match_plain_on_a_4bit_model():
    from tests.test_dpo import dpo_module, ordered_batches, preference_data

    module = dpo_module()
    module.configure_model()
    batch = ordered_batches(preference_data())[0]
    results = []
    for chunk, moved in ((None, False), (5, False), (5, True)):
        module.loss_chunk_size = chunk
        module.model.zero_grad()
        # The live reference, then the policy.
        metrics = module.batch_metrics(_moved(module, batch) if moved else batch)
        metrics["loss"].backward()
        grads = [p.grad.clone() for p in module.model.parameters() if p.requires_grad]
        results.append(({k: v.detach() for k, v in metrics.items()}, grads))
    plain, g_plain = results[0]
    for chunked, g_chunked in results[1:]:
        for name in plain:
            torch.testing.assert_close(chunked[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)
        for got, want in zip(g_chunked, g_plain):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in g_plain)
