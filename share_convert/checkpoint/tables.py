"""A checkpoint's per-(task, module) records as the reader presents them: tables, per task, per module.

Format version 2 stores the records as two dense tables (``records/int``, ``records/float``;
:mod:`.records`); version 1 as JSON in each module's entry. :class:`TaskRecords` gives both the
same accessors: the tables, one task's rows (read alone, so that extracting one task reads a
small part of the file), one module's records, and the history's last entry completed from them.

The tables are untrusted input: before any row of them is used, :meth:`TaskRecords.check_rows`
checks every position, rank, group and first row against the manifest and the shapes of the
stacked tensors they index, so that a crafted file is refused in one line, not by a traceback.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError, UnknownTaskError
from .compat import LazyModules
from .records import FLOAT, INT, RECORD_FLOAT, RECORD_INT, RecordTable, record_dict, record_tables
from .tensors import TensorStore


class TaskRecords:
    """The records of one checkpoint (``manifest``, format ``version``), read from ``store``."""

    def __init__(self, store: TensorStore, manifest: dict[str, Any], version: int, lock: threading.RLock, path: Path):
        self.store, self.manifest, self.version, self.path = store, manifest, version, path
        self._lock = lock
        self._tables: tuple[np.ndarray, np.ndarray] | None = None
        self._task_modules: dict[str, dict[str, dict[str, Any]]] = {}
        self._names: list[str] | None = None
        self._limits: dict[str, np.ndarray] | None = None
        self.modules: Mapping[str, dict[str, Any]]
        if version >= 2:
            try:
                self._check_layout()
            except (KeyError, TypeError, ValueError, AttributeError):
                raise CorruptCheckpointError(
                    "manifest is malformed", path=path, hint="Re-create or re-download it"
                ) from None
            self.modules = LazyModules(self.module_records, manifest["modules"], lock)
        else:
            self.modules = manifest["modules"]

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.manifest["tasks"]

    def task(self, name: str) -> dict[str, Any]:
        """The manifest's entry of task ``name``; :class:`UnknownTaskError` naming the tasks there are."""
        if name not in self.tasks:
            names = sorted(self.tasks)
            shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            raise UnknownTaskError(f"no task named {name!r}", path=self.path, hint=f"Available tasks: {shown}")
        return self.tasks[name]

    def _check_layout(self) -> None:
        cols = self.manifest["record_columns"]
        if tuple(cols["int"]) != RECORD_INT or tuple(cols["float"]) != RECORD_FLOAT:
            raise ValueError("unknown record columns")
        for name in ("records/int", "records/float"):
            if not self.store.has(name):
                raise CorruptCheckpointError(
                    f"tensor {name} is missing", path=self.path, hint="Re-create or re-download it"
                )
        if not isinstance(self.manifest["modules"], dict) or not isinstance(self.manifest["tasks"], dict):
            raise ValueError("modules and tasks must be objects")
        T, M = len(self.manifest["tasks"]), len(self.manifest["modules"])
        for name, dtype, columns in (("records/int", "I32", RECORD_INT), ("records/float", "F64", RECORD_FLOAT)):
            if self.store.tensor_meta(name) != ([T, M, len(columns)], dtype):  # from the header: nothing read yet
                raise CorruptCheckpointError(
                    f"tensor {name} does not match the manifest's {T} tasks and {M} modules",
                    path=self.path,
                    hint="Re-create or re-download it",
                )

    # -- the tables --------------------------------------------------------------------------------
    def record_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The per-(task, module) tables (tasks × modules × columns; see RECORD_INT, RECORD_FLOAT).

        Version 1 files get the same tables, built from their JSON records."""
        with self._lock:
            if self._tables is None:
                if self.version >= 2:
                    ints = self.store.array("records/int")
                    floats = self.store.array("records/float")
                    T, M = len(self.tasks), len(self.manifest["modules"])
                    if ints.shape != (T, M, len(RECORD_INT)) or floats.shape != (T, M, len(RECORD_FLOAT)):
                        raise CorruptCheckpointError(
                            "the records tables do not match the manifest", path=self.path, hint="Re-create it"
                        )
                    self.check_rows(ints, list(self.tasks))
                    self._tables = (ints, floats)
                else:
                    self._tables = record_tables(list(self.tasks), self.modules)
            return self._tables

    def task_record_rows(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """One task's rows of the record tables (modules × columns), reading only that task's rows."""
        self.task(task)
        i = list(self.tasks).index(task)
        if self.version < 2 or self._tables is not None:
            ints, floats = self.record_tables()
            return ints[i], floats[i]
        ints = self.store.rows_array("records/int", i, i + 1)
        self.check_rows(ints, [task])
        return ints[0], self.store.rows_array("records/float", i, i + 1)[0]

    def task_modules(self, task: str) -> dict[str, dict[str, Any]]:
        """Module name -> the task's record there, for the modules that have the task.

        In version 2 only the task's rows of the record tables are read (extraction of one task
        reads a small part of the file, whatever the number of tasks)."""
        with self._lock:
            cached = self._task_modules.get(task)
            if cached is not None:
                return cached
            if self.version < 2 or (isinstance(self.modules, LazyModules) and self.modules.opened):
                out = {m: info["tasks"][task] for m, info in self.modules.items() if task in info["tasks"]}
            else:
                ints, floats = self.task_record_rows(task)
                names = list(self.manifest["modules"])
                out = {
                    names[j]: record_dict(ints[j].tolist(), floats[j].tolist())
                    for j in np.nonzero(ints[:, INT["position"]] >= 0)[0].tolist()
                }
            if len(self._task_modules) >= 4:
                self._task_modules.pop(next(iter(self._task_modules)))
            self._task_modules[task] = out
            return out

    def module_records(self, column: int) -> RecordTable:
        """One module's records, its tasks in their order there (vectorized: no object per task)."""
        ints, floats = self.record_tables()
        col_i, col_f = ints[:, column], floats[:, column]
        pos = col_i[:, INT["position"]]
        present = np.nonzero(pos >= 0)[0]
        order = present[np.argsort(pos[present], kind="stable")]
        names = self._task_names()
        if len(order) == len(names) and (order == np.arange(len(names))).all():  # every task, in order
            return RecordTable(names, col_i, col_f.copy())  # the tables are read-only; records are not
        return RecordTable([names[i] for i in order.tolist()], col_i[order], col_f[order])

    def _task_names(self) -> list[str]:
        """The tasks in their order (the record tables' rows), one list for every module's records."""
        if self._names is None:
            self._names = list(self.tasks)
        return self._names

    # -- the tables' values against the tensors they index -------------------------------------------
    def check_rows(self, ints: np.ndarray, tasks: list[str]) -> None:
        """Refuse rows of ``records/int`` (``tasks`` × modules × columns) whose position, ranks,
        group or first rows fall outside the module's tasks, groups or stacked tensors."""
        limits = self._row_limits()
        v = ints.astype(np.int64)
        col = {c: v[:, :, INT[c]] for c in ("position", "rank", "private_rank", "group", "coef_row", "private_row")}
        present = col["position"] >= 0
        grouped = limits["groups"] > 0
        group = np.where(grouped, col["group"], -1)
        slot = np.clip(group + 1, 0, limits["coef_rows"].shape[1] - 1)
        modules = np.arange(v.shape[1])
        coef_rows = limits["coef_rows"][modules, slot]  # rows of the coefficients this task's bases index
        checks = {
            "position": col["position"] >= limits["task_count"],
            "rank": (col["rank"] < 0) | (col["private_rank"] < 0),
            "group": grouped & ((col["group"] < 0) | (col["group"] >= limits["groups"])),
            "coef_row": (col["coef_row"] < 0) | ((col["rank"] > 0) & (col["coef_row"] + col["rank"] > coef_rows)),
            "private_row": (col["private_row"] < 0)
            | ((col["private_rank"] > 0) & (col["private_row"] + col["private_rank"] > limits["private_rows"])),
        }
        for column, bad in checks.items():
            bad = bad & present
            if bad.any():
                i, j = (int(x) for x in np.argwhere(bad)[0])
                raise CorruptCheckpointError(
                    f"the records give task {tasks[i]} in module {list(self.manifest['modules'])[j]} a {column} "
                    "outside its module's tasks and tensors",
                    path=self.path,
                    hint="Re-create or re-download it",
                )

    def _row_limits(self) -> dict[str, np.ndarray]:
        """Per module, from the manifest and the tensors' headers (nothing is read): its task count, its
        number of groups (0: one set of bases), the coefficient rows each set of bases has (column 0
        for one set, 1 + g for group g; unbounded where k_B = 0: no coefficients are read there) and
        its private rows."""
        if self._limits is None:
            modules = self.manifest["modules"]
            width = 1 + max((len(info.get("groups", ())) for info in modules.values()), default=0)
            unbounded = np.iinfo(np.int64).max
            limits = {
                "task_count": np.zeros(len(modules), dtype=np.int64),
                "groups": np.zeros(len(modules), dtype=np.int64),
                "coef_rows": np.full((len(modules), width), unbounded, dtype=np.int64),
                "private_rows": np.zeros(len(modules), dtype=np.int64),
            }
            for j, (module, info) in enumerate(modules.items()):
                limits["task_count"][j] = info.get("task_count", len(self.tasks))
                sets = [(0, f"modules/{module}/", info)]
                if "groups" in info:
                    limits["groups"][j] = len(info["groups"])
                    sets = [(1 + g, f"modules/{module}/g{g}/", b) for g, b in enumerate(info["groups"])]
                for slot, prefix, bases in sets:
                    if bases["k_B"]:
                        limits["coef_rows"][j, slot] = min(self._rows(f"{prefix}coefs_{s}") for s in "BA")
                limits["private_rows"][j] = min(self._rows(f"modules/{module}/private_{s}") for s in "BA")
            self._limits = limits
        return self._limits

    def _rows(self, name: str) -> int:
        """The rows of a stacked tensor (0 when absent), from the header."""
        if not self.store.has(name):
            return 0
        shape = self.store.tensor_meta(name)[0]
        return shape[0] if shape else 0


