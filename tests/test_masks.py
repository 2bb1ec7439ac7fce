"""transformers' mask building takes the host's answers to the questions it would ask of the GPU.

A forward on positions the model builds itself skips the check for packed sequences; explicit
positions, a packed batch's, are still checked. A batch's attention mask, as moved to the device by
the module, is dropped where its host copy pads nothing and kept unread where it pads. Either check
would be a wait for the GPU in every forward.
"""

import subprocess
import sys
import textwrap

import torch
from transformers import masking_utils

from qlora_lightning.data.packing import model_inputs
from qlora_lightning.speed import masks
from tests.conftest import REPO, sft_module

PACKED = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])  # three sequences in one row
PADDED = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)


def test_within_it_the_packed_check_answers_one_sequence_per_row_and_outside_it_checks():
    assert masking_utils.find_packed_sequence_indices(PACKED).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    with masks.known_to_the_host():
        assert masking_utils.find_packed_sequence_indices(PACKED) is None
        # A packed batch's own positions, nested.
        with masks.known_to_the_host(model_positions=False):
            assert masking_utils.find_packed_sequence_indices(PACKED) is not None
    assert masking_utils.find_packed_sequence_indices(PACKED) is not None


def test_within_it_a_padding_mask_is_kept_unread_and_outside_it_checked(monkeypatch):
    read = []
    monkeypatch.setattr(
        masks, "_transformers_padding_check", lambda mask, *args: read.append(mask) or False
    )
    args = (4, 4, 0, 0)  # q_length, kv_length, q_offset, kv_offset
    with masks.known_to_the_host(padded=True):
        assert masking_utils._ignore_causal_mask_sdpa(PADDED, *args) is False and read == []
        # No mask: as usual.
        assert masking_utils._ignore_causal_mask_sdpa(None, *args) is False and read == [None]
        with masks.known_to_the_host(padded=False):  # nested: the host's answer is the inner one's
            masking_utils._ignore_causal_mask_sdpa(PADDED, *args)
            assert read[-1] is PADDED
    monkeypatch.undo()
    # The answer it takes is transformers' own for a mask that pads.
    assert masking_utils._ignore_causal_mask_sdpa(PADDED, *args) is False


def test_outside_it_transformers_has_its_own_checks(tmp_path):
    """The checks are replaced only within the context, not by importing the package."""
    own = masking_utils.find_packed_sequence_indices, masking_utils._ignore_causal_mask_sdpa
    assert own == (masks._transformers_packed_check, masks._transformers_padding_check)
    with masks.known_to_the_host():
        assert masking_utils.find_packed_sequence_indices is not own[0]
    assert (
        masking_utils.find_packed_sequence_indices,
        masking_utils._ignore_causal_mask_sdpa,
    ) == own


def test_importing_the_package_changes_nothing_in_the_libraries_it_builds_on():
    """Every attribute of every transformers, PEFT, bitsandbytes and torch module loaded before the
    package's modules are imported (with the other libraries it imports) is the same object
    after."""
    script = textwrap.dedent("""
        import importlib, pkgutil, sys, types
        import bitsandbytes, peft, torch, transformers
        # Their own changes to the others are not ours.
        import datasets, jsonargparse, lightning.pytorch, torchmetrics, trl
        from transformers import masking_utils, modeling_utils
        from transformers.models.llama import modeling_llama
        LIBS = ("transformers", "peft", "bitsandbytes", "torch")
        def snapshot():
            return {(name, attr): id(value) for name, module in list(sys.modules.items())
                    if name.split(".")[0] in LIBS and isinstance(module, types.ModuleType)
                    for attr, value in list(vars(module).items())
                    if not isinstance(value, types.ModuleType)}
        before = snapshot()
        import qlora_lightning
        for info in pkgutil.walk_packages(qlora_lightning.__path__, "qlora_lightning."):
            if not info.name.endswith("__main__"):  # that one runs the command line
                importlib.import_module(info.name)
        after = snapshot()
        changed = sorted(f"{name}.{attr}" for (name, attr), ident in before.items()
                         if after.get((name, attr), ident) != ident)
        print(" ".join(changed))""")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"importing qlora_lightning changed: {out.stdout}"


def _forward_checks(module, monkeypatch, **inputs) -> tuple[torch.Tensor, dict]:
    """The module's logits on ``inputs``, and how often each check read a tensor."""
    checks = {"packed": 0, "padding": 0}

    def count(name, check):
        def counted(tensor, *args, **kwargs):
            checks[name] += tensor is not None
            return check(tensor, *args, **kwargs)

        return counted

    monkeypatch.setattr(
        masks, "_transformers_packed_check", count("packed", masks._transformers_packed_check)
    )
    monkeypatch.setattr(
        masks, "_transformers_padding_check", count("padding", masks._transformers_padding_check)
    )
    with torch.no_grad():
        logits = module(**inputs)
    monkeypatch.undo()
    return logits, checks


def _moved(module, mask: torch.Tensor) -> dict:
    """A batch with ``mask``, through the module's move to its device (the CPU here)."""
    ids = torch.randint(3, 512, mask.shape, generator=torch.Generator().manual_seed(0))
    batch = {
        "input_ids": ids,
        "attention_mask": mask.long(),
        "labels": ids.masked_fill(~mask, -100),
    }
    return module.transfer_batch_to_device(batch, torch.device("cpu"), 0)


def test_the_module_answers_both_checks_from_the_host_copy(monkeypatch):
    module = sft_module()
    module.configure_model()
    vocab = module.model.config.vocab_size

    unpadded = _moved(module, torch.ones(2, 8, dtype=torch.bool))
    logits, checks = _forward_checks(module, monkeypatch, **model_inputs(unpadded))
    assert checks == {"packed": 0, "padding": 0} and logits.shape == (2, 8, vocab)
    positions = torch.arange(8).expand(2, 8)
    # Beside explicit positions the mask stays (else positions restarting in a row would read as
    # packed).
    _, checks = _forward_checks(
        module, monkeypatch, **model_inputs(unpadded), position_ids=positions
    )
    assert checks == {"packed": 0, "padding": 1}
    # What it skips changes nothing: transformers' own checks, of the mask and of explicit
    # positions.
    module._mask_twin = None
    for inputs, asked in (
        ({**model_inputs(unpadded)}, "padding"),
        ({"input_ids": unpadded["input_ids"], "position_ids": positions}, "packed"),
    ):
        checked, checks = _forward_checks(module, monkeypatch, **inputs)
        assert checks[asked] == 1
        torch.testing.assert_close(logits, checked)

    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    padded = _moved(module, mask)
    logits, checks = _forward_checks(module, monkeypatch, **model_inputs(padded))
    assert checks == {"packed": 0, "padding": 0}
    # A mask it does not know (not the last batch's as moved) is checked as transformers does,
    # and the logits of the real tokens are the same.
    unknown = {**model_inputs(padded), "attention_mask": padded["attention_mask"].clone()}
    checked, checks = _forward_checks(module, monkeypatch, **unknown)
    assert checks == {"packed": 0, "padding": 1}
    torch.testing.assert_close(logits[mask], checked[mask])

    # A packed batch's explicit positions are checked.
    _, checks = _forward_checks(
        module, monkeypatch, input_ids=unpadded["input_ids"][:1], position_ids=PACKED
    )
    assert checks["packed"] == 1
