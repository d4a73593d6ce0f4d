"""Inputs (one registry of sources: adapter formats, text-to-image files, checkpoints, the Hub) and
outputs (one registry of extraction writers).

This facade names, lazily, what tests, benchmarks and users import (nothing is imported until a
name is asked for, so that light commands start fast); the package's own modules import each
other directly, never through it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: name -> the module of this package that defines it
_WHERE = {
    "AdapterSource": "peft",
    "CheckpointTask": "checkpoint_source",
    "LoraFactors": "factors",
    "LoraStack": "factors",
    "OpenFiles": "stack",
    "READERS": "sources",
    "TaskSource": "task_source",
    "WRITERS": "writers",
    "checkpoint_tasks": "checkpoint_source",
    "classify": "sources",
    "extract": "extraction",
    "extract_all": "extraction",
    "local_path_values": "provenance",
    "looks_local": "provenance",
    "open_adapters": "sources",
    "open_inputs": "sources",
    "path_to_sgm": "t2i.naming",
    "read_module_stack": "stack",
    "recorded_source": "provenance",
    "write_synthetic_adapters": "synthetic",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
