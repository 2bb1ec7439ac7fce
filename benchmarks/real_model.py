"""The real pretrained model on the CPU: SmolLM2-135M-Instruct (the ``real`` extra's GGUF file).

Two measurements, each writing JSON into ``--out``:

``throughput``: training tokens/s of the whole model (30 layers) through ``build_model`` with an
NF4 base and with ``quantization: none`` (fp32 on both sides: CPUs without AMX run bf16 slower),
the same random full-length token rows for both (no padding: every token counts), AdamW on the
adapter, no checkpointing; ``--warmup`` steps untimed, then ``--steps`` timed. The torch profiler,
over one more step, gives the share of CPU time in bitsandbytes' operators (its NF4 dequantization
and matmul): what the 4-bit path costs against the 16-bit one.

``learn``: one config (``configs/smollm2_*.yaml``) through the project's CLI classes with smaller
sample counts (``--train-samples``, ``--val-samples``, ``--steps``), in this process: validation
metrics before and after ``fit``, the final training loss, wall time, peak host memory (the
process's max RSS) and, for GSM8K configs, exact match (greedy, the project's ``GSM8KEval`` scorer)
on the first ``--gsm8k-questions`` of ``../shared/datasets/gsm8k/test.jsonl`` before and after.
Then the reference column: the standard recipe (transformers' 4-bit load, PEFT, TRL's ``SFTTrainer``
or ``DPOTrainer``) trains the same initial adapter on the same token rows in the same order, with
the same optimizer, schedule, accumulation and clipping; its adapter is then scored by the same
validation and GSM8K code. Each run covers at most one epoch (``--train-samples`` = steps x
accumulation x batch), so both sides see identical micro-batches. The rows are the project's
tokenization, given to TRL pre-tokenized: what is compared is training (``tests/test_parity.py``
checks that TRL tokenizes these chat rows the same way).

    python benchmarks/real_model.py throughput --out benchmarks/results/<date>_real_model
    python benchmarks/real_model.py learn --config configs/smollm2_gsm8k.yaml \
        --out benchmarks/results/<date>_real_model
    python benchmarks/real_model.py report \
        --out benchmarks/results/<date>_real_model  # the learn runs as a table
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The standard recipe lives beside the tests that pin it (tests/trl_recipe.py)
sys.path.insert(0, str(REPO))
GSM8K_TEST = REPO.parent / "shared" / "datasets" / "gsm8k" / "test.jsonl"
MODEL = "smollm2-135m-instruct"


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min_at_start": round(__import__("os").getloadavg()[0], 2),
    }


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---- throughput ----------------------------------------------------------------------------


def train_steps(model, rows: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` optimizer steps on ``rows`` (B, T) of token ids."""
    from qlora_lightning.losses import lm_loss_sum

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for _ in range(steps):
        nll, n = lm_loss_sum(model(input_ids=rows, use_cache=False).logits, rows)
        (nll / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bitsandbytes_share(model, rows: torch.Tensor) -> float:
    """Share of one training step's CPU time spent in bitsandbytes' operators (self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_steps(model, rows, 1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ours = sum(e.self_cpu_time_total for e in events if "bitsandbytes" in e.key)
    return ours / total


def throughput(args) -> dict:
    from qlora_lightning.model.build import BaseModelSpec, LoraSpec, build_model

    rows = torch.randint(
        0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    results = {
        "machine": machine(),
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "runs": {},
    }
    for quantization in ("nf4", "none"):
        torch.manual_seed(0)
        spec = BaseModelSpec(name_or_path=MODEL, quantization=quantization, compute_dtype="float32")
        model = build_model(
            spec, LoraSpec(r=16, alpha=32, dropout=0.0), gradient_checkpointing=False
        )
        train_steps(model, rows, args.warmup)
        seconds = train_steps(model, rows, args.steps)
        run = {"seconds": seconds, "tokens_per_sec": args.steps * rows.numel() / seconds}
        if quantization == "nf4":
            run["bitsandbytes_cpu_share"] = bitsandbytes_share(model, rows)
        results["runs"][quantization] = run
        print(quantization, json.dumps(run), flush=True)
        del model
    results["nf4_slowdown"] = (
        results["runs"]["none"]["tokens_per_sec"] / results["runs"]["nf4"]["tokens_per_sec"]
    )
    return results


# ---- learning ------------------------------------------------------------------------------


def gsm8k_examples(tokenizer, n: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) of the first ``n`` GSM8K test questions, chat-templated as in
    training."""
    from qlora_lightning.data.tokenize import ChatFormat, tokenize_prompt

    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:n]]
    return [
        (
            tokenize_prompt(
                [{"role": "user", "content": r["question"].strip()}],
                tokenizer,
                ChatFormat(),
                512,
                use_chat_template=True,
            ),
            r["answer"],
        )
        for r in rows
    ]


