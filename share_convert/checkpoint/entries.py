"""A checkpoint's module entries, typed: what the engine reads of a module's shape, kind, widths and groups.

The manifest stores each module as a JSON object (docs/format.md); the reader presents it as a
dict (:attr:`~share_convert.checkpoint.reader.Checkpoint.modules`, every format version alike).
:class:`ModuleEntry` is that entry read once into fields, so that code reasoning about a module
names its fields instead of looking up keys and defaults. The per-task records stay tables
(:class:`~share_convert.checkpoint.records.RecordTable`); an entry holds their task names only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .quantized import CODE_DTYPE, ROLES


@dataclass(frozen=True)
class GroupEntry:
    """One group of bases of a module that has groups: its widths, plan kind, stored parameters
    and its tasks in their order in the module."""

    k_B: int
    k_A: int
    kind: str
    params: int
    tasks: tuple[str, ...]

    @classmethod
    def of(cls, group: Mapping[str, Any]) -> GroupEntry:
        """The entry of one group as the reader presents it (its ``tasks`` completed from the records)."""
        return cls(group["k_B"], group["k_A"], group["kind"], group["params"], tuple(group.get("tasks", ())))


@dataclass(frozen=True)
class ModuleEntry:
    """One module of a checkpoint: ``out_features`` × ``in_features`` (n × d), its bases' widths
    (``k_B``, ``k_A``: summed over the groups when it has groups), its plan ``kind``, its storage
    ``dtype`` (a torch dtype name; float32 where the manifest names none, as the format says), its
    groups (empty: one set of bases), the planner's ``alternatives`` (None if not stored), its
    tasks in their stored order and the storage ``precision`` of each factor role (``basis_B`` …
    ``private_A``: a float dtype name, ``int8`` or ``nf4``; the ``dtype`` where the manifest names
    none, as in files before format version 4)."""

    name: str
    out_features: int
    in_features: int
    kind: str
    k_B: int
    k_A: int
    dtype: str
    groups: tuple[GroupEntry, ...]
    alternatives: Mapping[str, Any] | None
    task_names: tuple[str, ...]
    precision: Mapping[str, str] = field(default_factory=dict)
    _task_set: frozenset[str] = field(repr=False, compare=False, default=frozenset())

    @classmethod
    def of(cls, name: str, info: Mapping[str, Any]) -> ModuleEntry:
        """The typed entry of module ``name`` from its manifest entry ``info`` (checked on reading:
        :func:`~share_convert.checkpoint.manifest.check_manifest`)."""
        tasks = tuple(info["tasks"])
        dtype = info.get("dtype", "float32")
        stored = info.get("precision") or {}
        return cls(
            name=name,
            out_features=info["out_features"],
            in_features=info["in_features"],
            kind=info["kind"],
            k_B=info.get("k_B", 0),
            k_A=info.get("k_A", 0),
            dtype=dtype,
            groups=tuple(GroupEntry.of(g) for g in info["groups"]) if "groups" in info else (),
            alternatives=info.get("alternatives"),
            task_names=tasks,
            precision={role: stored.get(role, dtype) for role in ROLES},
            _task_set=frozenset(tasks),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(n, d): the module's output and input features."""
        return self.out_features, self.in_features

    @property
    def grouped(self) -> bool:
        """Whether the module stores groups of bases (``modules/<name>/g<j>/``) rather than one set."""
        return bool(self.groups)

    @property
    def quantized(self) -> bool:
        """Whether any factor of the module is stored as codes (int8, nf4)."""
        return any(p in CODE_DTYPE for p in self.precision.values())

    def has_task(self, task: str) -> bool:
        """Whether ``task`` has a record in this module."""
        return task in self._task_set
