"""Running out of GPU memory while loading says how much was expected, how much was free, what to
lower."""

from types import SimpleNamespace

import pytest
import torch

from qlora_lightning import BaseModelSpec, SFTModule
from qlora_lightning.errors import UserError
from tests.conftest import TINY_LLAMA


def test_out_of_memory_at_load_is_one_actionable_line(monkeypatch):
    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("qlora_lightning.modules.building.build_model", no_room)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1.5 * 2**30, 16 * 2**30))
    module = SFTModule(base=BaseModelSpec(name_or_path=TINY_LLAMA, random_init=True))
    # The estimate is for the micro-batches the DataModule declares.
    module._trainer = SimpleNamespace(
        strategy=None, datamodule=SimpleNamespace(batch_size=1, max_seq_length=512)
    )
    with pytest.raises(UserError) as err:
        module.configure_model()
    message = str(err.value)
    assert "\n" not in message
    assert "GiB estimated for batch 1 x 512 tokens" in message and "1.5 of 16.0 GiB free" in message
    assert "data.batch_size" in message and "max_seq_length" in message
