"""The Python API behind the CLI: each function is one command, returning plain data.

Example::

    from share_convert import api
    summary = api.merge(["adapters/*.safetensors"], "share.safetensors")
    api.extract("share.safetensors", "out/", task="sst2")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .consolidation import ConsolidationConfig, Progress
from .consolidation import merge as _merge
from .extraction import ExtractedAdapter
from .extraction import extract as _extract
from .extraction import extract_all as _extract_all
from .formats import open_adapters
from .report import summarize


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint from a path (or an ``hf://`` address once downloaded)."""
    return Checkpoint(path)


def merge(
    inputs: Sequence[str],
    output: str | Path,
    config: ConsolidationConfig | None = None,
    *,
    alpha: float | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Consolidate adapters (paths, globs, folders) into ``output``; return the report."""
    sources = open_adapters(list(inputs), alpha=alpha)
    _merge(sources, output, config, force=force, progress=progress)
    return summarize(Checkpoint(output))


def info(checkpoint: str | Path) -> dict[str, Any]:
    """The report of an existing checkpoint."""
    return summarize(open_checkpoint(checkpoint))


def list_tasks(checkpoint: str | Path) -> list[str]:
    return list(open_checkpoint(checkpoint).tasks)


def extract(
    checkpoint: str | Path,
    output: str | Path,
    *,
    task: str | None = None,
    all_tasks: bool = False,
    rank: int | None = None,
    force: bool = False,
) -> list[ExtractedAdapter]:
    """Extract one task (``task``) or every task (``all_tasks``) as PEFT adapters."""
    ckpt = open_checkpoint(checkpoint)
    if all_tasks:
        return _extract_all(ckpt, output, rank=rank, force=force)
    assert task is not None
    return [_extract(ckpt, task, output, rank=rank, force=force)]


def verify(checkpoint: str | Path) -> dict[str, Any]:
    from .verification import verify_checkpoint

    return verify_checkpoint(open_checkpoint(checkpoint))
