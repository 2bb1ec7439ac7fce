"""DPO: the loss against TRL, sequence log-probs, the reference (adapter off / frozen SFT adapter,
one base), precomputed reference log-probs, preference data, and learning on a real tiny Llama."""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qlora_lightning.data.formats import DEFAULT_ROLES, column_pair, hh_rlhf_pair, trl_pair
from qlora_lightning.data.preference import PreferenceDataModule, tokenize_pair
from qlora_lightning.data.tokenize import (
    PROMPT_TOO_LONG,
    ChatFormat,
    RowError,
    plan_cut,
    tokenize_messages,
)
from qlora_lightning.losses import IGNORE_INDEX, dpo_loss, sequence_logps
from qlora_lightning.model.build import BaseModelSpec, LoraSpec, build_model
from qlora_lightning.modules.dpo import REFERENCE_ADAPTER, DPOModule, reference_fingerprint
from tests.conftest import EXAMPLES, REPO, TINY_LLAMA, cpu_trainer, shared_path, tiny_spec

PREFERENCE = str(EXAMPLES / "preference.jsonl")


def dpo_module(base=None, lr: float = 1e-2, **kwargs) -> DPOModule:
    """A DPOModule over ``base`` (the tiny Llama by default), dropout off, plain AdamW."""
    return DPOModule(
        base=base or tiny_spec(),
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        gradient_checkpointing=False,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),
        warmup_ratio=0.0,
        **kwargs,
    )


def preference_data(path: str = PREFERENCE, tokenizer=TINY_LLAMA, **kwargs) -> PreferenceDataModule:
    defaults = dict(max_seq_length=128, batch_size=4, val_fraction=0.2)
    dm = PreferenceDataModule(path=path, tokenizer=tokenizer, **{**defaults, **kwargs})
    dm.setup()
    return dm


def ordered_batches(dm: PreferenceDataModule, split: str = "train"):
    rows = dm.splits[split]
    return [
        dm.collate([rows[j] for j in range(i, min(i + dm.batch_size, len(rows)))])
        for i in range(0, len(rows), dm.batch_size)
    ]


# ---- the loss: TRL is the oracle ---------------------------------------------------------


def _trl_pair(
    loss_type: str,
    beta: float,
    label_smoothing: float,
    per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
):
    """TRL 1.16's DPOTrainer._compute_loss on given per-token policy log-probs and reference
    log-probs."""
    from trl import DPOTrainer

    metrics = defaultdict(lambda: defaultdict(list))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        beta=beta,
        label_smoothing=label_smoothing,
        loss_types=[loss_type],
        loss_weights=[1.0],
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        use_weighting=False,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
    )
    shifted = torch.zeros_like(per_token_logps)

    # What TRL's fused LM head returns: per-token log-probs, 0 off the completion.
    def model(
        **kwargs,
    ):
        return SimpleNamespace(
            log_probs=per_token_logps, entropy=shifted, mean_logits=shifted, is_top1=shifted.bool()
        )

    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in metrics["train"].items()}


