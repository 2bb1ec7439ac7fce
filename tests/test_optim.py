"""The project's 8-bit AdamW makes bitsandbytes' updates exactly, without its per-tensor
synchronize."""

import bitsandbytes as bnb
import pytest
import torch

from qlora_lightning.speed.optim import AdamW8bit


def _train(optimizer_class, device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    # Sizes above bitsandbytes' min_8bit_size (4096), so the 8-bit blockwise path runs, and one
    # below.
    params = [
        torch.nn.Parameter(torch.randn(shape, device=device))
        for shape in [(64, 128), (128, 64), (32,)]
    ]
    optimizer = optimizer_class(params, lr=1e-2, weight_decay=0.01)
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 2:
            params[
                1
            ].grad = None  # a parameter without a gradient is left alone, as bitsandbytes does
        optimizer.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_adamw8bit_matches_bitsandbytes(device):
    ours, theirs = _train(AdamW8bit, device), _train(bnb.optim.AdamW8bit, device)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(
        ours[0], _train(lambda p, **kw: AdamW8bit(p, **{**kw, "lr": 2e-2}), device)[0]
    )
