"""The 4-bit matmul in torch operations (``nf4.py``) against bitsandbytes' own, bit for bit."""

from __future__ import annotations

import dataclasses

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.nn import Linear4bit

from qlora_lightning.model.build import decoder_layers
from qlora_lightning.speed import nf4
from qlora_lightning.speed.lora_forward import LeanLoraLinear4bit
from tests.test_lora_forward import SPEC, _loss_and_grads, _model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _layer(
    out_features: int, in_features: int, nested: bool, device: str, bias: bool = False
) -> Linear4bit:
    torch.manual_seed(0)
    layer = Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=torch.bfloat16,
        compress_statistics=nested,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_features, in_features) * 0.02,
        requires_grad=False,
        compress_statistics=nested,
        quant_type="nf4",
    )
    if bias:
        # Phi-2 has biases.
        layer.bias = torch.nn.Parameter(torch.randn(out_features), requires_grad=False)
    return layer.to(device)  # quantizes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "single_quant"])
# The last shape's 3600 weights fill neither whole blocks of 64 nor whole nested blocks of 256.
@pytest.mark.parametrize("shape", [(192, 128), (64, 320), (100, 36)])
def test_gives_bitsandbytes_weight_output_and_input_gradient(shape, nested, device):
    layer = _layer(*shape, nested, device, bias=shape == (64, 320))
    assert nf4.supports(layer)
    state = layer.weight.quant_state
    weight = bnb.functional.dequantize_4bit(layer.weight.data, state).to(torch.bfloat16)
    assert torch.equal(
        nf4.dequantize_4bit(
            layer.weight,
            state.code,
            state.absmax,
            tuple(state.shape),
            state.blocksize,
            torch.bfloat16,
            *((state.state2.code, state.state2.absmax, state.offset) if nested else ()),
        ),
        weight,
    )
    x = torch.randn(3, 5, shape[1], dtype=torch.bfloat16, device=device, requires_grad=True)
    actual = nf4.linear_4bit(layer, x)
    # What bitsandbytes computes beyond 1536 rows (dequantize, then a 16-bit matmul), exactly ...
    assert actual.dtype == torch.bfloat16
    bias = None if layer.bias is None else layer.bias.to(torch.bfloat16)
    assert torch.equal(actual, torch.nn.functional.linear(x, weight, bias))
    # ... and what its layer computes here (on a GPU, a fused kernel for so few rows: other
    # rounding).
    expected = layer(x)
    torch.testing.assert_close(actual, expected, rtol=0.02, atol=0.01)
    grad = torch.randn_like(expected)
    (expected_grad,), (actual_grad,) = (
        torch.autograd.grad(expected, x, grad),
        torch.autograd.grad(actual, x, grad),
    )
    torch.testing.assert_close(actual_grad, expected_grad, rtol=0.02, atol=0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_matmul_dequantizes_exactly_and_keeps_no_16_bit_weight_for_the_backward(device):
    layer = _layer(192, 128, True, device)
    x = torch.randn(4, 128, dtype=torch.bfloat16, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        actual = torch.compile(nf4.linear_4bit, fullgraph=True)(layer, x)
    # The 4-bit weight and its constants, not the (192, 128) weight dequantized.
    assert saved and all(t.shape != (192, 128) for t in saved)
    torch.testing.assert_close(actual, nf4.linear_4bit(layer, x), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(actual, x, torch.ones_like(actual))
    torch.testing.assert_close(
        grad,
        torch.ones_like(actual)
        @ nf4.dequantize_4bit(
            layer.weight,
            layer.weight.quant_state.code,
            layer.weight.quant_state.absmax,
            (192, 128),
            64,
            torch.bfloat16,
            layer.weight.quant_state.state2.code,
            layer.weight.quant_state.state2.absmax,
            layer.weight.quant_state.offset,
        ),
        rtol=0,
        atol=0,
    )


def test_only_nf4_layers_with_a_compute_dtype_and_no_trainable_bias_are_supported():
    assert not nf4.supports(torch.nn.Linear(64, 64))
    assert not nf4.supports(
        Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="fp4").to("cpu")
    )
    layer = _layer(64, 64, True, "cpu", bias=True)
    assert nf4.supports(layer)
    layer.bias.requires_grad_(True)
    assert not nf4.supports(layer)


def _count_calls(module: torch.nn.Module, calls: list) -> None:
    module.register_forward_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_tokens", [64, 63], ids=["within_max_tokens", "beyond_max_tokens"])
def test_compiled_lean_layers_use_it_up_to_max_tokens_with_the_same_loss(
    max_tokens, device, monkeypatch
):
    torch._dynamo.reset()  # graphs compiled by earlier tests would run without the hooks below
    # 64 rows.
    tokens = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    # (out, in) features of the projections whose update rides on the base matmul.
    concatenated = set()
    linear_4bit_lora = nf4.linear_4bit_lora
    monkeypatch.setattr(
        nf4,
        "linear_4bit_lora",
        lambda layer, *args: (
            concatenated.add((layer.out_features, layer.in_features))
            or linear_4bit_lora(layer, *args)
        ),
    )
    results = {}
    for compiled in (False, True):
        spec = dataclasses.replace(SPEC, compile_layers=compiled)
        model, calls = (
            _model(
                True,
                0.0,
                spec,
                device,
                skip_last_recompute=False,
                compiled_dequant_tokens=max_tokens,
            ),
            [],
        )
        for layer in decoder_layers(model):
            _count_calls(layer.self_attn.q_proj.base_layer, calls)
        assert type(decoder_layers(model)[0].self_attn.q_proj) is LeanLoraLinear4bit
        results[compiled] = calls, *_loss_and_grads(model, tokens)
    (eager_calls, eager_loss, eager_grads), (compiled_calls, compiled_loss, compiled_grads) = (
        results[False],
        results[True],
    )
    # Compiled, within the limit: bitsandbytes' layer is never called.
    assert eager_calls and (
        not compiled_calls if max_tokens == 64 else compiled_calls == eager_calls
    )
    # There, the outputs at least as wide as the input (q and o: 64 -> 64, gate and up: 64 -> 128)
    # take the adapter on the inner dimension; k, v (64 -> 32) and down (128 -> 64) addmm.
    assert concatenated == ({(64, 64), (128, 64)} if max_tokens == 64 else set())
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-3, atol=0)
    for name in eager_grads:  # compiled graphs round differently, hence the loose tolerance
        torch.testing.assert_close(
            compiled_grads[name], eager_grads[name], rtol=0.1, atol=5e-3, msg=name
        )


def _lora_inputs(layer, device: str, rows: int = 5):
    generator = torch.Generator().manual_seed(3)
    x = (
        torch.randn(3, rows, layer.in_features, generator=generator)
        .to(device, torch.bfloat16)
        .requires_grad_()
    )
    h = torch.randn(3, rows, 8, generator=generator).to(device, torch.bfloat16).requires_grad_()
    lora_B = (
        (torch.randn(layer.out_features, 8, generator=generator) * 0.1).to(device).requires_grad_()
    )
    return x, h, lora_B


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "single_quant"])
@pytest.mark.parametrize("shape", [(192, 128), (64, 320), (100, 36)])
def test_lora_matmul_over_the_concatenated_inner_dimension_gives_base_plus_addmm(
    shape, nested, compiled, device
):
    torch._dynamo.reset()
    layer = _layer(*shape, nested, device, bias=shape == (64, 320))
    x, h, lora_B = _lora_inputs(layer, device)
    fn = torch.compile(nf4.linear_4bit_lora, fullgraph=True) if compiled else nf4.linear_4bit_lora
    actual = fn(layer, x, h, lora_B, 2.0)
    base = nf4.linear_4bit(layer, x)  # bitsandbytes' dequantize + matmul, bit for bit (above)
    expected = torch.addmm(
        base.reshape(-1, shape[0]), h.reshape(-1, 8), lora_B.to(torch.bfloat16).t(), alpha=2.0
    ).view(base.shape)
    assert actual.dtype == expected.dtype == torch.bfloat16
    # One matmul rounds once where the base matmul and addmm round twice.
    torch.testing.assert_close(actual, expected, rtol=0.02, atol=0.01)
    grad = torch.randn_like(expected)
    for name, a, e in zip(
        ("x", "h", "lora_B"),
        torch.autograd.grad(actual, (x, h, lora_B), grad),
        torch.autograd.grad(expected, (x, h, lora_B), grad),
    ):
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=0.02, atol=0.02, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_lora_matmul_keeps_no_16_bit_weight_for_the_backward(device):
    torch._dynamo.reset()
    layer = _layer(192, 128, True, device)
    x, h, lora_B = _lora_inputs(layer, device, rows=64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.compile(nf4.linear_4bit_lora, fullgraph=True)(layer, x, h, lora_B, 2.0)
    # The 4-bit weight and its constants, lora_B and the adapter's (tokens x 8) input; no 16-bit
    # tensor the size of the weight (192 x 128) or of the input (3 x 64 x 128), or larger.
    large_16_bit = [
        (tuple(t.shape), t.dtype) for t in saved if t.element_size() == 2 and t.numel() >= 192 * 128
    ]
    assert saved and not large_16_bit, large_16_bit
