"""Reading a checkpoint's manifest as untrusted input: bounded parsing, then its shape and names checked.

Anyone can change a manifest and recompute its checksum, so the checksum proves nothing about
who wrote it. Before anything uses a manifest, :func:`parse_manifest` bounds its size and its
nesting (measured on the raw text, before ``json.loads`` recurses into it), and
:func:`check_manifest` checks every field the readers use: types, ranges of the numbers (sizes,
ranks, counts) and every name against the same rules as names given on input
(:mod:`share_convert.names`). A file that fails is refused in one line, as
:class:`~share_convert.errors.CorruptCheckpointError`, before any command reads a tensor or
writes a file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConsolidationConfig
from ..errors import CorruptCheckpointError
from ..names import file_name_problem, key_problem, shown, task_name_problem
from .quantized import CODES_VERSION, ROLES

#: The most a manifest (or a shard index) may take: what safetensors accepts as a whole header.
MAX_MANIFEST_BYTES = 100_000_000
#: The deepest nesting of JSON arrays and objects a manifest may have (share-convert writes 5 or 6;
#: an adapter_config carried in it may add a few).
MAX_DEPTH = 64
#: The largest side of an adapted layer (the widest vocabularies are a few hundred thousand).
MAX_FEATURES = 1 << 24
#: The largest count (parameters, bytes, rows) a manifest may state.
MAX_COUNT = 1 << 53
_HINT = "Re-create or re-download it; it is not a checkpoint share-convert wrote"
_STRINGS_AND_TEXT = re.compile(r'"(?:[^"\\]|\\.)*"|[^\[\]{}"]+', re.DOTALL)
_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _refuse(path: str | Path | None, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"the manifest {what}", path=path, hint=_HINT)


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON ``text``, brackets inside strings not counted;
    stops counting past ``limit``. No recursion, and memory bounded by the text's size."""
    brackets = _STRINGS_AND_TEXT.sub("", text).replace('"', "").encode("ascii", "ignore")
    depth = deepest = 0
    step = 1 << 20
    for start in range(0, len(brackets), step):
        chunk = np.frombuffer(brackets[start : start + step], dtype=np.uint8)
        delta = (chunk == ord("[")).astype(np.int64) + (chunk == ord("{")) - (chunk == ord("]")) - (chunk == ord("}"))
        run = np.cumsum(delta) + depth
        deepest = max(deepest, int(run.max()))
        depth = int(run[-1])
        if deepest > limit:
            break
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def parse_json(text: str | bytes, path: str | Path | None, what: str = "manifest") -> Any:
    """JSON ``text`` from a file, parsed within bounds: at most :data:`MAX_MANIFEST_BYTES` bytes and
    :data:`MAX_DEPTH` levels, finite numbers only; anything else is one :class:`CorruptCheckpointError`."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(
            f"the {what} takes {len(text)} bytes (at most {MAX_MANIFEST_BYTES})", path=path, hint=_HINT
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptCheckpointError(f"the {what} is not UTF-8 text", path=path, hint=_HINT) from None
    if nesting_depth(text) > MAX_DEPTH:
        raise CorruptCheckpointError(f"the {what} is nested deeper than {MAX_DEPTH} levels", path=path, hint=_HINT)
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integers, NaN, 1e999
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CorruptCheckpointError(f"the {what} is not valid JSON ({reason})", path=path, hint=_HINT) from None


def parse_manifest(text: str, path: str | Path | None) -> dict[str, Any]:
    """A manifest's text, parsed within bounds (:func:`parse_json`); an object, or refused."""
    manifest = parse_json(text, path)
    if not isinstance(manifest, dict):
        raise _refuse(path, "is not a JSON object")
    return manifest


# -- the fields the readers use ---------------------------------------------------------------


def _int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Check:
    """Field checks that name the field in the one line they raise."""

    def __init__(self, path: str | Path | None):
        self.path = path

    def fail(self, where: str, what: str) -> CorruptCheckpointError:
        return _refuse(self.path, f"field {where} {what}")

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "is not an object")
        return value

    def seq(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, "is not a list")
        return value

    def count(self, value: Any, where: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
        if not _int(value, lo, hi):
            raise self.fail(
                where,
                f"is {shown(value) if isinstance(value, str) else repr(value)[:40]}, not an integer from {lo} to {hi}",
            )
        return value

    def optional(self, entry: dict[str, Any], key: str, where: str, check: Callable[[Any, str], Any]) -> None:
        if key in entry and entry[key] is not None:
            check(entry[key], f"{where}.{key}")

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, "is not text")
        return value

    def name(self, value: Any, where: str, rule: Callable[[object], str | None], kind: str) -> None:
        problem = rule(value)
        if problem:
            raise _refuse(self.path, f"names a {kind} {shown(value)} that {problem}")

    def names(self, value: Any, where: str, rule: Callable[[object], str | None], kind: str) -> None:
        for item in self.seq(value, where):
            self.name(item, where, rule, kind)


