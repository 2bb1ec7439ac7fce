"""Several named LoRA adapters on one 4-bit base: each gives its own outputs, per batch or per
request, switching leaves training state alone, and combinations are what PEFT says they are."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from qlora_lightning.data import PromptsDataModule
from qlora_lightning.errors import UserError
from qlora_lightning.evaluate.generation import greedy_generate, inference_mode, stop_token_ids
from qlora_lightning.model.adapters import AdapterMix, AdapterSet, using_adapter
from qlora_lightning.model.build import LoraSpec, build_model, load_base_model
from qlora_lightning.run.writers import JSONLWriter
from tests.conftest import TINY_LLAMA, cpu_trainer, sft_module, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")

# "Question: 1+2?\nAnswer:" in the tiny Llama's tokenizer
IDS = torch.tensor([[0, 52, 88, 447, 391, 29, 286, 14, 21, 34, 202, 36, 81, 86, 90, 267, 29]])


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, one_thread) -> dict[str, str]:
    """Two tiny-Llama NF4 adapters with different, non-zero updates."""
    dirs = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        model = build_model(
            tiny_spec(), LoraSpec(r=8, alpha=16, dropout=0.0), gradient_checkpointing=False
        )
        for param_name, p in model.named_parameters():
            if "lora_B" in param_name:
                torch.nn.init.normal_(p, std=0.5)
        dirs[name] = str(tmp_path_factory.mktemp(f"adapter_{name}"))
        model.save_pretrained(dirs[name])
    return dirs


def _logits(model) -> torch.Tensor:
    with inference_mode(model):
        return model(input_ids=IDS).logits


def _module(adapter_dirs, mixes=(), active=None):
    module = sft_module(adapters=AdapterSet(paths=adapter_dirs, mixes=list(mixes), active=active))
    module.configure_model()
    return module


def test_each_adapter_gives_its_own_outputs(adapter_dirs):
    model = _module(adapter_dirs).model
    alone = {
        name: _logits(PeftModel.from_pretrained(load_base_model(tiny_spec()), path))
        for name, path in adapter_dirs.items()
    }
    for name in adapter_dirs:
        with using_adapter(model, name):
            torch.testing.assert_close(_logits(model), alone[name], rtol=0, atol=1e-5)
    assert (alone["a"] - alone["b"]).abs().max() > 0.1
    with model.disable_adapter():
        base = _logits(model)
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=1e-6)  # `default` is fresh: B = 0
    assert model.active_adapter == "default"


def test_switching_for_an_evaluation_leaves_training_state_alone(adapter_dirs):
    model = _module(adapter_dirs).model
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    with using_adapter(model, "b"):
        assert model.active_adapter == "b"
    assert model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_rows_of_one_batch_can_use_different_adapters(adapter_dirs, tmp_path):
    """predict with an `adapter` column: PEFT mixed-adapter batches, each row as if alone."""
    questions = ["1+2?", "3+4?", "5+6?", "7+8?"]
    names = ["a", "b", None, "a"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"question": q, "adapter": n}) + "\n" for q, n in zip(questions, names))
    )
    module = _module(adapter_dirs)
    module.max_new_tokens = 6
    data = PromptsDataModule(
        path=str(prompts),
        tokenizer=TINY_LLAMA,
        prompt_column="question",
        user_template="Question: {content}\nAnswer:",
        batch_size=4,
    )
    writer = JSONLWriter(str(tmp_path / "out.jsonl"))
    cpu_trainer(tmp_path, callbacks=[writer]).predict(module, data, return_predictions=False)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    tokenizer, model = module.tokenizer, module.model
    expected = []
    for row, name in zip(data.prompts, names):
        with using_adapter(model, name or "default"):
            tokens = greedy_generate(
                model,
                [row["prompt_ids"]],
                tokenizer.pad_token_id,
                stop_token_ids(model, tokenizer),
                6,
            )
        expected.append(tokenizer.decode(tokens[0], skip_special_tokens=True))
    assert [line["generation"] for line in lines] == expected
    assert [line["adapter"] for line in lines] == names
    assert expected[0] != expected[1]  # the adapters differ, so the routing is observable


def test_a_cat_combination_is_both_adapters_at_once(adapter_dirs):
    model = _module(
        adapter_dirs, mixes=[AdapterMix("both", ["a", "b"], [1.0, 1.0], "cat")], active="both"
    ).model
    assert model.active_adapter == "both"
    combined = _logits(model)
    model.base_model.set_adapter(["a", "b"])  # PEFT sums the updates of several active adapters
    torch.testing.assert_close(combined, _logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "adapters, message",
    [
        (AdapterSet(paths={"default": "x"}), "already taken"),
        (AdapterSet(paths={"a": "/nonexistent"}), "not a PEFT adapter directory"),
        (AdapterSet(mixes=[AdapterMix("m", ["zzz"], [1.0])]), "unknown adapter"),
        (AdapterSet(active="zzz"), "is not loaded"),
    ],
)
def test_bad_adapter_sets_fail_in_one_line(adapters, message):
    module = sft_module(adapters=adapters)
    with pytest.raises(UserError, match=message):
        module.configure_model()


def test_a_mix_needs_one_weight_per_adapter():
    with pytest.raises(UserError, match="one weight per adapter"):
        AdapterMix("m", ["a", "b"], [1.0])
