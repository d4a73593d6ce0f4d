"""The commands that update a checkpoint: ``add`` folds new adapters in, ``remove`` takes tasks out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .options import AlphaOpt, Device, DeviceOpt, ForceOpt, InputsArg, JsonOpt, KOpt, NoWaitOpt, ShardOpt
from .shell import fail, progress_bar, say_waiting, show


def _update_target(checkpoint: str, output: Path | None, in_place: bool) -> Path:
    if in_place == (output is not None):
        fail("give exactly one of -o OUT or --in-place")
    if in_place and checkpoint.startswith("hf://"):
        fail("--in-place needs a local checkpoint; write the update with -o and push it")
    return Path(checkpoint) if in_place else output  # type: ignore[return-value]


def add(
    checkpoint: Annotated[
        str, typer.Argument(help="The Share checkpoint to update.", show_default=False, metavar="CHECKPOINT")
    ],
    inputs: InputsArg = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", metavar="CHECKPOINT", help="Where to write the updated checkpoint.", show_default=False
        ),
    ] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Replace CHECKPOINT itself (atomically).")] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace tasks that already exist instead of failing.")
    ] = False,
    k: KOpt = None,
    target_error: Annotated[
        float | None, typer.Option("--target-error", help="Error target for this update (default: the checkpoint's).")
    ] = None,
    alpha: AlphaOpt = None,
    device: DeviceOpt = Device.auto,
    force: ForceOpt = False,
    max_shard_size: ShardOpt = "5GB",
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold new adapters (or another checkpoint) into a checkpoint, without the old adapters.

    The report shows each old task's ΔW error before and after (its drift) and the new tasks' errors.

    Example: share-convert add share.safetensors new-task/ -o share-v2.safetensors
    """
    if not inputs:
        fail("no new adapters were given: pass adapter folders, files, globs or checkpoints")
    target = _update_target(checkpoint, output, in_place)
    with progress_bar("adding") as progress:
        summary = api.add(
            checkpoint,
            inputs,
            target,
            k=k,
            target_error=target_error,
            alpha=alpha,
            device=Device(device).value,
            replace=replace,
            force=force or in_place,
            progress=progress,
            max_shard_size=max_shard_size,
            wait=not no_wait,
            on_wait=say_waiting,
        )
    show(summary, as_json)


def remove(
    checkpoint: Annotated[
        str, typer.Argument(help="The Share checkpoint to update.", show_default=False, metavar="CHECKPOINT")
    ],
    task: Annotated[list[str], typer.Option("--task", metavar="NAME", help="Task to remove (repeatable).")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="CHECKPOINT", help="Where to write the result.", show_default=False),
    ] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Replace CHECKPOINT itself (atomically).")] = False,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="Recompute the bases from the remaining tasks: can save storage, but their originals are gone, so "
            "their errors may grow up to the error target (reported as bounds). Refused, with nothing written, "
            "when a remaining task would end above both its error before and the target, unless --force.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing output; with --refit, accept worse errors.")
    ] = False,
    max_shard_size: ShardOpt = "5GB",
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove tasks from a checkpoint, optionally refitting the bases to the tasks that remain.

    Without --refit no remaining task changes: the bases stay as they are.

    Example: share-convert remove share.safetensors --task old-task --in-place
    """
    target = _update_target(checkpoint, output, in_place)
    with progress_bar("removing") as progress:
        summary = api.remove(
            checkpoint,
            task,
            target,
            refit=refit,
            force=force or in_place,
            allow_worse=force,
            progress=progress,
            max_shard_size=max_shard_size,
            wait=not no_wait,
            on_wait=say_waiting,
        )
    show(summary, as_json)
