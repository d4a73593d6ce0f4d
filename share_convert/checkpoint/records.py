"""Per-(task, module) data as arrays: each task's record in a module, and its stacked rows.

A checkpoint of T tasks over M modules holds T × M records (ranks, ‖ΔW‖, errors, drift) and
T × M sets of coefficients and private factors. Format version 2 stores both per module as a
few arrays (docs/format.md); this module is their in-memory form, so that an update of a
checkpoint with thousands of old tasks handles each module's old tasks as arrays, never as
T × M Python objects:

- :class:`RecordTable`: one module's task records, one row per task (a read-only mapping
  task -> record dict, built on access, for code that wants one task at a time);
- :class:`TaskRows`: one module's per-task tensors stacked as they are stored: coefficient rows
  per set of bases, private rows, and where each task's rows start;
- :class:`Chain`: the basis-rotation chain of one set of bases (format version 3): coefficient
  rows written under earlier versions of the bases, and the rotations that bring them to the
  current ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from ..math.quantize import Quantized

#: Integer columns of a record; ``position`` is the task's place among the module's tasks,
#: ``group`` its group of bases (-1: one set), ``coef_row``/``private_row`` where its rows start.
RECORD_INT = ("position", "rank", "private_rank", "original_rank", "group", "coef_row", "private_row", "bound")
#: Float columns; ``error_before`` and ``drift`` are -1 where the last update did not set them.
RECORD_FLOAT = ("norm", "error", "error_before", "drift")
#: Column index of each name, for code that addresses the tables.
INT = {c: j for j, c in enumerate(RECORD_INT)}
FLOAT = {c: j for j, c in enumerate(RECORD_FLOAT)}
_I, _F = INT, FLOAT


def record_dict(ints: Sequence[int], floats: Sequence[float]) -> dict[str, Any]:
    """One record as a dict (the form of format version 1 and of the reader's mapping views)."""
    _position, rank, private_rank, original_rank, group, coef_row, private_row, bound = (int(x) for x in ints)
    norm, error, error_before, drift = (float(x) for x in floats)
    rec: dict[str, Any] = {
        "rank": rank,
        "private_rank": private_rank,
        "original_rank": original_rank,
        "norm": norm,
        "error": error,
        "coef_row": coef_row,
        "private_row": private_row,
    }
    if bound:
        rec["bound"] = True
    if group >= 0:
        rec["group"] = group
    if error_before >= 0:
        rec["error_before"] = error_before
    if drift >= 0:
        rec["drift"] = drift
    return rec


class RecordTable(Mapping):
    """One module's task records: ``ints`` (T × 8) and ``floats`` (T × 4), one row per task in ``tasks``."""

    def __init__(self, tasks: Sequence[str], ints: np.ndarray, floats: np.ndarray):
        self.tasks = list(tasks)
        self.ints = np.asarray(ints, dtype=np.int64).reshape(len(self.tasks), len(RECORD_INT))
        self.floats = np.asarray(floats, dtype=np.float64).reshape(len(self.tasks), len(RECORD_FLOAT))
        self._index: dict[str, int] | None = None
        self._lookups = 0

    @classmethod
    def from_dicts(cls, records: Mapping[str, Mapping[str, Any]]) -> RecordTable:
        if isinstance(records, RecordTable):
            return records
        ints = np.zeros((len(records), len(RECORD_INT)), dtype=np.int64)
        floats = np.zeros((len(records), len(RECORD_FLOAT)), dtype=np.float64)
        for i, rec in enumerate(records.values()):
            ints[i] = (
                rec.get("position", i),
                rec["rank"],
                rec["private_rank"],
                rec["original_rank"],
                rec.get("group", -1),
                rec.get("coef_row", 0),
                rec.get("private_row", 0),
                int(bool(rec.get("bound"))),
            )
            floats[i] = (rec["norm"], rec["error"], rec.get("error_before", -1.0), rec.get("drift", -1.0))
        return cls(list(records), ints, floats)

    @classmethod
    def concat(cls, tables: Sequence[Mapping[str, Mapping[str, Any]]]) -> RecordTable:
        parts = [cls.from_dicts(t) for t in tables]
        return cls(
            [t for p in parts for t in p.tasks],
            np.concatenate([p.ints for p in parts]) if parts else np.zeros((0, len(RECORD_INT))),
            np.concatenate([p.floats for p in parts]) if parts else np.zeros((0, len(RECORD_FLOAT))),
        )

    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {t: i for i, t in enumerate(self.tasks)}
        return self._index

    def rows_of(self, tasks: Sequence[str]) -> np.ndarray:
        index = self.index()
        return np.array([index[t] for t in tasks], dtype=np.int64)

    def select(self, tasks: Sequence[str]) -> RecordTable:
        """The records of ``tasks`` (all in this table), in that order."""
        if len(tasks) == len(self.tasks) and list(tasks) == self.tasks:  # all of them, in order: no lookups
            return self  # tables are not changed in place (``updated`` copies)
        rows = self.rows_of(tasks)
        return RecordTable(tasks, self.ints[rows], self.floats[rows])

    def int_column(self, name: str) -> np.ndarray:
        return self.ints[:, _I[name]]

    def float_column(self, name: str) -> np.ndarray:
        return self.floats[:, _F[name]]

    def updated(self, **columns: np.ndarray | float | int) -> RecordTable:
        """A copy with some columns replaced (names from RECORD_INT and RECORD_FLOAT)."""
        ints, floats = self.ints.copy(), self.floats.copy()
        for name, values in columns.items():
            if name in _I:
                ints[:, _I[name]] = values
            else:
                floats[:, _F[name]] = values
        return RecordTable(self.tasks, ints, floats)

    def _position(self, task: object) -> int | None:
        """The row of ``task``, or None. The first few look-ups scan the names (a table of thousands
        of tasks asked about one of them, as a manifest's new task is, builds no index)."""
        if self._index is None and self._lookups < 8:
            self._lookups += 1
            try:
                return self.tasks.index(task)  # type: ignore[arg-type]
            except ValueError:
                return None
        return self.index().get(task)  # type: ignore[arg-type]

    def __getitem__(self, task: str) -> dict[str, Any]:
        i = self._position(task)
        if i is None:
            raise KeyError(task)
        return record_dict(self.ints[i].tolist(), self.floats[i].tolist())

    def __iter__(self) -> Iterator[str]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, task: object) -> bool:
        return self._position(task) is not None