def check_manifest(manifest: dict[str, Any], path: str | Path | None) -> None:
    """Check a parsed manifest (any format version) before it is used: the types and ranges of the
    fields share-convert reads, and every stored name. Raises :class:`CorruptCheckpointError`."""
    c = _Check(path)
    version = manifest.get("format_version")
    tasks = c.obj(manifest.get("tasks"), "tasks")
    modules = c.obj(manifest.get("modules"), "modules")
    for option, value in c.obj(manifest.get("config", {}), "config").items():
        problem = ConsolidationConfig.stored_value_problem(option, value)
        if problem is not None:
            raise c.fail(f"config.{option}", problem)
    for task, entry in tasks.items():
        c.name(task, "tasks", task_name_problem, "task")
        where = f"tasks.{task}"
        entry = c.obj(entry, where)
        c.optional(entry, "heads", where, lambda v, w: c.names(v, w, key_problem, "head"))
        c.optional(entry, "head_dtypes", where, c.obj)
        c.optional(entry, "adapter_config", where, c.obj)
        c.optional(entry, "weights_dtype", where, c.text)
        c.optional(entry, "format", where, c.text)
        for key in ("original_params", "original_bytes", "head_params", "head_bytes"):
            c.optional(entry, key, where, c.count)
        if entry.get("alpha_assumed") is not None and not _number(entry["alpha_assumed"]):
            raise c.fail(f"{where}.alpha_assumed", "is not a number")
    for module, entry in modules.items():
        c.name(module, "modules", key_problem, "module")
        _check_module(c, module, c.obj(entry, f"modules.{module}"), len(tasks), version)
    for i, entry in enumerate(c.seq(manifest.get("history", []), "history")):
        entry = c.obj(entry, f"history[{i}]")
        for key in ("tasks_added", "tasks_removed", "tasks_replaced"):
            c.optional(entry, key, f"history[{i}]", lambda v, w: c.names(v, w, task_name_problem, "task"))
        for key in ("errors", "drift_summary"):
            c.optional(entry, key, f"history[{i}]", c.obj)
        c.text(entry.get("op"), f"history[{i}].op")  # every operation names itself (docs/format.md)
    hashes = c.obj(manifest.get("tensors", {}), "tensors")
    if not all(isinstance(v, str) for v in hashes.values()):
        raise c.fail("tensors", "holds a checksum that is not text")
    for name, entry in c.obj(manifest.get("blocks", {}), "blocks").items():
        where = f"blocks.{shown(name)}"
        entry = c.obj(entry, where)
        c.count(entry.get("rows"), f"{where}.rows", 1)
        if not all(isinstance(d, str) for d in c.seq(entry.get("sha256"), f"{where}.sha256")):
            raise c.fail(f"{where}.sha256", "holds a checksum that is not text")


def _check_module(c: _Check, module: str, entry: dict[str, Any], tasks: int, version: Any) -> None:
    where = f"modules.{module}"
    n = c.count(entry.get("out_features"), f"{where}.out_features", 1, MAX_FEATURES)
    d = c.count(entry.get("in_features"), f"{where}.in_features", 1, MAX_FEATURES)
    if entry.get("dtype", "float32") not in _DTYPES:
        raise c.fail(f"{where}.dtype", f"is {str(entry.get('dtype'))[:20]!r}, not one of {', '.join(_DTYPES)}")
    for key in ("params",):
        c.optional(entry, key, where, c.count)
    c.optional(entry, "task_count", where, lambda v, w: c.count(v, w, 0, tasks))
    c.text(entry.get("kind"), f"{where}.kind")
    c.optional(entry, "alternatives", where, c.obj)
    _check_precision(c, where, entry, version)
    bases = [entry]
    if "groups" in entry:
        groups = c.seq(entry["groups"], f"{where}.groups")
        if not groups or len(groups) > max(tasks, 1):
            raise c.fail(f"{where}.groups", f"holds {len(groups)} groups for {tasks} tasks")
        bases = [c.obj(g, f"{where}.groups[{j}]") for j, g in enumerate(groups)]
    for j, b in enumerate(bases):
        at = where if b is entry else f"{where}.groups[{j}]"
        c.count(b.get("k_B"), f"{at}.k_B", 0, n)
        c.count(b.get("k_A"), f"{at}.k_A", 0, d)
        c.optional(b, "params", at, c.count)
        if b is not entry:
            c.text(b.get("kind"), f"{at}.kind")
            c.count(b.get("params"), f"{at}.params")
    if version == 1:  # records in JSON
        for task, rec in c.obj(entry.get("tasks", {}), f"{where}.tasks").items():
            c.name(task, f"{where}.tasks", task_name_problem, "task")
            rec = c.obj(rec, f"{where}.tasks.{task}")
            for key in ("rank", "private_rank", "original_rank"):
                c.count(rec.get(key), f"{where}.tasks.{task}.{key}", 0, max(n, d))
            for key in ("norm", "error"):
                if not _number(rec.get(key)):
                    raise c.fail(f"{where}.tasks.{task}.{key}", "is not a number")


def _check_precision(c: _Check, where: str, entry: dict[str, Any], version: Any) -> None:
    """A module's ``precision`` (format version 4): factor role -> a storage precision; codes
    (int8, nf4) only in a file whose version says that readers must know them."""
    if "precision" not in entry:
        return
    from ..math.quantize import CODE_PRECISIONS, PRECISIONS  # torch: only for files that name precisions

    for role, name in c.obj(entry["precision"], f"{where}.precision").items():
        at = f"{where}.precision.{shown(role)}"
        if role not in ROLES:
            raise c.fail(at, f"names no factor (one of {', '.join(ROLES)})")
        if name not in PRECISIONS:
            raise c.fail(
                at,
                f"is {shown(name) if isinstance(name, str) else repr(name)[:40]}, not one of {', '.join(PRECISIONS)}",
            )
        if name in CODE_PRECISIONS and not (isinstance(version, int) and version >= CODES_VERSION):
            raise c.fail(at, f"is {name} in a format version {version!r} file (codes need version {CODES_VERSION})")


def check_index_files(files: list[str], path: str | Path | None) -> None:
    """Every shard an index names must be a file beside it (:func:`share_convert.names.file_name_problem`)."""
    for name in files:
        problem = file_name_problem(name)
        if problem:
            raise CorruptCheckpointError(
                f"the index names the shard {shown(name)}, which {problem}",
                path=path,
                hint="Re-create or re-download the checkpoint",
            )
