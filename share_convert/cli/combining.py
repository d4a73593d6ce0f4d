"""The ``combine`` command: a new task made from a checkpoint's tasks in coefficient space."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from .options import ForceOpt, JsonOpt, NoWaitOpt, ShardOpt
from .shell import fail, out, progress_bar, say_waiting, show
from .updating import update_target


class Method(str, enum.Enum):
    linear = "linear"
    ties = "ties"
    dare = "dare"


def combine(
    checkpoint: Annotated[
        str, typer.Argument(help="The Share checkpoint to update.", show_default=False, metavar="CHECKPOINT")
    ],
    task: Annotated[
        str | None,
        typer.Option("--task", metavar="NEW", help="Name of the new task.  [required]", show_default=False),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            metavar="T=W,...",
            help="The tasks to combine and their weights, e.g. a=0.7,b=0.3 (any real numbers).  [required]",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        Method,
        typer.Option(
            "--method",
            help="linear: exactly Σ w·ΔW; ties, dare: the papers' rules on the tasks' coefficients in the shared "
            "bases (docs/combine.md).",
        ),
    ] = Method.linear,
    density: Annotated[
        float | None,
        typer.Option(
            "--density",
            help="ties, dare: the fraction of each task's coefficients kept (0 < D ≤ 1).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="dare: seed of the random drops (default 0).", show_default=False)
    ] = None,
    head_from: Annotated[
        str | None,
        typer.Option(
            "--head-from",
            metavar="TASK",
            help="Take this task's heads (modules_to_save) when the combined tasks' heads differ.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="CHECKPOINT", help="Where to write the result.", show_default=False),
    ] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Replace CHECKPOINT itself (atomically).")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Replace task NEW if it already exists.")] = False,
    force: ForceOpt = False,
    max_shard_size: ShardOpt = "5GB",
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a new task from existing ones in coefficient space; no other task changes.

    Example: share-convert combine share.safetensors --task mix --weights a=0.7,b=0.3 --in-place
    """
    if not task:
        fail("give the new task's name: --task NEW")
    if not weights:
        fail("give the tasks to combine and their weights: --weights a=0.7,b=0.3")
    target = update_target(checkpoint, output, in_place)
    with progress_bar("combining") as progress:
        summary = api.combine(
            checkpoint,
            task,  # type: ignore[arg-type]
            api.parse_weights(weights),  # type: ignore[arg-type]
            target,
            method=Method(method).value,
            density=density,
            seed=seed,
            head_from=head_from,
            replace=replace,
            force=force or in_place,
            progress=progress,
            max_shard_size=max_shard_size,
            wait=not no_wait,
            on_wait=say_waiting,
        )
    show(summary, as_json)
    if not as_json:
        out.print(describe(summary["combined"]), highlight=False, markup=False)


def describe(combined: dict[str, Any]) -> str:
    """One line on what ``combine`` made: the formula, and where parts were summed outside the bases."""
    terms = " + ".join(f"{w:g}·{t}" for t, w in combined["weights"].items()).replace("+ -", "− ")
    how = combined["method"]
    if "density" in combined:
        how += f", density {combined['density']:g}"
    if "seed" in combined:
        how += f", seed {combined['seed']}"
    line = f"{combined['task']} = {terms} ({how}) in {combined['modules']} module(s)"
    outside = combined["modules_outside_bases"]
    if outside and combined["method"] != "linear":
        line += (
            f"; in {outside} of them parts outside the shared bases (private factors, other groups) were summed "
            f"as they are, up to {combined['outside_max']:.0%} of the new task's ΔW there"
        )
    return line
