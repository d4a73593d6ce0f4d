"""The Python API behind the CLI: each function is one command, returning plain data.

Example::

    from share_convert import api
    summary = api.merge(["adapters/*.safetensors"], "share.safetensors")
    api.extract("share.safetensors", "out/", task="sst2")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint.sharding import DEFAULT_MAX_SHARD_SIZE, check_checkpoint_name, parse_size
from .errors import InvalidOptionError
from .io import hub

# The engine (consolidation, continual updates, extraction) imports torch: each command imports
# what it needs when it runs, so that --help, tasks and info start without it.
if TYPE_CHECKING:
    from .checkpoint.reader import Checkpoint
    from .config import ConsolidationConfig
    from .io.extraction import ExtractedAdapter
    from .report.summary import Report

Progress = Callable[[str, int, int], None]
#: Receives one line to show when another process holds the output's lock, before waiting for it.
OnWait = Callable[[str], None]


def _turn(target: str | Path, wait: bool, on_wait: OnWait | None, *, shared: bool = False):
    """The lock that writers of the checkpoint at ``target`` take turns on (:func:`share_convert.files.locking.writing`);
    a folder stands for the checkpoint ``share.safetensors`` in it."""
    from .files.locking import writing

    path = Path(target)
    return writing(path / hub.CHECKPOINT_NAME if path.is_dir() else path, wait=wait, on_wait=on_wait, shared=shared)


def _summary(path: str | Path) -> Report:
    """The report of the checkpoint just written at ``path`` (its file closed afterwards)."""
    from .checkpoint.reader import Checkpoint
    from .report.summary import summarize

    with Checkpoint(path) as ckpt:
        return summarize(ckpt)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint from a path or an ``hf://owner/name`` address (downloaded through the cache);
    see :func:`share_convert.io.checkpoint_path.open_checkpoint`, where a checkpoint's path is read."""
    from .io.checkpoint_path import open_checkpoint as _open_checkpoint

    return _open_checkpoint(path, progress=_tty())


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def open_inputs(inputs: Sequence[str], *, alpha: float | None = None) -> list:
    """Adapters and Share checkpoints (every task of a checkpoint is an input) from what was typed;
    see :func:`share_convert.io.sources.open_inputs`, where every input is classified."""
    from .io.sources import open_inputs as _open_inputs

    return _open_inputs(inputs, alpha=alpha, progress=_tty())


def shards_as_indexes(paths: list[Path]) -> list[Path]:
    """``paths`` with the shards of a sharded checkpoint beside them replaced by its index, once
    (:func:`share_convert.io.sources.shards_as_indexes`)."""
    from .io.sources import shards_as_indexes as _shards_as_indexes

    return _shards_as_indexes(paths)


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
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    wait: bool = True,
    on_wait: OnWait | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> Report:
    """Consolidate adapters (paths, globs, folders, checkpoints) into ``output``; return the report.

    ``modules`` keeps only the modules whose names match that regular expression; ``timings``
    receives where the time went (see :func:`share_convert.engine.pipeline.merge`). Tensors taking
    more than ``max_shard_size`` bytes (an int, or text: '5GB', '500MB') are written in shards
    beside ``output`` with an index ``<output>.index.json`` (docs/format.md, "Sharding").

    Writers of one output take turns (:mod:`share_convert.files.locking`): while another process writes
    ``output``, ``on_wait`` receives one line and this waits for it, or with ``wait=False`` raises
    :class:`~share_convert.errors.TargetBusyError`. The same holds for :func:`add` and :func:`remove`.

    ``executor="ray"`` computes each module as a task on a Ray cluster: the one at ``ray_address``
    (``host:port``, ``ray://host:10001``), else Ray's own choice (``RAY_ADDRESS``, or a local cluster
    for the run); it needs ``pip install 'share-convert[ray]'``, and every node must see the inputs
    at the same paths. The output is the same, byte for byte, as with ``executor="local"``.
    The same holds for :func:`add`.
    """
    from .engine.members import only_modules
    from .engine.parallel import check_executor
    from .engine.pipeline import merge as _merge

    check_executor(executor, ray_address)  # Ray not installed: one line, before any input is read
    check_checkpoint_name(output)
    max_shard_size = parse_size(max_shard_size)

    if config is not None:
        config.validate()  # bad options (and --k 0 alone, which stores nothing) before any input is read
    with _turn(output, wait, on_wait):  # from reading the inputs (one may be the output) to the report
        sources = only_modules(open_inputs(inputs, alpha=alpha), modules)
        _merge(
            sources, output, config, force=force, progress=progress, timings=timings, max_shard_size=max_shard_size,
            executor=executor, ray_address=ray_address,
        )  # fmt: skip
        return _summary(output)


