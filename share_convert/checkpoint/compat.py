"""Compatibility between format versions: every version read through the accessors of the reader.

Format version 1 stored one tensor per task, module and side, and each task's record in its
module's JSON entry; version 2 stacks them (docs/format.md). Callers see one form:

- :class:`LazyModules` / :class:`ModuleView`: a version-2 (or 3) manifest's modules presented as
  in version 1, each entry with its ``tasks`` records (and its groups' task lists), read from the
  record tables on first use;
- :func:`v1_task_tensors`, :func:`v1_task_rows`, :func:`v1_coefficients`: a version-1 file's
  per-task tensors in the forms :mod:`.coefficients` gives for version 2.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..dtypes import ST_OF, torch_dtype
from .format import TASK_PARTS
from .records import Chain, RecordTable, TaskRows
from .tensors import TensorStore

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .entries import ModuleEntry


class Reader(Protocol):
    """What :mod:`.compat` and :mod:`.coefficients` use of a checkpoint reader
    (:class:`~share_convert.checkpoint.reader.Checkpoint`)."""

    path: Path
    version: int
    store: TensorStore

    @property
    def modules(self) -> Mapping[str, dict[str, Any]]: ...

    def has(self, name: str) -> bool: ...

    def module(self, name: str) -> ModuleEntry: ...

    def tensor(self, name: str) -> torch.Tensor: ...

    def tensor_meta(self, name: str) -> tuple[list[int], str]: ...

    def stacked(self, names: list[str]) -> torch.Tensor: ...

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...

    def chain(self, prefix: str) -> Chain | None: ...

    def task_modules(self, task: str) -> dict[str, dict[str, Any]]: ...

    def task_tensors(self, task: str, module: str) -> dict[str, torch.Tensor]: ...

    def bases(self, module: str, task: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


class LazyModules(Mapping):
    """A version-2 manifest's modules, each presented as in version 1 (with its ``tasks`` records)."""

    def __init__(
        self,
        module_records: Callable[[int], RecordTable],
        stored: dict[str, dict[str, Any]],
        lock: threading.RLock,
    ):
        self._module_records, self._stored, self._lock = module_records, stored, lock
        self._columns = {name: j for j, name in enumerate(stored)}
        self._views: dict[str, dict[str, Any]] = {}

    @property
    def opened(self) -> bool:
        """Whether an entry has been asked for (its records are then at hand for every module)."""
        return bool(self._views)

    def __getitem__(self, name: str) -> dict[str, Any]:
        with self._lock:
            view = self._views.get(name)
            if view is None:
                view = ModuleView(self._stored[name], self._module_records, self._columns[name], self._lock)
                self._views[name] = view
            return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def __contains__(self, name: object) -> bool:
        return name in self._stored


class ModuleView(dict):
    """One module's manifest entry; ``tasks`` (a :class:`RecordTable`) and the groups' task lists
    are read from the record tables on first use."""

    def __init__(
        self,
        stored: dict[str, Any],
        module_records: Callable[[int], RecordTable],
        column: int,
        lock: threading.RLock,
    ):
        super().__init__(stored)
        self._module_records, self._column, self._lock = module_records, column, lock
        self._complete = False

    def _complete_entry(self) -> None:
        if self._complete:
            return
        with self._lock:
            if not self._complete:
                tasks = self._module_records(self._column)
                dict.__setitem__(self, "tasks", tasks)
                if dict.__contains__(self, "groups"):
                    groups = [dict(g, tasks=[]) for g in dict.__getitem__(self, "groups")]
                    for t, g in zip(tasks.tasks, tasks.int_column("group").tolist()):
                        groups[g]["tasks"].append(t)
                    dict.__setitem__(self, "groups", groups)
                self._complete = True

    def __getitem__(self, key: str) -> Any:
        if key in ("tasks", "groups"):
            self._complete_entry()
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __contains__(self, key: object) -> bool:
        return key == "tasks" or dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._complete_entry()
        return dict.__iter__(self)

    def keys(self):  # type: ignore[override]
        self._complete_entry()
        return dict.keys(self)

    def items(self):  # type: ignore[override]
        self._complete_entry()
        return dict.items(self)

    def values(self):  # type: ignore[override]
        self._complete_entry()
        return dict.values(self)

    def copy(self) -> dict[str, Any]:
        self._complete_entry()
        return dict(dict.items(self))


def v1_task_tensors(ckpt: Reader, task: str, module: str) -> dict[str, torch.Tensor]:
    """One task's tensors in one module of a version-1 file, as stored (``tasks/<task>/<module>/<part>``)."""
    out = {}
    for part in TASK_PARTS:
        name = f"tasks/{task}/{module}/{part}"
        if ckpt.has(name):
            out[part] = ckpt.tensor(name)
    return out


def v1_task_rows(ckpt: Reader, module: str, tasks: Sequence[str], prefixes: list[str]) -> TaskRows:
    """The tensors of ``tasks`` in ``module`` of a version-1 file, stacked as version 2 stores them
    (one read per task), in the module's dtype."""
    dtype = torch_dtype(ST_OF[ckpt.modules[module]["dtype"]])
    return TaskRows.of_parts([(t, p, ckpt.task_tensors(t, module)) for t, p in zip(tasks, prefixes)], dtype)


def v1_coefficients(
    ckpt: Reader, module: str, tasks: Sequence[str], side: str, table: RecordTable, k: int, width: int
) -> torch.Tensor:
    """:meth:`~share_convert.checkpoint.reader.Checkpoint.coefficients` of a version-1 file: one read per rank."""
    import torch

    ranks: np.ndarray = table.int_column("rank")
    X = torch.zeros(len(tasks), k, width, dtype=torch.float64)
    by_rank: dict[int, list[int]] = {}
    for j, p in enumerate(ranks.tolist()):
        if p:
            by_rank.setdefault(p, []).append(j)
    for p, idx in by_rank.items():
        X[idx, :, :p] = ckpt.stacked([f"tasks/{tasks[j]}/{module}/coef_{side}" for j in idx]).double()
    return X
