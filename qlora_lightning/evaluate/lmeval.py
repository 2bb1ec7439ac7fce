"""``python -m qlora_lightning eval`` and ``LMEvalCallback``: lm-evaluation-harness tasks on the
model as trained.

The model lm-eval scores is the one in memory, handed to lm-eval's Hugging Face wrapper as an object
(``HFLM(pretrained=<model>, tokenizer=...)``): for an adapter, its 4-bit base loaded and quantized
as in training with the adapter (and any others) on top, exactly what ``GSM8KEval`` and ``merge``'s
check run (``merge.adapter_on_base``); nothing is merged or reloaded from disk. A merged folder
(``merge --output``) is evaluated as the plain model it is.

Tasks are lm-eval's, by name (``--tasks``), with its few-shot settings, limit and batch size. Tasks
whose data lm-eval downloads need the network; ``gsm8k_local`` (``assets/lm_eval/gsm8k_local.yaml``)
is lm-eval's ``gsm8k`` reading local JSONL files instead (``load_gsm8k_local``), and more task YAMLs
come in with ``--include_path``. Results go to a JSON file beside the run (``lm_eval/`` in the
adapter's run folder), the per-question generations and scores to a JSONL beside it, and, from the
callback, the metrics to the run's loggers as ``lmeval/<task>/<metric>[/<filter>]``.

lm-eval is optional (the ``eval`` extra): it is imported when a task runs, and its absence is one
line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import re
import sys
import time
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from qlora_lightning.errors import OneLineParser, UserError, first_line
from qlora_lightning.evaluate.generation import inference_mode
from qlora_lightning.model.adapters import AdapterSet, attach_adapters, using_adapter
from qlora_lightning.paths import PACKAGE_DIR, shipped

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[eval]'"
# The task YAMLs the package ships (gsm8k_local.yaml); always on lm-eval's include path.
TASKS_DIR = PACKAGE_DIR / "assets" / "lm_eval"
DEFAULT_TASKS = ("gsm8k_local",)
GSM8K_TEST = "qlora_lightning/assets/examples/gsm8k_test.jsonl"
GSM8K_TRAIN = "qlora_lightning/assets/examples/gsm8k_train.jsonl"
METRIC_PREFIX = "lmeval"


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"eval needs lm-evaluation-harness: {INSTALL_HINT}") from None
    return lm_eval


# ---- the local GSM8K task's data -----------------------------------------------------------------


def _read_gsm8k(path: Union[str, Path], role: str) -> list[dict]:
    path = Path(shipped(str(path)))
    if not path.is_file():
        raise UserError(f"gsm8k_local: the {role} file '{path}' does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({"question": str(row["question"]), "answer": str(row["answer"])})
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"gsm8k_local: line {number} of '{path}' is not a {{question, answer}} JSON row "
                f"({first_line(err)})"
            ) from None
    if not rows:
        raise UserError(f"gsm8k_local: the {role} file '{path}' has no rows")
    return rows


def load_gsm8k_local(
    gsm8k_test: Optional[str] = None, gsm8k_train: Optional[str] = None, **_metadata
):
    """The ``test`` (scored) and ``train`` (few-shot) splits of ``gsm8k_local`` from JSONL files of
    GSM8K rows; lm-eval calls it with the task's metadata (``--gsm8k_test``, ``--gsm8k_train``, or
    lm_eval's ``--metadata``). Default: the GSM8K-format examples shipped in the package."""
    import datasets

    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(_read_gsm8k(gsm8k_test or GSM8K_TEST, "test")),
            "train": datasets.Dataset.from_list(
                _read_gsm8k(gsm8k_train or GSM8K_TRAIN, "few-shot (train)")
            ),
        }
    )


# ---- running lm-eval -----------------------------------------------------------------------------


