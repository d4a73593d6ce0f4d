"""Serving a checkpoint's tasks in PyTorch, and training new tasks inside its bases.

A lazy facade (:mod:`share_convert.facade`): what users, tests and benchmarks import from here.
"""

from __future__ import annotations

from ..facade import lazy_names

#: name -> the module of this package that defines it
_WHERE = {
    "LoadReport": "tasks",
    "ModuleLoad": "tasks",
    "ShareHead": "heads",
    "ShareLayer": "layers",
    "ShareModel": "model",
    "TrainableTask": "training",
    "add_trainable_task": "training",
}

__getattr__, __all__ = lazy_names(__name__, _WHERE)
