"""The commands that read a checkpoint: ``info``, ``tasks``, ``extract`` (a task back out as an adapter) and ``verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import api
from ..io.writers import DTYPES as EXTRACT_DTYPES
from ..io.writers import FORMATS as EXTRACT_FORMATS
from .help import choices_metavar
from .options import ForceOpt, JsonOpt
from .shell import emit_json, fail, out, show, warn


def info(
    checkpoint: Annotated[
        str,
        typer.Argument(help="A Share checkpoint (path or hf://owner/name).", show_default=False, metavar="CHECKPOINT"),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Show a checkpoint's tasks, their ΔW errors, its storage and its history.

    Example: share-convert info share.safetensors --json
    """
    show(api.info(checkpoint), as_json)


def tasks(
    checkpoint: Annotated[str, typer.Argument(help="A Share checkpoint.", show_default=False, metavar="CHECKPOINT")],
    as_json: JsonOpt = False,
) -> None:
    """List the tasks of a checkpoint, one per line.

    Example: share-convert tasks share.safetensors
    """
    names = api.list_tasks(checkpoint)
    if as_json:
        emit_json(names)
    else:
        for n in names:
            out.print(n, highlight=False, markup=False)


def extract(
    checkpoint: Annotated[str, typer.Argument(help="A Share checkpoint.", show_default=False, metavar="CHECKPOINT")],
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            metavar="PATH",
            help="Folder to write the PEFT adapter to (with --all: one sub-folder per task).",
        ),
    ],
    task: Annotated[str | None, typer.Option("--task", metavar="NAME", help="The task to extract.")] = None,
    all_tasks: Annotated[bool, typer.Option("--all", help="Extract every task.")] = False,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            metavar="R",
            help="Truncate to at most this rank (best rank-R approximation), for engines with a maximum LoRA rank.",
        ),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            metavar=choices_metavar(list(EXTRACT_FORMATS)),
            help="peft (a PEFT folder), kohya (one .safetensors for ComfyUI/A1111) or diffusers "
            "(for load_lora_weights). Default: the format the task came in. With kohya/diffusers, "
            "-o may name the .safetensors file.",
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar=choices_metavar(list(EXTRACT_DTYPES)),
            help="The dtype of the written LoRA factors. Default: the dtype of the task's original factors "
            "(float32 for most PEFT adapters), whatever precision the checkpoint stores them at.",
        ),
    ] = None,
) -> None:
    """Write a task back out as a standard LoRA adapter: a PEFT folder, or a kohya or diffusers file.

    Example: share-convert extract share.safetensors --task sst2 -o sst2-lora/
    """
    if (task is None) == (not all_tasks):
        fail("give exactly one of --task NAME or --all")
    results = api.extract(
        checkpoint, output, task=task, all_tasks=all_tasks, rank=rank, force=force, format=format, dtype=dtype
    )
    if as_json:
        emit_json([r.as_dict() for r in results])
        return
    for r in results:
        out.print(f"wrote {r.path} (task {r.task}, rank {r.rank}, {r.modules} modules)", highlight=False, markup=False)
        if r.truncation_error is not None:
            t = r.truncation_error
            out.print(
                f"  truncating {r.task} to rank {rank} adds {t['mean']:.2%} mean ΔW error over its modules, "
                f"{t['max']:.2%} in the worst module (‖ΔŴ − ΔŴ_{rank}‖ / ‖ΔW‖, on top of the error in the checkpoint)",
                highlight=False,
                markup=False,
            )
        for w in r.warnings:
            warn(f"{r.task}: {w}")


def verify(
    checkpoint: Annotated[str, typer.Argument(help="A Share checkpoint.", show_default=False, metavar="CHECKPOINT")],
    as_json: JsonOpt = False,
) -> None:
    """Check a checkpoint fully: checksums, shapes, orthonormal bases, finite values, stored errors.

    Exits 0 when everything holds, 2 with the first problem otherwise.
    Example: share-convert verify share.safetensors
    """
    result = api.verify(checkpoint)
    if as_json:
        emit_json(result)
    else:
        out.print(
            f"ok: {result['tensors']} tensors, {result['tasks']} tasks, {result['modules']} modules verified"
            + (f" in {result['shards']} shards" if result["shards"] else ""),
            highlight=False,
        )