def task_manager(
    tasks: Sequence[str],
    include_path: Sequence[Union[str, Path]] = (),
    metadata: Optional[dict] = None,
):
    """lm-eval's ``TaskManager`` over the shipped task YAMLs, ``include_path`` and, only when a task
    is not found there, lm-eval's own ~15,000 (indexing them takes ~30 s on 2 busy cores).

    Raises:
        UserError: a missing include path, or a task name that none of them knows.
    """
    _lm_eval()
    from lm_eval.tasks import TaskManager

    for path in include_path:
        if not Path(path).exists():
            raise UserError(f"--include_path '{path}' does not exist")
    paths = [str(TASKS_DIR), *(str(p) for p in include_path)]
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        close = sorted(
            {m for task in unknown for m in get_close_matches(task, manager.all_tasks, n=3)}
        )
        hint = f"; did you mean {', '.join(close)}?" if close else " (lm_eval ls tasks lists them)"
        raise UserError(
            f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}{hint}"
        )
    return manager


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    max_gen_toks: Optional[int] = None,
    manager=None,
    include_path: Sequence[Union[str, Path]] = (),
    metadata: Optional[dict] = None,
    apply_chat_template: bool = False,
    seed: Optional[int] = 0,
    mixed_precision_dtype: Optional[torch.dtype] = None,
) -> dict:
    """lm-eval's ``simple_evaluate`` of ``tasks`` on ``model`` as it is in memory (its active
    adapter), through lm-eval's ``HFLM`` wrapper; returns lm-eval's results, per-question
    ``samples`` included.

    Args:
        model: A causal LM: a ``PeftModel`` over a 4-bit base, or any transformers model.
        tokenizer: Its tokenizer.
        tasks: lm-eval task (or group) names.
        num_fewshot: Few-shot examples per prompt; None: each task's own (gsm8k: 5).
        limit: Questions per task: the first N, or a fraction of them below 1; None: all.
        batch_size: Prompts per forward or ``generate``.
        max_gen_toks: Longest generation in tokens; None: lm-eval's 256.
        manager: A ``task_manager`` (built from ``include_path`` and ``metadata`` when None).
        apply_chat_template: Render prompts (few-shot turns included) with the tokenizer's chat
            template.
        seed: lm-eval's seeds (Python, NumPy, torch: it sets the global generators); None leaves
            them alone.
        mixed_precision_dtype: Autocast dtype for the forwards (a GPU run's ``bf16-mixed``).
    """
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(tasks, include_path, metadata)
    # HFLM puts the model in eval mode (and logs that the model is no name); `inference_mode`
    # restores train mode.
    with inference_mode(model), _quiet("lm_eval.models.huggingface", logging.ERROR):
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            mixed_precision_dtype=mixed_precision_dtype,
        )
        seeds = {
            "random_seed": seed,
            "numpy_random_seed": None if seed is None else 1234,
            "torch_random_seed": None if seed is None else 1234,
        }
        gen_kwargs = {"max_gen_toks": max_gen_toks} if max_gen_toks else None
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            gen_kwargs=gen_kwargs,
            apply_chat_template=apply_chat_template,
            log_samples=True,
            **seeds,
        )
    return results


class _quiet:
    """Raise a library logger's level for the duration."""

    def __init__(self, name: str, level: int):
        self.logger, self.level = logging.getLogger(name), level

    def __enter__(self):
        self.before = self.logger.level
        self.logger.setLevel(self.level)

    def __exit__(self, *exc):
        self.logger.setLevel(self.before)