@dataclass
class Chain:
    """The basis-rotation chain of one set of bases (format version 3, docs/format.md).

    Coefficient rows ``ends[v-1] … ends[v] − 1`` (``ends[-1]`` = 0) were written in the coordinates
    of version v of the bases and are read as ``rotations_B[v] @ row`` (``rotations_A`` for the A
    side); rows from ``ends[-1]`` on are in the current bases. ``rotations_*`` are float64,
    ``V × k × k``; ``ends`` holds V increasing row counts.
    """

    rotations_B: torch.Tensor
    rotations_A: torch.Tensor
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.ends)

    def versions(self, rows: np.ndarray) -> np.ndarray:
        """The version of each row (``len(self)`` for rows in the current bases)."""
        return np.searchsorted(self.ends, np.asarray(rows, dtype=np.int64), side="right")

    def rotate(self, rows: torch.Tensor, index: np.ndarray, side: str) -> torch.Tensor:
        """Rows (float64, ``len(index) × k``, stored at rows ``index``) in the current bases' coordinates."""
        import torch

        R = self.rotations_B if side == "B" else self.rotations_A
        versions = self.versions(index)
        present = np.unique(versions[versions < len(self)]).tolist()
        if len(present) > 64:  # many versions: one batched product, each row with its rotation
            current = torch.eye(R.shape[1], dtype=R.dtype)[None]
            each = torch.cat([R, current])[torch.from_numpy(versions)]
            return (each @ rows[:, :, None])[:, :, 0]
        out = rows.clone()
        ordered = bool((np.diff(versions) >= 0).all())
        starts = np.searchsorted(versions, np.arange(len(self) + 1)) if ordered else None
        for v in present:
            if starts is not None:  # the rows of one version are one block
                a, b = int(starts[v]), int(starts[v + 1])
                out[a:b] = rows[a:b] @ R[v].T
            else:
                pick = torch.from_numpy(np.nonzero(versions == v)[0])
                out[pick] = rows[pick] @ R[v].T
        return out

    def select(self, index: np.ndarray) -> Chain | None:
        """The chain of the rows ``index`` gathered in that order, or None when they are not in
        increasing versions (they must then be rotated into the current bases)."""
        versions = self.versions(index)
        if len(versions) and bool((np.diff(versions) < 0).any()):
            return None
        ends = np.searchsorted(versions, np.arange(len(self)), side="right")
        keep = np.diff(np.concatenate([[0], ends])) > 0  # versions left without rows are dropped
        if not keep.any():
            return None
        import torch

        pick = torch.from_numpy(np.nonzero(keep)[0])
        return Chain(self.rotations_B[pick], self.rotations_A[pick], ends[keep])


