"""The commands that build a checkpoint from adapters: ``merge``, and ``plan``, which shows what merging would give."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .. import api
from ..config import DEFAULT_TARGET_ERROR
from .options import (
    AlphaOpt,
    BudgetOpt,
    CanonOpt,
    Device,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    EnergyOpt,
    Executor,
    ExecutorOpt,
    ForceOpt,
    InputsArg,
    JsonOpt,
    KOpt,
    MetricOpt,
    ModulesOpt,
    NoWaitOpt,
    OutputOpt,
    Precision,
    PrecisionOpt,
    PrivOpt,
    RayAddressOpt,
    SeedOpt,
    ShardOpt,
    TargetMetric,
    TargetOpt,
    Weighting,
    WeightOpt,
    config_from_options,
)
from .shell import emit_json, fail, out, progress_bar, say_waiting, show


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
    precision: PrecisionOpt = Precision.auto,
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
    executor: ExecutorOpt = Executor.local,
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
    timings: Annotated[
        Path | None, typer.Option("--timings", hidden=True, help="Write where the time went (JSON).")
    ] = None,
) -> None:
    """Consolidate adapters into one Share checkpoint and print the report.

    By default each module gets the representation with the least storage whose mean relative
    ΔW error is at most 5%: shared bases, per-task private corrections, or both, each stored in
    the fewest bits that keep the error within the target (--precision). Use --k, --energy or
    --budget for another rule.

    Example: share-convert merge adapters/*.safetensors -o share.safetensors
    """
    if not inputs:
        fail("no inputs were given: pass adapter folders, files or globs (share-convert merge --help)")
    if output is None:
        fail("no output was given: pass -o CHECKPOINT.safetensors")
    config = config_from_options(
        k, private_rank, energy, budget, target_error, target_metric, weighting, canonicalize, device, dtype, seed,
        precision,
    )  # fmt: skip
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
            executor=Executor(executor).value,
            ray_address=ray_address,
        )
    if timings is not None:
        timings.write_text(json.dumps(clock, indent=2) + "\n")
    show(summary, as_json)


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
    precision: PrecisionOpt = Precision.auto,
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
    from ..config import ConsolidationConfig

    config = ConsolidationConfig(
        target_error=target_error,
        target_metric=TargetMetric(target_metric).value,
        device=Device(device).value,
        precision=Precision(precision).value,
    )
    with progress_bar("planning") as progress:
        result = api.plan(inputs, config, alpha=alpha, modules=modules, plot=plot, progress=progress)
    if as_json:
        emit_json(result)
        return
    from ..report.render import render_plan

    render_plan(result, out)
    if plot is not None:
        out.print(f"wrote {plot}")