@pytest.mark.parametrize(
    "loss_type,label_smoothing,trl_loss_type",
    [
        ("sigmoid", 0.0, "sigmoid"),
        # TRL 1.16's sigmoid has no label smoothing; its "aot" loss is conservative DPO on the
        # sorted log-ratio margins, which for a single pair is exactly smoothed sigmoid DPO.
        ("sigmoid", 0.2, "aot"),
        ("ipo", 0.0, "ipo"),
        ("hinge", 0.0, "hinge"),
    ],
)
def test_loss_and_rewards_match_trl(loss_type, label_smoothing, trl_loss_type):
    torch.manual_seed(0)
    pairs, length, vocab, beta = 6, 14, 11, 0.3
    logits = torch.randn(2 * pairs, length, vocab, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (2 * pairs, length))
    prompt_len = torch.randint(2, 7, (pairs,)).repeat(2)  # chosen and rejected share the prompt
    seq_len = torch.randint(9, length + 1, (2 * pairs,))
    positions = torch.arange(length)
    completion = (positions >= prompt_len[:, None]) & (positions < seq_len[:, None])
    labels = input_ids.masked_fill(~completion, IGNORE_INDEX)
    ref = -20 * torch.rand(2 * pairs, dtype=torch.float64)

    logps, tokens = sequence_logps(logits, labels)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:pairs],
        logps[pairs:],
        ref[:pairs],
        ref[pairs:],
        beta,
        loss_type,
        label_smoothing,
        tokens[:pairs],
        tokens[pairs:],
    )

    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    per_token = per_token * completion[:, 1:]
    for i in range(pairs):  # one pair at a time: TRL logs batch means, this compares every pair
        rows = [i, pairs + i]
        trl_loss, trl = _trl_pair(
            trl_loss_type,
            beta,
            label_smoothing,
            per_token[rows],
            completion[rows].long(),
            ref[i : i + 1],
            ref[pairs + i : pairs + i + 1],
        )
        assert losses[i].item() == pytest.approx(trl_loss.item(), abs=1e-6)
        assert chosen_rewards[i].item() == pytest.approx(trl["rewards/chosen"], abs=1e-6)
        assert rejected_rewards[i].item() == pytest.approx(trl["rewards/rejected"], abs=1e-6)
        assert (chosen_rewards[i] - rejected_rewards[i]).item() == pytest.approx(
            trl["rewards/margins"], abs=1e-6
        )
        assert float(chosen_rewards[i] > rejected_rewards[i]) == trl["rewards/accuracies"]
        assert logps[i].item() == pytest.approx(trl["logps/chosen"], abs=1e-6)
        assert logps[pairs + i].item() == pytest.approx(trl["logps/rejected"], abs=1e-6)
    assert losses.isfinite().all()


def test_sequence_logps_sum_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    ids = torch.tensor([[0, 3, 1, 4, 2, 2], [0, 2, 2, 1, 0, 0]])
    labels = torch.tensor(
        [
            [-100, -100, 1, 4, 2, -100],  # prompt 0 3, response 1 4 2, padding
            [-100, 2, 2, 1, -100, -100],
        ]
    )
    logps, tokens = sequence_logps(logits, labels)
    log_softmax = torch.log_softmax(logits, -1)
    # Token t is predicted from position t - 1.
    expected = [
        sum(log_softmax[b, t - 1, ids[b, t]] for t in range(1, 6) if labels[b, t] != IGNORE_INDEX)
        for b in range(2)
    ]
    torch.testing.assert_close(logps, torch.stack(expected))
    assert tokens.tolist() == [3, 3]
    # The prompt's own next-token predictions carry no weight.
    changed = logits.clone()
    changed[0, 0] += 100.0  # predicts the prompt token 3
    torch.testing.assert_close(sequence_logps(changed, labels)[0], logps)


def test_dpo_loss_rejects_bad_settings():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_module(label_smoothing=0.1, loss_type="hinge")


# ---- preference data ---------------------------------------------------------------------