def completed_history_entry(entry: dict[str, Any], tables: tuple[np.ndarray, np.ndarray], names: list[str]) -> dict:
    """The history's last entry completed from the record tables: every task's current ``errors``
    and, after an ``add``, the old tasks' ``errors_before`` and ``drift`` (so that the stored
    history grows with operations, not operations × tasks)."""
    ints, floats = tables
    present = ints[:, :, INT["position"]] >= 0
    count = present.sum(1)
    error = np.where(present, floats[:, :, FLOAT["error"]], 0.0)
    mean, worst = error.sum(1) / np.maximum(count, 1), error.max(1, initial=0.0)
    entry = dict(entry, errors={t: {"mean": float(mean[i]), "max": float(worst[i])} for i, t in enumerate(names)})
    if entry.get("op") == "add":
        added = set(entry.get("tasks_added", []))
        touched = present & (floats[:, :, FLOAT["drift"]] >= 0)
        n = np.maximum(touched.sum(1), 1)
        drift = np.where(touched, floats[:, :, FLOAT["drift"]], 0.0)
        before = np.where(touched, floats[:, :, FLOAT["error_before"]], 0.0)
        before_max = before.max(1, initial=0.0)
        old = [i for i, t in enumerate(names) if t not in added and touched[i].any()]
        entry["drift"] = {names[i]: {"mean": float(drift[i].sum() / n[i]), "max": float(drift[i].max())} for i in old}
        entry["errors_before"] = {
            names[i]: {"mean": float(before[i].sum() / n[i]), "max": float(before_max[i])} for i in old
        }
    return entry
