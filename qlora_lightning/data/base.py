"""The shared SFT DataModule: load (hub id or local file) -> messages -> tokens -> padded batches.

A dataset subclass only says where its data lives by default and how one raw row becomes
chat messages (``messages_fn``); everything else lives here.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Union

import datasets
import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt, restricted_number_type
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from qlora_lightning.data.packing import PackingMode, collate_packs, pack_examples
from qlora_lightning.data.sampling import EpochSeededSampler, LengthGroupedSampler
from qlora_lightning.data.tokenize import RAW_JSON, ChatFormat, Message, RowError, decode_row, tokenize_messages
from qlora_lightning.errors import UserError
from qlora_lightning.losses import IGNORE_INDEX
from qlora_lightning.model import load_tokenizer
from qlora_lightning.paths import shipped

log = logging.getLogger(__name__)

# Room for a prompt and a response; checked when a config is parsed.
SequenceLength = restricted_number_type("SequenceLength", int, [(">=", 16)])

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                  ".arrow": "arrow", ".txt": "text"}


def load_raw_dataset(path: str, hub_config: Optional[str] = None) -> datasets.DatasetDict:
    """A local file or directory, or else a hub dataset id, as a DatasetDict of splits."""
    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = _FILE_BUILDERS.get("".join(local.suffixes[-1:]).lower())
            if builder is None:
                raise UserError(f"data file '{path}': unsupported extension (use {', '.join(_FILE_BUILDERS)})")
            try:
                return datasets.load_dataset(builder, data_files={"train": str(local)})
            except Exception:
                if builder != "json":
                    raise
                return _lenient_json(local)
        if local.is_dir():
            if (local / "dataset_dict.json").is_file():
                return datasets.load_from_disk(str(local))
            return datasets.load_dataset(str(local))
        if path.startswith((".", "/", "~")) or Path(path).suffix in _FILE_BUILDERS:
            raise UserError(f"data path '{path}' does not exist")
        return datasets.load_dataset(path, hub_config)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load data '{path}': {first}") from None


def resolve_tokenizer(tokenizer: Optional[Union[str, PreTrainedTokenizerBase]]) -> PreTrainedTokenizerBase:
    """The DataModule's tokenizer, loaded when given by name."""
    if tokenizer is None:
        raise UserError("data.tokenizer is not set (the CLI takes it from the model)")
    return load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


