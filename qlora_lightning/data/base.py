"""The shared SFT DataModule: load (hub id or local file) -> messages -> tokens -> padded batches.

A dataset subclass only says where its data lives by default and how one raw row becomes
chat messages (``messages_fn``); everything else lives here.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from jsonargparse.typing import (
    NonNegativeInt,
    OpenUnitInterval,
    PositiveInt,
)
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from qlora_lightning.bounds import SequenceLength
from qlora_lightning.data.formats import (
    SFT_FORMATS,
    UNMAPPED,
    Format,
    detect_format,
    fields_read,
    role_map,
    sft_reader,
)
from qlora_lightning.data.packing import PackingMode, collate_packs, pack_examples
from qlora_lightning.data.sampling import EpochSeededSampler, LengthGroupedSampler
from qlora_lightning.data.tokenize import (
    RAW_JSON,
    ChatFormat,
    Message,
    RowError,
    TrainOn,
    decode_row,
    tokenize_messages,
)
from qlora_lightning.errors import UserError
from qlora_lightning.losses import IGNORE_INDEX
from qlora_lightning.model.build import load_tokenizer
from qlora_lightning.paths import shipped

# `datasets` (with pandas and pyarrow) is imported where data is loaded: a config's parse, which
# imports this module, then stays a second shorter (benchmarks/startup.py). The annotations name its
# types through these aliases, Any to mypy, without importing it; a TYPE_CHECKING import would not
# do, as jsonargparse runs those of the modules whose classes a config names.
Dataset = Any  # datasets.Dataset
DatasetDict = Any  # datasets.DatasetDict

log = logging.getLogger(__name__)

_LISTED = 100  # dropped rows listed one by one in data_report.json (all are counted)

_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}


# Column added to every raw split: where the row sits in its source ("line 12", "item 3",
# "test row 5"), so that every error and report entry points at the user's own file.
ORIGIN = "__origin__"


def load_raw_dataset(path: str, hub_config: Optional[str] = None) -> DatasetDict:
    """A local file or directory, or else a hub dataset id, as a DatasetDict of splits with an
    ``ORIGIN`` column."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = _FILE_BUILDERS.get("".join(local.suffixes[-1:]).lower())
            if builder is None:
                raise UserError(
                    f"data file '{path}': unsupported extension (use {', '.join(_FILE_BUILDERS)})"
                )
            try:
                raw = datasets.load_dataset(builder, data_files={"train": str(local)})
            except Exception:
                if builder != "json":
                    raise
                return _lenient_json(local)
            return datasets.DatasetDict(
                {"train": raw["train"].add_column(ORIGIN, _file_origins(local, raw["train"]))}
            )
        if local.is_dir():
            if (local / "dataset_dict.json").is_file():
                raw = datasets.load_from_disk(str(local))
            else:
                raw = datasets.load_dataset(str(local))
        elif path.startswith((".", "/", "~")) or Path(path).suffix in _FILE_BUILDERS:
            raise UserError(f"data path '{path}' does not exist")
        else:
            raw = datasets.load_dataset(path, hub_config)
        return datasets.DatasetDict(
            {
                name: ds.add_column(ORIGIN, [f"{name} row {i + 1}" for i in range(len(ds))])
                for name, ds in raw.items()
            }
        )
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load data '{path}': {first}") from None


def _file_origins(path: Path, ds: Dataset) -> list[str]:
    """Each row's place in its file: the line of a JSON Lines or text file, the item of a JSON
    array, else the row."""
    if path.suffix.lower() in (".jsonl", ".json", ".txt"):
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(4096).lstrip()
        if head.startswith("[") and path.suffix.lower() == ".json":
            return [f"item {i + 1}" for i in range(len(ds))]
        with path.open(encoding="utf-8", errors="replace") as f:
            # The loaders skip blank lines.
            lines = [n + 1 for n, line in enumerate(f) if line.strip()]
        if len(lines) == len(ds):
            return [f"line {n}" for n in lines]
    return [f"row {i + 1}" for i in range(len(ds))]


def resolve_tokenizer(
    tokenizer: Optional[Union[str, PreTrainedTokenizerBase]],
) -> PreTrainedTokenizerBase:
    """The DataModule's tokenizer, loaded when given by name."""
    if tokenizer is None:
        raise UserError("data.tokenizer is not set (the CLI takes it from the model)")
    return load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


