"""merge: adapter + 4-bit base -> a standalone 16-bit model that computes what adapter-on-4-bit computes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_lightning.adapters import save_base_spec
from qlora_lightning.cli import main
from qlora_lightning.merge import adapter_on_base, base_spec_for, check_batch, logit_gap, logits_on, merge_adapter
from qlora_lightning.model import LoraSpec, build_model
from tests.conftest import tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tokenizer, one_thread):
    """A tiny-Llama NF4 adapter saved as ``fit`` saves one (bf16 compute recorded), with a B far from zero."""
    spec = tiny_spec()
    spec.compute_dtype = "bfloat16"
    torch.manual_seed(0)
    model = build_model(spec, LoraSpec(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_base_spec(spec, path)
    return path


def test_the_merge_reads_how_the_base_was_quantized(adapter_dir):
    spec = base_spec_for(adapter_dir)
    assert (spec.quantization, spec.double_quant, spec.compute_dtype) == ("nf4", True, "bfloat16")
    assert "random-llama" in spec.name_or_path  # the saved random checkpoint, not a fresh random init
    assert base_spec_for(adapter_dir, compute_dtype="float32").compute_dtype == "float32"


def test_merged_into_dequantized_weights_computes_adapter_on_4bit_exactly_in_fp32(adapter_dir, tokenizer):
    spec = base_spec_for(adapter_dir, compute_dtype="float32")
    batch = check_batch(tokenizer)
    reference = logits_on(adapter_on_base(adapter_dir, spec), batch)
    dequantized = logit_gap(logits_on(merge_adapter(adapter_dir, spec, "dequantized", torch.float32), batch), reference)
    original = logit_gap(logits_on(merge_adapter(adapter_dir, spec, "original", torch.float32), batch), reference)
    assert dequantized["max_abs_logit_diff"] < 1e-4 * reference.abs().max()  # fp32 summation order only
    # Merging into the original weights drops the quantization error the adapter was trained with.
    assert original["max_abs_logit_diff"] > 100 * dequantized["max_abs_logit_diff"]


def test_merge_cli_writes_a_standalone_bf16_model_within_bf16_tolerance(adapter_dir, tmp_path, caplog):
    output = tmp_path / "merged"
    main(["merge", "--adapter", str(adapter_dir), "--output", str(output)])
    report = json.loads((output / "merge_report.json").read_text())
    assert report["into"] == "dequantized" and report["within_tolerance"]
    # bf16 rounding of the merged weights only: a few bf16 ulps of the logits' spread.
    assert report["max_abs_logit_diff"] < 0.1 * report["reference_logit_std"]
    assert report["mean_abs_logit_diff"] < 0.01 * report["reference_logit_std"]

    merged = AutoModelForCausalLM.from_pretrained(output)  # no PEFT, no bitsandbytes
    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config and merged.dtype == torch.bfloat16
    assert not any("lora" in key for key in merged.state_dict())
    assert all(type(m) is torch.nn.Linear for name, m in merged.named_modules() if name.endswith("q_proj"))
    assert (output / "tokenizer_config.json").is_file()

    with caplog.at_level(logging.WARNING, logger="qlora_lightning.merge"):
        main(["merge", "--adapter", str(adapter_dir), "--output", str(tmp_path / "original"), "--into", "original"])
    original = json.loads((tmp_path / "original" / "merge_report.json").read_text())
    assert not original["within_tolerance"] and "expected with --into original" in caplog.text
    assert original["max_abs_logit_diff"] > 5 * report["max_abs_logit_diff"]


def test_dequantized_merge_of_a_16bit_adapter_is_refused_in_one_line(adapter_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--adapter", str(adapter_dir), "--output", str(tmp_path), "--quantization", "none"])
    assert str(exit_info.value.code).startswith("error: ") and "--into original" in str(exit_info.value.code)


@pytest.mark.gpu
def test_merge_on_cuda_matches_adapter_on_4bit_within_bf16_tolerance(adapter_dir, tmp_path):
    """bitsandbytes' CUDA kernels (quantize, dequantize, 4-bit matmul) differ from the CPU ones."""
    main(["merge", "--adapter", str(adapter_dir), "--output", str(tmp_path), "--device", "cuda"])
    report = json.loads((tmp_path / "merge_report.json").read_text())
    assert report["within_tolerance"] and report["mean_abs_logit_diff"] < 0.01 * report["reference_logit_std"]