def info(checkpoint: str | Path) -> Report:
    """The report of an existing checkpoint (every tensor's checksum is verified first)."""
    from .report.summary import summarize

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
    dtype: str | None = None,
) -> list[ExtractedAdapter]:
    """Extract one task (``task``) or every task (``all_tasks``) as adapters.

    ``format`` is ``peft``, ``kohya`` or ``diffusers``; by default each task in the format it came in.
    ``dtype`` (``float32``, ``float16``, ``bfloat16``) is the written factors' dtype; by default the
    dtype of the task's original factors, whatever precision the checkpoint stores.
    With ``rank``, each result's ``truncation_error`` says how much ΔW error the truncation adds.
    """
    from .io.extraction import extract as _extract
    from .io.extraction import extract_all as _extract_all

    ckpt = open_checkpoint(checkpoint)
    if all_tasks:
        return _extract_all(ckpt, output, rank=rank, force=force, format=format, dtype=dtype)
    assert task is not None
    return [_extract(ckpt, task, output, rank=rank, force=force, format=format, dtype=dtype)]


def verify(checkpoint: str | Path) -> dict[str, Any]:
    from .checkpoint.verification import verify_checkpoint

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
    device: str | None = None,
    replace: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    wait: bool = True,
    on_wait: OnWait | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> Report:
    """Fold new adapters (or checkpoints) into ``checkpoint``, writing ``output``; return the report.

    ``config`` defaults to the checkpoint's own options, with ``k`` / ``target_error`` / ``device``
    overriding them (the device defaults to 'auto', whatever the checkpoint was made on). Its
    ``precision`` too: a checkpoint older than precisions is updated with 'float'; a module the
    checkpoint has keeps where it stores each kind of factor, and the modules an update plans afresh
    are planned at the checkpoint's ``precision``.
    ``executor`` and ``ray_address`` as for :func:`merge`.
    """
    from .engine.add_tasks import add as _add
    from .engine.parallel import check_executor
    from .engine.tasks import config_of

    check_executor(executor, ray_address)
    max_shard_size = parse_size(max_shard_size)
    with _turn(output, wait, on_wait):  # from reading the old checkpoint (in place: the output) to the report
        ckpt = open_checkpoint(checkpoint)
        check_checkpoint_name(output)
        if config is None:
            config = config_of(ckpt)
            config.k = k if k is not None else config.k
            config.target_error = target_error if target_error is not None else config.target_error
            config.device = device if device is not None else config.device
        config.validate()  # refuses options that store nothing (--k 0 alone) before any input is read
        sources = open_inputs(inputs, alpha=alpha)
        _add(
            ckpt,
            sources,
            output,
            config,
            replace=replace,
            force=force,
            progress=progress,
            max_shard_size=max_shard_size,
            executor=executor,
            ray_address=ray_address,
        )
        return _summary(output)


