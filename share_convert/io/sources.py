"""Every input of merge, plan and add, classified once, in one place, and opened by its format's reader.

An input as typed is ``NAME=PATH`` or a path: a PEFT folder, a bare ``.safetensors`` / ``.bin``
weights file, a kohya or diffusers text-to-image file, a Share checkpoint or its shard index, an
``hf://`` address, or a glob or folder of these. :func:`classify` decides what one path is
(an :class:`Input`); :data:`READERS` holds one reader per kind, each giving
:class:`~share_convert.io.task_source.TaskSource` objects (a checkpoint gives one per task).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.index import is_checkpoint, read_index
from ..checkpoint.reader import Checkpoint
from ..checkpoint.sharding import INDEX_SUFFIX, existing_checkpoint
from ..errors import BadAdapterError
from . import hub
from .checkpoint_source import checkpoint_tasks
from .inputs import check_unique_tasks, expand_paths, parse_input
from .peft import AdapterSource
from .t2i.parsing import sniff
from .t2i.source import PeftComponentSource, T2ISource, as_component, check_same_base
from .task_source import TaskSource

#: one copy of the shapes and offsets that adapters of one base repeat (see AdapterSource)
Shared = dict[tuple, tuple]


@dataclass(frozen=True)
class Input:
    """One input path, classified: what it is (``kind``, a key of :data:`READERS`), the task name
    typed for it (``NAME=PATH``), what messages call it, and the ``hf://`` address it came from."""

    path: Path
    kind: str
    task: str | None
    origin: str
    address: str | None = None


def classify(
    path: Path,
    *,
    task: str | None = None,
    origin: str | None = None,
    address: str | None = None,
    checkpoints: bool = True,
) -> Input:
    """What ``path`` is: a Share checkpoint or shard index (``checkpoint``, only where ``checkpoints``
    are inputs), a text-to-image file by its tensor names (``kohya``, ``diffusers``; ``mixed``, which
    its reader refuses), else a PEFT adapter (``peft``: a folder or a bare weights file, whose reader
    says what is wrong with anything else)."""
    stored = path.name.endswith(INDEX_SUFFIX) or path.suffix == ".safetensors"
    if checkpoints and path.is_file() and stored and is_checkpoint(path):
        kind = "checkpoint"
    else:
        kind = sniff(path) or "peft"
    return Input(path, kind, task, origin or str(path), address)


def _checkpoint(item: Input, alpha: float | None, shared: Shared) -> list[TaskSource]:
    return list(checkpoint_tasks(Checkpoint(item.path), address=item.address))


def _t2i(item: Input, alpha: float | None, shared: Shared) -> list[TaskSource]:
    return [T2ISource(item.path, task=item.task, alpha=alpha, origin=item.origin)]


def _peft(item: Input, alpha: float | None, shared: Shared) -> list[TaskSource]:
    # a PEFT adapter of a UNet or Flux transformer is read under the text-to-image module names
    return [as_component(AdapterSource(item.path, task=item.task, alpha=alpha, origin=item.origin, shared=shared))]


#: kind -> the reader that opens an input of that kind as its tasks
READERS: dict[str, Callable[[Input, float | None, Shared], list[TaskSource]]] = {
    "checkpoint": _checkpoint,
    "kohya": _t2i,
    "diffusers": _t2i,
    "mixed": _t2i,
    "peft": _peft,
}


def read(item: Input, *, alpha: float | None = None, shared: Shared | None = None) -> list[TaskSource]:
    """The tasks of one classified input, opened lazily (headers only) by its kind's reader."""
    return READERS[item.kind](item, alpha, shared if shared is not None else {})


def open_adapter(
    path: Path,
    *,
    task: str | None = None,
    alpha: float | None = None,
    origin: str | None = None,
    shared: Shared | None = None,
) -> AdapterSource | T2ISource | PeftComponentSource:
    """One adapter file or folder (a checkpoint is not an adapter: it is read as one, and refused)."""
    (source,) = read(classify(Path(path), task=task, origin=origin, checkpoints=False), alpha=alpha, shared=shared)
    return source  # type: ignore[return-value]


