"""A forward on positions the model builds itself skips transformers' check for packed sequences (a wait
for the GPU in every forward); explicit positions, a packed batch's, are still checked."""

import torch
from transformers import masking_utils

from qlora_lightning import masks
from qlora_lightning.data.packing import model_inputs
from tests.conftest import sft_module

PACKED = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])  # three sequences in one row


def test_within_it_the_check_answers_one_sequence_per_row_and_outside_it_checks():
    assert masking_utils.find_packed_sequence_indices(PACKED).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    with masks.positions_from_the_model():
        assert masking_utils.find_packed_sequence_indices(PACKED) is None
        with masks.positions_from_the_model(False):  # a packed batch's own positions, nested
            assert masking_utils.find_packed_sequence_indices(PACKED) is not None
    assert masking_utils.find_packed_sequence_indices(PACKED) is not None


def _checks_in_forward(module, monkeypatch, **inputs) -> tuple[torch.Tensor, int]:
    checked = []
    monkeypatch.setattr(masks, "_transformers_check", lambda positions: checked.append(positions))
    return module(**inputs), len(checked)


def test_the_module_skips_it_for_an_unpadded_batch_and_keeps_it_for_packed_positions(monkeypatch):
    module = sft_module()
    module.configure_model()
    ids = torch.randint(3, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "num_real_tokens": ids.numel()}
    logits, checks = _checks_in_forward(module, monkeypatch, **model_inputs(batch))
    assert checks == 0 and logits.shape == (2, 8, module.model.config.vocab_size)
    _, checks = _checks_in_forward(module, monkeypatch, input_ids=ids[:1], position_ids=PACKED)
    assert checks == 1
    # The answer it skips is the one the check gives: the model's own positions hold one sequence per row.
    monkeypatch.undo()
    with torch.no_grad():
        skipped = module(**model_inputs(batch))
        checked = module(input_ids=ids, position_ids=torch.arange(8).expand(2, 8))
    torch.testing.assert_close(skipped, checked)
