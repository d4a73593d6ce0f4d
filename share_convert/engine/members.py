"""Members: one task's update in one module, read from its source and canonicalized.

A task comes from a source (an adapter file or a task of a checkpoint: :class:`TaskSource`); per
module its factors are read (scale folded) and put in balanced SVD form (spec, section 2, step 2):
a :class:`ModuleMember`, what stacks, planning and encoding work on. The checks that the sources
agree on their modules' shapes, and the ``--modules`` filter, are here too: they decide which
members a module has.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

import torch

from ..config import STORAGE_DTYPES, ConsolidationConfig
from ..dtypes import ST_OF, kept_as, torch_dtype
from ..errors import IncompatibleAdaptersError, InvalidOptionError
from ..io.factors import LoraFactors, LoraStack
from ..io.stack import OpenFiles, read_module_stack
from ..io.task_source import Prior, TaskSource  # noqa: F401 (engine modules import them from here)
from ..math.linalg import canonicalize_many

Progress = Callable[[str, int, int], None]


@dataclass
class ModuleMember:
    """One task's update in one module, ready for stacking."""

    task: str
    rank: int  # the adapter's rank r in this module
    Bc: torch.Tensor  # canonical factors, float32: ΔW = Bc Acᵀ, BcᵀBc = AcᵀAc = diag(s)
    Ac: torch.Tensor
    s: torch.Tensor  # singular values of ΔW, float64
    raw: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, Aᵀ) as trained, stacked when not canonicalizing
    prior: Prior | None = None
    #: η of planning.drift_bound for a reconstruction that was a projection of its original (+inf: not known)
    slack: float = math.inf

    @property
    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The column factors that enter the stacks (spec, section 2, step 3)."""
        return self.raw if self.raw is not None else (self.Bc, self.Ac)

    def to(self, device: torch.device) -> ModuleMember:
        """This member with its tensors on ``device`` (itself when they are there already)."""
        if self.s.device == device:
            return self
        raw = None if self.raw is None else (self.raw[0].to(device), self.raw[1].to(device))
        return dc_replace(self, Bc=self.Bc.to(device), Ac=self.Ac.to(device), s=self.s.to(device), raw=raw)


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def storage_dtype(config: ConsolidationConfig, weights_dtypes: Sequence[str]) -> torch.dtype:
    """The dtype a merge writes bases and coefficients in: the option's, or under 'auto' the widest
    dtype the inputs' factors are kept in (float32, then bfloat16, then float16)."""
    if config.dtype != "auto":
        return named_dtype(config.dtype)
    kept = {kept_as(d) for d in weights_dtypes}
    for pref in (torch.float32, torch.bfloat16, torch.float16):
        if pref in kept:
            return pref
    return torch.float32


def named_dtype(name: str) -> torch.dtype:
    """The torch dtype of a storage dtype as options and manifests name it ('float32', 'bfloat16',
    'float16'); KeyError for any other name."""
    if name not in STORAGE_DTYPES:
        raise KeyError(name)
    return torch_dtype(ST_OF[name])


