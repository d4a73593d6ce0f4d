"""The options and arguments that several commands share, and the consolidation options they build.

Inputs and outputs are parsed as optional so that a missing one gets this tool's one-line error
(exit code 2) rather than click's usage block; the help marks them [required].
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..config import FIELD_HELP

if TYPE_CHECKING:
    from ..config import ConsolidationConfig


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


class Executor(str, enum.Enum):
    local = "local"
    ray = "ray"


class Precision(str, enum.Enum):
    auto = "auto"
    float = "float"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    int8 = "int8"
    nf4 = "nf4"


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
    precision: Precision = Precision.auto,
) -> ConsolidationConfig:
    from ..config import ConsolidationConfig

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
        precision=Precision(precision).value,
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
        help="Storage budget in bytes, a ratio ('4x') or a size ('20MB'): least mean error within it "
        "(with --target-metric max: least worst-task error).",
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
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help=FIELD_HELP["precision"])]
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
ExecutorOpt = Annotated[
    Executor,
    typer.Option(
        "--executor",
        help="Where modules are computed: 'local' (threads of this process) or 'ray' (one Ray task per module; "
        "needs pip install 'share-convert[ray]'). The output is the same.",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="ADDR",
        help="With --executor ray: the cluster to run on (HOST:PORT of 'ray start --head', or Ray's 'auto' or "
        "'local'). Default: RAY_ADDRESS, else a cluster 'ray start' started here, else a local one for this run.",
    ),
]
