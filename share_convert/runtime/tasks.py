"""Loading and deleting tasks while a :class:`~share_convert.runtime.model.ShareModel` serves.

:func:`load_task` reads one task from any input the command line takes (a PEFT adapter folder or
file, a kohya or diffusers file, an ``hf://`` address, or a task of another Share checkpoint written
``CHECKPOINT::TASK``), through the one input registry (share_convert.io.sources). Per module it is
encoded by the engine's encoder (share_convert.engine.encoding.encode_in_bases) in the model's shared
bases where it lies in them, with a private correction where they miss part of it, or as its own
factors where that stores less, the least storage whose ΔW error is within the checkpoint's error
target (its ``target_error``). What happened in each module comes back as a :class:`LoadReport`.
:func:`delete_task` frees a task's rows (coefficients, private factors, head copies). Both work on
the layers' stacked tensors through share_convert.runtime.slots.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ..checkpoint.reader import Checkpoint
from ..config import DEFAULT_TARGET_ERROR, ConsolidationConfig
from ..engine.encoding import StoredBases, encode_in_bases
from ..engine.members import prepare_members
from ..engine.precision import Precisions
from ..errors import (
    DuplicateTaskError,
    InvalidOptionError,
    InvalidTaskNameError,
    ModelMismatchError,
    UnknownTaskError,
)
from ..io.factors import LoraFactors
from ..io.sources import open_inputs
from ..io.task_source import TaskSource
from ..names import validate_task_name
from .layers import ShareLayer, layer_kind, model_path, replace_module
from .loading import head_copies
from .selection import LoadedTasks
from .slots import empty_factors, free_task, put_coefficients, put_private
from .training import ServingModel, attach_head

#: Separates a checkpoint from one of its tasks in a source: ``share.safetensors::sst2``.
TASK_SEPARATOR = "::"

Placement = Literal["shared", "mixed", "private", "zero"]
Group = tuple[int, int, int, int]  # a group's columns in a layer's bases: a0, a1 (basis_A), b0, b1 (basis_B)


@dataclass(frozen=True)
class ServingOptions:
    """What a model keeps of its checkpoint for tasks loaded later: the error target they are held
    within, the dtype of the Share tensors (None: each layer's weight dtype), the head padding, and
    the base models its tasks' adapter configs name."""

    target_error: float = DEFAULT_TARGET_ERROR
    dtype: torch.dtype | None = None
    pad_value: float = float("-inf")
    base_models: frozenset[str] = frozenset()

    @classmethod
    def of(cls, ckpt: Checkpoint, dtype: torch.dtype | None, pad_value: float) -> ServingOptions:
        target = ckpt.config.get("target_error")
        bases = {(rec.get("adapter_config") or {}).get("base_model_name_or_path") for rec in ckpt.tasks.values()}
        return cls(
            float(target)
            if isinstance(target, (int, float)) and not isinstance(target, bool)
            else DEFAULT_TARGET_ERROR,
            dtype,
            pad_value,
            frozenset(str(b) for b in bases if b),
        )


@dataclass(frozen=True)
class ModuleLoad:
    """How a loaded task is held in one module.

    ``placement``: ``"shared"`` (coefficients in the module's shared bases only), ``"mixed"``
    (coefficients and a private correction of rank ``private_rank``), ``"private"`` (its own factors
    of rank ``private_rank``: the bases hold too little of it, or the module has none), or ``"zero"``
    (its ΔW is zero here: nothing is held). ``rank`` is the number of columns of its coefficients;
    ``error`` the relative ΔW error of what is held, against the source's ΔW (for a task of a
    checkpoint: its reconstruction there); ``new_layer`` that the checkpoint had no such module and a
    layer was added for it; ``params`` the numbers held.
    """

    module: str
    placement: Placement
    rank: int
    private_rank: int
    error: float
    params: int
    new_layer: bool = False


@dataclass(frozen=True)
class LoadReport:
    """What :meth:`ShareModel.load_task` did: the task, where it came from, the error target it was held
    within, and per module how (:class:`ModuleLoad`); ``heads``: the head modules it brought a copy of."""

    task: str
    source: str
    target_error: float
    modules: tuple[ModuleLoad, ...]
    heads: tuple[str, ...]

    def count(self, placement: Placement) -> int:
        """The number of modules where the task is held that way."""
        return sum(m.placement == placement for m in self.modules)

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), max_error=self.max_error)