def _adapters(
    text: str, paths: list[Path], task: str | None, alpha: float | None, shared: Shared
) -> list[AdapterSource | T2ISource | PeftComponentSource]:
    """The adapters at ``paths`` (what ``text`` expanded to), named ``task`` when one was typed."""
    if task is not None and len(paths) != 1:
        raise BadAdapterError("NAME=PATH needs exactly one adapter", path=text, hint="Name each adapter separately")
    sources = [open_adapter(p, task=task, alpha=alpha, origin=str(p), shared=shared) for p in paths]
    check_unique_tasks([s.task for s in sources], [s.origin for s in sources])
    check_same_base(sources)
    return sources


def open_adapters(
    inputs: list[str], *, alpha: float | None = None, shared: Shared | None = None
) -> list[AdapterSource | T2ISource | PeftComponentSource]:
    """Open every input (paths, globs, folders, ``NAME=PATH``) as an adapter (never a checkpoint).

    Raises a :class:`~share_convert.errors.ShareError` for the first bad input, and
    :class:`~share_convert.errors.DuplicateTaskError` when two inputs would share a task name.
    ``shared`` (a dict, empty at first) lets adapters opened by several calls keep one copy of
    their equal shapes and offsets.
    """
    shared = shared if shared is not None else {}
    sources: list[AdapterSource | T2ISource | PeftComponentSource] = []
    for text in inputs:
        spec = parse_input(text)
        sources += _adapters(text, expand_paths(spec.path), spec.task, alpha, shared)
    check_unique_tasks([s.task for s in sources], [s.origin for s in sources])
    check_same_base(sources)
    return sources


def open_inputs(inputs: Sequence[str], *, alpha: float | None = None, progress: bool = False) -> list[TaskSource]:
    """Adapters and Share checkpoints (every task of a checkpoint is an input) from what was typed,
    in the order typed; ``progress`` shows the Hub's download bars."""
    sources: list[TaskSource] = []
    shared: Shared = {}  # one copy of the shapes and offsets the adapters repeat
    for text in inputs:
        spec = parse_input(text)
        if hub.is_hub_address(spec.path):
            address = hub.parse_address(spec.path)
            for path in hub.download_inputs(spec.path, progress=progress):
                name = spec.task or (address.subfolder or address.repo_id).rstrip("/").split("/")[-1]
                item = classify(path, task=name, origin=str(address), address=str(address))
                sources += read(item, alpha=alpha, shared=shared)
            continue
        typed = spec.path
        if not os.path.exists(typed) and typed.endswith(".safetensors") and (found := existing_checkpoint(typed)):
            typed = str(found)  # a checkpoint written in shards: its index
        for path in shards_as_indexes(expand_paths(typed)):
            item = classify(path, task=spec.task)
            if item.kind == "checkpoint":
                sources += read(item)
                continue
            paths = expand_paths(str(path))  # a folder a glob matched may hold adapters: each is an input
            if paths == [path]:
                sources += read(item, alpha=alpha, shared=shared)
            else:
                sources += _adapters(f"{spec.task}={path}" if spec.task else str(path), paths, spec.task, alpha, shared)
    check_unique_tasks([s.task for s in sources], [s.origin for s in sources])
    check_same_base(sources)  # text-to-image inputs: one base (SD 1.x, SDXL, Flux)
    return sources


def shards_as_indexes(paths: list[Path]) -> list[Path]:
    """``paths`` (a folder's files, a glob's matches) with the shards of a sharded checkpoint beside
    them replaced by its index, once: a folder or glob holding a sharded checkpoint gives its tasks."""
    out = list(paths)
    for folder in sorted({p.parent for p in paths}):
        for index in sorted(folder.glob(f"*.safetensors{INDEX_SUFFIX}")):
            if not is_checkpoint(index):
                continue
            names = set(read_index(index)[1])
            if any(p.parent == folder and p.name in names for p in out):
                out = [p for p in out if not (p.parent == folder and p.name in names)]
                if index not in out:
                    out.append(index)
    return out