class ModuleFilter:
    """A task source restricted to the modules whose names match a regular expression."""

    def __init__(self, source: TaskSource, pattern: str):
        self._source, self._pattern = source, re.compile(pattern)
        self._shapes: dict[str, tuple[int, int, int]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    @property
    def inner(self) -> TaskSource:
        """The source filtered (what reads a module: the filter only hides modules)."""
        return self._source

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        """The source's modules that match, filtered once (a merge asks for them per module)."""
        if self._shapes is None:
            self._shapes = {k: v for k, v in self._source.module_shapes().items() if self._pattern.search(k)}
        return dict(self._shapes)


def only_modules(sources: Sequence[TaskSource], pattern: str | None) -> list[TaskSource]:
    """Keep only the modules matching ``pattern`` (a regex searched in module names)."""
    if not pattern:
        return list(sources)
    try:
        re.compile(pattern)
    except re.error as e:
        raise InvalidOptionError(
            f"--modules {pattern!r} is not a valid regular expression ({e})",
            hint="For example --modules 'attn\\.c_attn'",
        ) from None
    kept = [ModuleFilter(s, pattern) for s in sources]
    kept = [s for s in kept if s.module_shapes()]
    if not kept:
        raise InvalidOptionError(
            f"--modules {pattern!r} matches no module of the inputs", hint="Check the pattern against the module names"
        )
    return kept


def check_compatible(sources: Sequence[TaskSource]) -> dict[str, tuple[int, int, list[int]]]:
    """Module name → (n, d, indices of the sources that have it); raises on disagreements."""
    modules: dict[str, tuple[int, int, list[int]]] = {}
    owner: dict[str, int] = {}
    for i, src in enumerate(sources):
        for name, (n, d, _r) in src.module_shapes().items():
            if name in modules:
                n0, d0, idx = modules[name]
                if (n0, d0) != (n, d):
                    other = sources[owner[name]]
                    raise IncompatibleAdaptersError(
                        f"module {name} is {n}×{d} in {src.origin} but {n0}×{d0} in {other.origin}: "
                        "they adapt different base models",
                        hint="Consolidate adapters of one base model together",
                    )
                idx.append(i)
            else:
                modules[name] = (n, d, [i])
                owner[name] = i
    if len(sources) > 1:
        for i, src in enumerate(sources):
            if all(len(modules[m][2]) == 1 for m in src.module_shapes()):
                other = next(s for j, s in enumerate(sources) if j != i)
                bases = {s.config.get("base_model_name_or_path") for s in (src, other) if s.config}
                extra = f" (base models: {', '.join(sorted(str(b) for b in bases))})" if len(bases) > 1 else ""
                raise IncompatibleAdaptersError(
                    f"{src.origin} shares no module with the other inputs{extra}: they adapt different base models",
                    hint="Consolidate adapters of one base model together",
                )
    return dict(sorted(modules.items(), key=lambda kv: natural_key(kv[0])))


def prepare_member(task: str, factors: LoraFactors, config: ConsolidationConfig, prior=None) -> ModuleMember:
    """Canonicalize one task's factors (spec, section 2, step 2)."""
    return prepare_members([task], [factors], config, [prior])[0]


def prepare_members(
    tasks: Sequence[str],
    factors: LoraStack | Sequence[LoraFactors],
    config: ConsolidationConfig,
    priors: Sequence | None = None,
    original_ranks: Sequence[int | None] | None = None,
) -> list[ModuleMember]:
    """Canonicalize many tasks' factors in one module at once (batched; spec, section 2, step 2).

    The factors move to the compute device first (``config.device``): the members, and everything
    computed from them for this module (stacks, bases, planning, encoding), live there; only what
    is written comes back. ``original_ranks`` gives, for tasks read from a checkpoint, the rank of
    the adapter they came from (their factors as read have the stored rank)."""
    device = config.torch_device()
    if isinstance(factors, LoraStack):  # read as one stack: canonicalized without restacking
        factors = LoraStack(factors.B.to(device), factors.A.to(device))
        canon = canonicalize_many(factors.B, factors.A.transpose(-1, -2))
    else:
        factors = [LoraFactors(f.B.to(device), f.A.to(device)) for f in factors]
        canon = canonicalize_many([f.B for f in factors], [f.A.T for f in factors])
    priors = priors or [None] * len(tasks)
    originals = original_ranks or [None] * len(tasks)
    if isinstance(factors, LoraStack) and config.canonicalize:  # one rank; no per-task views of the factors
        rank = int(factors.B.shape[2])
        return [
            ModuleMember(t, rank if o is None else o, Bc, Ac, s, None, p)
            for t, (Bc, Ac, s), p, o in zip(tasks, canon, priors, originals)
        ]
    return [
        ModuleMember(
            t,
            int(f.B.shape[1]) if o is None else o,
            Bc,
            Ac,
            s,
            None if config.canonicalize else (f.B, f.A.T.contiguous()),
            p,
        )
        for t, f, (Bc, Ac, s), p, o in zip(tasks, factors, canon, priors, originals)
    ]


def read_members(
    sources: Sequence[TaskSource], module: str, config: ConsolidationConfig, files: OpenFiles | None = None
) -> list[ModuleMember]:
    """One module of every source in ``sources``, read (scale folded) and canonicalized: what
    merge, add and the budget's first pass all start a module with."""
    return prepare_members(
        [s.task for s in sources],
        read_module_stack(list(sources), module, files, config.torch_device()),
        config,
        [s.prior(module) for s in sources],
        [original_rank(s, module) for s in sources],
    )


def original_rank(source: TaskSource, module: str) -> int | None:
    """The rank of the adapter a task came from in ``module``, when it differs from what is read
    (a task of a checkpoint); None for an adapter."""
    method = getattr(source, "original_rank", None)
    return method(module) if method is not None else None
