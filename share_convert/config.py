"""The options of consolidation (:class:`ConsolidationConfig`) and the figures every report shares.

Importing this module does not import torch: ``info``, ``tasks`` and ``--help`` read a
checkpoint's options and describe them without the engine (docs/architecture.md, start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidOptionError

if TYPE_CHECKING:
    import torch

#: Storage dtypes of bases and coefficients, besides 'auto' (the inputs').
STORAGE_DTYPES = ("float32", "bfloat16", "float16")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


#: Units of a size, by lower-case name: KB, MB, GB, TB are powers of 1000 (as in huggingface_hub),
#: KiB, MiB, GiB, TiB powers of 1024. Longer names first: a size is split at the first that ends it.
SIZE_UNITS = {
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "b": 1,
}


def split_size(text: str) -> tuple[str, int]:
    """A size written as text, split into its number (as written) and its unit's bytes:
    ``'2.5 GiB'`` → ('2.5', 2**30); text without a unit → (text, 1). The one reading of units
    for every size share-convert takes (``--budget``, ``--max-shard-size``); each caller reads the
    number as it needs (a float for a budget, exactly for a shard size)."""
    t = text.strip().lower()
    for unit, factor in SIZE_UNITS.items():
        if t.endswith(unit):
            return t[: -len(unit)].rstrip(), factor
    return t, 1


def parse_budget(text: str) -> tuple[str, float]:
    """``'4x'`` → ('ratio', 4.0); ``'10MB'`` / ``'2.5GiB'`` / ``'1000000'`` → ('bytes', …);
    ValueError for anything else."""
    t = text.strip().lower().replace(" ", "")
    if t.endswith("x"):
        return "ratio", float(t[:-1])
    number, factor = split_size(t)
    return "bytes", float(number) * factor


DEFAULT_TARGET_ERROR = 0.05

#: ``--precision`` choices: 'auto' (chosen per module with the structure), 'float' (every factor in
#: ``--dtype``, as before precisions existed) or one storage precision for every factor.
PRECISION_CHOICES = ("auto", "float", "float32", "float16", "bfloat16", "int8", "nf4")

#: Help of options that is also a field's documentation: written once, read by the CLI.
FIELD_HELP = {
    "precision": "How stored factors (bases, coefficients, private factors) keep their numbers: 'auto' "
    "chooses per module, with k and the private ranks, the least bytes that meet the target (float32, "
    "a half type, int8 or 4-bit NF4 per role); 'float' keeps every factor in --dtype (as before "
    "precisions existed); or one of float32, float16, bfloat16, int8, nf4 for every factor.",
}


@dataclass
class ConsolidationConfig:
    """Every option of consolidation; stored in the checkpoint and shown by ``info``.

    How k (the shared rank, per module and side) and q (each task's private rank) are chosen,
    in order of precedence: a fixed ``k`` (with ``private_rank`` for every task), an ``energy``
    target (fraction of the stack's squared norm kept, q = 0), a storage ``budget``, or an error
    target (the default): per module, the plan with the least storage whose mean (or worst, with
    ``target_metric="max"``) relative ΔW error is at most ``target_error``.
    """

    k: int | None = None
    """Fixed shared rank per module and side (clamped to the stack's numerical rank)."""
    private_rank: int = 0
    """With ``k``: private rank kept by every task in every module."""
    energy: float | None = None
    """Energy target τ in (0, 1]: smallest k whose basis holds τ of the stack's squared norm."""
    budget: str | None = None
    """Storage budget: a compression ratio ('4x') or a size ('10MB'); least mean error within it."""
    target_error: float = DEFAULT_TARGET_ERROR
    """Error target ε: relative ΔW error per module (mean over tasks, or worst task)."""
    target_metric: str = "mean"
    """'mean' or 'max': which task error the target bounds, per module."""
    weighting: str = "equal"
    """'equal': every task counts the same in the basis fit; 'norm': tasks weigh by ‖ΔW‖."""
    canonicalize: bool = True
    """Stack each adapter's balanced SVD factors rather than the raw (gauge-dependent) ones."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda': where the decompositions run."""
    dtype: str = "auto"
    """Storage dtype of bases and coefficients: 'auto' (the inputs'), 'float32', 'bfloat16', 'float16'."""
    seed: int = 0
    """Seed of the randomized range finder."""
    n_oversamples: int = 10
    """Extra random directions of the range finder (Halko et al. 2011)."""
    n_iter: int = 1
    """Power iterations of the range finder (1 suffices for stacks whose spectrum decays; the
    planner measures the true errors of whatever basis it gets, so a weaker basis costs storage,
    never honesty)."""
    max_k: int | None = None
    """Upper bound on k for every module."""
    groups: str | int = "1"
    """'1' (one basis per module), 'auto' (try 2–4 groups of tasks with separate bases per module,
    kept where cheaper at the same error, or lower error within a budget) or a number of groups."""
    precision: str = "auto"
    """How stored factors keep their numbers (:data:`FIELD_HELP`): 'auto', 'float' or one precision.
    A checkpoint whose options lack it (older files) is updated with 'float'."""

    @staticmethod
    def stored_value_problem(name: str, value: object) -> str | None:
        """What is wrong with ``value`` as the stored option ``name`` (of the type its field declares:
        a checkpoint's options are untrusted input), or None; unknown names are ignored (older or
        newer versions may store others)."""
        field = ConsolidationConfig.__dataclass_fields__.get(name)
        if field is None:
            return None
        allowed = {part.strip() for part in str(field.type).split("|")}
        if value is None:
            return None if "None" in allowed else "is null"
        if isinstance(value, bool):
            return None if "bool" in allowed else f"is {value!r}, not a number or text"
        if isinstance(value, int) and ("int" in allowed or "float" in allowed):
            return None
        if isinstance(value, float) and "float" in allowed:
            return None
        if isinstance(value, str) and "str" in allowed:
            return None
        kinds = " or ".join(sorted(allowed - {"None"}))
        return f"is {type(value).__name__} {str(value)[:40]!r}, not {kinds}"

    def mode(self) -> str:
        if self.k is not None:
            return "fixed"
        if self.energy is not None:
            return "energy"
        if self.budget is not None:
            return "budget"
        return "target"

    def validate(self) -> None:
        def bad(msg: str, hint: str) -> None:
            raise InvalidOptionError(msg, hint=hint)

        if self.k is not None and self.k < 0:
            bad(f"--k must be ≥ 0, got {self.k}", "Give a non-negative k")
        if self.k == 0 and not self.private_rank:
            bad(
                "--k 0 without --private-rank stores nothing of the tasks (every task would have 100% ΔW error)",
                "Give --k 1 or more, or --private-rank Q to keep Q private directions per task",
            )
        if self.private_rank < 0:
            bad("--private-rank must be ≥ 0", "Give a non-negative rank")
        if self.energy is not None and not 0 < self.energy <= 1:
            bad(f"--energy must be in (0, 1], got {self.energy}", "For example --energy 0.99")
        if not 0 <= self.target_error < 1:
            bad(f"--target-error must be in [0, 1), got {self.target_error}", "For example --target-error 0.05")
        if self.target_metric not in ("mean", "max"):
            bad(f"--target-metric must be 'mean' or 'max', got {self.target_metric!r}", "Use mean or max")
        if self.weighting not in ("equal", "norm"):
            bad(f"--weighting must be 'equal' or 'norm', got {self.weighting!r}", "Use equal or norm")
        if self.device not in ("auto", "cpu", "cuda"):
            bad(f"--device must be auto, cpu or cuda, got {self.device!r}", "Use auto, cpu or cuda")
        if self.device == "cuda" and not _cuda_available():
            bad("--device cuda was asked for but no CUDA device is available", "Use --device cpu or auto")
        if self.dtype not in ("auto", *STORAGE_DTYPES):
            bad(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}", "Use one of those")
        if self.precision not in PRECISION_CHOICES:
            bad(
                f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}",
                "For example --precision auto",
            )
        if self.groups != "auto" and not (str(self.groups).isdigit() and int(self.groups) >= 1):
            bad(f"--groups must be 'auto' or a positive number, got {self.groups!r}", "For example --groups auto")
        if self.budget is not None:
            try:
                kind, value = parse_budget(self.budget)
            except ValueError:
                bad(
                    f"--budget {self.budget!r} is neither a ratio ('4x') nor a size ('10MB')", "For example --budget 4x"
                )
            if value <= 0 or (kind == "ratio" and value < 1):
                bad(f"--budget {self.budget!r} must be a ratio ≥ 1 or a positive size", "For example --budget 4x")

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    def describe(self) -> str:
        mode = self.mode()
        if mode == "fixed":
            text = f"fixed k={self.k}, private rank {self.private_rank}"
        elif mode == "energy":
            text = f"energy ≥ {self.energy:g} of each stack"
        elif mode == "budget":
            text = f"budget {self.budget}, least {'worst' if self.target_metric == 'max' else 'mean'} ΔW error"
        else:
            text = f"{self.target_metric} ΔW error ≤ {self.target_error:g} per module, least storage"
        return text if self.precision == "float" else f"{text}, precision {self.precision}"