def metrics_of(results: dict, prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """``{"lmeval/<task>/<metric>[/<filter>]": value}`` of lm-eval's results (standard errors left
    out; gsm8k: ``lmeval/gsm8k/exact_match/strict-match`` and ``.../flexible-extract``)."""
    metrics = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            suffix = f"/{filter_name}" if filter_name and filter_name != "none" else ""
            metrics[f"{prefix}/{task}/{metric}{suffix}"] = float(value)
    return metrics


def write_results(results: dict, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
    """lm-eval's results (without the per-question samples) as JSON at ``path``; the samples as
    JSONL beside it (``<name>.samples.jsonl``: each question, the generation, what each filter took,
    its scores; not the few-shot prompt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {key: value for key, value in results.items() if key != "samples"}
    path.write_text(json.dumps({**summary, **(extra or {})}, indent=2, default=str) + "\n")
    samples = path.with_name(path.stem + ".samples.jsonl")
    with samples.open("w") as out:
        for task, rows in (results.get("samples") or {}).items():
            for row in rows:
                kept = {k: v for k, v in row.items() if k not in _LEFT_OUT}
                out.write(json.dumps({"task": task, **kept}, default=str) + "\n")
    return path


# The few-shot prompt, and hashes.
_LEFT_OUT = (
    "arguments",
    "doc_hash",
    "prompt_hash",
    "target_hash",
)


def results_table(results: dict) -> str:
    """lm-eval's own markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)


# ---- during fit ----------------------------------------------------------------------------------


class LMEvalCallback(Callback):
    """lm-eval tasks on the model being trained, every ``every_n_steps`` optimizer steps of ``fit``.

    The model is the module's, with its adapter as it is at that step, in the trainer's precision;
    train mode, the adapter in use and the global random generators are as before afterwards, so the
    run goes on as without it. Metrics go to the run's loggers as
    ``lmeval/<task>/<metric>[/<filter>]`` at the step; lm-eval's results to
    ``<run folder>/lm_eval/step_<N>.json`` (and the per-question samples beside it). Rank 0
    evaluates; under DDP the other ranks wait.

    Args:
        tasks: lm-eval task names; ``gsm8k_local`` is the shipped local GSM8K task.
        every_n_steps: Optimizer steps between evaluations.
        num_fewshot: Few-shot examples per prompt; None: the task's own (gsm8k: 5).
        limit: Questions per task: the first N, or a fraction below 1; None: all.
        batch_size: Prompts per forward or ``generate``.
        max_gen_toks: Longest generation in tokens; None: lm-eval's 256.
        include_path: More folders of task YAMLs.
        metadata: Task metadata, e.g. ``{"gsm8k_test": FILE, "gsm8k_train": FILE}`` for
            ``gsm8k_local``.
        apply_chat_template: Render prompts with the tokenizer's chat template.
        adapter: The adapter to evaluate (see ``model.adapters``); the active one when None.
        eval_at_start: Also evaluate before the first optimizer step (the baseline).
        eval_at_end: Also evaluate after the last step when it is no multiple of ``every_n_steps``.
    """

    def __init__(
        self,
        tasks: list[str] = list(DEFAULT_TASKS),
        every_n_steps: PositiveInt = 200,
        num_fewshot: Optional[int] = None,
        limit: Optional[float] = 32,
        batch_size: PositiveInt = 8,
        max_gen_toks: Optional[PositiveInt] = None,
        include_path: Optional[list[str]] = None,
        metadata: Optional[dict[str, Any]] = None,
        apply_chat_template: bool = False,
        adapter: Optional[str] = None,
        eval_at_start: bool = False,
        eval_at_end: bool = True,
    ):
        super().__init__()
        if not tasks:
            raise UserError("LMEvalCallback: give at least one task")
        if every_n_steps < 1 or batch_size < 1:
            raise UserError("LMEvalCallback: every_n_steps and batch_size must be >= 1")
        if num_fewshot is not None and num_fewshot < 0:
            raise UserError(f"LMEvalCallback: num_fewshot must be >= 0, got {num_fewshot}")
        self.tasks, self.every_n_steps, self.num_fewshot, self.limit = (
            list(tasks),
            every_n_steps,
            num_fewshot,
            limit,
        )
        self.batch_size, self.max_gen_toks, self.include_path = (
            batch_size,
            max_gen_toks,
            list(include_path or []),
        )
        self.metadata, self.apply_chat_template, self.adapter = (
            metadata,
            apply_chat_template,
            adapter,
        )
        self.eval_at_start, self.eval_at_end = eval_at_start, eval_at_end
        self.history: list[dict] = []  # {"step", **metrics} per evaluation
        self._manager = None
        self._last_step: Optional[int] = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Unknown tasks and a missing lm-eval stop the run now.
        if stage == "fit" and trainer.is_global_zero:
            self._manager = task_manager(self.tasks, self.include_path, self.metadata)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if self.eval_at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.eval_at_end and trainer.global_step > 0:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> Optional[dict[str, float]]:
        """Run the tasks once per optimizer step (accumulation calls this per micro-batch); rank 0's
        metrics."""
        step = trainer.global_step
        if self._last_step == step:
            return None
        self._last_step = step
        log_dir = trainer.log_dir  # on every rank: a broadcast
        metrics = None
        if trainer.is_global_zero:
            metrics = self._evaluate(trainer, pl_module, step, log_dir)
        trainer.strategy.barrier("lmeval")
        return metrics

    def _evaluate(
        self, trainer: Trainer, pl_module: LightningModule, step: int, log_dir: Optional[str]
    ) -> dict:
        started = time.perf_counter()
        states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        try:
            with (
                trainer.precision_plugin.forward_context(),
                using_adapter(pl_module.model, self.adapter),
            ):
                results = evaluate_model(
                    pl_module.model,
                    pl_module.tokenizer,
                    self.tasks,
                    num_fewshot=self.num_fewshot,
                    limit=self.limit,
                    batch_size=self.batch_size,
                    max_gen_toks=self.max_gen_toks,
                    manager=self._manager,
                    include_path=self.include_path,
                    metadata=self.metadata,
                    apply_chat_template=self.apply_chat_template,
                    seed=None,
                )
        finally:
            # lm-eval draws from the global generators (few-shot sampling, its seeds): training must
            # not see it
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])
        metrics = metrics_of(results)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.append({"step": step, **metrics})
        if log_dir:
            write_results(results, Path(log_dir) / "lm_eval" / f"step_{step}.json", {"step": step})
        log.info(
            "lm-eval at step %d (%.0f s): %s",
            step,
            time.perf_counter() - started,
            ", ".join(f"{k.removeprefix(METRIC_PREFIX + '/')} {v:.4f}" for k, v in metrics.items()),
        )
        return metrics