def test_row_layouts():
    # Intel/orca_dpo_pairs: system + question + two answers, read as named columns.
    orca = {"system": "Be brief.", "question": "2+2?", "chosen": "4", "rejected": "5"}
    assert column_pair(orca, DEFAULT_ROLES, "question", "chosen", "rejected", "system") == (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "4",
        "5",
    )
    # HuggingFaceH4/ultrafeedback_binarized: whole conversations; the prompt column only repeats
    # them.
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
    ]
    uf = {
        "prompt": "Name a color.",
        "chosen": conversation + [{"role": "assistant", "content": "Blue."}],
        "rejected": conversation + [{"role": "assistant", "content": "No."}],
    }
    assert trl_pair(uf, DEFAULT_ROLES) == (conversation, "Blue.", "No.")
    assert trl_pair({k: v for k, v in uf.items() if k != "prompt"}, DEFAULT_ROLES) == (
        conversation,
        "Blue.",
        "No.",
    )
    # TRL's conversational format: prompt messages, one-message responses.
    trl_row = {
        "prompt": conversation,
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "Soup."}],
    }
    assert trl_pair(trl_row, DEFAULT_ROLES) == (conversation, "Red.", "Soup.")
    # Anthropic/hh-rlhf: two transcripts split at the last assistant turn.
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color."
    hh = {"chosen": shared + "\n\nAssistant: Blue.", "rejected": shared + "\n\nAssistant: No."}
    assert hh_rlhf_pair(hh, DEFAULT_ROLES) == (conversation, "Blue.", "No.")
    with pytest.raises(RowError, match="share a prompt"):
        hh_rlhf_pair(
            {"chosen": hh["chosen"], "rejected": "\n\nHuman: Other\n\nAssistant: No."},
            DEFAULT_ROLES,
        )
    with pytest.raises(RowError, match="share no prompt"):
        trl_pair(
            {
                **uf,
                "rejected": [
                    {"role": "user", "content": "?"},
                    {"role": "assistant", "content": "x"},
                ],
            },
            DEFAULT_ROLES,
        )
    # They part before their last turn.
    with pytest.raises(RowError, match="'chosen' is not one assistant reply"):
        trl_pair(
            {**uf, "rejected": conversation[:1] + [{"role": "assistant", "content": "x"}]},
            DEFAULT_ROLES,
        )


def test_pair_tokens_match_sft_rendering(tokenizer):
    prompt = [{"role": "user", "content": "What is 7 times 8?"}]
    out = tokenize_pair(prompt, "It is 56.", "It is 54.", tokenizer, ChatFormat(), 128, 64, False)
    sft = tokenize_messages(
        prompt + [{"role": "assistant", "content": "It is 56."}], tokenizer, ChatFormat(), 128
    )
    assert out["chosen_prompt_ids"] + out["chosen_ids"] == sft["input_ids"]
    assert out["rejected_prompt_ids"] == out["chosen_prompt_ids"]
    response = [i for i, label in enumerate(sft["labels"]) if label != IGNORE_INDEX]
    assert response[0] == len(out["chosen_prompt_ids"])  # the boundary is where SFT's loss starts
    assert out["chosen_ids"][-1] == out["rejected_ids"][-1] == tokenizer.eos_token_id
    assert not out["prompt_truncated"] and not out["response_truncated"]


