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

from . import hub
from .checkpoint import Checkpoint, is_checkpoint
from .consolidation import ConsolidationConfig, Progress, only_modules
from .consolidation import merge as _merge
from .continual import add as _add
from .continual import checkpoint_tasks, config_of
from .continual import remove as _remove
from .extraction import ExtractedAdapter
from .extraction import extract as _extract
from .extraction import extract_all as _extract_all
from .formats import check_unique_tasks, expand_paths, open_adapter, open_adapters, parse_input
from .report import summarize
from .t2i import check_same_base


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint from a path or an ``hf://owner/name`` address (downloaded through the cache)."""
    if hub.is_hub_address(str(path)):
        return Checkpoint(hub.checkpoint_path(str(path), progress=_tty()))
    return Checkpoint(path)


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def open_inputs(inputs: Sequence[str], *, alpha: float | None = None) -> list:
    """Adapters and Share checkpoints (every task of a checkpoint is an input) from what was typed."""
    sources: list = []
    for text in inputs:
        spec = parse_input(text)
        if hub.is_hub_address(spec.path):
            for path in hub.download_inputs(spec.path, progress=_tty()):
                if is_checkpoint(path):
                    sources += checkpoint_tasks(Checkpoint(path))
                else:
                    addr = hub.parse_address(spec.path)
                    name = spec.task or (addr.subfolder or addr.repo_id).rstrip("/").split("/")[-1]
                    sources.append(open_adapter(path, task=name, alpha=alpha, origin=str(addr)))
            continue
        for path in expand_paths(spec.path):
            if path.is_file() and path.suffix == ".safetensors" and is_checkpoint(path):
                sources += checkpoint_tasks(Checkpoint(path))
            else:
                sources += open_adapters([f"{spec.task}={path}" if spec.task else str(path)], alpha=alpha)
    check_unique_tasks([s.task for s in sources], [s.origin for s in sources])
    check_same_base(sources)  # text-to-image inputs: one base (SD 1.x, SDXL, Flux)
    return sources


def merge(
    inputs: Sequence[str],
    output: str | Path,
    config: ConsolidationConfig | None = None,
    *,
    alpha: float | None = None,
    modules: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Consolidate adapters (paths, globs, folders, checkpoints) into ``output``; return the report.

    ``modules`` keeps only the modules whose names match that regular expression; ``timings``
    receives where the time went (see :func:`share_convert.consolidation.merge`).
    """
    if config is not None:
        config.validate()  # bad options are reported before any input is read
    sources = only_modules(open_inputs(inputs, alpha=alpha), modules)
    _merge(sources, output, config, force=force, progress=progress, timings=timings)
    return summarize(Checkpoint(output))


def info(checkpoint: str | Path) -> dict[str, Any]:
    """The report of an existing checkpoint (every tensor's checksum is verified first)."""
    ckpt = open_checkpoint(checkpoint)
    ckpt.verify_all()
    return summarize(ckpt)


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
    format: str | None = None,
) -> list[ExtractedAdapter]:
    """Extract one task (``task``) or every task (``all_tasks``) as adapters.

    ``format`` is ``peft``, ``kohya`` or ``diffusers``; by default each task in the format it came in.
    """
    ckpt = open_checkpoint(checkpoint)
    if all_tasks:
        return _extract_all(ckpt, output, rank=rank, force=force, format=format)
    assert task is not None
    return [_extract(ckpt, task, output, rank=rank, force=force, format=format)]


def verify(checkpoint: str | Path) -> dict[str, Any]:
    from .verification import verify_checkpoint

    return verify_checkpoint(open_checkpoint(checkpoint))


def add(
    checkpoint: str | Path,
    inputs: Sequence[str],
    output: str | Path,
    config: ConsolidationConfig | None = None,
    *,
    k: int | None = None,
    target_error: float | None = None,
    alpha: float | None = None,
    replace: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fold new adapters (or checkpoints) into ``checkpoint``, writing ``output``; return the report.

    ``config`` defaults to the checkpoint's own options, with ``k`` / ``target_error`` overriding them.
    """
    ckpt = open_checkpoint(checkpoint)
    if config is None:
        config = config_of(ckpt)
        config.k = k if k is not None else config.k
        config.target_error = target_error if target_error is not None else config.target_error
    sources = open_inputs(inputs, alpha=alpha)
    _add(ckpt, sources, output, config, replace=replace, force=force, progress=progress)
    return summarize(Checkpoint(output))


def remove(
    checkpoint: str | Path,
    tasks: Sequence[str],
    output: str | Path,
    *,
    refit: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Drop ``tasks`` from ``checkpoint`` (optionally refitting the bases); return the report."""
    ckpt = open_checkpoint(checkpoint)
    _remove(ckpt, tasks, output, refit=refit, force=force, progress=progress)
    return summarize(Checkpoint(output))


def plan(
    inputs: Sequence[str],
    config: ConsolidationConfig | None = None,
    *,
    alpha: float | None = None,
    modules: str | None = None,
    plot: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Error-against-compression curves of a collection, without writing a checkpoint."""
    from .analysis import plan_collection, plot_curves

    result = plan_collection(only_modules(open_inputs(inputs, alpha=alpha), modules), config, progress=progress)
    if plot is not None:
        plot_curves(result, plot)
        result["plot"] = str(plot)
    return result


def push(checkpoint: str | Path, repo_id: str, **kwargs: Any) -> str:
    """Upload a checkpoint with a model card; see :func:`share_convert.hub.push`."""
    return hub.push(checkpoint, repo_id, **kwargs)


def pull(repo: str, output: str | Path, **kwargs: Any) -> Path:
    """Download a pushed checkpoint; see :func:`share_convert.hub.pull`."""
    return hub.pull(repo, output, progress=_tty(), **kwargs)