# ---- the command ---------------------------------------------------------------------------------


def _limit(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def parse_args(args: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m qlora_lightning eval",
        description="lm-evaluation-harness tasks on a trained adapter on its 4-bit base, as "
        "trained (or on a merged model folder), in memory through lm-eval's HF wrapper.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--adapter",
        help="a saved adapter (fit's <run>/adapter): evaluated on its base, loaded and "
        "quantized as in training",
    )
    source.add_argument(
        "--model",
        help="a merged model folder (merge --output), or any transformers checkpoint folder",
    )
    parser.add_argument(
        "--extra_adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another adapter loaded beside --adapter under NAME (repeatable); --active picks one",
    )
    parser.add_argument(
        "--active",
        help="the adapter evaluated: 'default' (--adapter's, the default) or an "
        "--extra_adapter NAME",
    )
    parser.add_argument(
        "--base", help="with --adapter: base model id or directory (default: the one it records)"
    )
    parser.add_argument(
        "--without_adapter",
        action="store_true",
        help="with --adapter: score its base alone, loaded and quantized as in training, the "
        "adapter switched off (the score before training)",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help="comma-separated lm-eval task names (default: gsm8k_local, the shipped local GSM8K "
        "task)",
    )
    parser.add_argument(
        "--num_fewshot",
        type=int,
        help="few-shot examples per prompt (default: each task's own; gsm8k 5)",
    )
    parser.add_argument(
        "--limit",
        type=_limit,
        help="questions per task: the first N, or a fraction below 1 (default: all)",
    )
    parser.add_argument(
        "--batch_size", type=int, default=8, help="prompts per forward or generate (default: 8)"
    )
    parser.add_argument(
        "--max_gen_toks", type=int, help="longest generation in tokens (default: lm-eval's 256)"
    )
    parser.add_argument(
        "--apply_chat_template",
        action="store_true",
        help="render prompts (few-shot examples as turns) with the tokenizer's chat template",
    )
    parser.add_argument(
        "--include_path",
        action="append",
        default=[],
        help="a folder of more task YAMLs (repeatable)",
    )
    parser.add_argument("--metadata", help="task metadata as a JSON object (lm_eval's --metadata)")
    parser.add_argument(
        "--gsm8k_test",
        help="gsm8k_local: JSONL of the scored {question, answer} rows "
        "(default: the shipped examples)",
    )
    parser.add_argument(
        "--gsm8k_train",
        help="gsm8k_local: JSONL of the few-shot rows (default: the shipped examples)",
    )
    parser.add_argument(
        "--output",
        help="results JSON (default: <run folder>/lm_eval/<tasks>-<time>.json; the "
        "adapter's run folder, or the model folder)",
    )
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's random seed (default: 0)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to load the model (default: cuda when available)",
    )
    opts = parser.parse_args(args)
    opts.tasks = [task.strip() for task in opts.tasks.split(",") if task.strip()]
    if not opts.tasks:
        parser.error("--tasks names no task")
    if opts.batch_size < 1 or (opts.max_gen_toks is not None and opts.max_gen_toks < 1):
        parser.error("--batch_size and --max_gen_toks must be >= 1")
    if opts.num_fewshot is not None and opts.num_fewshot < 0:
        parser.error("--num_fewshot must be >= 0")
    if opts.without_adapter and not opts.adapter:
        parser.error("--without_adapter goes with --adapter (whose base it scores)")
    return opts


def task_metadata(opts: argparse.Namespace) -> dict:
    """``--metadata`` with ``--gsm8k_test`` / ``--gsm8k_train`` (as absolute paths) on top."""
    metadata = {}
    if opts.metadata:
        try:
            metadata = json.loads(opts.metadata)
        except ValueError as err:
            raise UserError(f"--metadata is not JSON: {first_line(err)}") from None
        if not isinstance(metadata, dict):
            raise UserError("--metadata must be a JSON object")
    for key in ("gsm8k_test", "gsm8k_train"):
        value = getattr(opts, key)
        if value:
            if not Path(value).is_file():
                raise UserError(f"--{key} '{value}' does not exist")
            metadata[key] = str(Path(value).resolve())
    return metadata