def remove(
    checkpoint: str | Path,
    tasks: Sequence[str],
    output: str | Path,
    *,
    refit: bool = False,
    force: bool = False,
    allow_worse: bool = False,
    progress: Progress | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    wait: bool = True,
    on_wait: OnWait | None = None,
) -> Report:
    """Drop ``tasks`` from ``checkpoint`` (optionally refitting the bases); return the report.

    Without ``refit`` no remaining task changes. With ``refit`` the bases are recomputed from the
    remaining tasks' reconstructions (their originals are gone), which can save storage but lets
    their errors grow up to the checkpoint's error target. A refit that would leave a remaining
    task's mean or worst-module error above both its error before and the target is refused, and
    nothing is written, unless ``allow_worse``.
    """
    max_shard_size = parse_size(max_shard_size)
    with _turn(output, wait, on_wait):  # from reading the old checkpoint (in place: the output) to the report
        return _remove_locked(checkpoint, tasks, output, refit, force, allow_worse, progress, max_shard_size)


def _remove_locked(
    checkpoint: str | Path,
    tasks: Sequence[str],
    output: str | Path,
    refit: bool,
    force: bool,
    allow_worse: bool,
    progress: Progress | None,
    max_shard_size: int,
) -> Report:
    """The body of :func:`remove`, under the output's lock."""
    import shutil

    from .checkpoint.publish import check_output, move_checkpoint, same_checkpoint
    from .checkpoint.reader import Checkpoint
    from .checkpoint.sharding import checkpoint_target
    from .engine.remove_tasks import remove as _remove
    from .files.atomic import temp_dir_beside
    from .report.summary import summarize

    ckpt = open_checkpoint(checkpoint)
    check_checkpoint_name(output)
    if not refit:
        _remove(ckpt, tasks, output, refit=False, force=force, progress=progress, max_shard_size=max_shard_size)
        return _summary(output)
    output = checkpoint_target(output)
    check_output(output, force or same_checkpoint(output, ckpt))
    before = {t["task"]: t for t in summarize(ckpt)["tasks"]}
    target = float(ckpt.config.get("target_error") or 0.0)
    # staged under the output's own name (its shards are named after it), in a folder beside it
    folder = temp_dir_beside(output)
    staged = folder / output.name
    try:
        _remove(ckpt, tasks, staged, refit=True, force=True, progress=progress, max_shard_size=max_shard_size)
        worse = degraded_tasks(before, summarize(Checkpoint(staged))["tasks"], target)
        if worse and not allow_worse:
            shown = "; ".join(worse[:3]) + (f"; and {len(worse) - 3} more" if len(worse) > 3 else "")
            raise InvalidOptionError(
                f"refitting would make {len(worse)} remaining task(s) worse than both their error before and the "
                f"target {target:.0%}: {shown}; nothing was written",
                path=ckpt.path,
                hint="Remove without --refit (no remaining task changes), or pass --force to accept it",
            )
        move_checkpoint(staged, output)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _summary(output)


#: An error that grows by less than this (0.01 percentage points, below the report's precision) is
#: not counted as worse: refitting recomputes every reconstruction and rounding moves them slightly.
DEGRADED_TOLERANCE = 1e-4


def degraded_tasks(before: dict[str, dict[str, Any]], after: list[dict[str, Any]], target: float) -> list[str]:
    """The tasks whose mean or worst-module ΔW error ends above both its value before and ``target``."""
    worse = []
    for t in after:
        old = before.get(t["task"])
        if old is None:
            continue
        for key, label in (("mean_error", "mean"), ("max_error", "worst")):
            limit = max(old[key], target)
            if t[key] > limit + DEGRADED_TOLERANCE:
                worse.append(f"{t['task']} {label} {old[key]:.2%} → ≤{t[key]:.2%}")
                break
    return worse


def parse_weights(text: str) -> dict[str, float]:
    """``"a=0.7,b=0.3"`` as ``{"a": 0.7, "b": 0.3}`` (the CLI's ``--weights``); :class:`InvalidOptionError`
    for anything else: a part without ``=``, a weight that is not a finite number, a task named twice."""
    import math

    weights: dict[str, float] = {}
    hint = "Give TASK=WEIGHT pairs separated by commas, for example --weights a=0.7,b=0.3"
    for part in text.split(","):
        name, eq, value = part.strip().rpartition("=")
        name = name.strip()
        if not eq or not name:
            raise InvalidOptionError(f"--weights: {part.strip()!r} is not TASK=WEIGHT", hint=hint)
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise InvalidOptionError(f"--weights: the weight of {name!r} is {value.strip()!r}, not a number", hint=hint)
        if name in weights:
            raise InvalidOptionError(f"--weights names task {name!r} twice", hint=hint)
        weights[name] = weight
    return weights


