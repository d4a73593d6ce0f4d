"""Lazy package facades: a subpackage names what users, tests and benchmarks import from it, and
imports the module that defines a name only when that name is first asked for (PEP 562), so that
light commands (``info``, ``tasks``, ``--help``) start without torch. Library modules never import
through a facade: they import the module that defines what they use.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_names(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """The ``__getattr__`` and ``__all__`` of ``package`` for ``where`` (name -> its module in ``package``)."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{where[name]}", package), name)

    return __getattr__, sorted(where)