def learn(args) -> dict:
    from qlora_lightning.evaluate.gsm8k_eval import GSM8KEval
    from qlora_lightning.run.cli import make_cli

    name = run_name(args)
    root = Path(args.out) / f"{name}_runs"
    overrides = [
        "--trainer.max_steps",
        str(args.steps),
        "--trainer.val_check_interval",
        str(args.steps * args.accumulate),
        "--trainer.accumulate_grad_batches",
        str(args.accumulate),
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--data.init_args.num_samples",
        str(args.train_samples),
        "--data.init_args.num_val_samples",
        str(args.val_samples),
    ]
    cli = make_cli(["--config", args.config, *overrides], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    result = {
        "machine": machine(),
        "config": args.config,
        "train_samples": args.train_samples,
        "val_samples": args.val_samples,
        "steps": args.steps,
        "accumulate": args.accumulate,
    }

    scorer = (
        GSM8KEval(max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch)
        if "gsm8k" in name and args.gsm8k_questions > 0
        else None
    )

    def evaluate(when: str, score: bool = True) -> None:
        metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
        result[f"val_{when}"] = {k: float(v) for k, v in metrics.items()}
        if scorer is not None and score:
            start = time.perf_counter()
            scored = scorer.score(model, gsm8k_examples(model.tokenizer, args.gsm8k_questions))
            result[f"gsm8k_exact_match_{when}"] = sum(s.correct for s in scored) / len(scored)
            result[f"gsm8k_seconds_{when}"] = time.perf_counter() - start
            result[f"gsm8k_samples_{when}"] = [
                {"generation": s.generation, "reference": s.reference, "correct": s.correct}
                for s in scored[:3]
            ]
        print(
            when,
            json.dumps({k: v for k, v in result.items() if k.endswith(when)})[:2000],
            flush=True,
        )

    evaluate("before")
    if "chosen_prompt_ids" in data.splits["train"].column_names:
        result["pairs_left_out"] = keep_whole_prompts(
            data, args.steps * args.accumulate * data.batch_size
        )
    # The same rows for TRL, read before fit fails late.
    rows = training_rows(data, args.steps * args.accumulate)
    initial_adapter = root / "initial_adapter"
    model.model.save_pretrained(initial_adapter)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    result["fit_seconds"] = time.perf_counter() - start
    result["final_train_loss"] = float(trainer.callback_metrics["train/loss"])
    evaluate("after")
    result["peak_rss_gib"] = peak_rss_gib()
    if args.reference:
        result["trl"] = train_with_trl(trainer, model, rows, str(initial_adapter), root / "trl")
        evaluate("trl_after", score=args.score_reference)  # the module now holds TRL's adapter
    return result


def run_name(args) -> str:
    """The config's name, and the ``--tag`` of a second run of it."""
    return "_".join(filter(None, [Path(args.config).stem, args.tag]))


def keep_whole_prompts(data, n: int) -> int:
    """Keep the first ``n`` train pairs whose two sequences hold the same prompt tokens: TRL holds
    one prompt per pair, so a pair cut to fit with a different share of its prompt in each sequence
    has no TRL equivalent. Both runs then train on the same pairs. Returns how many were left
    out."""
    train = data.splits["train"]
    whole = [i for i, r in enumerate(train) if r["chosen_prompt_ids"] == r["rejected_prompt_ids"]]
    if len(whole) < n:
        raise SystemExit(
            f"only {len(whole)} of {len(train)} train pairs keep one prompt: raise --train-samples"
        )
    data.splits["train"] = train.select(whole[:n])
    return len(train) - len(whole)


def training_rows(data, micro_batches: int) -> list[dict]:
    """The train split's rows in the order the project's first epoch read them."""
    loader = data.train_dataloader()
    order = [i for batch in loader.batch_sampler for i in batch]
    if len(order) != micro_batches * data.batch_size:
        raise SystemExit(
            f"the run must read its {len(order)} train rows exactly once: set --train-samples to "
            f"steps x accumulation x batch = {micro_batches * data.batch_size}"
        )
    return [data.splits["train"][i] for i in order]


def train_with_trl(trainer, model, rows: list[dict], initial_adapter: str, out: Path) -> dict:
    """Train ``initial_adapter`` through TRL on ``rows`` in order; load the result into
    ``model``."""
    from datasets import Dataset
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from tests.trl_recipe import TrlLog, trl_args, trl_fp32_adapter, trl_peft_model

    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW", "the reference recipe runs AdamW"
    steps = trainer.max_steps
    recipe = dict(
        batch=len(rows) // (steps * trainer.accumulate_grad_batches),
        accumulate=trainer.accumulate_grad_batches,
        steps=steps,
        lr=optimizer.defaults["lr"],
        warmup=int(model.warmup_ratio * steps),
        clip=trainer.gradient_clip_val,
    )
    if hasattr(model, "beta"):
        from trl import DPOConfig, DPOTrainer

        class PretokenizedDPOTrainer(DPOTrainer):
            """Reads ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` as given (TRL would tokenize
            text)."""

            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset

        dataset = Dataset.from_list(
            [
                {
                    "prompt_ids": r["chosen_prompt_ids"],
                    "chosen_ids": r["chosen_ids"],
                    "rejected_ids": r["rejected_ids"],
                }
                for r in rows
            ]
        )
        config, trainer_class = DPOConfig, PretokenizedDPOTrainer
        extra = dict(
            beta=model.beta,
            loss_type=[model.loss_type],
            max_length=None,
            precompute_ref_log_probs=model.precompute_ref_logps,
        )
    else:
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_list(
            [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        )
        config, trainer_class, extra = SFTConfig, SFTTrainer, dict(max_length=None, packing=False)
    log = TrlLog()
    torch.manual_seed(0)
    trl = trainer_class(
        model=trl_peft_model(model.base, initial_adapter),
        processing_class=model.tokenizer,
        train_dataset=dataset,
        callbacks=[log],
        args=trl_args(config, out, **recipe, **extra),
    )
    trl_fp32_adapter(trl, initial_adapter)
    start = time.perf_counter()
    trl.train()
    seconds = time.perf_counter() - start
    loaded = set_peft_model_state_dict(model.model, get_peft_model_state_dict(trl.model))
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    return {
        "recipe": recipe,
        "fit_seconds": seconds,
        "step_losses": [step["loss"] for step in log.steps],
        "final_train_loss": log.steps[-1]["loss"],
    }


# ---- report --------------------------------------------------------------------------------


def report(out: Path) -> str:
    """Markdown tables of every ``learn`` result in ``out``: the project's runs beside TRL's (those
    run with a reference), then every preference method's held-out rewards (DPO's beside the
    others')."""
    results = {
        path.stem: json.loads(path.read_text()) for path in sorted(out.glob("smollm2_*.json"))
    }
    return "\n\n".join(
        [
            _trl_table({k: r for k, r in results.items() if "trl" in r}),
            _preference_table({k: r for k, r in results.items() if _ACCURACY in r["val_before"]}),
        ]
    )


_ACCURACY, _MARGIN = "val/rewards/accuracy", "val/rewards/margin"


def _trl_table(results: dict[str, dict]) -> str:
    lines = [
        "| config | rows (train / val) | steps x accumulation | validation loss before | after: "
        "project | after: TRL | gap | final training loss: project / TRL | held-out | wall time of "
        "fit: project (with a validation pass; DPO: and the reference log-probs) / TRL | peak host "
        "memory |",
        "|" + "---|" * 11,
    ]
    for name, r in results.items():
        before, after, trl = (
            r[f"val_{when}"]["val/loss"] for when in ("before", "after", "trl_after")
        )
        if "gsm8k_exact_match_before" in r:
            held_out = (
                f"perplexity {r['val_before']['val/ppl']:.3f} -> {r['val_after']['val/ppl']:.3f}; "
                f"GSM8K exact match {r['gsm8k_exact_match_before']:.3f} -> "
                f"{r['gsm8k_exact_match_after']:.3f}"
            )
        elif _ACCURACY in r["val_before"]:
            held_out = (
                f"reward accuracy {r['val_before'][_ACCURACY]:.3f} -> "
                f"{r['val_after'][_ACCURACY]:.3f} (TRL {r['val_trl_after'][_ACCURACY]:.3f}), "
                f"margin {r['val_before'][_MARGIN]:.4f} -> {r['val_after'][_MARGIN]:.4f} (TRL "
                f"{r['val_trl_after'][_MARGIN]:.4f})"
            )
        else:
            held_out = (
                f"perplexity {r['val_before']['val/ppl']:.3f} -> {r['val_after']['val/ppl']:.3f}"
            )
        lines.append(
            f"| `{name}` | {r['train_samples']} / {r['val_samples']} | {r['steps']} x "
            f"{r['accumulate']} | {before:.4f} | {after:.4f} | {trl:.4f} | "
            f"{abs(after - trl) / trl:.2%} | {r['final_train_loss']:.4f} / "
            f"{r['trl']['final_train_loss']:.4f} | {held_out} | {r['fit_seconds'] / 60:.1f} / "
            f"{r['trl']['fit_seconds'] / 60:.1f} min | {r['peak_rss_gib']:.2f} GiB |"
        )
    return "\n".join(lines)


def _loss_type(config: str) -> str:
    """The preference method a config trains (its model's ``loss_type``)."""
    import yaml

    return yaml.safe_load(Path(config).read_text())["model"]["init_args"].get("loss_type", "-")


def _preference_table(results: dict[str, dict]) -> str:
    lines = [
        "| config | method | rows (train / val) | steps x accumulation | held-out reward accuracy "
        "before -> after | held-out reward margin before -> after | validation loss before -> "
        "after | wall time of fit | peak host memory |",
        "|" + "---|" * 9,
    ]
    for name, r in results.items():
        before, after = r["val_before"], r["val_after"]
        lines.append(
            f"| `{name}` | {_loss_type(r['config'])} | {r['train_samples']} / {r['val_samples']} | "
            f"{r['steps']} x {r['accumulate']} | {before[_ACCURACY]:.3f} -> {after[_ACCURACY]:.3f} "
            f"| {before[_MARGIN]:.4f} -> {after[_MARGIN]:.4f} | {before['val/loss']:.4f} -> "
            f"{after['val/loss']:.4f} | {r['fit_seconds'] / 60:.1f} min | {r['peak_rss_gib']:.2f} "
            "GiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["throughput", "learn", "report"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=2, help="throughput: rows per step")
    parser.add_argument("--seq", type=int, default=256, help="throughput: tokens per row")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=3, help="optimizer steps (timed ones for throughput)"
    )
    parser.add_argument("--config", help="learn: a configs/smollm2_*.yaml")
    parser.add_argument(
        "--train-samples",
        type=int,
        default=48,
        help="learn: train rows read (DPO: a few more, for the pairs TRL cannot hold)",
    )
    parser.add_argument("--val-samples", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=8)
    parser.add_argument(
        "--gsm8k-questions", type=int, default=200, help="learn: 0 skips the exact match"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--generation-batch", type=int, default=32, help="learn: GSM8K prompts per generate call"
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="learn: skip the TRL reference column",
    )
    parser.add_argument(
        "--tag", help="learn: results go to <config>_<tag>.json (another budget of one config)"
    )
    parser.add_argument(
        "--score-reference",
        action="store_true",
        help="learn: GSM8K exact match of TRL's adapter too (validation loss always)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.what == "report":
        print(report(out))
        return
    out.mkdir(parents=True, exist_ok=True)
    result = throughput(args) if args.what == "throughput" else learn(args)
    name = "throughput" if args.what == "throughput" else run_name(args)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
