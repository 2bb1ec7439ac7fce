"""The lean LoRA forward (``lora_forward.py``) against PEFT's own, on real 4-bit layers on the
CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft.tuners.lora.bnb import Linear4bit

from qlora_lightning.model.build import LoraSpec, build_model, decoder_layers
from qlora_lightning.speed.lora_forward import BaseLastLoraLinear4bit, LeanLoraLinear4bit
from tests.conftest import tiny_spec

SPEC = dataclasses.replace(tiny_spec(num_key_value_heads=4), compute_dtype="bfloat16")


def _model(lean: bool, dropout: float, spec=SPEC, device: str = "cpu", checkpointing=True, **lora):
    torch.manual_seed(0)
    model = build_model(
        spec,
        LoraSpec(r=4, dropout=dropout, lean_forward=lean, **lora),
        gradient_checkpointing=checkpointing,
        device=device,
    )
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # a non-zero update, so that the adapter's path shows in the output
            p.data.copy_(torch.randn(p.shape, generator=generator).to(p.device) * 0.05)
    return model


def _loss_and_grads(model, tokens: torch.Tensor):
    torch.manual_seed(2)  # the dropout masks
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_forward_gives_peft_s_loss_and_gradients(dropout):
    tokens = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    # The last projection's reordering (tested below) left off: every layer takes the lean forward.
    lean_model = _model(True, dropout, skip_last_recompute=False)
    peft_model = _model(False, dropout, skip_last_recompute=False)
    (lean_loss, lean), (peft_loss, peft) = (
        _loss_and_grads(lean_model, tokens),
        _loss_and_grads(peft_model, tokens),
    )
    layers = [m for m in lean_model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * lean_model.config.num_hidden_layers
    assert all(type(m) is LeanLoraLinear4bit for m in layers)
    assert not any(type(m) is LeanLoraLinear4bit for m in peft_model.modules())
    # The same dropout masks (both draw them in the same order); bf16 rounds the fused sum once, not
    # twice.
    torch.testing.assert_close(lean_loss, peft_loss, rtol=2e-3, atol=0)
    assert lean.keys() == peft.keys()
    for name in lean:
        torch.testing.assert_close(lean[name], peft[name], rtol=0.05, atol=2e-3, msg=name)


def test_lean_forward_is_used_only_where_it_computes_what_peft_does():
    model = build_model(SPEC, LoraSpec(r=4, lean_forward=True), gradient_checkpointing=False)
    layer = next(m for m in model.modules() if type(m) is LeanLoraLinear4bit)
    x = torch.randn(2, 3, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._lean_adapter(x, (), {}) == "default"
        # Mixed-adapter batches.
        assert layer._lean_adapter(x, (), {"adapter_names": ["default"] * 2}) is None
        with model.disable_adapter():
            assert layer._lean_adapter(x, (), {}) is None
        model.eval()
        assert layer._lean_adapter(x, (), {}) is None  # generation and evaluation: PEFT's forward
        model.train()
    # No autocast: PEFT casts the input to the adapter's dtype.
    assert layer._lean_adapter(x, (), {}) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_skip_last_recompute_leaves_the_last_base_matmul_out_of_the_recomputation(compiled, device):
    spec = dataclasses.replace(SPEC, compile_layers=compiled)
    torch._dynamo.reset()  # graphs compiled by earlier tests would run without the hooks below
    tokens = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for skip in (True, False):
        model, calls = _model(False, 0.0, spec, device, skip_last_recompute=skip), {}
        for layer in decoder_layers(model):
            _count_base_calls(layer.mlp.down_proj, calls)
        results[skip] = model, calls, *_loss_and_grads(model, tokens)
    (model, calls, loss, grads), (_, peft_calls, peft_loss, peft_grads) = (
        results[True],
        results[False],
    )
    layers = len(decoder_layers(model))
    assert [type(layer.mlp.down_proj) for layer in decoder_layers(model)] == [
        BaseLastLoraLinear4bit
    ] * layers
    # Once per layer in the forward, and never again: the recomputation stopped before it ...
    assert calls == {"forward": layers}
    # ... where PEFT's order (base matmul first) redoes it in the backward.
    assert peft_calls == {"forward": layers, "backward": layers}
    torch.testing.assert_close(loss, peft_loss, rtol=2e-3, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=0.05, atol=2e-3, msg=name)


def _count_base_calls(layer: torch.nn.Module, calls: dict) -> None:
    """Count the calls of a LoRA layer's frozen base in ``calls``, by whether a backward is
    running."""

    def hook(*_):
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        calls[phase] = calls.get(phase, 0) + 1

    layer.base_layer.register_forward_hook(hook)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_offload_halves_never_recompute_the_base_matmul_last_in_either_half(compiled, device):
    torch._dynamo.reset()  # graphs compiled by earlier tests would run without the hooks below
    spec = dataclasses.replace(SPEC, compile_layers=compiled)
    tokens = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    # Eager, q_proj's base layer shows the recomputation; compiled, it runs inside the graph,
    # unhooked.
    counted = ("o_proj", "down_proj") if compiled else ("q_proj", "o_proj", "down_proj")
    results = {}
    for checkpointing in ("offload_halves", False):
        model, calls = _model(False, 0.0, spec, device, checkpointing=checkpointing), {}
        for layer in decoder_layers(model):
            for name in counted:
                _count_base_calls(
                    layer.get_submodule(f"{'mlp' if name == 'down_proj' else 'self_attn'}.{name}"),
                    calls.setdefault(name, {}),
                )
        results[checkpointing] = calls, *_loss_and_grads(model, tokens)
    (calls, loss, grads), (_, plain_loss, plain_grads) = results["offload_halves"], results[False]
    layers = len(decoder_layers(model))
    expected = {"o_proj": {"forward": layers}, "down_proj": {"forward": layers}}
    if not compiled:
        expected["q_proj"] = {"forward": layers, "backward": layers}
    assert calls == expected
    # The same loss and gradients as without checkpointing.
    torch.testing.assert_close(loss, plain_loss, rtol=2e-3, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=0.05, atol=2e-3, msg=name)
