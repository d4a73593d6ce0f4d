"""The ``share-convert`` command line: a thin shell over the library.

Every command turns a :class:`~share_convert.errors.ShareError` (or an OS error such as a full
disk) into one line on stderr and exit code 2; nothing else is caught.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from . import api
from .cli_help import HelpCommand, choices_metavar
from .errors import ShareError

if TYPE_CHECKING:
    from .config import ConsolidationConfig

from .config import DEFAULT_TARGET_ERROR


class _Typer(typer.Typer):
    """Every command draws its help with :class:`~share_convert.cli_help.HelpCommand` (the same under
    every typer the project allows)."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", HelpCommand)
        return super().command(*args, **kwargs)


app = _Typer(
    name="share-convert",
    help=(
        "Consolidate many LoRA adapters into one Share checkpoint (shared bases per module plus tiny "
        "per-task coefficients), and take any task back out as a PEFT adapter.\n\n"
        "Example: share-convert merge adapters/*.safetensors -o share.safetensors"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help, drawn by cli_help.HelpCommand: flags bare, [required] marked, choices listed as <a|b|c>
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn user errors into one line and exit code 2; let bugs surface."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .files.atomic import published

        before = len(published())
        try:
            return fn(*args, **kwargs)
        except ShareError as e:
            fail(e.one_line())
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(f"{where}{e.strerror or e}")
        except KeyboardInterrupt:
            fail(interrupted(published()[before:]), 130)

    return wrapper


def interrupted(written: list[Path]) -> str:
    """What Ctrl-C left on disk: nothing, or the outputs published before it (whole: a publication
    is never cut, see share_convert/atomic.py). Temporaries published into, then removed, are not counted."""
    done = list(dict.fromkeys(str(p) for p in written if os.path.lexists(p)))
    if not done:
        return "interrupted before anything was written"
    where = "it is" if len(done) == 1 else "they are"
    return f"interrupted after writing {', '.join(done)}: {where} in place, complete"


def say_waiting(line: str) -> None:
    """The one line a writer shows when another process holds its output's lock, before waiting."""
    err.print(line, highlight=False, markup=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on a terminal; silence in pipes."""
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None, item="")

        def update(item: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, item=item[-60:])

        yield update


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Weighting(str, enum.Enum):
    equal = "equal"
    norm = "norm"


class TargetMetric(str, enum.Enum):
    mean = "mean"
    max = "max"


class Dtype(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# Inputs and outputs are parsed as optional so that a missing one gets this tool's one-line error
# (exit code 2) rather than click's usage block; the help marks them [required].
InputsArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Adapters: PEFT folders, .safetensors/.bin files, globs, folders of adapters, Share checkpoints, "
        "or hf://owner/name (optionally @revision and /subfolder). NAME=PATH names a task.  [required]",
        show_default=False,
        metavar="ADAPTER",
    ),
]


def config_from_options(
    k: int | None,
    private_rank: int,
    energy: float | None,
    budget: str | None,
    target_error: float,
    target_metric: TargetMetric,
    weighting: Weighting,
    canonicalize: bool,
    device: Device,
    dtype: Dtype,
    seed: int,
) -> ConsolidationConfig:
    from .config import ConsolidationConfig

    return ConsolidationConfig(
        k=k,
        private_rank=private_rank,
        energy=energy,
        budget=budget,
        target_error=target_error,
        target_metric=TargetMetric(target_metric).value,
        weighting=Weighting(weighting).value,
        canonicalize=canonicalize,
        device=Device(device).value,
        dtype=Dtype(dtype).value,
        seed=seed,
    )


# Options shared by merge, add and plan.
KOpt = Annotated[
    int | None,
    typer.Option("--k", metavar="K", help="Fixed shared rank per module and side (pure Share unless --private-rank)."),
]
PrivOpt = Annotated[
    int, typer.Option("--private-rank", metavar="Q", help="With --k: private rank every task keeps per module.")
]
EnergyOpt = Annotated[
    float | None,
    typer.Option(
        "--energy",
        metavar="FRACTION",
        help="Energy target: keep this fraction of each stack's squared norm (e.g. 0.99).",
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        metavar="RATIO|SIZE",
        help="Storage budget, a ratio ('4x') or a size ('20MB'): least mean error within it.",
    ),
]
TargetOpt = Annotated[
    float,
    typer.Option(
        "--target-error",
        metavar="ERROR",
        help="Relative ΔW error target per module (default rule; least storage that meets it).",
    ),
]
MetricOpt = Annotated[
    TargetMetric,
    typer.Option(
        "--target-metric", help="What the target bounds per module: the 'mean' task error or the worst ('max')."
    ),
]
WeightOpt = Annotated[
    Weighting,
    typer.Option("--weighting", help="'equal': every task counts the same in the basis fit; 'norm': by ‖ΔW‖."),
]
CanonOpt = Annotated[
    bool,
    typer.Option("--canonicalize/--no-canonicalize", help="Stack each adapter's balanced SVD factors (gauge-free)."),
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where the decompositions run; auto: CUDA when available.")]
DtypeOpt = Annotated[
    Dtype, typer.Option("--dtype", help="Storage dtype of bases and coefficients; auto: the inputs' dtype.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD.")]
ModulesOpt = Annotated[
    str | None,
    typer.Option(
        "--modules", metavar="REGEX", help="Only the modules whose names match this regular expression (e.g. 'c_attn')."
    ),
]
AlphaOpt = Annotated[
    float | None,
    typer.Option("--alpha", metavar="ALPHA", help="lora_alpha to assume for weights files with no config beside them."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
ShardOpt = Annotated[
    str,
    typer.Option(
        "--max-shard-size",
        metavar="SIZE",
        help="Above this many bytes of tensors, write shards CHECKPOINT-00001-of-0000N.safetensors and an index "
        "CHECKPOINT.safetensors.index.json (Hugging Face convention). E.g. 5GB, 500MB, 2GiB or bytes.",
    ),
]
NoWaitOpt = Annotated[
    bool,
    typer.Option(
        "--no-wait",
        help="When another share-convert is writing the same checkpoint, fail at once (exit 2) instead of "
        "waiting for it to finish.",
    ),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        metavar="CHECKPOINT",
        help="The Share checkpoint to write (.safetensors).  [required]",
        show_default=False,
    ),
]


@app.command()
@handle_errors
def merge(
    inputs: InputsArg = None,
    output: OutputOpt = None,
    k: KOpt = None,
    private_rank: PrivOpt = 0,
    energy: EnergyOpt = None,
    budget: BudgetOpt = None,
    target_error: TargetOpt = DEFAULT_TARGET_ERROR,
    target_metric: MetricOpt = TargetMetric.mean,
    weighting: WeightOpt = Weighting.equal,
    canonicalize: CanonOpt = True,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.auto,
    seed: SeedOpt = 0,
    groups: Annotated[
        str,
        typer.Option(
            "--groups",
            metavar="<1|auto|N>",
            help="'1', 'auto' (try 2–4 groups of tasks with separate bases per module, kept where cheaper) or a number.",
        ),
    ] = "1",
    alpha: AlphaOpt = None,
    modules: ModulesOpt = None,
    force: ForceOpt = False,
    max_shard_size: ShardOpt = "5GB",
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
    timings: Annotated[
        Path | None, typer.Option("--timings", hidden=True, help="Write where the time went (JSON).")
    ] = None,
) -> None:
    """Consolidate adapters into one Share checkpoint and print the report.

    By default each module gets the representation with the least storage whose mean relative
    ΔW error is at most 5%: shared bases, per-task private corrections, or both. Use --k,
    --energy or --budget for another rule.

    Example: share-convert merge adapters/*.safetensors -o share.safetensors
    """
    if not inputs:
        fail("no inputs were given: pass adapter folders, files or globs (share-convert merge --help)")
    if output is None:
        fail("no output was given: pass -o CHECKPOINT.safetensors")
    config = config_from_options(
        k, private_rank, energy, budget, target_error, target_metric, weighting, canonicalize, device, dtype, seed
    )
    config.groups = groups
    with progress_bar("merging") as progress:
        clock: dict[str, float] = {}
        summary = api.merge(
            inputs,
            output,
            config,
            alpha=alpha,
            modules=modules,
            force=force,
            progress=progress,
            timings=clock,
            max_shard_size=max_shard_size,
            wait=not no_wait,
            on_wait=say_waiting,
        )
    if timings is not None:
        timings.write_text(json.dumps(clock, indent=2) + "\n")
    show(summary, as_json)


def show(summary: dict[str, Any], as_json: bool) -> None:
    from .report.render import render

    if as_json:
        emit_json(summary)
    else:
        render(summary, out)


@app.command()
@handle_errors
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


@app.command()
@handle_errors
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


@app.command()
@handle_errors
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
    # -- text-to-image hook (share_convert/t2i.py) --
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            metavar=choices_metavar(["peft", "kohya", "diffusers"]),
            help="peft (a PEFT folder), kohya (one .safetensors for ComfyUI/A1111) or diffusers "
            "(for load_lora_weights). Default: the format the task came in. With kohya/diffusers, "
            "-o may name the .safetensors file.",
        ),
    ] = None,
) -> None:
    """Write a task back out as a standard LoRA adapter: a PEFT folder, or a kohya or diffusers file.

    Example: share-convert extract share.safetensors --task sst2 -o sst2-lora/
    """
    if (task is None) == (not all_tasks):
        fail("give exactly one of --task NAME or --all")
    results = api.extract(checkpoint, output, task=task, all_tasks=all_tasks, rank=rank, force=force, format=format)
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


@app.command()
@handle_errors
def plan(
    inputs: InputsArg = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="PNG",
            help="Also draw the curves to this PNG file (needs matplotlib: pip install 'share-convert[plot]').",
        ),
    ] = None,
    target_error: TargetOpt = DEFAULT_TARGET_ERROR,
    target_metric: MetricOpt = TargetMetric.mean,
    device: DeviceOpt = Device.auto,
    alpha: AlphaOpt = None,
    modules: ModulesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show how much a collection shares before consolidating it: error against compression.

    For a range of budgets: pure sharing (weighted by ‖ΔW‖ as in the paper, and with tasks
    weighted equally), no sharing (truncating each adapter), and the planner's mix; then where
    the default plan lands, and one sentence on whether consolidation pays off. Writes nothing
    (except the --plot image).

    Example: share-convert plan adapters/ --plot curves.png
    """
    if not inputs:
        fail("no inputs were given: pass adapter folders, files or globs")
    from .config import ConsolidationConfig

    config = ConsolidationConfig(
        target_error=target_error, target_metric=TargetMetric(target_metric).value, device=Device(device).value
    )
    with progress_bar("planning") as progress:
        result = api.plan(inputs, config, alpha=alpha, modules=modules, plot=plot, progress=progress)
    if as_json:
        emit_json(result)
        return
    from .report.render import render_plan

    render_plan(result, out)
    if plot is not None:
        out.print(f"wrote {plot}")


def _update_target(checkpoint: str, output: Path | None, in_place: bool) -> Path:
    if in_place == (output is not None):
        fail("give exactly one of -o OUT or --in-place")
    if in_place and checkpoint.startswith("hf://"):
        fail("--in-place needs a local checkpoint; write the update with -o and push it")
    return Path(checkpoint) if in_place else output  # type: ignore[return-value]


@app.command()
@handle_errors
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


@app.command()
@handle_errors
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


@app.command()
@handle_errors
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


@app.command()
@handle_errors
def push(
    checkpoint: Annotated[
        str, typer.Argument(help="The Share checkpoint to upload.", show_default=False, metavar="CHECKPOINT")
    ],
    repo: Annotated[
        str | None,
        typer.Argument(
            help="owner/name of the Hub repository (created when needed).  [required]",
            show_default=False,
            metavar="REPO",
        ),
    ] = None,
    repo_option: Annotated[
        str | None, typer.Option("--repo", help="Deprecated: give the repository after the checkpoint.", hidden=True)
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created when needed).")] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Hub token (default: HF_TOKEN or the saved login). Never printed.")
    ] = None,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", metavar="MESSAGE", help="Commit message.")
    ] = None,
    license: Annotated[
        str | None, typer.Option("--license", help="Licence for the model card (e.g. mit, apache-2.0).")
    ] = None,
    no_local_paths: Annotated[
        bool,
        typer.Option(
            "--no-local-paths",
            help="Refuse to push when a recorded value looks like a local path (by default: a warning per value).",
        ),
    ] = False,
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait",
            help="When another share-convert is writing the checkpoint, fail at once (exit 2) instead of waiting "
            "to upload it whole.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Upload a checkpoint to the Hub with a machine-readable config and a model card.

    Before uploading, says which recorded values look like local paths (a base_model_name_or_path
    that is a folder, an absolute path in kohya metadata): they would be published. Local inputs
    are recorded by their own name only; hf:// addresses are kept. Everything goes up in one commit:
    a push cut off leaves the repository as it was.

    Example: share-convert push share.safetensors alice/my-share
    """
    if repo_option is not None:
        if repo is not None and repo != repo_option:
            fail(f"two repositories were given ({repo} and --repo {repo_option}): give it once, after the checkpoint")
        warn(f"--repo is deprecated: write 'share-convert push {checkpoint} {repo_option}'")
        repo = repo_option
    if repo is None:
        fail("no repository was given: share-convert push CHECKPOINT OWNER/NAME")
    local: list[dict[str, Any]] = []

    def tell(found: list) -> None:  # before anything is uploaded
        then = "" if no_local_paths else " and will be published with the checkpoint"
        for value in found:
            warn(f"{value.describe()} looks like a local path{then}")
            local.append(value.as_json())

    url = api.push(
        checkpoint,
        repo,
        private=private,
        revision=revision,
        token=token,
        commit_message=commit_message,
        license=license,
        on_local_paths=tell,
        refuse_local_paths=no_local_paths,
        wait=not no_wait,
        on_wait=say_waiting,
    )
    if as_json:
        emit_json({"checkpoint": checkpoint, "repo": repo, "revision": revision, "url": url, "local_paths": local})
        return
    out.print(f"pushed {checkpoint} to {repo}: {url}", highlight=False, markup=False)


@app.command()
@handle_errors
def pull(
    repo: Annotated[
        str,
        typer.Argument(
            help="owner/name (or hf://owner/name@revision) of a pushed checkpoint.",
            show_default=False,
            metavar="REPO",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="DIR", help="Folder to download into.  [required]", show_default=False),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    token: Annotated[str | None, typer.Option("--token", help="Hub token (default: HF_TOKEN). Never printed.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Download a checkpoint pushed with 'share-convert push'.

    Example: share-convert pull alice/my-share -o share/
    """
    if output is None:
        fail("no output folder was given: pass -o DIR")
    path = api.pull(repo, output, revision=revision, token=token, force=force)
    if as_json:
        emit_json({"repo": repo, "revision": revision, "checkpoint": str(path)})
        return
    out.print(f"wrote {path}", highlight=False, markup=False)


@app.command()
@handle_errors
def demo(
    keep: Annotated[
        Path | None,
        typer.Option(
            "--keep",
            metavar="DIR",
            help="Write the demo's files (adapters, checkpoint, extracted task) to this folder and keep them; "
            "without it they go to a temporary folder that is removed at the end.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build six small example adapters with a shared structure, consolidate them, report, extract one.

    Example: share-convert demo --keep demo/
    """
    from .config import ConsolidationConfig
    from .io.synthetic import write_synthetic_adapters

    say = (lambda text: None) if as_json else (lambda text: out.print(text, highlight=False, markup=False))  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="share-convert-demo-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        where = "" if keep else " (a temporary folder, removed when the demo ends; --keep DIR keeps the files)"
        say(f"Writing 6 example adapters (rank 8, 2 layers × q_proj,v_proj, hidden 64) to {root / 'adapters'}{where}")
        write_synthetic_adapters(root / "adapters", count=6)
        ckpt = root / "share.safetensors"
        say(f"$ share-convert merge {root / 'adapters'} -o {ckpt}")
        summary = api.merge([str(root / "adapters")], ckpt, ConsolidationConfig(), force=True)
        if not as_json:
            show(summary, False)
        target = root / "task-000"
        say(f"$ share-convert extract {ckpt} --task task-000 -o {target}")
        r = api.extract(ckpt, target, task="task-000", force=True)[0]
        say(
            f"wrote {r.path} (rank {r.rank}, {r.modules} modules): a PEFT adapter, loadable with PeftModel.from_pretrained"
        )
        if as_json:
            emit_json({"folder": str(root), "kept": keep is not None, "merge": summary, "extract": r.as_dict()})
        elif keep:
            say(f"The demo's files are in {root}.")
        else:
            say(f"Removed {root} and everything in it; run 'share-convert demo --keep DIR' to keep the files.")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
