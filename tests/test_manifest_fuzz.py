"""Fuzzing a checkpoint's manifest: its meaning, not its bytes (issue 28, item 5).

tests/fuzz_reader.py and tests/fuzz_checkpoint.py flip bytes; a flipped manifest byte fails its
checksum. Here the manifest of a small real checkpoint is changed as a hostile author would
change it (names, numbers, shapes, nesting, types, missing keys) and its checksum recomputed.
Every command that reads a checkpoint must then either work or refuse the file in one line
(exit 2): no traceback, no file outside the output folder, bounded time and memory.

The default run tries a few dozen cases, derandomized (the same ones each run); for more::

    MANIFEST_FUZZ_EXAMPLES=2000 python -m pytest tests/test_manifest_fuzz.py -q
"""

from __future__ import annotations

import copy
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from share_convert.cli import app

from .builders.cli import command_built_once
from .manifest_tools import rename_task, rewrite_manifest

EXAMPLES = int(os.environ.get("MANIFEST_FUZZ_EXAMPLES", "60"))
#: Seconds one case (four commands on a one-task checkpoint) may take, on a loaded machine.
CASE_SECONDS = 30
#: How much the process's peak memory may grow over the whole run.
MEMORY_BYTES = 1 << 30
runner = CliRunner()

NAMES = ["../../escape", "@abs@", "a/b", "..", ".", "", " x", "x" * 5000, "a\x00b", "a\nb", "C:\\x", "ok-name"]
NUMBERS = [-1, 0, 1, 2**31, 2**63, 10**30, 1.5, -0.0, 1e308, "7", None, True, False]
SHAPES = [[], {}, "text", [1, 2], [[1]], {"a": 1}, "@deep@", "@deep70@", "@long_int@", "@inf@", "@nan@"]
VALUES = NAMES + NUMBERS + SHAPES
#: Where a mutation starts, the parts of the manifest the readers use most weighted up.
ROOTS = [("tasks",), ("modules",), ("history",), ("blocks",), ("tensors",), ("config",), ("record_columns",), ()]

operation = st.tuples(
    st.sampled_from(["set", "delete", "rename", "rename_task"]),
    st.sampled_from(ROOTS),
    st.lists(st.integers(0, 1000), max_size=4),  # the walk down from the root
    st.integers(0, len(VALUES) - 1),
)


def mutate(manifest: dict[str, Any], header: dict[str, Any], ops: list[tuple], abs_name: str) -> None:
    """Apply ``ops`` to a manifest: each walks from a root down some children, then replaces,
    deletes or renames what it reached (``rename_task`` renames a task consistently: tensors too)."""
    for kind, root, walk, pick in ops:
        value = copy.deepcopy(VALUES[pick])  # never an object another case (or this one) changes
        value = abs_name if value == "@abs@" else value
        if kind == "rename_task":
            if manifest.get("tasks") and isinstance(manifest["tasks"], dict):
                name = NAMES[pick % len(NAMES)]
                try:
                    rename_task(manifest, header, next(iter(manifest["tasks"])), abs_name if name == "@abs@" else name)
                except (AttributeError, TypeError):  # an earlier operation broke what a rename walks: nothing renamed
                    pass
            continue
        node: Any = manifest
        for step in root:
            if isinstance(node, dict) and isinstance(node.get(step), (dict, list)) and node[step]:
                node = node[step]
        for step in walk:
            child = node[_keys(node)[step % len(node)]]
            if not (isinstance(child, (dict, list)) and child):
                break
            node = child
        if not node:
            continue
        key = _keys(node)[pick % len(node)]
        if kind == "set":
            node[key] = value
        elif kind == "delete":
            del node[key]
        elif isinstance(node, dict) and isinstance(value, str):  # a key renamed, in its place
            items = [(value if k == key else k, v) for k, v in node.items()]
            node.clear()
            node.update(items)


def _keys(node: dict | list) -> list[Any]:
    return list(node) if isinstance(node, dict) else list(range(len(node)))


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture(scope="module", autouse=True)
def cli_built_once() -> Any:
    """The CLI's click command built once for the hundreds of commands run here (builders.cli)."""
    with command_built_once():
        yield


@pytest.fixture(scope="module")
def good(merged) -> Path:
    return merged("bert-tiny", k=4, private_rank=1)


@pytest.fixture(scope="module")
def new_adapter(real) -> Path:
    """An adapter of the checkpoint's model, for ``add`` (under a task name of its own)."""
    return next((real / "bert-tiny").iterdir())


