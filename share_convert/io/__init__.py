"""Inputs (adapter formats, text-to-image files, the Hub) and outputs (extracted adapters).

This facade names, lazily, what tests, benchmarks and users import (nothing is imported until a
name is asked for, so that light commands start fast); the package's own modules import each
other directly, never through it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: name -> the module of this package that defines it
_WHERE = {
    "AdapterSource": "formats",
    "LoraFactors": "formats",
    "LoraStack": "formats",
    "OpenFiles": "formats",
    "extract": "extraction",
    "extract_all": "extraction",
    "local_path_values": "provenance",
    "looks_local": "provenance",
    "open_adapters": "formats",
    "path_to_sgm": "t2i",
    "read_module_stack": "formats",
    "recorded_source": "provenance",
    "write_synthetic_adapters": "synthetic",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