def _lenient_json(path: Path) -> DatasetDict:
    """A JSON / JSONL file that arrow cannot read as one table (rows of clashing types, broken
    lines): one text column of per-row JSON, decoded and judged row by row in ``decode_row``."""
    import datasets

    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, list):
        rows = [(f"item {i + 1}", json.dumps(row)) for i, row in enumerate(whole)]
    else:
        rows = [(f"line {n + 1}", line) for n, line in enumerate(text.splitlines()) if line.strip()]
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {RAW_JSON: [line for _, line in rows], ORIGIN: [origin for origin, _ in rows]}
            )
        }
    )


def without_origin(row: dict) -> dict:
    """The row as its file has it: decoded (``decode_row``) and without the ``ORIGIN`` column."""
    return decode_row({key: value for key, value in row.items() if key != ORIGIN})


def _encode_row(
    row: dict,
    to_messages: Callable[[dict], list[Message]],
    tokenizer: PreTrainedTokenizerBase,
    fmt: ChatFormat,
    max_seq_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
    train_on: TrainOn,
) -> dict:
    """Module-level (not a method) so that `datasets` can hash it and cache the tokenized split."""
    try:
        messages = to_messages(without_origin(row))
        out = tokenize_messages(
            messages, tokenizer, fmt, max_seq_length, max_prompt_length, use_chat_template, train_on
        )
        return {
            **out,
            "final_line_lost": out["response_truncated"]
            and _final_line_lost(messages, out, tokenizer),
            "drop_reason": "",
        }
    except RowError as err:
        return {
            "input_ids": [],
            "labels": [],
            "prompt_truncated": False,
            "response_truncated": False,
            "final_line_lost": False,
            "drop_reason": str(err),
        }


def _final_line_lost(
    messages: list[Message], encoded: dict, tokenizer: PreTrainedTokenizerBase
) -> bool:
    """Whether a response cut on the right lost its last line (GSM8K's ``#### N``, the end of a code
    block)."""
    final = messages[-1]["content"].strip().splitlines()[-1]
    labels = encoded["labels"]
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1  # the last trained run: what is left of the last response
    kept = tokenizer.decode(labels[start:], skip_special_tokens=True)
    return "".join(final.split()) not in "".join(kept.split())  # tokenizers may move spaces


def _row_key(row: dict) -> str:
    """A row's content, for finding duplicates: its raw JSON text, or its fields as sorted JSON."""
    if RAW_JSON in row:
        return row[RAW_JSON]
    return json.dumps({k: v for k, v in row.items() if k != ORIGIN}, sort_keys=True, default=str)


def drop_duplicates(ds: Dataset, seen: dict[str, str]) -> tuple[Dataset, list[dict]]:
    """The rows whose content no earlier row had (``seen``: content -> origin, updated), and the
    others' entries."""
    keep, dropped = [], []
    for i, row in enumerate(ds):
        key = _row_key(row)
        if key in seen:
            dropped.append({"at": row[ORIGIN], "reason": f"duplicate ({seen[key]})"})
        else:
            seen[key] = row[ORIGIN]
            keep.append(i)
    return (ds.select(keep) if dropped else ds), dropped


