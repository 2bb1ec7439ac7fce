"""Configuration mistakes answered before torch loads: a missing ``--config`` file, a key that the
command or a class does not take, a word where a number belongs.

LightningCLI can only say so after importing torch, Lightning and transformers (~10 s on 2 cores).
Every successful parse records what it learned (``record``): the command's top-level keys, the
Trainer's keys, and for each model and data class its constructor's keys and which of them are
integers or floats. The next command checks its config against that record first (``check``) and
stops in a fraction of a second on a mistake the record proves. Anything it cannot prove (a class
not seen yet, nested keys, values the classes validate themselves) goes on to LightningCLI, which
still checks everything; ``check`` never accepts a config, it only refuses some early.

The record lives beside the cached help (``help_cache.py``) under the same key, so a changed
source file or library version discards it.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Optional

from qlora_lightning.paths import cache_dir
from qlora_lightning.run import help_cache

_NUMBERS = (("int", int), ("float", float))
_SHORT_PREFIX = "qlora_lightning."  # the configs name the project's classes as qlora_lightning.NAME


def _path(command: str) -> Path:
    return cache_dir() / "config_keys" / f"{command}.json"


def _load(command: str) -> Optional[dict]:
    try:
        record = json.loads(_path(command).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == help_cache.source_key() else None


# ---- recording, after LightningCLI parsed a config --------------------------------------------


def record(command: str, config) -> None:
    """Keep the keys of ``config`` (the parsed namespace of ``command``) for ``check``. A cache
    folder that cannot be written costs only the next mistake's speed."""
    known = _load(command) or {"key": help_cache.source_key(), "classes": {}}
    known["top"] = sorted(vars(config))
    known["trainer"] = sorted(vars(config.trainer))
    for group in ("model", "data"):
        node = config.get(group)
        if node is not None and node.get("class_path") and node.get("init_args") is not None:
            known["classes"][node.class_path] = _class_keys(
                node.class_path, sorted(vars(node.init_args))
            )
    path = _path(command)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            json.dump(known, tmp)
        os.replace(tmp.name, path)
    except OSError:
        pass


def _class_keys(class_path: str, keys: list[str]) -> dict[str, Optional[list[str]]]:
    """Each constructor key of ``class_path``, with ``[kind, type name]`` where the key is a plain
    integer or float (``PositiveInt`` included), else None."""
    module, _, name = class_path.rpartition(".")
    numbers: dict[str, Optional[list[str]]] = {}
    # A subclass's annotation wins.
    for klass in reversed(getattr(importlib.import_module(module), name).__mro__):
        init = klass.__dict__.get("__init__")
        try:
            hints = typing.get_type_hints(init) if init is not None else {}
        except Exception:  # an annotation that does not resolve here: no type checks for that class
            continue
        numbers.update({name: _number_kind(hint) for name, hint in hints.items()})
    return {key: numbers.get(key) for key in keys}


def _number_kind(hint) -> Optional[list[str]]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:  # Optional[int]
        hint = args[0]
    if not isinstance(hint, type) or issubclass(hint, bool):
        return None
    return next(([kind, hint.__name__] for kind, base in _NUMBERS if issubclass(hint, base)), None)


# ---- checking, before anything heavy is imported ---------------------------------------------


def check(argv: list[str]) -> Optional[str]:
    """The first mistake in ``COMMAND [--config FILE]... [--KEY VALUE]...`` that the record proves,
    as one line without the ``error:`` prefix; None when there is none or the arguments are not of
    that simple shape."""
    command, rest = argv[0], argv[1:]
    pairs = _pairs(rest)
    if pairs is None:
        return None
    config: dict = {}
    overrides = []
    for key, value in pairs:
        if key == "config":
            if not Path(value).is_file():
                return f"--config {value}: no such file"
            loaded = _read_yaml(value)
            if not isinstance(loaded, dict):
                return None
            _merge(config, loaded)
        else:
            overrides.append((key, value))
    known = _load(command)
    if known is None:
        return None
    for key, value in overrides:
        _set(config, key.rstrip("+").split("."), _scalar(value))
    return _first_problem(command, config, known)


def _pairs(args: list[str]) -> Optional[list[tuple[str, str]]]:
    """``--key value`` and ``--key=value`` pairs; None for anything else (flags, positionals)."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            return None
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            return None
        pairs.append((key, value))
    return pairs


def _read_yaml(path: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None  # LightningCLI says what is wrong with it


def _scalar(text: str) -> Any:
    """A command-line value as LightningCLI reads it first: as YAML (``2`` is an int, ``two`` a
    string)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _set(config: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        if not isinstance(config.get(key), dict):
            config[key] = (
                {} if key not in config or config[key] is None else {"class_path": config[key]}
            )
        config = config[key]
    config[keys[-1]] = value


def _first_problem(command: str, config: dict, known: dict) -> Optional[str]:
    unknown = [key for key in config if key not in known["top"]]
    trainer = config.get("trainer")
    if isinstance(trainer, dict):
        unknown += [f"trainer.{key}" for key in trainer if key not in known["trainer"]]
    if unknown:
        return f"Subcommand '{command}' does not accept option '{unknown[0]}'"
    for group in ("model", "data"):
        node = config.get(group)
        if not isinstance(node, dict) or not isinstance(node.get("init_args"), dict):
            continue
        keys = _known_class(node.get("class_path"), known["classes"])
        if keys is None:
            continue
        for key, value in node["init_args"].items():
            if key not in keys:
                return f"{group}: Option '{key}' is not accepted"
            problem = _not_a_number(value, keys[key])
            if problem:
                return f"{group}.{key}: {problem}"
    return None


def _known_class(class_path: Any, classes: dict) -> Optional[dict]:
    """The recorded keys of ``class_path`` as a config names it: in full, or (for the project's own
    classes) as ``qlora_lightning.NAME`` or ``NAME``."""
    if not isinstance(class_path, str):
        return None
    if class_path in classes:
        return classes[class_path]
    name = class_path.removeprefix(_SHORT_PREFIX)
    if "." in name:
        return None
    found = [
        keys
        for path, keys in classes.items()
        if path.startswith(_SHORT_PREFIX) and path.rsplit(".", 1)[-1] == name
    ]
    return found[0] if len(found) == 1 else None


def _not_a_number(value: Any, kind: Optional[list[str]]) -> Optional[str]:
    """LightningCLI's complaint about a string where an int or float belongs; other values (None,
    bounds, other types) are left to it."""
    if kind is None or not isinstance(value, str):
        return None
    number, type_name = kind
    try:
        (int if number == "int" else float)(value)
    except ValueError as err:
        return f"Not of type {type_name}: {err}"
    return None