@dataclass
class TaskRows:
    """One module's per-task tensors, stacked as format version 2 stores them.

    Task ``tasks[i]`` owns the coefficient rows ``coef_row[i] … coef_row[i] + p_i − 1`` of
    ``coefs[prefixes[i]]`` (row j is column j of its E_B, E_A) and the private rows
    ``private_row[i] … + q_i − 1`` of ``private`` (rows of P_Bᵀ and of P_A).
    """

    tasks: list[str]
    prefixes: list[str]
    coefs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    coef_row: np.ndarray
    private: tuple[torch.Tensor, torch.Tensor] | None
    private_row: np.ndarray
    #: per set of bases, the chain of its coefficient rows (absent: every row is in the current bases)
    chains: dict[str, Chain] = field(default_factory=dict)
    #: stacked tensors whose leading rows are ``source``'s tensor of the same name, unchanged:
    #: name -> how many rows; ``coefs``/``private`` then hold only the rows after them (appended
    #: to the copied ones, whose block checksums stay valid)
    base: dict[str, int] = field(default_factory=dict)
    source: Any = None
    #: role (``coefs_B``, ``coefs_A``, ``private_B``, ``private_A``) -> storage precision
    #: (:data:`~share_convert.math.quantize.PRECISIONS`); a role not named is stored in the dtype given
    precision: dict[str, str] = field(default_factory=dict)
    #: rows already quantized as a checkpoint stores them (read from one: their codes are written
    #: back as they are, never quantized again): ``<prefix>coefs_<side>`` or ``private_<side>`` ->
    #: the codes of exactly the rows of ``coefs[prefix]`` / ``private`` on that side
    codes: dict[str, Quantized] = field(default_factory=dict)

    @classmethod
    def of_parts(cls, tasks: Sequence[tuple[str, str, Mapping[str, torch.Tensor]]], dtype: torch.dtype) -> TaskRows:
        """Stack per-task parts (``coef_B`` k_B × p, ``coef_A``, ``private_B`` n × q, ``private_A`` q × d)."""
        import torch

        coefs: dict[str, tuple[list, list]] = {}
        private_B: list[torch.Tensor] = []
        private_A: list[torch.Tensor] = []
        coef_row = np.zeros(len(tasks), dtype=np.int64)
        private_row = np.zeros(len(tasks), dtype=np.int64)
        next_coef: dict[str, int] = {}
        next_private = 0
        for i, (_task, prefix, parts) in enumerate(tasks):
            coef_row[i] = next_coef.get(prefix, 0)
            if "coef_B" in parts:
                cB, cA = coefs.setdefault(prefix, ([], []))
                cB.append(parts["coef_B"].T)
                cA.append(parts["coef_A"].T)
                next_coef[prefix] = int(coef_row[i]) + parts["coef_B"].shape[1]
            private_row[i] = next_private
            if "private_B" in parts:
                private_B.append(parts["private_B"].T)
                private_A.append(parts["private_A"])
                next_private += parts["private_B"].shape[1]

        def stacked(items: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([x.to(dtype) for x in items]) if len({x.dtype for x in items}) > 1 else torch.cat(items)

        return cls(
            tasks=[t for t, _, _ in tasks],
            prefixes=[p for _, p, _ in tasks],
            coefs={p: (stacked(b).to(dtype), stacked(a).to(dtype)) for p, (b, a) in coefs.items()},
            coef_row=coef_row,
            private=(stacked(private_B).to(dtype), stacked(private_A).to(dtype)) if private_B else None,
            private_row=private_row,
        )

    @classmethod
    def concat(cls, parts: Sequence[TaskRows], dtype: torch.dtype) -> TaskRows:
        """One module's rows from several blocks of tasks (their row offsets shifted).

        A block's chain or copied leading rows (``base``) are kept only when no earlier block has
        rows of the same tensor; otherwise its rows are rotated into the current bases."""
        import torch

        coefs: dict[str, tuple[list, list]] = {}
        coef_rows, private_rows, privates_B, privates_A = [], [], [], []
        filled: dict[str, int] = {}
        private_filled = 0
        chains: dict[str, Chain] = {}
        base: dict[str, int] = {}
        source = None
        precision: dict[str, str] = {}
        codes: dict[str, list[tuple[torch.Tensor, Quantized | None]]] = {}  # key -> each part's rows
        for part in parts:
            for role, p in part.precision.items():
                precision.setdefault(role, p)
            for key, count in part.base.items():
                if (filled if key != "private" else {"private": private_filled}).get(key, 0):
                    raise ValueError("copied rows must come first in their stacked tensor")
                base[key] = count
                source = part.source
            shift = np.array([filled.get(p, 0) for p in part.prefixes], dtype=np.int64)
            coef_rows.append(part.coef_row + shift)
            for p, (b, a) in part.coefs.items():
                rotated = False
                chain = part.chains.get(p)
                if chain is not None and filled.get(p, 0):  # behind other rows: rotated now
                    index = np.arange(b.shape[0]) + part.base.get(p, 0)
                    b = chain.rotate(b.double(), index, "B").to(dtype)
                    a = chain.rotate(a.double(), index, "A").to(dtype)
                    rotated = True
                elif chain is not None:
                    chains[p] = chain
                cb, ca = coefs.setdefault(p, ([], []))
                cb.append(b)
                ca.append(a)
                for side, rows in zip("BA", (b, a)):
                    key = f"{p}coefs_{side}"
                    codes.setdefault(key, []).append((rows, None if rotated else part.codes.get(key)))
                filled[p] = filled.get(p, 0) + part.base.get(p, 0) + b.shape[0]
            for p in set(part.base) - set(part.coefs) - {"private"}:
                filled[p] = filled.get(p, 0) + part.base[p]
            private_rows.append(part.private_row + private_filled)
            private_filled += part.base.get("private", 0)
            if part.private is not None:
                privates_B.append(part.private[0])
                privates_A.append(part.private[1])
                private_filled += part.private[0].shape[0]
                for side, rows in zip("BA", part.private):
                    codes.setdefault(f"private_{side}", []).append((rows, part.codes.get(f"private_{side}")))
        kept = {role: p for role, p in precision.items() if p in ("int8", "nf4")}  # the code precisions

        def cat(items: list[torch.Tensor], role: str) -> torch.Tensor:
            # rows kept as codes stay in the float32 they were read in (their codes are what is written)
            return torch.cat(items) if role in kept else torch.cat(items).to(dtype)

        return cls(
            tasks=[t for part in parts for t in part.tasks],
            prefixes=[p for part in parts for p in part.prefixes],
            coefs={p: (cat(b, "coefs_B"), cat(a, "coefs_A")) for p, (b, a) in coefs.items()},
            coef_row=np.concatenate(coef_rows) if coef_rows else np.zeros(0, dtype=np.int64),
            private=(cat(privates_B, "private_B"), cat(privates_A, "private_A")) if privates_B else None,
            private_row=np.concatenate(private_rows) if private_rows else np.zeros(0, dtype=np.int64),
            chains=chains,
            base=base,
            source=source,
            precision=precision,
            codes=joined_codes(codes),
        )


def joined_codes(parts: Mapping[str, list[tuple[torch.Tensor, Quantized | None]]]) -> dict[str, Quantized]:
    """The codes of stacked rows from several blocks (key -> each block's rows and their codes, or
    None): where some blocks' rows are codes, those of the others are quantized at the same
    precision (rows are quantized one by one, so this is what quantizing the stack gives) and all
    joined; a key without codes in any block is left out."""
    import torch

    from ..math.quantize import Quantized, quantize

    out: dict[str, Quantized] = {}
    for key, items in parts.items():
        known = [q for _, q in items if q is not None]
        if not known or len({(q.precision, q.block) for q in known}) > 1:
            continue
        first = known[0]
        done = [q if q is not None else quantize(rows, first.precision, first.block) for rows, q in items]
        if len(done) == 1:
            out[key] = done[0]
            continue
        rows = sum(q.shape[0] for q in done)
        codes = torch.cat([q.codes for q in done])
        scales = torch.cat([q.scales for q in done])
        out[key] = Quantized(first.precision, codes, scales, (rows, first.shape[1]), first.block)
    return out


def gather_rows(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The row indices ``starts[i] … starts[i] + lengths[i] − 1`` for every i, concatenated."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    offsets = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return offsets + np.arange(total, dtype=np.int64)


def record_tables(
    tasks: Sequence[str],
    modules: Mapping[str, Mapping[str, Any]],
    rows: Mapping[str, tuple[list[str], np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The tables ``records/int`` (T × M × 8, int32) and ``records/float`` (T × M × 4) of modules
    whose entries hold their tasks' records (``modules[m]["tasks"]``: dicts or a RecordTable).

    Rows follow ``tasks``, columns ``modules``; a task's ``position`` is its place among the
    module's tasks. ``rows[m]`` = (tasks, first coefficient rows, first private rows) says where
    each task's rows start in module m's stacked tensors, when they were written in another order
    or the records do not know it (format version 1).
    """
    index = {t: i for i, t in enumerate(tasks)}
    ints = np.zeros((len(tasks), len(modules), len(RECORD_INT)), dtype=np.int32)
    ints[:, :, INT["position"]] = -1  # absent from the module
    ints[:, :, INT["group"]] = -1
    floats = np.zeros((len(tasks), len(modules), len(RECORD_FLOAT)), dtype=np.float64)
    floats[:, :, FLOAT["error_before"]] = -1.0  # not set by the last update
    floats[:, :, FLOAT["drift"]] = -1.0
    for j, (name, info) in enumerate(modules.items()):
        table = RecordTable.from_dicts(info["tasks"])
        if not len(table):
            continue
        col_ints = table.ints.copy()
        col_ints[:, INT["position"]] = np.arange(len(table))
        if rows is not None and name in rows:
            row_tasks, coef_row, private_row = rows[name]
            if row_tasks != table.tasks:  # the rows were stacked in another order
                order = {t: i for i, t in enumerate(row_tasks)}
                pick = np.array([order[t] for t in table.tasks], dtype=np.int64)
                coef_row, private_row = coef_row[pick], private_row[pick]
            col_ints[:, INT["coef_row"]] = coef_row
            col_ints[:, INT["private_row"]] = private_row
        where = np.array([index[t] for t in table.tasks], dtype=np.int64)
        ints[where, j] = col_ints
        floats[where, j] = table.floats
    return ints, floats