class TaskHost(ServingModel, Protocol):
    """The members of a ShareModel that loading and deleting tasks read and change."""

    _tasks: LoadedTasks
    _groups: dict[str, list[Group]]
    _options: ServingOptions
    _active: tuple[str | None, ...]

    def _check_loaded(self) -> None: ...

    def unmerge(self) -> None: ...


# -- loading ------------------------------------------------------------------------------------------------


def open_task(source: str | Path) -> TaskSource:
    """The one task ``source`` names, opened through the input registry (``CHECKPOINT::TASK`` picks a
    task of a checkpoint; a checkpoint of one task needs no ``::TASK``)."""
    text = os.fspath(source)
    wanted = None
    if TASK_SEPARATOR in text:
        text, wanted = text.rsplit(TASK_SEPARATOR, 1)
    found = open_inputs([text])
    if wanted is not None:
        match = [s for s in found if getattr(s, "source_task", s.task) == wanted]
        if not match:
            names = ", ".join(s.task for s in found[:20])
            raise UnknownTaskError(f"{text} has no task named {wanted!r}", path=text, hint=f"Its tasks: {names}")
        return match[0]
    if len(found) != 1:
        names = ", ".join(s.task for s in found[:5]) + (", …" if len(found) > 5 else "")
        raise InvalidOptionError(
            f"{text} holds {len(found)} tasks ({names}): load_task loads one",
            path=text,
            hint=f"Name one: '{text}{TASK_SEPARATOR}{found[0].task}'" if found else "Give an adapter or a checkpoint",
        )
    return found[0]


def load_task(
    model: TaskHost, source: str | Path, name: str | None = None, *, check_base_model: bool = True
) -> LoadReport:
    """Load the task ``source`` names into ``model`` as ``name`` (default: the name the source gives
    it); see :meth:`ShareModel.load_task`. Nothing changes in the model unless every module and head fits.

    ``check_base_model``: refuse an adapter whose config names a base model other than the ones the
    checkpoint's tasks and the model's config name (compared by their last path component); shapes are
    always checked."""
    model._check_loaded()
    src = open_task(source)
    name = src.task if name is None else name
    if not isinstance(name, str):
        raise InvalidTaskNameError(f"a task name is text, got {name!r}", hint="For example name='sst2'")
    validate_task_name(name)
    if name in model._tasks.ids:
        raise DuplicateTaskError(f"task {name!r} is already loaded", hint="Pass another name=, or delete_task it first")
    if check_base_model:
        _check_base_model(model, src)
    options = model._options
    plans: dict[str, tuple[ShareLayer | None, nn.Module, LoraFactors]] = {}
    for module, (n, d, _r) in src.module_shapes().items():
        path = model_path(module)
        layer = model._layers.get(path)
        target = layer.base_layer if layer is not None else _new_target(model, path, src.origin)
        kind = layer_kind(target)
        if kind is None or not kind.fits(target.weight, n, d):
            shape = tuple(target.weight.shape)
            raise ModelMismatchError(
                f"{src.origin} adapts {path} as {n}×{d}; the model's {path} is a {type(target).__name__} of "
                f"weight {shape}",
                path=src.origin,
                hint="Load adapters of the model's base model",
            )
        plans[path] = (layer, target, src.read_module(module))
    heads = head_copies(model.base_model, name, src.read_heads(), set(model._layers) | set(plans), src.origin)
    encoded = {
        path: _encode(path, layer, target, factors, model, options) for path, (layer, target, factors) in plans.items()
    }
    # every module and head fits: from here on the model changes
    tid = model._append_task(name)
    results = []
    for path, (report, tensors, group) in encoded.items():
        layer = model._layers.get(path)
        if layer is None and tensors:
            layer = _add_layer(model, path, plans[path][1])
        if "coef_B" in tensors:
            put_coefficients(layer.factors, tid, tensors["coef_B"], tensors["coef_A"], group)
        if "private_B" in tensors:
            put_private(layer.factors, tid, tensors["private_B"], tensors["private_A"])
        results.append(report)
    for path, module in heads.items():
        attach_head(model, path, tid, module)
    return LoadReport(name, src.origin, options.target_error, tuple(results), tuple(heads))


