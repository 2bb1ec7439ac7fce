"""``base.attn_implementation: flex_attention`` computes the model that ``sdpa`` computes.

The lever matters for long sequences on Mistral (sliding window 4096): sdpa needs a dense
(B, 1, T, T) mask there and computes every block; flex attention skips the blocks the window
masks out. Both must give the same logits and, on the GPU, the same adapter gradients.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig

from qlora_lightning.model.build import BaseModelSpec, LoraSpec, build_model

# Windows shorter than the sequence, so the mask is more than causal.
SEQ, WINDOW = 96, 24


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mistral")
    MistralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        sliding_window=WINDOW,
        max_position_embeddings=256,
    ).save_pretrained(path)
    return str(path)


def _model(path: str, attn: str, device: str, dtype: str):
    torch.manual_seed(0)
    spec = BaseModelSpec(
        name_or_path=path, random_init=True, compute_dtype=dtype, attn_implementation=attn
    )
    model = build_model(
        spec, LoraSpec(r=4, dropout=0.0), gradient_checkpointing=False, device=device
    )
    generator = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # a non-trivial adapter
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def _tokens(device: str) -> torch.Tensor:
    return torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.slow
def test_flex_attention_gives_the_sdpa_logits_under_a_sliding_window(mistral_dir):
    # Flex attention has no backward on the CPU: logits only here.
    logits = {}
    for attn in ("sdpa", "flex_attention", "eager"):
        model = _model(mistral_dir, attn, "cpu", "float32").eval()
        with torch.no_grad():
            logits[attn] = model(input_ids=_tokens("cpu")).logits
    torch.testing.assert_close(logits["flex_attention"], logits["sdpa"], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_flex_attention_gives_the_sdpa_loss_and_gradients_on_the_gpu(mistral_dir):
    results = {}
    for attn in ("sdpa", "flex_attention"):
        model = _model(mistral_dir, attn, "cuda", "bfloat16")
        tokens = _tokens("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        results[attn] = (
            loss.item(),
            {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad},
        )
    assert results["flex_attention"][0] == pytest.approx(results["sdpa"][0], rel=1e-2)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(
            results["flex_attention"][1][name], grad, rtol=0.05, atol=1e-3, msg=name
        )