@pytest.fixture(scope="module")
def first_task(good) -> str:
    """The task ``remove`` is asked to drop (a mutation may have renamed or removed it)."""
    from share_convert.checkpoint import Checkpoint

    with Checkpoint(good) as ckpt:
        return next(iter(ckpt.tasks))


@pytest.fixture(scope="module")
def peak() -> Any:
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    assert grown < MEMORY_BYTES, f"the fuzzed commands grew this process's peak memory by {grown} bytes"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(operation, min_size=1, max_size=3))
def test_a_mutated_manifest_is_read_or_refused_in_one_line(good, new_adapter, first_task, peak, ops):
    read_or_refused(good, new_adapter, first_task, ops, [])


#: Shapes and dtypes a crafted header may give a tensor (the codes and scales of a quantized factor).
HEADER_VALUES = [[1, 2], [2, 1], [0, 0], [1 << 20, 4], [3], [], "I8", "U8", "F32", "I32", "BF16"]
header_operation = st.tuples(st.integers(0, 1000), st.sampled_from(["shape", "dtype"]), st.integers(0, 1000))


def mutate_header(header: dict[str, Any], ops: list[tuple]) -> None:
    """Give the factors' tensors (codes, scales, floats) other shapes or dtypes in the header; their
    bytes stay where they are (safetensors refuses entries whose size disagrees with their offsets)."""
    names = sorted(k for k in header if k.startswith("modules/"))
    for which, key, pick in ops:
        values = [v for v in HEADER_VALUES if isinstance(v, list) == (key == "shape")]
        header[names[which % len(names)]][key] = copy.deepcopy(values[pick % len(values)])


@pytest.fixture(scope="module")
def quantized(good, tmp_path_factory) -> Path:
    """``good`` with NF4 bases, int8 coefficients and bfloat16 private rows (format version 4)."""
    from .builders.quantized import MIXED, requantize

    return requantize(good, tmp_path_factory.mktemp("quantized") / "q.safetensors", MIXED)


@settings(max_examples=EXAMPLES // 4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(operation, max_size=2), header_ops=st.lists(header_operation, max_size=2))
def test_a_mutated_quantized_checkpoint_is_read_or_refused_in_one_line(
    quantized, new_adapter, first_task, peak, ops, header_ops
):
    """The same for a checkpoint storing codes and scales, its header's shapes and dtypes changed too."""
    read_or_refused(quantized, new_adapter, first_task, ops, header_ops)


def read_or_refused(good: Path, new_adapter: Path, first_task: str, ops: list[tuple], header_ops: list[tuple]) -> None:
    """Every reading command on ``good`` changed by ``ops`` (manifest) and ``header_ops`` works or
    refuses it in one line, in bounded time, writing nothing outside its output."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "a" / "b"
        folder.mkdir(parents=True)
        ckpt = folder / "c.safetensors"
        abs_name = str(root / "abs")

        def edit(m: dict[str, Any], h: dict[str, Any]) -> None:
            mutate(m, h, ops, abs_name)
            mutate_header(h, header_ops)

        rewrite_manifest(good, ckpt, edit)
        out = folder / "out"
        updates = folder / "updates"  # add and remove write here
        updates.mkdir()
        before = files_under(root)
        commands = (
            ["info", ckpt],
            ["tasks", ckpt],
            ["verify", ckpt],
            ["extract", ckpt, "--all", "-o", out],
            ["add", ckpt, f"fuzz-new={new_adapter}", "-o", updates / "added.safetensors"],
            ["remove", ckpt, "--task", first_task, "--force", "-o", updates / "removed.safetensors"],
        )
        for args in commands:
            began = time.monotonic()
            result = runner.invoke(app, [str(a) for a in args])
            took = time.monotonic() - began
            assert result.exception is None or isinstance(result.exception, SystemExit), (
                f"{args[0]} crashed on {ops!r}: {result.exception!r}"
            )
            assert result.exit_code in (0, 2), (args[0], ops, result.output)
            if result.exit_code:
                lines = [line for line in result.output.splitlines() if line.strip()]
                assert len(lines) == 1 and lines[0].startswith("error:"), (args[0], ops, result.output)
            assert took < CASE_SECONDS, f"{args[0]} took {took:.1f} s on {ops!r}"
            new = files_under(root) - before
            outside = [p for p in new if out not in (p, *p.parents) and updates not in p.parents]
            assert not outside, f"{args[0]} wrote outside its output on {ops!r}: {sorted(outside)}"
