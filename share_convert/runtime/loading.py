"""Reading a checkpoint into a base model: the injected layers and heads of a :class:`ShareModel`.

:func:`inject` checks every module and head of the checkpoint against the base model before it
changes anything, builds each target layer's :class:`~share_convert.runtime.layers.ShareLayer`
(bases side by side per group, the tasks' coefficients stacked and zero-padded, their private rows
ragged: share_convert.runtime.factors; with ``keep_quantized``, the default, every role the
checkpoint stores as int8/NF4 codes is held as its codes: share_convert.runtime.coded) and each saved head's
:class:`~share_convert.runtime.heads.ShareHead`, then puts them in the model. The checkpoint is read
only through :class:`~share_convert.checkpoint.file.Checkpoint`'s accessors (``tasks``, ``modules``,
``bases``, ``task_tensors``, ``heads``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..checkpoint.reader import Checkpoint
from ..errors import (
    CorruptCheckpointError,
    DeviceMismatchError,
    InvalidOptionError,
    ModelMismatchError,
    UnknownTaskError,
)
from ..io.peft import PEFT_PREFIX
from .coded import BasisStore, RaggedCoefficients
from .components import module_paths
from .factors import RowStore, TaskFactors
from .heads import ShareHead
from .layers import ShareLayer, layer_kind, model_path, replace_module, submodule, unsupported_conv
from .selection import TaskSelection

#: PEFT wrapper segments that may appear in a head's key (``score.modules_to_save.default.weight``).
_WRAPPER_SEGMENT = re.compile(r"\.(?:modules_to_save\.[^.]+|original_module)(?=\.)")


class Injection(NamedTuple):
    """What :func:`inject` put into a base model: the loaded tasks (their ids are their positions),
    the injected layers and heads by model path, and the selection they all read the running tasks from."""

    tasks: list[str]
    layers: dict[str, ShareLayer]
    heads: dict[str, ShareHead]
    selection: TaskSelection


def inject(
    base_model: Any,
    ckpt: Checkpoint,
    tasks: Sequence[str] | None,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    pad_value: float,
    component: str | None = None,
    keep_quantized: bool = True,
) -> Injection:
    """Inject ``tasks`` of ``ckpt`` (default: all) into ``base_model`` (a model, a pipeline or one of its
    components: share_convert.runtime.components), in place; see :meth:`ShareModel.from_checkpoint` for
    the options. Nothing is changed unless every module and head fits."""
    if isinstance(tasks, str):
        raise InvalidOptionError("tasks must be a list of names", hint=f"Use tasks=[{tasks!r}]")
    names = list(ckpt.tasks) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in ckpt.tasks]
    if unknown:
        available = sorted(ckpt.tasks)
        shown = ", ".join(available[:20]) + (", …" if len(available) > 20 else "")
        raise UnknownTaskError(f"no task named {unknown[0]!r}", path=ckpt.path, hint=f"Available tasks: {shown}")
    if len(set(names)) != len(names) or not names:
        raise InvalidOptionError("tasks must name at least one task, each once", path=ckpt.path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidOptionError(
            f"dtype must be a floating torch dtype, got {dtype!r}", hint="For example torch.float32"
        )
    ids = {t: i for i, t in enumerate(names)}
    selection = TaskSelection()
    layers: dict[str, ShareLayer] = {}
    served = [m for m, info in ckpt.modules.items() if any(t in info["tasks"] for t in names)]
    paths = module_paths(base_model, ckpt, served, component)
    for module in served:
        if module not in paths:
            continue  # another component's (a text encoder's, when a UNet is served)
        info = ckpt.modules[module]
        present = [t for t in names if t in info["tasks"]]
        path = paths[module]
        target = _target(base_model, path, module, ckpt.path)
        kind = layer_kind(target)
        if kind is None:
            raise ModelMismatchError(
                f"{path} is a {type(target).__name__}; the runtime serves nn.Linear, nn.Conv2d and transformers "
                "Conv1D layers",
                path=ckpt.path,
                hint="Use 'share-convert extract' and PEFT for this model",
            )
        why = unsupported_conv(target)
        if why is not None:
            raise ModelMismatchError(
                f"{path} is a Conv2d with {why}, which a LoRA cannot adapt as PEFT and diffusers apply one",
                path=ckpt.path,
                hint="Use 'share-convert extract' for this model",
            )
        n, d = info["out_features"], info["in_features"]
        weight = target.weight
        if not kind.fits(weight, n, d):
            raise ModelMismatchError(
                f"module {path} of the model has weight {tuple(weight.shape)}, the checkpoint's ΔW is {n}×{d} "
                f"({kind.name} stores {kind.layout})",
                path=ckpt.path,
                hint=f"Load it into the base model it was made for ({_base_names(ckpt, present)})",
            )
        here = _placement(weight, device, path)
        held = dtype or weight.dtype
        if not held.is_floating_point:
            raise DeviceMismatchError(
                f"{path} has {weight.dtype} weights (quantized?)",
                path=ckpt.path,
                hint="Pass dtype=torch.bfloat16 (or float32) for the Share tensors",
            )
        basis_A, basis_B, factors, coded = _read_module(
            ckpt, module, present, ids, len(names), held, here, keep_quantized
        )
        layers[path] = ShareLayer(target, kind, path, basis_A, basis_B, factors, selection, coded)
    heads = _read_heads(base_model, ckpt, names, ids, layers, selection, pad_value)
    for path, layer in layers.items():
        replace_module(base_model, path, layer)
    for path, head in heads.items():
        replace_module(base_model, path, head)
    return Injection(names, layers, heads, selection)


def _target(model: Any, path: str, module: str, origin: Any) -> nn.Module:
    try:
        return submodule(model, path)
    except AttributeError:
        raise ModelMismatchError(
            f"the checkpoint's module {module} has no counterpart {path} in the model ({type(model).__name__})",
            path=origin,
            hint="Load it into the model class the adapters were trained on (the one PEFT wrapped)",
        ) from None


def _base_names(ckpt: Checkpoint, tasks: list[str]) -> str:
    found = sorted({str((ckpt.tasks[t].get("adapter_config") or {}).get("base_model_name_or_path")) for t in tasks})
    return ", ".join(found[:3])


def _placement(weight: torch.Tensor, device: str | torch.device | None, path: str) -> torch.device:
    """The device of a layer's Share tensors: the layer's own, or the requested one if it is the same."""
    if device is None:
        return weight.device
    wanted = torch.device(device)
    same = wanted.type == weight.device.type and (wanted.index is None or wanted.index == weight.device.index)
    if not same:
        raise DeviceMismatchError(
            f"device={str(wanted)!r} was asked for, but {path} of the model is on {weight.device}",
            hint=f"Move the model first (base_model.to({str(wanted)!r})), or leave device unset",
        )
    return weight.device


def _read_module(
    ckpt: Checkpoint,
    module: str,
    present: list[str],
    ids: dict[str, int],
    count: int,
    dtype: torch.dtype,
    device: torch.device,
    keep_quantized: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, TaskFactors, tuple[BasisStore | None, BasisStore | None]]:
    """One module's bases (groups side by side), its tasks' coefficients (stacked and padded; ragged
    where kept as codes) and ragged private rows; with ``keep_quantized``, every role the checkpoint
    stores as int8/NF4 codes is kept as its codes (the bases then as :class:`BasisStore` s, last)."""
    info = ckpt.modules[module]
    n, d = info["out_features"], info["in_features"]
    grouped = "groups" in info
    bases: dict[Any, tuple[torch.Tensor, torch.Tensor, int, int]] = {}  # group -> β, α, offsets in K_B, K_A
    k_B = k_A = 0
    coefs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    prefixes: dict[Any, str | None] = {}  # group -> where its bases and coefficients are stored
    name_of = {i: t for t, i in ids.items()}
    privates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in present:
        parts = ckpt.task_tensors(t, module)
        if "coef_B" in parts and parts["coef_B"].shape[1] > 0:
            group = info["tasks"][t].get("group") if grouped else None
            if group not in bases:
                beta, alpha = ckpt.bases(module, t)
                if beta is None or alpha is None:
                    raise CorruptCheckpointError(
                        f"module {module} has coefficients of task {t!r} but no bases",
                        path=ckpt.path,
                        hint="Re-create or re-download the checkpoint",
                    )
                bases[group] = (beta, alpha, k_B, k_A)
                prefixes[group] = ckpt.bases_prefix(module, t)
                k_B, k_A = k_B + beta.shape[1], k_A + alpha.shape[1]
            coefs[ids[t]] = (group, parts["coef_B"], parts["coef_A"])
        if "private_B" in parts and parts["private_B"].shape[1] > 0:
            privates[ids[t]] = (parts["private_B"], parts["private_A"])

    def new(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    code = _kept_codes(ckpt, module, keep_quantized, [prefixes[g] for g in bases])
    coef_slot = torch.zeros(count + 1, dtype=torch.long, device=device)
    spans: dict[int, tuple[int, int, int, int, int, int]] = {}
    ragged = None
    if code["coefs_B"] or code["coefs_A"]:  # held ragged, as stored: no padding to the largest rank
        groups = [(a0, a0 + al.shape[1], b0, b0 + be.shape[1]) for be, al, b0, a0 in sorted(bases.values(), key=_by_b0)]
        ragged = RaggedCoefficients(groups, code["coefs_B"], code["coefs_A"], dtype, device)
        coef_A, coef_B = new(1, k_A, 0), new(1, k_B, 0)
        for tid, (group, cB, cA) in sorted(coefs.items()):
            beta, alpha, b0, a0 = bases[group]
            g = (a0, a0 + alpha.shape[1], b0, b0 + beta.shape[1])
            p, rows = cB.shape[1], {"B": cB.T, "A": cA.T}
            row = ckpt.task_modules(name_of[tid])[module]["coef_row"]
            for side in rows:
                if code[f"coefs_{side}"]:  # this task's rows as codes, as stored
                    rows[side] = ckpt.store.quantized(f"{prefixes[group]}coefs_{side}", row, row + p)
            ragged.append(tid, g, rows["B"], rows["A"])
            spans[tid] = (-1, *g, p)
    else:
        P = max((c[1].shape[1] for c in coefs.values()), default=0)
        coef_A, coef_B = new(len(coefs) + 1, k_A, P), new(len(coefs) + 1, k_B, P)
        for slot, (tid, (group, cB, cA)) in enumerate(sorted(coefs.items()), start=1):
            beta, alpha, b0, a0 = bases[group]
            p = cB.shape[1]
            coef_B[slot, b0 : b0 + beta.shape[1], :p] = cB.to(dtype)
            coef_A[slot, a0 : a0 + alpha.shape[1], :p] = cA.to(dtype)
            coef_slot[tid] = slot
            spans[tid] = (slot, a0, a0 + alpha.shape[1], b0, b0 + beta.shape[1], p)
    private_A, private_Bt, ranks = _private_stores(ckpt, module, privates, ids, n, d, dtype, device, keep_quantized)
    held: dict[str, torch.Tensor | None] = {"A": None, "B": None}
    coded: dict[str, BasisStore | None] = {"A": None, "B": None}
    if bases:
        ordered = sorted(bases.items(), key=lambda item: _by_b0(item[1]))
        for side, at in (("B", 0), ("A", 1)):
            if code[f"basis_{side}"]:  # each group's basis as its codes, as stored
                parts = []
                for group, b in ordered:
                    part = RowStore(b[at].shape[1], dtype, device, code[f"basis_{side}"])
                    part.append(ckpt.store.quantized(f"{prefixes[group]}basis_{side}"))
                    parts.append(part)
                coded[side] = BasisStore(parts)
            else:
                held[side] = torch.cat([b[at] for _, b in ordered], 1).to(device=device, dtype=dtype).contiguous()
    factors = TaskFactors(coef_A, coef_B, coef_slot, private_A, private_Bt, spans, ranks, ragged)
    kept = {role for role, c in code.items() if c} | {
        f"private_{side}" for side, store in (("A", private_A), ("B", private_Bt)) if store.precision
    }
    factors.dequantized_from = _coded_bytes(ckpt, module, bases, coefs, privates, kept)
    return held["A"], held["B"], factors, (coded["A"], coded["B"])


def _by_b0(b: tuple[torch.Tensor, torch.Tensor, int, int]) -> int:
    return b[2]


def _kept_codes(ckpt: Checkpoint, module: str, keep_quantized: bool, prefixes: list[str | None]) -> dict[str, Any]:
    """Role of the bases and coefficients -> the code precision it is kept at (None: held as values).

    Coefficients written under older bases (a rotation chain, format version 3) are read rotated,
    so a module with a chain holds its coefficients as values."""
    from ..math.quantize import CODE_PRECISIONS

    roles = ("basis_B", "basis_A", "coefs_B", "coefs_A")
    precision = ckpt.module(module).precision if keep_quantized else {}
    out = {role: precision.get(role) if precision.get(role) in CODE_PRECISIONS else None for role in roles}
    if any(prefix is not None and ckpt.chain(prefix) is not None for prefix in prefixes):
        out["coefs_B"] = out["coefs_A"] = None
    return out


def _private_stores(
    ckpt: Checkpoint,
    module: str,
    privates: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ids: dict[str, int],
    n: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    keep_quantized: bool,
) -> tuple[RowStore, RowStore, dict[int, tuple[int, int]]]:
    """The ragged stores of P_A's and P_Bᵀ's rows of the tasks in ``privates`` (task id -> (P_B, P_A)),
    in task-id order, and task id -> (first row, q). With ``keep_quantized``, a side the checkpoint
    stores as int8/NF4 codes keeps its codes and scales as stored (read by rows, not dequantized)."""
    name_of = {i: t for t, i in ids.items()}
    stores: dict[str, RowStore] = {}
    for side, cols in (("A", d), ("B", n)):
        stored = f"modules/{module}/private_{side}"
        code = ckpt.code_precision(stored) if keep_quantized and ckpt.has(stored) else None
        stores[side] = RowStore(cols, dtype, device, code)
    ranks: dict[int, tuple[int, int]] = {}
    for tid, (pB, pA) in sorted(privates.items()):
        q = pB.shape[1]
        rows: dict[str, Any] = {"A": pA, "B": pB.T}
        for side, store in stores.items():
            if store.precision is not None:  # the codes of this task's rows, as stored
                row = ckpt.task_modules(name_of[tid])[module]["private_row"]
                rows[side] = ckpt.store.quantized(f"modules/{module}/private_{side}", row, row + q)
        offset = stores["A"].append(rows["A"])
        stores["B"].append(rows["B"])
        ranks[tid] = (offset, q)
    return stores["A"], stores["B"], ranks


def _coded_bytes(
    ckpt: Checkpoint,
    module: str,
    bases: dict[Any, tuple[torch.Tensor, torch.Tensor, int, int]],
    coefs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]],
    privates: dict[int, tuple[torch.Tensor, torch.Tensor]],
    kept: Collection[str] = frozenset(),
) -> dict[str, int]:
    """Precision -> the bytes the checkpoint keeps, as int8/NF4 codes and their scales, of what was
    loaded of ``module`` (its bases, the loaded tasks' coefficient and private rows) and is held
    dequantized: the roles in ``kept`` (held as codes) left out."""
    from ..math.quantize import CODE_PRECISIONS, stored_bytes

    precision = ckpt.module(module).precision
    if not any(p in CODE_PRECISIONS for p in precision.values()):
        return {}
    out: dict[str, int] = {}

    def count(role: str, rows: int, cols: int) -> None:
        if precision[role] in CODE_PRECISIONS and rows and role not in kept:
            out[precision[role]] = out.get(precision[role], 0) + stored_bytes(rows, cols, precision[role])

    for beta, alpha, _, _ in bases.values():
        count("basis_B", beta.shape[0], beta.shape[1])
        count("basis_A", alpha.shape[0], alpha.shape[1])
    for cB, cA in ((c[1], c[2]) for c in coefs.values()):
        count("coefs_B", cB.shape[1], cB.shape[0])
        count("coefs_A", cA.shape[1], cA.shape[0])
    for pB, pA in privates.values():
        count("private_B", pB.shape[1], pB.shape[0])
        count("private_A", pA.shape[0], pA.shape[1])
    return dict(sorted(out.items()))


def _read_heads(
    base_model: nn.Module,
    ckpt: Checkpoint,
    names: list[str],
    ids: dict[str, int],
    layers: dict[str, ShareLayer],
    selection: TaskSelection,
    pad_value: float,
) -> dict[str, ShareHead]:
    """Per head module, a copy per task that saved one (its tensors replacing the base module's)."""
    copies: dict[str, dict[int, nn.Module]] = {}
    for t in names:
        for path, module in head_copies(base_model, t, ckpt.heads(t), layers, ckpt.path).items():
            copies.setdefault(path, {})[ids[t]] = module
    return {
        path: ShareHead(submodule(base_model, path), path, per_task, selection, pad_value)
        for path, per_task in copies.items()
    }


def head_copies(
    base_model: nn.Module, task: str, heads: dict[str, torch.Tensor], layers: Collection[str], origin: Any
) -> dict[str, nn.Module]:
    """Per head module path, a copy of the model's module holding ``task``'s saved ``heads`` tensors
    (PEFT keys); refused when a head is also a LoRA target (one of ``layers``) or the model lacks it.
    ``origin`` is the file the heads come from, for messages."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in heads.items():
        rel = _WRAPPER_SEGMENT.sub("", model_path(key))
        path, _, leaf = rel.rpartition(".")
        by_module.setdefault(path, {})[leaf] = value
    out: dict[str, nn.Module] = {}
    for path, tensors in by_module.items():
        if any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p in layers):
            raise ModelMismatchError(
                f"task {task!r} saves tensors of {path}, which is also a LoRA target",
                path=origin,
                hint="Use 'share-convert extract' and PEFT for this task",
            )
        base = _target(base_model, path, f"{PEFT_PREFIX}{path}", origin) if path else None
        if isinstance(base, ShareHead):  # a head already served per task: copy the base model's module
            base = base.base_module
        if base is None or not all(isinstance(getattr(base, leaf, None), torch.Tensor) for leaf in tensors):
            raise ModelMismatchError(
                f"task {task!r} saves head tensors {sorted(tensors)} of {path or 'the model'}, which the model lacks",
                path=origin,
                hint="Load it into the model class the adapter was trained with",
            )
        out[path] = _head_copy(base, tensors)
    return out


def _head_copy(base: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``base`` holding ``tensors`` (in the base module's dtype and device; shapes may differ)."""
    module = copy.deepcopy(base)
    for leaf, value in tensors.items():
        old = getattr(module, leaf)
        new = value.to(dtype=old.dtype, device=old.device).clone()
        if isinstance(old, nn.Parameter):
            setattr(module, leaf, nn.Parameter(new, requires_grad=False))
        else:
            module.register_buffer(leaf, new)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    return module.requires_grad_(False)


__all__ = ["Injection", "head_copies", "inject"]