def combine(
    checkpoint: str | Path,
    task: str,
    weights: dict[str, float] | str,
    output: str | Path,
    *,
    method: str = "linear",
    density: float | None = None,
    seed: int | None = None,
    head_from: str | None = None,
    replace: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    wait: bool = True,
    on_wait: OnWait | None = None,
) -> dict[str, Any]:
    """Add task ``task`` to ``checkpoint``, made from its tasks in coefficient space, writing ``output``;
    return the report, with what was combined under ``"combined"`` (docs/combine.md).

    ``weights`` maps tasks to weights (or is the CLI's text, ``"a=0.7,b=0.3"``). ``method``:
    ``linear`` (exactly Σ w_t ΔŴ_t), ``ties`` or ``dare`` on the tasks' coefficients in the shared
    bases, with ``density`` (the fraction kept) and for ``dare`` ``seed``. ``head_from`` names the
    task whose heads the new task takes when the inputs' heads differ. An existing ``task`` is an
    error unless ``replace``. Writers take turns as for :func:`merge`.
    """
    from .engine.combine import combine as _combine

    if isinstance(weights, str):
        weights = parse_weights(weights)
    max_shard_size = parse_size(max_shard_size)
    with _turn(output, wait, on_wait):  # from reading the checkpoint (in place: the output) to the report
        ckpt = open_checkpoint(checkpoint)
        check_checkpoint_name(output)
        written = _combine(
            ckpt,
            task,
            weights,
            output,
            method=method,
            density=density,
            seed=seed,
            head_from=head_from,
            replace=replace,
            force=force,
            progress=progress,
            max_shard_size=max_shard_size,
        )
        return {**_summary(output), "combined": written["combined"]}


def plan(
    inputs: Sequence[str],
    config: ConsolidationConfig | None = None,
    *,
    alpha: float | None = None,
    modules: str | None = None,
    plot: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Error-against-compression curves of a collection, without writing a checkpoint.

    ``plot`` (a PNG file to draw the curves to) is checked before any input is read: matplotlib is
    installed and its folder exists and is writable, as ``merge`` checks its output.
    """
    from .engine.members import only_modules
    from .report.curves import plan_collection
    from .report.plots import check_plot_target, plot_curves

    if plot is not None:
        check_plot_target(plot)
    result = plan_collection(only_modules(open_inputs(inputs, alpha=alpha), modules), config, progress=progress)
    if plot is not None:
        plot_curves(result, plot)
        result["plot"] = str(plot)
    return result


def push(
    checkpoint: str | Path, repo_id: str, *, wait: bool = True, on_wait: OnWait | None = None, **kwargs: Any
) -> str:
    """Upload a checkpoint with a model card; see :func:`share_convert.io.hub.push`.

    The checkpoint is read under its lock, shared (:mod:`share_convert.files.locking`): a checkpoint being
    written is uploaded once it is published, never half-written; ``wait`` and ``on_wait`` as for :func:`merge`.
    """
    with _turn(checkpoint, wait, on_wait, shared=True):
        from .report.summary import summarize

        return hub.push(checkpoint, repo_id, summarize=summarize, **kwargs)


def pull(repo: str, output: str | Path, *, wait: bool = True, on_wait: OnWait | None = None, **kwargs: Any) -> Path:
    """Download a pushed checkpoint; see :func:`share_convert.io.hub.pull`.

    The checkpoint pulled into ``output`` (``share.safetensors`` there) is written under its lock, as
    ``add --in-place`` writes it, so that the two take turns; ``wait`` and ``on_wait`` as for :func:`merge`.
    """
    with _turn(Path(output) / hub.CHECKPOINT_NAME, wait, on_wait):
        return hub.pull(repo, output, progress=_tty(), **kwargs)
