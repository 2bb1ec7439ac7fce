"""KTO: the loss against TRL's KTOTrainer, unpaired data (and pairs split into it), and a module
that learns."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qlora_lightning.data.kto import KTODataModule
from qlora_lightning.errors import UserError
from qlora_lightning.losses import IGNORE_INDEX, kto_loss, sequence_logps
from qlora_lightning.model.build import BaseModelSpec, LoraSpec
from qlora_lightning.modules.kto import KTOModule
from tests.conftest import EXAMPLES, REPO, TINY_LLAMA, cpu_trainer, shared_path, tiny_spec

PAIRS = str(EXAMPLES / "preference.jsonl")

# ---- the loss: TRL is the oracle ---------------------------------------------------------


def _policy(rows: int, seed: int, length: int = 14, vocab: int = 11):
    """Random fp64 logits and completion labels -> our (B,) log-probs and TRL's per-token
    log-probs."""
    torch.manual_seed(seed)
    logits = torch.randn(rows, length, vocab, dtype=torch.float64)
    ids = torch.randint(0, vocab, (rows, length))
    positions = torch.arange(length)
    completion = (positions >= torch.randint(2, 7, (rows, 1))) & (
        positions < torch.randint(9, length + 1, (rows, 1))
    )
    logps, _ = sequence_logps(logits, ids.masked_fill(~completion, IGNORE_INDEX))
    per_token = (
        torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        * completion[:, 1:]
    )
    return logps, per_token, completion.long()


def _trl_kto(
    loss_type,
    beta,
    desirable_weight,
    undesirable_weight,
    label,
    per_token,
    completion,
    kl_per_token,
    kl_completion,
    ref,
    ref_kl,
):
    """TRL 1.16's ``KTOTrainer._compute_loss`` (the loss's least-private entry point: it sits inside
    the trainer's loss method) on given per-token policy log-probs and precomputed reference
    log-probs."""
    from trl import KTOTrainer

    metrics = defaultdict(lambda: defaultdict(list))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        loss_type=loss_type,
        calculate_KL=loss_type == "kto",
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
    )
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(
        trainer, model, batch
    )
    inputs = {
        "input_ids": torch.zeros_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
        "KL_input_ids": torch.zeros_like(kl_completion),
        "KL_attention_mask": torch.ones_like(kl_completion),
        "KL_completion_mask": kl_completion,
        "label": label,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }

    # What TRL's fused LM head returns: per-token log-probs, 0 off the completion.
    def model(
        **kwargs,
    ):
        log_probs = kl_per_token if kwargs["input_ids"] is inputs["KL_input_ids"] else per_token
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)

    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[0] for name, values in metrics["train"].items()}


LABELS = {
    "mixed": [True, False, False, True, True, False, True],
    "desirable": [True] * 7,
    "undesirable": [False] * 7,
}


@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize(
    "loss_type,beta,desirable_weight,undesirable_weight,kl_shift",
    [
        ("kto", 0.1, 1.0, 1.0, 0.7),  # a positive KL estimate: the reference point moves
        ("kto", 0.5, 1.33, 1.0, -0.7),  # a negative one: clamped to 0
        ("kto", 2.0, 1.0, 0.75, 0.2),
        ("apo_zero_unpaired", 0.3, 1.0, 1.2, 0.7),  # no KL term at all
    ],
)
def test_kto_loss_matches_trl(
    labels, loss_type, beta, desirable_weight, undesirable_weight, kl_shift
):
    rows = len(LABELS[labels])
    label = torch.tensor(LABELS[labels])
    logps, per_token, completion = _policy(rows, seed=0)
    kl_logps, kl_per_token, kl_completion = _policy(rows, seed=1)
    torch.manual_seed(2)
    ref = logps - torch.randn(rows, dtype=torch.float64)  # log-ratios of either sign
    ref_kl = kl_logps - kl_shift - 0.1 * torch.randn(rows, dtype=torch.float64)

    losses, rewards, kl = kto_loss(
        logps,
        ref,
        label,
        (kl_logps - ref_kl).mean(),
        beta,
        desirable_weight,
        undesirable_weight,
        loss_type,
    )
    trl_loss, trl = _trl_kto(
        loss_type,
        beta,
        desirable_weight,
        undesirable_weight,
        label,
        per_token,
        completion,
        kl_per_token,
        kl_completion,
        ref,
        ref_kl,
    )
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert kl.item() == pytest.approx(trl["kl"], abs=1e-6)
    if loss_type == "kto":  # the settings reach both sides of the clamp
        assert (kl.item() > 0) == (kl_shift > 0)
    for name, rows_of in (("chosen", label), ("rejected", ~label)):
        if rows_of.any():
            assert rewards[rows_of].mean().item() == pytest.approx(trl[f"rewards/{name}"], abs=1e-6)
            assert logps[rows_of].mean().item() == pytest.approx(trl[f"logps/{name}"], abs=1e-6)
        else:
            assert f"rewards/{name}" not in trl
    if label.any() and (~label).any():
        margin = rewards[label].mean() - rewards[~label].mean()
        assert margin.item() == pytest.approx(trl["rewards/margins"], abs=1e-6)


# ---- data: unpaired rows, and pairs split into them ------------------------------------------


def kto_data(path: str = PAIRS, tokenizer=TINY_LLAMA, **kwargs) -> KTODataModule:
    dm = KTODataModule(
        path=path,
        tokenizer=tokenizer,
        **{"max_seq_length": 128, "batch_size": 4, "val_fraction": 0.2, **kwargs},
    )
    dm.setup()
    return dm


def _write(tmp_path, rows: list) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _trained(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])


def test_awkward_unpaired_rows_train_exactly_their_completion(tmp_path, tokenizer):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4."},
            ],
            "label": True,
        },
        # Several turns: the earlier reply is context, only the last one is scored.
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Soup."},
            ],
            "label": "false",
        },
        {
            "messages": [
                {"role": "user", "content": "word " * 300 + "Last?"},
                {"role": "assistant", "content": "Yes."},
            ],
            "label": 1,
        },
        {
            "messages": [
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ],
            "label": "TRUE",
        },
        {
            "messages": [
                {"role": "user", "content": "Empty?"},
                {"role": "assistant", "content": " "},
            ],
            "label": False,
        },
    ]
    # So that the held-out split keeps a row whichever it draws.
    fillers = [
        {
            "messages": [
                {"role": "user", "content": f"Count to {i}."},
                {"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))},
            ],
            "label": i % 2 == 0,
        }
        for i in range(5)
    ]
    dm = kto_data(_write(tmp_path, rows + fillers))
    encoded = {}
    for split in ("train", "val"):
        for row in dm.splits[split]:
            encoded[tokenizer.decode(row["completion_ids"])] = row
    # Not the empty one.
    assert len(encoded) == 9 and {"4.</s>", "Soup.</s>", "Yes.</s>", "Paris.</s>"} <= set(encoded)
    assert sum(sum(dm.report[s]["dropped"].values()) for s in ("train", "val")) == 1
    assert [encoded[k]["label"] for k in ("4.</s>", "Soup.</s>", "Yes.</s>", "Paris.</s>")] == [
        True,
        False,
        True,
        True,
    ]
    for completion, row in encoded.items():
        batch = dm.collate([row])
        assert _trained(tokenizer, {"labels": batch["labels"][0].tolist()}) == completion
    assert (
        tokenizer.decode(encoded["4.</s>"]["prompt_ids"])
        == "<s>Be brief.\n\n### Human: 2+2?### Assistant:"
    )
    assert tokenizer.decode(encoded["Soup.</s>"]["prompt_ids"]) == (
        "<s>### Human: Hi### Assistant:Hello!</s>### Human: Name a color.### Assistant:"
    )
    # The prompt cut from the left (BOS kept) just enough to fit the completion.
    long = encoded["Yes.</s>"]
    assert long["prompt_ids"][0] == tokenizer.bos_token_id
    assert len(long["prompt_ids"]) + len(long["completion_ids"]) == dm.max_seq_length
    assert tokenizer.decode(long["prompt_ids"]).endswith("word Last?### Assistant:")
    assert dm.report["train"]["prompt_truncated"] + dm.report["val"]["prompt_truncated"] == 1


@pytest.mark.parametrize(
    "label,error",
    [
        (
            None,
            "line 3 of '.*' \\(.* split\\): bad label: no field 'label' \\(every row needs a "
            "label, true or false\\)",
        ),
        ("yes", "line 3 .*bad label: 'label' is 'yes', not true or false"),
        (0.5, "line 3 .*bad label: 'label' is 0.5, not true or false"),
    ],
)
def test_a_bad_label_stops_the_run_naming_the_row(tmp_path, label, error):
    rows = [
        {"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0}
        for i in range(10)
    ]
    rows[2] = {"prompt": "Q?", "completion": "A."} if label is None else {**rows[2], "label": label}
    with pytest.raises(UserError, match=error) as info:
        kto_data(_write(tmp_path, rows))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "layout,row,fmt",
    [
        (
            "alpaca",
            lambda i: {
                "instruction": f"Add {i} and {i}.",
                "output": f"{2 * i}",
                "label": i % 3 > 0,
            },
            "alpaca",
        ),
        (
            "sharegpt",
            lambda i: {
                "conversations": [
                    {"from": "human", "value": f"Add {i} and {i}."},
                    {"from": "gpt", "value": f"{2 * i}"},
                ],
                "label": i % 3 > 0,
            },
            "sharegpt",
        ),
        (
            "hh_rlhf pairs",
            lambda i: {
                "chosen": f"\n\nHuman: Add {i} and {i}.\n\nAssistant: {2 * i}",
                "rejected": f"\n\nHuman: Add {i} and {i}.\n\nAssistant: {2 * i + 1}",
            },
            "hh_rlhf",
        ),
        (
            "openai pairs",
            lambda i: {
                "input": {"messages": [{"role": "user", "content": f"Add {i} and {i}."}]},
                "preferred_output": [{"role": "assistant", "content": f"{2 * i}"}],
                "non_preferred_output": [{"role": "assistant", "content": f"{2 * i + 1}"}],
            },
            "openai_preference",
        ),
    ],
)
def test_every_layout_reads_as_labelled_completions(tmp_path, tokenizer, layout, row, fmt):
    dm = kto_data(_write(tmp_path, [row(i) for i in range(10)]))
    assert dm.row_format == fmt and dm.from_pairs == layout.endswith("pairs")
    rows = [r for split in ("train", "val") for r in dm.splits[split]]
    for r in rows:
        asked = int(tokenizer.decode(r["prompt_ids"]).split("Add ")[1].split(" ")[0])
        answer = int(tokenizer.decode(r["completion_ids"], skip_special_tokens=True))
        assert r["label"] == ((answer == 2 * asked) if dm.from_pairs else asked % 3 > 0)
    assert len(rows) == (20 if dm.from_pairs else 10)


def test_pairs_split_into_a_desirable_and_an_undesirable_row(tokenizer):
    dm = kto_data(max_seq_length=512)  # nothing cut
    assert dm.from_pairs and dm.row_format == "trl"
    pairs = [json.loads(line) for line in open(PAIRS)]
    rows = [row for split in ("train", "val") for row in dm.splits[split]]
    assert len(rows) == 2 * len(pairs) and sum(row["label"] for row in rows) == len(pairs)
    completions = {(tokenizer.decode(row["completion_ids"]), row["label"]) for row in rows}
    for pair in pairs:
        assert (pair["chosen"] + "</s>", True) in completions and (
            pair["rejected"] + "</s>",
            False,
        ) in completions
    # Both halves of a pair land in the same split: none is held out against its twin.
    val = {tokenizer.decode(row["prompt_ids"]) for row in dm.splits["val"]}
    assert val.isdisjoint(tokenizer.decode(row["prompt_ids"]) for row in dm.splits["train"])


def test_kl_pairs_match_each_prompt_with_the_previous_rows_completion(tokenizer):
    dm = kto_data(max_seq_length=40, max_prompt_length=24)
    rows = [dm.splits["train"][i] for i in range(4)]
    batch = dm.collate(rows)
    assert (
        batch["label"].dtype == torch.bool
        and batch["input_ids"].shape[0] == batch["kl_input_ids"].shape[0] == 4
    )
    for i, row in enumerate(rows):
        other = rows[i - 1]  # row 0 takes the last row's completion, as TRL rotates them
        kl = batch["kl_input_ids"][i][batch["kl_attention_mask"][i] == 1].tolist()
        expected = (row["prompt_ids"] + other["completion_ids"])[:40]  # the completion cut to fit
        assert kl == expected
        assert batch["kl_labels"][i][: len(row["prompt_ids"])].eq(IGNORE_INDEX).all()
        assert (
            batch["kl_labels"][i][len(row["prompt_ids"]) : len(kl)].tolist()
            == expected[len(row["prompt_ids"]) :]
        )


# ---- the module ------------------------------------------------------------------------------


def kto_module(base=None, lr: float = 1e-2, **kwargs) -> KTOModule:
    return KTOModule(
        base=base or tiny_spec(),
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        gradient_checkpointing=False,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),
        warmup_ratio=0.0,
        **kwargs,
    )


def test_module_loss_is_kto_of_the_policy_the_adapter_off_reference_and_the_kl_pairs(
    tmp_path, one_thread
):
    dm = kto_data()
    module = kto_module(beta=0.5, desirable_weight=1.2)
    module.configure_model()
    batch = dm.collate([dm.splits["train"][i] for i in range(4)])
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # the policy moves away from the base
        mismatched = {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "labels")}
        with module.model.disable_adapter():
            ref, ref_kl = (
                sequence_logps(module(b["input_ids"], b["attention_mask"]), b["labels"])[0]
                for b in (batch, mismatched)
            )
        policy, policy_kl = (
            sequence_logps(module(b["input_ids"], b["attention_mask"]), b["labels"])[0]
            for b in (batch, mismatched)
        )
        metrics = module.batch_metrics(batch)
    losses, rewards, kl = kto_loss(
        policy, ref, batch["label"], (policy_kl - ref_kl).mean(), 0.5, 1.2
    )
    torch.testing.assert_close(metrics["loss"], losses.mean())
    torch.testing.assert_close(metrics["kl"], kl)
    torch.testing.assert_close(metrics["rewards/chosen"], rewards[batch["label"]])
    torch.testing.assert_close(metrics["rewards/rejected"], rewards[~batch["label"]])
    assert set(metrics) == set(module.metric_names)

    trainer = cpu_trainer(
        tmp_path, max_steps=3, limit_val_batches=2, val_check_interval=3, log_every_n_steps=1
    )
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    for name in module.metric_names:
        assert torch.isfinite(logged["train/loss" if name == "loss" else name]), name
        assert torch.isfinite(logged[f"val/{name}"]), name
    assert 0 <= logged["val/rewards/accuracy"] <= 1


def test_batches_of_one_row_are_refused(tmp_path):
    with pytest.raises(UserError, match="data.batch_size to 2 or more"):
        cpu_trainer(tmp_path, max_steps=1).fit(kto_module(), datamodule=kto_data(batch_size=1))


def test_kto_on_stories260k_learns_thumbs_up_from_thumbs_down(tmp_path, one_thread):
    # The real pretrained 260K Llama on the real oasst pairs, split into unpaired rows; 16-bit base
    # for speed (the 4-bit path is covered above), as the DPO learning test does.
    model_dir = str(shared_path("models", "stories260K"))
    data = str(shared_path("datasets", "preference", "oasst1_en_validation_pairs.jsonl"))
    torch.manual_seed(0)
    dm = kto_data(
        data,
        tokenizer=model_dir,
        num_samples=20,
        num_val_samples=2,
        max_seq_length=96,
        batch_size=8,
    )
    module = kto_module(
        BaseModelSpec(name_or_path=model_dir, compute_dtype="float32", quantization="none"), lr=1e-2
    )
    module.configure_model()

    def measured() -> tuple[float, float]:
        """Reward accuracy and mean loss over every training row."""
        module.eval()
        with torch.no_grad():
            rows = dm.splits["train"]
            values = [
                module.batch_metrics(dm.collate([rows[j] for j in range(i, min(i + 8, len(rows)))]))
                for i in range(0, len(rows), 8)
            ]
        module.train()
        return (
            torch.cat([v["rewards/accuracy"] for v in values]).mean().item(),
            torch.stack([v["loss"] for v in values]).mean().item(),
        )

    accuracy, loss = measured()
    # Policy == reference: every reward on the reference point.
    assert accuracy == 0.0 and loss == pytest.approx(0.5)
    cpu_trainer(tmp_path, max_steps=16, limit_val_batches=0).fit(module, datamodule=dm)
    accuracy, loss = measured()
    assert accuracy >= 0.8 and loss < 0.25, (accuracy, loss)  # measured: 0.875 and 0.13


def test_config_names_the_kto_classes(monkeypatch):
    from qlora_lightning.run.cli import make_cli

    monkeypatch.chdir(REPO)
    cli = make_cli(["--config", "configs/smollm2_kto.yaml"], run=False)
    assert isinstance(cli.model, KTOModule) and isinstance(cli.datamodule, KTODataModule)
    assert (
        cli.model.loss_type == "kto"
        and cli.datamodule.from_pairs
        and cli.datamodule.batch_size >= 2
    )
