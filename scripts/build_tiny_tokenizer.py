#!/usr/bin/env python
"""Build the tiny byte-level BPE tokenizer and tiny Llama config shipped with the package.

Trains a 512-token byte-level BPE tokenizer on the text of the bundled example
datasets (``qlora_lightning/assets/examples``), wraps it in a
``transformers.PreTrainedTokenizerFast`` and writes it, together with a matching
``LlamaConfig`` (no weights), to ``qlora_lightning/assets/tiny-llama``.

Usage:
    python scripts/build_tiny_tokenizer.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "qlora_lightning" / "assets" / "examples"
DEFAULT_OUT_DIR = REPO_ROOT / "qlora_lightning" / "assets" / "tiny-llama"

VOCAB_SIZE = 512
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]
MODEL_MAX_LENGTH = 1024


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def example_texts(examples_dir: Path = EXAMPLES_DIR) -> list[str]:
    """All free text contained in the bundled example datasets."""
    texts: list[str] = []
    for row in _read_jsonl(examples_dir / "guanaco.jsonl"):
        texts.append(row["text"])
    with (examples_dir / "codealpaca.json").open(encoding="utf-8") as f:
        for row in json.load(f):
            texts.extend(t for t in (row["instruction"], row["input"], row["output"]) if t)
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        for row in _read_jsonl(examples_dir / name):
            texts.extend([row["question"], row["answer"]])
    for row in _read_jsonl(examples_dir / "preference.jsonl"):
        texts.extend(msg["content"] for msg in row["prompt"])
        texts.extend([row["chosen"], row["rejected"]])
    return texts


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prepend <s> to every sequence (ByteLevel first keeps offsets tidy).
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tok


def build(out_dir: Path = DEFAULT_OUT_DIR) -> PreTrainedTokenizerFast:
    texts = example_texts()
    raw = train_tokenizer(texts)
    if raw.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"expected vocab size {VOCAB_SIZE}, got {raw.get_vocab_size()}")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(out_dir))

    _check(out_dir, texts)
    return tokenizer


def _check(out_dir: Path, texts: list[str]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    cfg = AutoConfig.from_pretrained(str(out_dir))
    assert len(tok) == VOCAB_SIZE == cfg.vocab_size, (len(tok), cfg.vocab_size)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (BOS, EOS, PAD, UNK)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert tok.model_max_length == MODEL_MAX_LENGTH
    assert tok("hi").input_ids[0] == tok.bos_token_id
    for text in texts:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded == text, (text, decoded)
    print(f"tokenizer ok: vocab={len(tok)}, round-tripped {len(texts)} texts, saved to {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    build(args.out_dir)


if __name__ == "__main__":
    main()