def test_pair_tokens_with_a_chat_template(tokenizer):
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% "
        "endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = chatml
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 times 8?"}]
    out = tokenize_pair(
        prompt, "56", "54", templated, ChatFormat(), 128, 64, use_chat_template=True
    )
    assert templated.decode(out["chosen_prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert templated.decode(out["chosen_ids"]) == "56<|im_end|>\n"
    assert templated.decode(out["rejected_ids"]) == "54<|im_end|>\n"


def test_hh_rlhf_layout_through_the_datamodule(tmp_path):
    rows = [
        {
            "chosen": f"\n\nHuman: What is {a} plus {a}?\n\nAssistant: {2 * a}.",
            "rejected": f"\n\nHuman: What is {a} plus {a}?\n\nAssistant: {2 * a + 1}.",
        }
        for a in range(10)
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dm = preference_data(str(path))  # format: auto finds hh_rlhf
    assert dm.row_format == "hh_rlhf"
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 10
    batch = ordered_batches(dm)[0]
    pairs = batch["input_ids"].shape[0] // 2
    tok = dm.tokenizer
    for i in range(pairs):
        chosen = tok.decode(batch["labels"][i][batch["labels"][i] != IGNORE_INDEX])
        rejected = tok.decode(
            batch["labels"][pairs + i][batch["labels"][pairs + i] != IGNORE_INDEX]
        )
        in_prompt = (batch["labels"][i] == IGNORE_INDEX) & (batch["attention_mask"][i] == 1)
        prompt = tok.decode(batch["input_ids"][i][in_prompt])
        a = int(prompt.split("What is ")[1].split(" ")[0])
        assert prompt.rstrip().endswith("### Assistant:")  # the default template's cue
        assert chosen.strip().startswith(f"{2 * a}.") and rejected.strip().startswith(
            f"{2 * a + 1}."
        )


def test_truncation_cuts_the_prompt_first():
    # 1 head token (BOS) + 9 prompt tokens, 6 response tokens: 16 > 12, 4 prompt tokens go
    # (oldest first, head kept); the response stays whole.
    assert plan_cut(n_head=1, n_prompt=10, n_response=6, limit=12, max_prompt_length=4) == (4, 0)
    # 16 > 11: the prompt goes down to max_prompt_length (8) only; then the response is cut on the
    # right.
    assert plan_cut(n_head=1, n_prompt=10, n_response=6, limit=11, max_prompt_length=8) == (2, 3)
    assert plan_cut(n_head=1, n_prompt=10, n_response=6, limit=20, max_prompt_length=4) == (0, 0)
    # A head (BOS + system message) that leaves no room for a response token: the only drop.
    assert plan_cut(n_head=9, n_prompt=10, n_response=6, limit=10, max_prompt_length=4) == (1, 5)
    with pytest.raises(RowError, match=PROMPT_TOO_LONG):
        plan_cut(n_head=10, n_prompt=12, n_response=6, limit=10, max_prompt_length=4)


def test_bad_pairs_are_counted_and_skipped_with_one_warning_line(tmp_path, caplog):
    good = [json.loads(line) for line in Path(PREFERENCE).read_text().splitlines()]
    bad = [
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
        {"prompt": "Empty?", "chosen": "Something.", "rejected": "  "},
        {
            "prompt": [
                {"role": "system", "content": "rule " * 400},
                {"role": "user", "content": "Hi?"},
            ],
            "chosen": "Long.",
            "rejected": "Short.",
        },
    ]
    kept_long = {
        "prompt": "word " * 400 + "Last?",
        "chosen": "Long.",
        "rejected": "Short.",
    }  # cut, not dropped
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in good + bad + [kept_long]))
    with caplog.at_level(logging.WARNING, logger="qlora_lightning.data.base"):
        dm = preference_data(str(path), val_fraction=0.1)
    dropped = sum(sum(dm.report[split]["dropped"].values()) for split in ("train", "val"))
    reasons = set(dm.report["train"]["dropped"]) | set(dm.report["val"]["dropped"])
    assert dropped == 3
    assert reasons == {"chosen and rejected are identical", "empty response", PROMPT_TOO_LONG}
    assert sum(dm.report[split]["prompt_truncated"] for split in ("train", "val")) == 1
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("qlora_lightning")
    ]
    # One per split.
    assert 1 <= len(warnings) <= 2 and all("\n" not in w and "dropped" in w for w in warnings)
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == len(good) + 1

    module = dpo_module(loss_type="ipo")
    module.configure_model()
    batch = ordered_batches(dm)[0]
    assert (
        batch["input_ids"].shape
        == batch["attention_mask"].shape
        == (2 * dm.batch_size, batch["labels"].shape[1])
    )
    assert torch.isfinite(module.batch_metrics(batch)["loss"])


# ---- the reference: one base, adapter off or a frozen SFT adapter ---------------------------


