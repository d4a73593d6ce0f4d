"""What a checkpoint says about where its tasks came from, and what in it points at this machine.

A checkpoint is meant to be shared (``push``), so it records a local input by its own name only
(``/home/alice/clients/acme/adapters/sst2`` → ``sst2``), never the folders above it, which name
the user, their clients and their layout; ``hf://`` addresses are public provenance and are kept
verbatim. The output of a merge therefore no longer depends on where its inputs lie.

Values copied from the inputs (an adapter config's ``base_model_name_or_path``, kohya ``ss_*``
metadata, records of checkpoints made by older versions) can still be local paths:
:func:`local_path_values` finds them so that ``push`` can say so before uploading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

#: absolute POSIX paths, home folders, explicit relative paths, Windows drives and shares, file URLs
_LOCAL = re.compile(r"^(/|~|\.\.?$|\.\.?[/\\]|[A-Za-z]:[/\\]|\\\\|file:)")
#: keys whose value names a model that a local folder of that name would stand for
_MODEL_KEY = re.compile(r"name_or_path$")


def recorded_source(origin: str) -> str:
    """What the manifest records for an input typed as ``origin``: an ``hf://`` address verbatim,
    a local file or folder by its own name (``adapters/sst2`` → ``sst2``, ``x.safetensors`` → itself)."""
    if origin.startswith("hf://"):
        return origin
    text = origin.rstrip("/\\") or origin
    name = PureWindowsPath(text).name if "\\" in text else Path(text).name
    if name in ("", ".", ".."):
        name = Path(os.path.abspath(text)).name
    return name or "/"


def looks_local(value: str, *, model_key: bool = False) -> bool:
    """Whether ``value`` reads as a path on some machine: absolute, ``~``, ``./``, ``../``, a Windows
    drive or share, a ``file:`` URL; for a model reference (``model_key``), also an existing local folder."""
    if _LOCAL.match(value):
        return True
    return model_key and "://" not in value and os.path.isdir(value)


@dataclass(frozen=True)
class LocalValue:
    """A recorded value that looks like a local path: in ``task``'s record (None: elsewhere in the
    manifest) at ``field`` (dotted, e.g. ``adapter_config.base_model_name_or_path``)."""

    task: str | None
    field: str
    value: str

    def describe(self) -> str:
        where = f"task {self.task!r}, {self.field}" if self.task is not None else self.field
        return f"{where} = {self.value!r}"

    def as_json(self) -> dict[str, Any]:
        return {"task": self.task, "field": self.field, "value": self.value}


def _strings(value: Any, field: str, *, keys_are_data: bool = False) -> Iterator[tuple[str, str]]:
    """Every string under ``value`` with its dotted field. JSON held in a string (kohya's
    ``ss_dataset_dirs``, ``ss_tag_frequency``) is looked into as well, its keys included: kohya
    keys those by folder."""
    if isinstance(value, dict):
        for key, item in value.items():
            if keys_are_data and isinstance(key, str):
                yield field, key
            yield from _strings(item, f"{field}.{key}" if field else str(key), keys_are_data=keys_are_data)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{field}[{i}]", keys_are_data=keys_are_data)
    elif isinstance(value, str):
        yield field, value
        if value[:1] in ("{", "["):
            try:
                inner = json.loads(value)
            except ValueError:
                return
            yield from _strings(inner, field, keys_are_data=True)


def local_path_values(manifest: dict[str, Any]) -> list[LocalValue]:
    """The values of a checkpoint's manifest that look like local paths (see :func:`looks_local`):
    every string of the task records (sources, adapter configs, kohya metadata) and of the
    manifest outside the per-module records, each listed once per task and field."""
    found: dict[tuple[str | None, str, str], None] = {}
    for task, record in (manifest.get("tasks") or {}).items():
        for field, value in _strings(record, ""):
            if looks_local(value, model_key=bool(_MODEL_KEY.search(field))):
                found.setdefault((task, field, value))
    rest = {k: v for k, v in manifest.items() if k not in ("tasks", "modules", "tensors", "record_columns")}
    for field, value in _strings(rest, ""):
        if looks_local(value, model_key=bool(_MODEL_KEY.search(field))):
            found.setdefault((None, field, value))
    return [LocalValue(*key) for key in found]
