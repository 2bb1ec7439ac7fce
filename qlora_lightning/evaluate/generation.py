"""Batched greedy generation from a (4-bit + LoRA) causal LM: left padding, KV cache, EOS trimming.

Pure functions over a model and token ids; the eval callback, ``predict_step`` and the
benchmarks call them. Greedy decoding makes the output a function of the weights alone,
so a batched run gives the same tokens as one prompt at a time (tested).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from transformers import GenerationConfig


@contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no autograd for the duration, then the previous train/eval mode again.

    Eval mode matters beyond dropout: Hugging Face gradient checkpointing is active only in
    training mode, and it turns the KV cache off.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and attention mask, padded on the left.

    Every prompt then ends in the last column, where generation appends its tokens; the
    model derives position ids from the mask, so padding shifts no position.
    """
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, length - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, length - len(p) :] = 1
    return ids.to(device), mask.to(device)


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """The tokenizer's EOS and any the model's generation config adds (chat models end turns with
    their own)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token is not None and token not in ids:
            ids.append(token)
    return ids


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Tokens before the first stop token (the stop token itself is dropped)."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return list(tokens[:i])
    return list(tokens)


def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int = 8,
    adapter_names: Optional[Sequence[str]] = None,
) -> list[list[int]]:
    """The greedy continuation of each prompt, without the prompt and cut before the first stop
    token.

    Prompts are generated in batches of similar length (less padding), and the results come
    back in the order of ``prompts``.

    Args:
        model: A causal LM (a ``PeftModel`` over a 4-bit base, or any ``generate``-capable model).
        prompts: Token ids of each prompt, BOS included when the model expects one.
        pad_id: Id used for left padding (masked out, so any id works).
        stop_ids: Generation of a row ends at the first of these tokens.
        max_new_tokens: Longest continuation, in tokens.
        batch_size: Prompts per ``generate`` call.
        adapter_names: One adapter name per prompt (PEFT mixed-adapter batches; ``__base__`` means
            no adapter); None uses the active adapter for all.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}"
        )
    device = next(model.parameters()).device
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=list(stop_ids) or None,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    # Decoding with a growing KV cache would recompile parts compiled for training (compile_layers).
    with inference_mode(model), torch.compiler.set_stance("force_eager"):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i in rows], pad_id, device)
            extra = (
                {"adapter_names": [adapter_names[i] for i in rows]}
                if adapter_names is not None
                else {}
            )
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, **extra
            )
            for i, row in zip(rows, out[:, ids.shape[1] :].tolist()):  # (B, new) continuation only
                outputs[i] = cut_at_stop(row, stop_ids)
    return outputs