def _adapter_dir(path: str, what: str) -> Path:
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        why = (
            "does not exist"
            if not folder.exists()
            else "is not a PEFT adapter folder (no adapter_config.json)"
        )
        raise UserError(f"{what} '{path}' {why}")
    return folder


def load_for_eval(opts: argparse.Namespace):
    """(model, tokenizer, compute dtype) as ``opts`` name them (see ``parse_args``)."""
    from qlora_lightning.evaluate.merge import adapter_on_base, base_spec_for
    from qlora_lightning.model.build import load_tokenizer, tokenizer_source

    if opts.model:
        from transformers import AutoModelForCausalLM

        folder = Path(opts.model)
        if not (folder / "config.json").is_file():
            hint = (
                ": it is an adapter, use --adapter"
                if (folder / "adapter_config.json").is_file()
                else ""
            )
            what = "does not exist" if not folder.exists() else "holds no config.json"
            raise UserError(f"model folder '{folder}' {what}{hint}")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype="auto", device_map={"": opts.device}
            )
            tokenizer = load_tokenizer(str(folder))
        except (OSError, ValueError) as err:
            raise UserError(f"model folder '{folder}': {first_line(err)}") from None
        return model, tokenizer, None
    adapter = _adapter_dir(opts.adapter, "adapter")
    extra = {}
    for item in opts.extra_adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--extra_adapter '{item}': give NAME=PATH")
        extra[name] = str(_adapter_dir(path, f"adapter '{name}'"))
    spec = base_spec_for(adapter, opts.base)
    model = adapter_on_base(adapter, spec, opts.device)
    attach_adapters(model, AdapterSet(paths=extra, active=opts.active))
    saved = (
        adapter / "tokenizer_config.json"
    ).is_file()  # fit saves the tokenizer with the adapter
    tokenizer = load_tokenizer(str(adapter) if saved else tokenizer_source(spec))
    return model, tokenizer, getattr(torch, spec.compute_dtype)


def default_output(opts: argparse.Namespace) -> Path:
    """``<run folder>/lm_eval/<tasks>-<time>.json``: an adapter's run folder (the adapter's parent
    when it is a run's ``adapter``), else the adapter or model folder itself."""
    source = Path(opts.adapter or opts.model).resolve()
    folder = source.parent if opts.adapter and source.name == "adapter" else source
    name = re.sub(r"[^\w.+-]", "_", "+".join(opts.tasks))[:80]
    return folder / "lm_eval" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def main(args: Optional[Sequence[str]] = None) -> Path:
    """Run the eval CLI; return the results file (bad input raises ``UserError``: exit 1)."""
    opts = parse_args(args)
    metadata = task_metadata(opts)
    # Before minutes of loading a model.
    manager = task_manager(opts.tasks, opts.include_path, metadata)
    started = time.perf_counter()
    model, tokenizer, compute_dtype = load_for_eval(opts)
    on_gpu = str(opts.device).startswith("cuda")
    # On a GPU, training ran under bf16-mixed autocast: the forwards do here too.
    autocast = (
        compute_dtype if on_gpu and compute_dtype in (torch.bfloat16, torch.float16) else None
    )
    what = (
        "merged model"
        if not opts.adapter
        else f"{'its base, adapter off' if opts.without_adapter else 'adapter '}"
        f"{'' if opts.without_adapter else repr(model.active_adapter)} "
        f"on {model.peft_config[model.active_adapter].base_model_name_or_path}"
    )
    log.info("evaluating %s (%s) on %s", opts.adapter or opts.model, what, ", ".join(opts.tasks))
    with model.disable_adapter() if opts.without_adapter else contextlib.nullcontext():
        results = evaluate_model(
            model,
            tokenizer,
            opts.tasks,
            num_fewshot=opts.num_fewshot,
            limit=opts.limit,
            batch_size=opts.batch_size,
            max_gen_toks=opts.max_gen_toks,
            manager=manager,
            apply_chat_template=opts.apply_chat_template,
            seed=opts.seed,
            mixed_precision_dtype=autocast,
        )
    output = Path(opts.output) if opts.output else default_output(opts)
    source = {
        "adapter": str(opts.adapter) if opts.adapter else None,
        "model": opts.model,
        "what": what,
        "extra_adapters": opts.extra_adapter,
        "active": opts.active,
        "base": opts.base,
        "metadata": metadata,
        "command": "python -m qlora_lightning eval " + " ".join(args or sys.argv[2:]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(results, output, {"qlora_lightning": source})
    print(results_table(results))
    print(output)
    return output