def _check_base_model(model: TaskHost, src: TaskSource) -> None:
    """Refuse an adapter whose config names a base model other than those the model's tasks name."""
    base = (src.config or {}).get("base_model_name_or_path")
    known = set(model._options.base_models)
    own = getattr(getattr(model.base_model, "config", None), "_name_or_path", None)
    if own:
        known.add(str(own))
    if not base or not known:
        return

    def short(name: str) -> str:
        return name.rstrip("/").rsplit("/", 1)[-1].lower()

    if short(str(base)) not in {short(k) for k in known}:
        raise ModelMismatchError(
            f"{src.origin} was trained on {base}; this model serves {', '.join(sorted(known)[:3])}",
            path=src.origin,
            hint="Load adapters of the model's base model, or pass check_base_model=False if it is one",
        )


def _new_target(model: TaskHost, path: str, origin: str) -> nn.Module:
    """The base model's layer at ``path``, which the checkpoint does not adapt."""
    try:
        return model.base_model.get_submodule(path)
    except AttributeError:
        raise ModelMismatchError(
            f"{origin} adapts {path}, which the model ({type(model.base_model).__name__}) lacks",
            path=origin,
            hint="Load adapters of the model's base model",
        ) from None


def _add_layer(model: TaskHost, path: str, target: nn.Module) -> ShareLayer:
    """Inject a layer with no bases (its tasks held privately) at ``path``, where the checkpoint has none."""
    kind = layer_kind(target)
    assert kind is not None
    n, d = target.weight.shape[::-1] if kind.transposed else target.weight.shape
    dtype = model._options.dtype or target.weight.dtype
    factors = empty_factors(n, d, len(model._tasks.names), dtype, target.weight.device)
    layer = ShareLayer(target, kind, path, None, None, factors, model._selection)
    replace_module(model.base_model, path, layer)
    model._layers[path] = layer
    model._groups[path] = []
    return layer


# -- one module's encoding ----------------------------------------------------------------------------------

Encoded = tuple[dict[str, torch.Tensor], float]