class SFTDataModule(LightningDataModule):
    """Supervised fine-tuning data with loss on response tokens only.

    Args:
        path: Hub dataset id or a local file / directory (JSON, JSONL, CSV, Parquet, Arrow).
        tokenizer: Tokenizer hub id or directory; the CLI fills it in from the model.
        hub_config: Dataset config name on the hub (e.g. ``main`` for GSM8K).
        train_split: Split to train on.
        val_split: The dataset's own validation split; when the dataset lacks it,
            ``val_fraction`` of the training rows are held out instead.
        val_fraction: Fraction of training rows held out when there is no ``val_split``.
        num_samples: Train on this many rows drawn at random (all when None).
        num_val_samples: Validate on this many rows (all when None).
        seed: Seed of the sampling, the held-out split and the shuffling.
        max_seq_length: Longest example in tokens (see the truncation policy in
            ``data/tokenize.py``).
        batch_size: Examples per micro-batch; with packing, packs (of up to ``max_seq_length``
            tokens each) per micro-batch.
        num_workers: DataLoader worker processes.
        use_chat_template: Format turns with the tokenizer's chat template instead of
            ``user_template``.
        user_template: Text of a user turn with ``{content}``; ends with the cue before the
            response.
        system_template: Text of a system message with ``{content}``.
        pad_to_multiple_of: Pad each batch's length up to a multiple of this (tensor-core friendly).
        packing: ``off``: one example per row, padded. ``padded``: examples packed by best fit into
            rows of up to ``max_seq_length`` tokens, ``batch_size`` rows padded to the longest,
            position ids restarting at each example so attention never crosses one (for ``sdpa``,
            ``eager``, ``flex_attention``). ``padding_free``: the same packs flattened into one row
            with no padding at all (for ``flash_attention_2``/``_3``; exact but slower with
            ``sdpa``, whose T x T mask then spans the whole micro-batch). See ``data/packing.py``.
        group_by_length: Without packing, batch examples of similar length (less padding); the
            order is still random from batch to batch of length groups.
        strict: Fail on the first bad row (saying which and why) instead of dropping and counting
            it.
        format: How a row holds its turns (see ``data/formats.py``): ``auto`` detects it from the
            first rows and logs what it found.
        roles: Role names of the data -> ``system`` / ``user`` / ``assistant`` / ``tool``, on top of
            ``formats.DEFAULT_ROLES`` (``human`` -> user, ``gpt`` -> assistant, ``developer`` ->
            system, ...).
        unmapped_roles: A row with a role no entry maps stops the run (``error``, naming the role
            and the row's line), or is dropped and counted (``drop``). It is never trained by guess.
        train_on: ``all_assistant``: loss on every assistant turn; ``last_assistant``: on the last
            one only. System, user and tool turns are never trained.
        max_prompt_length: When a row is too long, its prompt is cut from the left down to no
            fewer than this many tokens, then its response from the right; default
            ``max_seq_length // 2``.
    """

    default_path: str = ""
    default_hub_config: Optional[str] = None
    default_user_template: str = ChatFormat.user_template

    def __init__(
        self,
        path: Optional[str] = None,
        tokenizer: Optional[Union[str, PreTrainedTokenizerBase]] = None,
        hub_config: Optional[str] = None,
        train_split: str = "train",
        val_split: Optional[str] = "test",
        val_fraction: OpenUnitInterval = 0.05,
        num_samples: Optional[PositiveInt] = None,
        num_val_samples: Optional[PositiveInt] = None,
        seed: int = 42,
        max_seq_length: SequenceLength = 512,
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
        use_chat_template: bool = False,
        user_template: Optional[str] = None,
        system_template: str = ChatFormat.system_template,
        pad_to_multiple_of: Optional[int] = None,
        packing: PackingMode = "off",
        group_by_length: bool = False,
        strict: bool = False,
        format: Format = "auto",
        roles: Optional[dict[str, str]] = None,
        unmapped_roles: Literal["error", "drop"] = "error",
        train_on: TrainOn = "all_assistant",
        max_prompt_length: Optional[PositiveInt] = None,
    ):
        super().__init__()
        self.path = shipped(path or self.default_path)
        self.hub_config = hub_config if hub_config is not None else self.default_hub_config
        self.tokenizer = tokenizer
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.num_samples, self.num_val_samples, self.seed = num_samples, num_val_samples, seed
        self.max_seq_length, self.batch_size, self.num_workers = (
            max_seq_length,
            batch_size,
            num_workers,
        )
        self.use_chat_template = use_chat_template
        self.chat_format = ChatFormat(user_template or self.default_user_template, system_template)
        if "{content}" not in self.chat_format.user_template:
            raise UserError(
                f"data.user_template must contain '{{content}}': {self.chat_format.user_template!r}"
            )
        if format != "auto" and format not in self.formats:
            raise UserError(
                f"data.format '{format}' does not apply to {type(self).__name__} "
                f"(use one of: auto, {', '.join(self.formats)})"
            )
        self.format, self.roles, self.unmapped_roles, self.train_on = (
            format,
            role_map(roles),
            unmapped_roles,
            train_on,
        )
        self.max_prompt_length = (
            self.max_seq_length // 2 if max_prompt_length is None else max_prompt_length
        )
        if self.max_prompt_length >= self.max_seq_length:
            raise UserError(
                f"data.max_prompt_length must be below max_seq_length ({self.max_seq_length}), "
                f"got {self.max_prompt_length}"
            )
        # The format read: data.format, or what `auto` finds when the data is read (until then, the
        # dataset's own).
        self.row_format: Optional[str] = self.native_format if format == "auto" else format
        self.pad_to_multiple_of = pad_to_multiple_of
        if group_by_length and packing != "off":
            raise UserError(
                "data.group_by_length applies only with data.packing 'off' (packs are already full)"
            )
        self.packing, self.group_by_length = packing, group_by_length
        self.splits: dict[str, Dataset] = {}
        self.strict = strict
        self.report: dict[str, dict] = {}  # per split: rows, kept, truncated, dropped
        self.read_report: dict[
            str, Any
        ] = {}  # before the split: rows, duplicates, fields no key reads

    formats: tuple[str, ...] = SFT_FORMATS  # the values of data.format this module reads
    # Whether ``encoder()``'s function maps batches of raw rows (and may turn one row into several).
    encodes_batches = False
    # What `auto` reads when no row shows a format (the dataset's own)
    native_format: Optional[str] = None
    preference = False  # whether rows are preference pairs (decides what `auto` may detect)

    def columns(self) -> Optional[dict]:
        """The column names of the ``columns`` format (its subclasses name them)."""
        return None

    def messages_fn(self) -> Callable[[dict], list[Message]]:
        """The row -> chat messages function of the format read; raises ``RowError`` for a bad row.

        A ``functools.partial`` of a module-level function: `datasets` hashes it to cache the
        tokenized split, which a bound method would defeat.
        """
        assert self.row_format is not None  # read by setup before a split is encoded
        return sft_reader(self.row_format, self.roles, self.columns())

    def encoder(self) -> tuple[Callable[..., dict], dict]:
        """The raw row -> tokens function that ``datasets.map`` runs, and its keyword arguments.

        The function returns the tokenized columns plus ``prompt_truncated``, ``response_truncated``
        and ``final_line_lost`` (bools) and ``drop_reason`` ('' for a kept row, else why it is
        dropped, counted and logged). Module-level, for caching. With ``encodes_batches`` it takes
        and returns columns of rows, ``ORIGIN`` included.
        """
        return _encode_row, {
            "to_messages": self.messages_fn(),
            "tokenizer": self.tokenizer,
            "fmt": self.chat_format,
            "max_seq_length": self.max_seq_length,
            "max_prompt_length": self.max_prompt_length,
            "use_chat_template": self.use_chat_template,
            "train_on": self.train_on,
        }

    @property
    def dropped(self) -> dict[str, Counter]:
        """Per split, how many rows were dropped for each reason."""
        return {name: Counter(r["dropped"]) for name, r in self.report.items()}

    def describe(self) -> dict:
        """What this data is, for run summaries."""
        return {
            "dataset": self.path,
            "format": self.row_format,
            "hub_config": self.hub_config,
            "num_samples": self.num_samples,
            "train_rows": len(self.splits["train"]) if "train" in self.splits else None,
            "val_rows": len(self.splits["val"]) if "val" in self.splits else None,
            "max_seq_length": self.max_seq_length,
            "read": self.read_report,
            "report": self.report,
            "packing": self.packing,
            "group_by_length": self.group_by_length,
        }  # packed: *_rows count packs

    # ---- Lightning hooks -------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        self.tokenizer = resolve_tokenizer(self.tokenizer)
        raw = load_raw_dataset(self.path, self.hub_config)
        if self.train_split not in raw:
            raise UserError(
                f"data '{self.path}' has no split '{self.train_split}' (it has: {', '.join(raw)})"
            )
        self.row_format = self._read_format(raw[self.train_split])
        train, val = self._split(raw)
        self.splits = {"train": self._encode(train, "train"), "val": self._encode(val, "val")}
        log.info(
            "data: %d train and %d validation rows of '%s' (format %s)",
            len(self.splits["train"]),
            len(self.splits["val"]),
            self.path,
            self.row_format,
        )
        if self.packing != "off":
            self.splits = {
                name: pack_examples(ds, self.max_seq_length) for name, ds in self.splits.items()
            }
        self._write_report()

    def _write_report(self) -> None:
        """``data_report.json`` next to the run's logs: rows read, kept, truncated, dropped and
        why."""
        trainer = self.trainer
        if trainer is None:
            return
        # On every rank: under DDP/FSDP the property is a broadcast from rank 0.
        log_dir = trainer.log_dir
        if not trainer.is_global_zero or not log_dir:
            return
        path = Path(log_dir) / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "data": self.path,
                    "format": self.row_format,
                    "read": self.read_report,
                    "splits": self.report,
                },
                indent=2,
            )
            + "\n"
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # ---- pieces ----------------------------------------------------------------------

    @staticmethod
    def first_rows(ds: Dataset) -> list[dict]:
        """Up to 20 first rows, decoded: what format detection looks at."""
        first = []
        for row in ds.select(range(min(len(ds), 20))):
            try:
                first.append(without_origin(row))
            except RowError:  # a broken row tells nothing of the format; it is dropped when encoded
                continue
        return first

    def _read_format(self, ds: Dataset) -> str:
        """``data.format``, or the format its first rows show (logged), after a warning for fields
        no key reads."""
        fmt: str = self.format
        if fmt == "auto":
            first = self.first_rows(ds)
            fmt = detect_format(first, self.preference, self.path, fallback=self.native_format)
            log.info(
                "data '%s': format '%s' (detected from the fields %s)",
                self.path,
                fmt,
                ", ".join(sorted(set().union(*(row.keys() for row in first)))),
            )
        read = fields_read(fmt, self.columns())
        if read is not None:
            self._warn_unused_fields(ds, read)
        return fmt

    def _warn_unused_fields(self, ds: Dataset, read: set[str]) -> None:
        """One warning naming each column no key reads that holds a value in some row (counted)."""
        unused = {}
        for name in set(ds.column_names) - read - {ORIGIN, RAW_JSON}:
            filled = sum(value not in (None, "", [], {}) for value in ds[name])
            if filled:
                unused[name] = filled
        if unused:
            self.read_report["unused_fields"] = unused
            detail = ", ".join(f"'{name}' ({n} rows)" for name, n in sorted(unused.items()))
            log.warning(
                "data '%s': fields read by no data key: %s (map them or remove them)",
                self.path,
                detail,
            )

    def _split(self, raw: DatasetDict) -> tuple[Dataset, Dataset]:
        # Duplicates go before the held-out split, so that no row sits in both splits. A dataset's
        # own splits are each its authors' choice: deduplicated apart.
        train, duplicates = drop_duplicates(raw[self.train_split], {})
        if self.val_split and self.val_split in raw:
            val, more = drop_duplicates(raw[self.val_split], {})
            duplicates += more
        else:
            try:
                held = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
            except ValueError:  # too few rows for both splits: datasets says so in sklearn's words
                raise UserError(
                    f"data '{self.path}': {len(train)} usable rows cannot make a training split "
                    f"and a validation split of {self.val_fraction:g}; add rows, or name a "
                    "val_split"
                ) from None
            train, val = held["train"], held["test"]
        self.read_report.update(
            rows=sum(len(raw[name]) for name in {self.train_split, self.val_split} & set(raw)),
            duplicates=len(duplicates),
            duplicate_rows=duplicates[:_LISTED],
        )
        if duplicates:
            log.warning(
                "data '%s': dropped %d duplicate rows (first: %s is a %s)",
                self.path,
                len(duplicates),
                duplicates[0]["at"],
                duplicates[0]["reason"],
            )
        return self._sample(train, self.num_samples), self._sample(val, self.num_val_samples)

    def _sample(self, ds: Dataset, n: Optional[int]) -> Dataset:
        if n is None or n >= len(ds):
            return ds
        return ds.shuffle(seed=self.seed).select(range(n))

    def _encode(self, ds: Dataset, name: str) -> Dataset:
        encode, fn_kwargs = self.encoder()
        encoded = ds.map(
            encode,
            fn_kwargs=fn_kwargs,
            batched=self.encodes_batches,
            remove_columns=[c for c in ds.column_names if c != ORIGIN],
            desc=f"tokenizing {name}",
        )
        drops = [
            {"at": at, "reason": why}
            for at, why in zip(encoded[ORIGIN], encoded["drop_reason"])
            if why
        ]
        self._refuse(drops, name)
        kept = encoded.filter(lambda r: r == "", input_columns="drop_reason")
        flags = [c for c in encoded.column_names if c.endswith(("_truncated", "_lost"))]
        reasons = Counter(drop["reason"] for drop in drops)
        self.report[name] = {
            "rows": len(encoded),
            "kept": len(kept),
            **{c: sum(kept[c]) for c in flags},
            "dropped": dict(reasons.most_common()),
            "dropped_rows": drops[:_LISTED],
        }
        if drops:
            detail = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
            log.warning(
                "%s split of '%s': dropped %d of %d rows (%s; first: %s)",
                name,
                self.path,
                len(drops),
                len(encoded),
                detail,
                drops[0]["at"],
            )
        cut = {c: self.report[name][c] for c in flags if self.report[name][c]}
        if cut:
            log.info(
                "%s split of '%s': %s (of %d rows, to %d tokens)",
                name,
                self.path,
                ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in cut.items()),
                len(kept),
                self.max_seq_length,
            )
        if len(kept) == 0:
            why = reasons.most_common(1)[0][0] if reasons else "the split is empty"
            raise UserError(
                f"no usable rows in the {name} split of '{self.path}': {why} "
                f"(columns: {', '.join(c for c in ds.column_names if c != ORIGIN)})"
            )
        return kept.remove_columns(["drop_reason", ORIGIN, *flags])

    def _refuse(self, drops: list[dict], name: str) -> None:
        """Stop on the first bad row under ``strict``, and on the first row a ``refusal_hint``
        answers for."""
        first: Optional[dict]
        hint: Optional[str]
        if drops and self.strict:
            first, hint = drops[0], "data.strict is on"
        else:
            first, hint = next(
                ((d, hint) for d in drops if (hint := self.refusal_hint(d["reason"]))), (None, None)
            )
        if first is None:
            return
        raise UserError(
            f"{first['at']} of '{self.path}' ({name} split): {first['reason']} ({hint})"
        )

    def refusal_hint(self, reason: str) -> Optional[str]:
        """What to do about a row dropped for ``reason`` when it must stop the run (a mistake in the
        data's layout, not one bad row), else None. An unmapped role stops it unless told to drop
        them."""
        if reason.startswith(UNMAPPED) and self.unmapped_roles == "error":
            return "map it with data.roles, or drop such rows with data.unmapped_roles: drop"
        return None

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        # Stateful: checkpoints record the position inside the epoch, so resuming never
        # repeats or skips a batch.
        sampler = None
        if shuffle:
            # A resumed run builds its loaders with the epoch already restored; over several ranks
            # the sampler shards the data itself (Lightning leaves a DistributedSampler alone).
            ranks = (
                {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank}
                if self.trainer
                else {}
            )
            if self.group_by_length:
                sampler = LengthGroupedSampler(
                    [len(ids) for ids in ds["input_ids"]], self.batch_size, self.seed, **ranks
                )
            else:
                sampler = EpochSeededSampler(ds, self.seed, **ranks)
            sampler.set_epoch(self.trainer.current_epoch if self.trainer else 0)
        # Its own generator: starting an epoch draws the workers' base seed from it, not from the
        # global generator that the dropout masks come from, so a checkpoint taken at the end of
        # an epoch resumes exactly too.
        # Pinned batches reach the GPU without the host waiting for the GPU's queue to drain.
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return StatefulDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            pin_memory=on_gpu,
        )

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        """Pad a list of examples (or packs) on the right to the longest (dynamic padding)."""
        if self.packing != "off":
            return collate_packs(
                rows,
                self.tokenizer.pad_token_id,
                self.packing == "padding_free",
                self.pad_to_multiple_of,
            )
        batch = pad_batch(rows, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        # Counted here, on the host: counting the mask on the GPU would make the host wait for it.
        batch["num_real_tokens"], batch["num_examples"] = (
            int(batch["attention_mask"].sum()),
            len(rows),
        )
        return batch


def pad_batch(
    rows: list[dict], pad_id: int, multiple: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """(B, T) input_ids / attention_mask / labels, right-padded; labels are -100 on padding."""
    length = max(len(r["input_ids"]) for r in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    batch = {
        "input_ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
        "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(r["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(r["labels"])
    return batch
