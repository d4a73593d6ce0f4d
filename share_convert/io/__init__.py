"""Inputs (one registry of sources: adapter formats, text-to-image files, checkpoints, the Hub) and
outputs (one registry of extraction writers).

A lazy facade (:mod:`share_convert.facade`): what users, tests and benchmarks import from here.
"""

from __future__ import annotations

from ..facade import lazy_names

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

__getattr__, __all__ = lazy_names(__name__, _WHERE)