def _linear4bit_count(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_sft_adapter_reference_shares_the_one_4bit_base(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    sft = build_model(
        tiny_spec(), LoraSpec(r=8, alpha=16, dropout=0.1), gradient_checkpointing=False
    )
    for name, p in sft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a "trained" SFT adapter: it changes the outputs
    sft.save_pretrained(tmp_path / "sft")
    plain_layers = _linear4bit_count(sft)

    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(
        AutoModelForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)),
    )
    module = dpo_module(sft_adapter=str(tmp_path / "sft"), lr=1e-2)
    module.configure_model()
    model = module.model
    assert len(loads) == 1  # the base is loaded once
    assert _linear4bit_count(model) == plain_layers == 14  # 2 layers x 7 projections, one copy
    assert set(model.peft_config) == {"default", REFERENCE_ADAPTER}
    assert model.active_adapter == "default"
    reference_params = {
        n: p.detach().clone() for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n
    }
    assert reference_params and not any(
        p.requires_grad for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n
    )
    assert model.peft_config[REFERENCE_ADAPTER].lora_dropout == 0.0  # a fixed reference

    dm = preference_data()
    batch = ordered_batches(dm)[0]
    sft.eval()
    with torch.no_grad():
        expected = sequence_logps(
            sft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )[0]
    reference = module.reference_logps(batch)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-4)
    module.eval()
    with torch.no_grad():
        start = module.batch_metrics(batch)  # the policy starts from the SFT adapter: no reward yet
    assert abs(start["rewards/margin"].item()) < 1e-5 and start["loss"].item() == pytest.approx(
        0.6931, abs=1e-3
    )
    assert model.training is False  # as_reference restores the mode it found
    module.train()

    trainer = cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    torch.testing.assert_close(module.reference_logps(batch), reference, rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            assert torch.equal(p, reference_params[name]) and not p.requires_grad
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    saved = tmp_path / "lightning_logs" if (tmp_path / "lightning_logs").exists() else tmp_path
    adapter = next(saved.rglob("adapter_config.json")).parent
    assert not (adapter / REFERENCE_ADAPTER).exists()  # only the trained policy adapter is saved


def test_reference_is_the_base_with_the_adapter_off():
    module = dpo_module()
    module.configure_model()
    batch = ordered_batches(preference_data())[0]
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # the policy moves away from the base
        module.model.eval()
        with module.model.disable_adapter():
            base = sequence_logps(
                module(batch["input_ids"], batch["attention_mask"]), batch["labels"]
            )[0]
        policy = sequence_logps(
            module(batch["input_ids"], batch["attention_mask"]), batch["labels"]
        )[0]
    torch.testing.assert_close(module.reference_logps(batch), base, rtol=0, atol=1e-5)
    assert (policy - base).abs().max() > 1e-3


# ---- precomputed reference log-probs ------------------------------------------------------


def test_precomputed_reference_equals_live_and_is_cached(tmp_path):
    dm = preference_data()
    module = dpo_module(precompute_ref_logps=True, ref_batch_size=3)
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)
    for split in ("train", "val"):
        assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(dm.splits[split].column_names)
    for batch in ordered_batches(dm):
        live = module.reference_logps(batch)
        torch.testing.assert_close(
            torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]),
            live,
            rtol=0,
            atol=1e-4,
        )

    # Same data, same reference: read back from the datasets cache, not recomputed.
    calls = []

    def compute(batch):
        calls.append(batch)
        return torch.zeros(batch["input_ids"].shape[0] // 2), torch.zeros(
            batch["input_ids"].shape[0] // 2
        )

    fingerprint = reference_fingerprint(module.model)
    again = preference_data()
    again.add_reference_logps(compute, fingerprint, batch_size=3)
    assert not calls
    assert list(again.splits["train"]["ref_chosen_logps"]) == list(
        dm.splits["train"]["ref_chosen_logps"]
    )
    other = preference_data()
    # Unique: no stale cache.
    other.add_reference_logps(compute, f"another reference {tmp_path}", batch_size=3)
    assert calls and set(other.splits["train"]["ref_chosen_logps"]) == {0.0}


# ---- learning on a real tiny pretrained Llama ---------------------------------------------


def _train_pair_metrics(module: DPOModule, dm: PreferenceDataModule) -> dict[str, float]:
    """Mean metrics over all training pairs, with the reference computed live (never the cache)."""
    module.eval()
    out = defaultdict(float)
    with torch.no_grad():
        batches = ordered_batches(dm)
        for batch in batches:
            live = {k: v for k, v in batch.items() if not k.startswith("ref_")}
            for name, value in module.batch_metrics(live).items():
                out[name] += value.item() * live["input_ids"].shape[0] / 2 / len(dm.splits["train"])
        reference = torch.cat([module.reference_logps(b) for b in batches])
    module.train()
    return {**out, "reference": reference}


