"""``remove``: tasks dropped from a checkpoint, the bases kept or refitted to the tasks that remain."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

from ..checkpoint.publish import check_output, same_checkpoint
from ..checkpoint.reader import Checkpoint
from ..checkpoint.sharding import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..checkpoint.writer import CheckpointWriter
from ..errors import UnknownTaskError
from ..io.checkpoint_source import CheckpointTask
from ..math.linalg import deterministic
from .members import Progress
from .old_tasks import carry_module
from .pipeline import build_manifest, merge
from .tasks import KeptTask, config_of


def remove(
    checkpoint: str | Path | Checkpoint,
    tasks: Sequence[str],
    output: str | Path,
    *,
    refit: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> dict[str, Any]:
    """Drop ``tasks``. Without ``refit`` the bases stay (their Gram matrices are recomputed from the
    remaining tasks); with ``refit`` the bases are recomputed from the remaining tasks' reconstructions."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    max_shard_size = parse_size(max_shard_size)
    for t in tasks:
        ckpt.task(t)  # raises UnknownTaskError with the list
    keep = [t for t in ckpt.tasks if t not in tasks]
    if not keep:
        raise UnknownTaskError(
            "removing every task would leave an empty checkpoint", path=ckpt.path, hint="Delete the file instead"
        )
    output = Path(output)
    check_output(output, force or same_checkpoint(output, ckpt))
    config = config_of(ckpt)
    if refit:
        return merge(
            [CheckpointTask(ckpt, t) for t in keep],
            output,
            dc_replace(config),
            force=True,
            progress=progress,
            history=ckpt.history,
            op="remove+refit",
            max_shard_size=max_shard_size,
        )
    modules_out: dict[str, Any] = {}
    # the Gram matrices are recomputed: one thread, as merge, add and extract compute (same bytes anywhere)
    with deterministic(), CheckpointWriter(output, max_shard_size) as writer:
        for t in keep:
            for key in ckpt.task(t).get("heads", []):
                ckpt.copy_to(writer, f"tasks/{t}/heads/{key}")
        modules = list(ckpt.modules)
        for step, name in enumerate(modules):
            if progress:
                progress(name, step, len(modules))
            carried = carry_module(ckpt, writer, name, keep, tasks, config.weighting)
            if carried is not None:
                modules_out[name] = carried
        if progress:
            progress("", len(modules), len(modules))
        manifest = build_manifest(
            config, [KeptTask(ckpt, t) for t in keep], modules_out, ckpt.history, "remove", added=[]
        )
        manifest["history"][-1]["tasks_removed"] = list(tasks)
        manifest["history"][-1]["tasks_added"] = []
        manifest["history"][-1]["errors"] = {}
        writer.finish(manifest)
    return manifest