def _encode(
    path: str,
    layer: ShareLayer | None,
    target: nn.Module,
    factors: LoraFactors,
    model: TaskHost,
    options: ServingOptions,
) -> tuple[ModuleLoad, dict[str, torch.Tensor], Group | None]:
    """One module of the new task, encoded the cheapest way within the error target (module doc)."""
    dtype = layer.factors.coef_A.dtype if layer is not None else options.dtype or target.weight.dtype
    (member,) = prepare_members(
        [path], [LoraFactors(factors.B.cpu(), factors.A.cpu())], ConsolidationConfig(device="cpu")
    )
    norm = float(member.s.double().pow(2).sum().sqrt())
    n, d = factors.B.shape[0], factors.A.shape[1]
    rank = int(member.Bc.shape[1])

    held = _held_precision(layer)

    def encode(bases: StoredBases | None, q: int) -> Encoded:
        tensors, record = encode_in_bases(
            [member], [q], bases, dtype, [norm], factors="per_task", errors="stored", precision=held
        )[0]
        return tensors, float(record["error"])

    def report(placement: Placement, tensors: dict[str, torch.Tensor], error: float) -> ModuleLoad:
        p = tensors["coef_B"].shape[1] if "coef_B" in tensors else 0
        q = tensors["private_B"].shape[1] if "private_B" in tensors else 0
        params = _numel(tensors)
        return ModuleLoad(path, placement, p, q, error, params, new_layer=layer is None and bool(tensors))

    if rank == 0:
        return report("zero", {}, 0.0), {}, None
    target_error = options.target_error
    shared: tuple[Group, StoredBases, Encoded] | None = None
    for group in model._groups.get(path, []) if layer is not None else []:
        a0, a1, b0, b1 = group
        bases = StoredBases.of(layer.basis("B", b0, b1).cpu(), layer.basis("A", a0, a1).cpu())
        found = encode(bases, 0)
        if shared is None or found[1] < shared[2][1]:
            shared = (group, bases, found)
    if shared is not None and shared[2][1] <= target_error:
        return report("shared", *shared[2]), shared[2][0], shared[0]

    def key(c: tuple[Placement, Encoded, Group | None]) -> tuple[bool, int, float]:
        tensors, error = c[1]
        return error > target_error, _numel(tensors), error

    candidates: list[tuple[Placement, Encoded, Group | None]] = [
        ("private", _own_factors(lambda q: encode(None, q), member.s, rank, target_error), None)
    ]
    if shared is not None:
        # coefficients and a correction of rank q store (n + d) q more than the coefficients: only the
        # q that would store less than the task's own factors are worth trying
        own = candidates[0][1]
        spare = _numel(own[0]) - _numel(shared[2][0]) - 1 if own[1] <= target_error else rank * (n + d)
        group, bases = shared[0], shared[1]
        mixed = _fewest(lambda q: encode(bases, q), min(rank, spare // (n + d)), target_error)
        if mixed is not None:
            candidates.append(("mixed", mixed, group))
    placement, (tensors, error), group = min(candidates, key=key)
    return report(placement, tensors, error), tensors, group


def _held_precision(layer: ShareLayer | None) -> Precisions:
    """The precisions a layer holds a new task's coefficients and private rows at: the codes of its
    stores where it keeps a checkpoint's codes (``keep_quantized``), so that the task is encoded, and its
    error measured, as it will be held; the serving dtype (None) elsewhere."""
    if layer is None:
        return Precisions()
    f = layer.factors
    return Precisions(None, f.ragged.rows_B[0].precision if f.ragged is not None else None, f.private_A.precision)


def _numel(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def _own_factors(encode: Callable[[int], Encoded], s: torch.Tensor, rank: int, target: float) -> Encoded:
    """The task's own top-q factors with the smallest q whose error is within ``target``: the error of
    keeping q singular values is that of the ones left (‖s[q:]‖ / ‖s‖) up to the storage's rounding, so
    the search starts there."""
    tail = s.double().pow(2).flip(0).cumsum(0).flip(0)  # tail[j] = Σ_{i ≥ j} s_i²
    within = (tail[1:] <= (target**2) * tail[0]).nonzero()
    q = int(within[0]) + 1 if within.numel() else rank
    while True:
        found = encode(q)
        if found[1] <= target or q >= rank:
            return found
        q += 1


def _fewest(encode: Callable[[int], Encoded], most: int, target: float) -> Encoded | None:
    """The encoding with the smallest private rank 1 ≤ q ≤ ``most`` whose error is within ``target`` (the
    error falls as q grows: a binary search), or None when none is."""
    if most < 1:
        return None
    found = {most: encode(most)}
    if found[most][1] > target:
        return None
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi) // 2
        found[mid] = encode(mid)
        if found[mid][1] <= target:
            hi = mid
        else:
            lo = mid + 1
    return found[lo]


# -- deleting -----------------------------------------------------------------------------------------------


def delete_task(model: TaskHost, name: str) -> None:
    """Free task ``name``'s rows in every layer and its head copies; see :meth:`ShareModel.delete_task`."""
    model._check_loaded()
    if not isinstance(name, str):
        raise UnknownTaskError(f"no task named {name!r} is loaded", hint="Name a loaded task")
    tid = model._tasks.id_of(name)
    if model._selection.merged == tid:
        model.unmerge()
    trained = model._trainable.pop(name, None)
    if trained is not None:
        for hook in trained._hooks:
            hook.remove()
        for path in trained.module_names:
            del model._layers[path]._modules[f"trainable_task{tid}"]
        del model.trainable[f"task{tid}"]
    for path, layer in list(model._layers.items()):
        free_task(layer.factors, tid)
        idle = not layer.factors.spans and not layer.factors.private_ranks
        if idle and not layer.has_bases and not any(k.startswith("trainable_task") for k in layer._modules):
            replace_module(model.base_model, path, layer.base_layer)  # a layer load_task added, now unused
            del model._layers[path]
            model._groups.pop(path, None)
    for path, head in list(model._heads.items()):
        if str(tid) in head.copies:
            del head.copies[str(tid)]
        if not len(head.copies):
            replace_module(model.base_model, path, head.base_module)
            del model._heads[path]
    model._tasks.remove(name)
    if model._active == (name,):
        model._active = ()


def groups_of(layers: dict[str, ShareLayer]) -> dict[str, list[Group]]:
    """Per layer, the groups of its bases (their columns), from the loaded tasks' spans."""
    return {path: sorted({s[1:5] for s in layer.factors.spans.values()}) for path, layer in layers.items()}


__all__ = [
    "TASK_SEPARATOR",
    "LoadReport",
    "ModuleLoad",
    "ServingOptions",
    "delete_task",
    "groups_of",
    "load_task",
    "open_task",
]