def test_dpo_on_stories260k_learns_the_preferences_while_the_reference_stays_fixed(tmp_path):
    # A real pretrained Llama (dim 64, MLP 172: not a multiple of 64). NF4 works for it too (the
    # builder turns off bitsandbytes' CPU inference repacking, which needs out_features % 64 == 0),
    # and reaches the same accuracy, but NF4 dequantization makes CPU steps ~3x slower; the 4-bit
    # path is covered above, so a 16-bit base keeps this learning test in seconds.
    model_dir = str(shared_path("models", "stories260K"))
    data = str(shared_path("datasets", "preference", "oasst1_en_validation_pairs.jsonl"))
    torch.manual_seed(0)
    dm = preference_data(
        data,
        tokenizer=model_dir,
        num_samples=40,
        num_val_samples=4,
        max_seq_length=96,
        batch_size=8,
    )
    # Long pairs are cut, not dropped.
    assert len(dm.splits["train"]) == 40 and dm.report["train"]["prompt_truncated"]
    module = dpo_module(
        BaseModelSpec(name_or_path=model_dir, compute_dtype="float32", quantization="none"),
        lr=1e-2,
        precompute_ref_logps=True,
        beta=0.1,
    )
    module.configure_model()
    before = _train_pair_metrics(module, dm)
    assert abs(before["rewards/margin"]) < 1e-6  # policy == reference: no pair is preferred yet

    cpu_trainer(tmp_path, max_steps=16, limit_val_batches=0).fit(module, datamodule=dm)
    after = _train_pair_metrics(module, dm)
    assert after["rewards/accuracy"] >= 0.9, after
    assert after["rewards/margin"] > before["rewards/margin"] + 1.0
    assert after["loss"] < before["loss"]
    torch.testing.assert_close(after["reference"], before["reference"], rtol=0, atol=1e-5)
    precomputed = torch.cat(
        [torch.cat([b["ref_chosen_logps"], b["ref_rejected_logps"]]) for b in ordered_batches(dm)]
    )
    torch.testing.assert_close(precomputed, after["reference"], rtol=0, atol=1e-4)


# ---- configs and the CLI ------------------------------------------------------------------


@pytest.mark.parametrize("config", ["dpo_quickstart.yaml", "dpo_mistral.yaml"])
def test_configs_instantiate(config, monkeypatch):
    from qlora_lightning.data.base import SFTDataModule
    from qlora_lightning.modules.base import QLoRAModule
    from qlora_lightning.run.cli import QLoRACLI

    monkeypatch.chdir(REPO)
    cli = QLoRACLI(
        QLoRAModule,
        SFTDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=[
            "--config",
            f"configs/{config}",
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--trainer.logger=false",
        ],
    )
    assert isinstance(cli.model, DPOModule) and isinstance(cli.datamodule, PreferenceDataModule)
    assert cli.datamodule.tokenizer == (cli.model.base.tokenizer or cli.model.base.name_or_path)


def test_quickstart_cli_logs_dpo_metrics(tmp_path, monkeypatch):
    from qlora_lightning.data.base import SFTDataModule
    from qlora_lightning.modules.base import QLoRAModule
    from qlora_lightning.run.cli import QLoRACLI

    monkeypatch.chdir(REPO)
    cli = QLoRACLI(
        QLoRAModule,
        SFTDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[
            "fit",
            "--config",
            "configs/dpo_quickstart.yaml",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ],
    )
    metrics = cli.trainer.callback_metrics
    names = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
    )
    # Training uses TRL's names; validation prefixes every one with `val/`.
    for key in ("train/loss", *names, "val/loss", *(f"val/{name}" for name in names)):
        assert torch.isfinite(metrics[key]), key
    summary = json.loads(next(tmp_path.rglob("run_summary.json")).read_text())
    assert (
        summary["final_train_loss"] is not None and summary["model"]["dpo"]["precompute_ref_logps"]
    )