def _lenient_json(path: Path) -> datasets.DatasetDict:
    """A JSON / JSONL file that arrow cannot read as one table (rows of clashing types, broken
    lines): one text column of per-row JSON, decoded and judged row by row in ``decode_row``."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, list):
        lines = [json.dumps(row) for row in whole]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({RAW_JSON: lines})})


def _encode_row(row: dict, to_messages: Callable[[dict], list[Message]], tokenizer: PreTrainedTokenizerBase,
                fmt: ChatFormat, max_seq_length: int, use_chat_template: bool) -> dict:
    """Module-level (not a method) so that `datasets` can hash it and cache the tokenized split."""
    try:
        out = tokenize_messages(to_messages(decode_row(row)), tokenizer, fmt, max_seq_length, use_chat_template)
        return {**out, "drop_reason": ""}
    except RowError as err:
        return {"input_ids": [], "labels": [], "truncated": False, "drop_reason": str(err)}


def _mark_duplicates(encoded: datasets.Dataset) -> tuple[datasets.Dataset, Counter]:
    """Mark as ``duplicate`` each kept row whose tokens repeat an earlier one; count all drop reasons."""
    columns = [c for c in encoded.column_names if c not in ("drop_reason", "truncated")]
    seen, reasons, marks = set(), Counter(), []
    for row in encoded:
        reason = row["drop_reason"]
        if not reason:
            key = hash(tuple(tuple(row[c]) if isinstance(row[c], list) else row[c] for c in columns))
            reason = "duplicate" if key in seen else ""
            seen.add(key)
        marks.append(reason)
        reasons.update([reason] if reason else [])
    if reasons["duplicate"]:
        encoded = encoded.remove_columns("drop_reason").add_column("drop_reason", marks)
    return encoded, reasons


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
        max_seq_length: Longest example in tokens (see the truncation policy in ``data/tokenize.py``).
        batch_size: Examples per micro-batch; with packing, packs (of up to ``max_seq_length``
            tokens each) per micro-batch.
        num_workers: DataLoader worker processes.
        use_chat_template: Format turns with the tokenizer's chat template instead of ``user_template``.
        user_template: Text of a user turn with ``{content}``; ends with the cue before the response.
        system_template: Text of a system message with ``{content}``.
        pad_to_multiple_of: Pad each batch's length up to a multiple of this (tensor-core friendly).
        packing: ``off``: one example per row, padded. ``padded``: examples packed by best fit
            into rows of up to ``max_seq_length`` tokens, ``batch_size`` rows padded to the longest,
            position ids restarting at each example so attention never crosses one (for ``sdpa``,
            ``eager``, ``flex_attention``). ``padding_free``: the same packs flattened into one row
            with no padding at all (for ``flash_attention_2``/``_3``; exact but slower with ``sdpa``,
            whose T x T mask then spans the whole micro-batch). See ``data/packing.py``.
        group_by_length: Without packing, batch examples of similar length (less padding); the
            order is still random from batch to batch of length groups.
        strict: Fail on the first bad row (saying which and why) instead of dropping and counting it.
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
    ):
        super().__init__()
        self.path = shipped(path or self.default_path)
        self.hub_config = hub_config if hub_config is not None else self.default_hub_config
        self.tokenizer = tokenizer
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.num_samples, self.num_val_samples, self.seed = num_samples, num_val_samples, seed
        self.max_seq_length, self.batch_size, self.num_workers = max_seq_length, batch_size, num_workers
        self.use_chat_template = use_chat_template
        self.format = ChatFormat(user_template or self.default_user_template, system_template)
        if "{content}" not in self.format.user_template:
            raise UserError(f"data.user_template must contain '{{content}}': {self.format.user_template!r}")
        self.pad_to_multiple_of = pad_to_multiple_of
        if group_by_length and packing != "off":
            raise UserError("data.group_by_length applies only with data.packing 'off' (packs are already full)")
        self.packing, self.group_by_length = packing, group_by_length
        self.splits: dict[str, datasets.Dataset] = {}
        self.strict = strict
        self.report: dict[str, dict] = {}  # per split: rows, kept, truncated, dropped {reason: count}

    def messages_fn(self) -> Callable[[dict], list[Message]]:
        """The row -> chat messages function of this dataset; raises ``RowError`` for a bad row.

        Subclasses return a module-level function (or a ``functools.partial`` of one): `datasets`
        hashes it to cache the tokenized split, which a bound method would defeat.
        """
        raise NotImplementedError

    def encoder(self) -> tuple[Callable[..., dict], dict]:
        """The raw row -> tokens function that ``datasets.map`` runs, and its keyword arguments.

        The function returns the tokenized columns plus ``truncated`` (bool) and ``drop_reason``
        ('' for a kept row, else why it is dropped, counted and logged). Module-level, for caching.
        """
        return _encode_row, {"to_messages": self.messages_fn(), "tokenizer": self.tokenizer, "fmt": self.format,
                             "max_seq_length": self.max_seq_length, "use_chat_template": self.use_chat_template}

    @property
    def dropped(self) -> dict[str, Counter]:
        """Per split, how many rows were dropped for each reason."""
        return {name: Counter(r["dropped"]) for name, r in self.report.items()}

    def describe(self) -> dict:
        """What this data is, for run summaries."""
        return {"dataset": self.path, "hub_config": self.hub_config, "num_samples": self.num_samples,
                "train_rows": len(self.splits["train"]) if "train" in self.splits else None,
                "val_rows": len(self.splits["val"]) if "val" in self.splits else None,
                "max_seq_length": self.max_seq_length, "report": self.report,
                "packing": self.packing, "group_by_length": self.group_by_length}  # packed: *_rows count packs

    # ---- Lightning hooks -------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        self.tokenizer = resolve_tokenizer(self.tokenizer)
        raw = load_raw_dataset(self.path, self.hub_config)
        train, val = self._split(raw)
        self.splits = {"train": self._encode(train, "train"), "val": self._encode(val, "val")}
        if self.packing != "off":
            self.splits = {name: pack_examples(ds, self.max_seq_length) for name, ds in self.splits.items()}
        self._write_report()

    def _write_report(self) -> None:
        """``data_report.json`` next to the run's logs: rows read, kept, truncated, dropped and why."""
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # on every rank: under DDP/FSDP the property is a broadcast from rank 0
        if not trainer.is_global_zero or not log_dir:
            return
        path = Path(log_dir) / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"data": self.path, "splits": self.report}, indent=2) + "\n")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # ---- pieces ----------------------------------------------------------------------

    def _split(self, raw: datasets.DatasetDict) -> tuple[datasets.Dataset, datasets.Dataset]:
        if self.train_split not in raw:
            raise UserError(f"data '{self.path}' has no split '{self.train_split}' (it has: {', '.join(raw)})")
        train = raw[self.train_split]
        if self.val_split and self.val_split in raw:
            val = raw[self.val_split]
        else:
            held = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
            train, val = held["train"], held["test"]
        return self._sample(train, self.num_samples), self._sample(val, self.num_val_samples)

    def _sample(self, ds: datasets.Dataset, n: Optional[int]) -> datasets.Dataset:
        if n is None or n >= len(ds):
            return ds
        return ds.shuffle(seed=self.seed).select(range(n))

    def _encode(self, ds: datasets.Dataset, name: str) -> datasets.Dataset:
        encode, fn_kwargs = self.encoder()
        encoded = ds.map(
            encode,
            fn_kwargs=fn_kwargs,
            remove_columns=ds.column_names,
            desc=f"tokenizing {name}",
        )
        encoded, reasons = _mark_duplicates(encoded)
        if self.strict and reasons:
            first = next(i for i, r in enumerate(encoded["drop_reason"]) if r)
            raise UserError(f"row {first} of the {name} split of '{self.path}': {encoded[first]['drop_reason']} "
                            "(data.strict is on)")
        kept = encoded.filter(lambda r: r == "", input_columns="drop_reason").remove_columns("drop_reason")
        truncated = sum(kept["truncated"])
        self.report[name] = {"rows": len(encoded), "kept": len(kept), "truncated": truncated,
                             "dropped": dict(reasons.most_common())}
        if reasons:
            detail = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
            log.warning("%s split of '%s': dropped %d of %d rows (%s)", name, self.path, sum(reasons.values()),
                        len(encoded), detail)
        if truncated:
            log.info("%s split of '%s': truncated %d rows to %d tokens", name, self.path, truncated,
                     self.max_seq_length)
        if len(kept) == 0:
            why = reasons.most_common(1)[0][0] if reasons else "the split is empty"
            raise UserError(f"no usable rows in the {name} split of '{self.path}': {why} "
                            f"(columns: {', '.join(ds.column_names)})")
        return kept.remove_columns("truncated")

    def _loader(self, ds: datasets.Dataset, shuffle: bool) -> DataLoader:
        # Stateful: checkpoints record the position inside the epoch, so resuming never
        # repeats or skips a batch.
        sampler = None
        if shuffle:
            # A resumed run builds its loaders with the epoch already restored; over several ranks
            # the sampler shards the data itself (Lightning leaves a DistributedSampler alone).
            ranks = {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank} if self.trainer else {}
            if self.group_by_length:
                sampler = LengthGroupedSampler([len(ids) for ids in ds["input_ids"]], self.batch_size, self.seed,
                                               **ranks)
            else:
                sampler = EpochSeededSampler(ds, self.seed, **ranks)
            sampler.set_epoch(self.trainer.current_epoch if self.trainer else 0)
        # Its own generator: starting an epoch draws the workers' base seed from it, not from the
        # global generator that the dropout masks come from, so a checkpoint taken at the end of
        # an epoch resumes exactly too.
        # Pinned batches reach the GPU without the host waiting for the GPU's queue to drain.
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return StatefulDataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                                  collate_fn=self.collate, persistent_workers=self.num_workers > 0,
                                  generator=torch.Generator().manual_seed(self.seed), pin_memory=on_gpu)

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        """Pad a list of examples (or packs) on the right to the longest (dynamic padding)."""
        if self.packing != "off":
            return collate_packs(rows, self.tokenizer.pad_token_id, self.packing == "padding_free",
                                 self.pad_to_multiple_of)
        batch = pad_batch(rows, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        # Counted here, on the host: counting the mask on the GPU would make the host wait for it.
        batch["num_real_tokens"], batch["num_examples"] = int(batch["attention_mask"].sum()), len(rows)
        return batch


def pad_batch(rows: list[dict], pad_id: int, multiple: Optional[int] = None) -> dict[str, torch.Tensor]:
    """(B, T) input_ids / attention_mask / labels, right-padded; labels are -100 on padding."""
    length = max(len(r["input_ids"]) for r in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    batch = {"input_ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
             "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(r["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(r["labels"])
    return batch
