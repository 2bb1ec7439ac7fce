"""Write the published architecture configs (no weights) of the benchmarked models into a folder.

Each ``<out>/<arch>/config.json`` holds the fields of the model card's own config.json that
fix the shapes (vocab, widths, layers, heads); ``random_init: true`` then builds that
architecture with random weights. No hub access is needed.

    python benchmarks/make_arch.py /tmp/archs            # all four
    python benchmarks/make_arch.py /tmp/archs mistral-7b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# From each model's config.json on the hub (mistralai/Mistral-7B-v0.1, meta-llama/Llama-2-7b-hf,
# google/gemma-7b, microsoft/phi-2). Legacy top-level rope fields are kept as published:
# transformers 5.x converts them into `rope_parameters` on load.
ARCHS: dict[str, dict] = {
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "llama-2-7b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gemma-7b": {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "vocab_size": 256000,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
    "phi-2": {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": 51200,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "gelu_new",
        "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-05,
        "partial_rotary_factor": 0.4,
        "rope_theta": 10000.0,
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    },
}

# A CPU-sized stand-in for dry runs: same model types, dims multiples of 64 (bitsandbytes' block
# size).
TINY = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "head_dim": 32,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_arch(name: str, out: Path, tiny: bool = False) -> Path:
    """Write ``out/<name>/config.json`` (``tiny`` shrinks the dims for CPU dry runs) and return the
    folder."""
    config = dict(ARCHS[name])
    if tiny:
        config.update(TINY)
        if config["model_type"] in ("llama", "phi"):
            config["num_key_value_heads"] = config["num_attention_heads"]  # MHA as published
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write <arch>/config.json into")
    parser.add_argument("archs", nargs="*", help=f"some of {', '.join(ARCHS)} (default: all)")
    parser.add_argument("--tiny", action="store_true", help="shrink the dims (CPU dry runs)")
    args = parser.parse_intermixed_args()
    unknown = set(args.archs) - set(ARCHS)
    if unknown:
        parser.error(f"unknown arch {', '.join(sorted(unknown))}; known: {', '.join(ARCHS)}")
    for name in args.archs or ARCHS:
        print(write_arch(name, Path(args.out), args.tiny))


if __name__ == "__main__":
    main()
