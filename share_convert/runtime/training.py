"""Training a new task inside a Share checkpoint's subspaces (spec, section 5, last paragraph).

A new task does not get a LoRA of its own. Per module it trains only coefficients in the
module's existing bases, plus optionally φ temporary directions per side where the bases lack
something, with everything else frozen:

    ΔW_new = D_B E_B (D_A E_A)ᵀ,   D_B = [β, (I − ββᵀ) Φ_B]  (n × (k_B + φ)),
                                   D_A = [α, (I − ααᵀ) Φ_A]  (d × (k_A + φ))

Trainable: E_B ((k_B + φ) × p, initialised to 0 so that ΔW starts at exactly 0, as LoRA's B),
E_A ((k_A + φ) × p, random, as LoRA's A) and the temporary directions Φ_B (n × φ), Φ_A (d × φ).
The projection keeps the temporary directions orthogonal to the bases at every step without a
re-orthogonalization pass (gradients flow through it).

A module where the checkpoint keeps no shared basis (k = 0: every task stores private factors
only) trains in the principal subspace of the stored tasks' factors there (the left singular
vectors of their stacked balanced private factors, per side), with its rank chosen like
consolidation's ``--k`` or ``--energy``. It is an ordinary input of ``add`` afterwards: the
trained task's factors lie in that subspace, and folding makes it the module's basis.

The trained task is injected through the runtime's layers with forward hooks (no change to the
runtime's forward): :func:`add_trainable_task` (or :meth:`ShareModel.add_task`) registers it;
share_convert.runtime.saving writes it as a standard PEFT LoRA adapter (scale folded) or folds it
into a checkpoint through the same engine as ``share-convert add``. This module depends on the
runtime's layers, not on its model (which imports it): the model is known here by the members
training uses (:class:`ServingModel`). The API is documented in docs/training.md.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..engine.planning import energy_k
from ..errors import (
    DuplicateTaskError,
    InvalidOptionError,
    InvalidTaskNameError,
    ModelMismatchError,
    UnknownTaskError,
)
from ..math.linalg import canonicalize, principal_basis
from ..math.tolerances import RANK_RTOL
from ..names import validate_task_name
from .heads import ShareHead
from .layers import ShareLayer, model_path, replace_module
from .selection import TaskSelection

#: Default energy target of the principal subspace in modules without shared bases.
DEFAULT_SUBSPACE_ENERGY = 0.9
#: How far from orthonormal a layer's bases may be and still be used as they are (else QR).
_ORTHONORMAL_TOL = 1e-4


# -- the model training works on ------------------------------------------------------------------------------


class ServingModel(Protocol):
    """The members of a :class:`~share_convert.runtime.model.ShareModel` that training reads and changes.

    Declared here rather than imported, so that training depends on the runtime's layers and heads only
    and the model can import training (its ``add_task`` and ``train_task`` call this module).
    """

    base_model: nn.Module
    #: the injected layers and heads, by model path; the selection they read the running tasks from
    _layers: dict[str, ShareLayer]
    _heads: dict[str, ShareHead]
    _selection: TaskSelection
    #: the tasks added by this module, by name, and the submodules holding them (``model.trainable``)
    _trainable: dict[str, TrainableTask]
    _modules: dict[str, nn.Module | None]
    trainable: nn.ModuleDict

    @property
    def tasks(self) -> list[str]: ...

    def _append_task(self, name: str) -> int: ...

    def add_module(self, name: str, module: nn.Module | None) -> None: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...


# -- one module ----------------------------------------------------------------------------------------------


class TrainableModule(nn.Module):
    """The trainable factors of a new task in one module: ΔW = D_B E_B (D_A E_A)ᵀ (see the module doc).

    ``basis_B`` (n × k_B) and ``basis_A`` (d × k_A) are frozen buffers with orthonormal columns:
    the module's shared bases, or the principal subspace of its tasks when it has none
    (``subspace`` says which: ``"shared"`` or ``"principal"``).
    """

    def __init__(
        self,
        name: str,
        basis_B: torch.Tensor,
        basis_A: torch.Tensor,
        rank: int,
        new_directions: int,
        subspace: str,
        generator: torch.Generator,
    ):
        super().__init__()
        self.name, self.subspace = name, subspace
        self.rank, self.new_directions = rank, new_directions
        dtype = basis_B.dtype
        self.register_buffer("basis_B", basis_B)
        self.register_buffer("basis_A", basis_A)
        k_B, k_A, phi = basis_B.shape[1], basis_A.shape[1], new_directions

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype=dtype, device=basis_B.device)

        # ΔW = 0 at the start (E_B = 0); E_A random with unit-scale rows, as LoRA's A gives
        # x ↦ A x a spread of order ‖x‖/√d per direction, here in coordinates of orthonormal D_A.
        self.coef_B = nn.Parameter(torch.zeros(k_B + phi, rank, dtype=dtype, device=basis_B.device))
        self.coef_A = nn.Parameter(randn(k_A + phi, rank) / (k_A + phi) ** 0.5)
        self.phi_B = nn.Parameter(self._orthogonal(basis_B, randn(basis_B.shape[0], phi)))
        self.phi_A = nn.Parameter(self._orthogonal(basis_A, randn(basis_A.shape[0], phi)))

    @staticmethod
    def _orthogonal(basis: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """Unit columns of (I − ββᵀ) Φ: the initial temporary directions."""
        phi = phi - basis @ (basis.T @ phi)
        return phi / phi.norm(dim=0, keepdim=True).clamp_min(1e-12)

    def directions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """D_B = [β, (I − ββᵀ)Φ_B] and D_A = [α, (I − ααᵀ)Φ_A]; without φ, the bases themselves."""
        if not self.new_directions:
            return self.basis_B, self.basis_A
        pB = self.phi_B - self.basis_B @ (self.basis_B.T @ self.phi_B)
        pA = self.phi_A - self.basis_A @ (self.basis_A.T @ self.phi_A)
        return torch.cat([self.basis_B, pB], 1), torch.cat([self.basis_A, pA], 1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's LoRA factors with the scale folded: B (n × p) and A (p × d)."""
        D_B, D_A = self.directions()
        return D_B @ self.coef_B, (D_A @ self.coef_A).T

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x for inputs ``x`` (…, d), through the k-sized coordinates (never forming ΔW)."""
        D_B, D_A = self.directions()
        h = x if x.dtype == D_A.dtype or torch.is_autocast_enabled(x.device.type) else x.to(D_A.dtype)
        return (((h @ D_A) @ self.coef_A) @ self.coef_B.T) @ D_B.T

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def lora_count(self) -> int:
        """Parameters of a LoRA of the same rank on this module: p (n + d)."""
        return self.rank * (self.basis_B.shape[0] + self.basis_A.shape[0])


# -- the task -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainableCount:
    """Trainable parameters of a new task, against a LoRA of the same rank on the same modules.

    ``share``: coefficients and temporary directions; ``lora``: p (n + d) summed over the same
    modules; ``heads``: per-task copies of ``modules_to_save`` heads (the same for both).
    """

    share: int
    lora: int
    heads: int

    @property
    def ratio(self) -> float:
        """How many times fewer parameters than the LoRA, heads excluded."""
        return self.lora / max(self.share, 1)

    @property
    def ratio_with_heads(self) -> float:
        return (self.lora + self.heads) / max(self.share + self.heads, 1)

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), ratio=self.ratio, ratio_with_heads=self.ratio_with_heads)


class TrainableTask(nn.Module):
    """A new task being trained in a :class:`ShareModel`: its trainable factors per module and heads.

    Held by the model (a submodule: ``model.to(...)`` moves it, ``model.parameters()`` lists it);
    its contribution is added to the injected layers' outputs by forward hooks for the rows that
    select it.
    """

    def __init__(self, name: str, task_id: int, modules: dict[str, TrainableModule], heads: dict[str, nn.Module]):
        super().__init__()
        self.name, self.task_id = name, task_id
        self.layers = nn.ModuleDict({_key(m): t for m, t in modules.items()})
        self.heads = nn.ModuleDict({_key(h): m for h, m in heads.items()})
        self.module_names = list(modules)
        self.head_names = list(heads)
        self.new_directions = max((m.new_directions for m in modules.values()), default=0)
        self._hooks: list[Any] = []
        #: the parameters that merging froze (share_convert.runtime.merging), made trainable again by unmerging
        self.frozen_by_merge: list[nn.Parameter] = []

    def module(self, name: str) -> TrainableModule:
        return self.layers[_key(name)]  # type: ignore[return-value]

    def head(self, path: str) -> nn.Module:
        """This task's copy of the head at ``path``."""
        return self.heads[_key(path)]

    def count(self) -> TrainableCount:
        layers = list(self.layers.values())
        return TrainableCount(
            share=sum(m.trainable_count() for m in layers),  # type: ignore[operator]
            lora=sum(m.lora_count() for m in layers),  # type: ignore[operator]
            heads=sum(p.numel() for p in self.heads.parameters()),
        )

    def hook(self, layer: ShareLayer) -> Any:
        """The forward hook adding this task's ΔW x to ``layer``'s output for its rows."""
        trainable = self.module(layer.name)
        tid = self.task_id

        def add_delta(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            sel = layer.selection.current
            if sel.single is not None:
                if sel.single != tid or layer.selection.merged == tid:  # merged: ΔW is in the weights
                    return output
                return output + trainable.delta(args[0]).to(output.dtype)
            if tid not in sel.distinct:
                return output
            x = args[0]
            mask = (sel.index(x.device) == tid).to(output.dtype)  # this task's rows of a mixed batch
            delta = trainable.delta(x).to(output.dtype)
            return output + delta * mask.view(-1, *([1] * (delta.dim() - 1)))

        return add_delta


def _key(name: str) -> str:
    """A module name usable as an nn.ModuleDict key (no dots)."""
    return name.replace(".", "__")


# -- adding a task ----------------------------------------------------------------------------------------


def add_trainable_task(
    model: ServingModel,
    name: str,
    *,
    rank: int = 8,
    new_directions: int = 0,
    modules: Sequence[str] | None = None,
    heads: Sequence[str] | None = None,
    k: int | None = None,
    energy: float | None = None,
    seed: int = 0,
) -> TrainableTask:
    """Add task ``name`` to ``model``, trainable: coefficients (and φ temporary directions) only.

    Args:
        rank: the pseudo-rank p of the new task (columns of its coefficients).
        new_directions: φ, temporary directions per side and module, kept orthogonal to the bases.
        modules: the modules to train (model paths or PEFT keys); default: every injected module.
        heads: head modules (``modules_to_save``) the task trains a copy of; default: the heads
            the checkpoint's tasks save. Copies start from the base model's module, as PEFT's do.
        k, energy: rank of the principal subspace in modules without shared bases: ``k`` fixed
            (clamped to the numerical rank), else the smallest holding ``energy`` of the stored
            factors' squared norm (default 0.9).
        seed: seed of the random initial E_A and Φ.

    The new task becomes the one that trains: every other parameter of the model, earlier added tasks'
    included, is frozen (``requires_grad=False``), and the new task's parameters are the ones with
    ``requires_grad`` (:meth:`ShareModel.trainable_parameters`). :func:`set_training`
    (:meth:`ShareModel.train_task`) switches to other added tasks.
    """
    if rank < 1:
        raise InvalidOptionError(f"rank must be ≥ 1, got {rank}", hint="For example rank=8")
    if new_directions < 0:
        raise InvalidOptionError(f"new_directions must be ≥ 0, got {new_directions}", hint="For example 2")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidOptionError(f"energy must be in (0, 1], got {energy}", hint="For example 0.9")
    if k is not None and k < 1:
        raise InvalidOptionError(f"k must be ≥ 1, got {k}", hint="For example k=8")
    validate_task_name(name)
    if "=" in name:  # folding names the adapter NAME=PATH
        raise InvalidTaskNameError(f"task name {name!r} contains '='", hint="Use letters, digits, '-', '_' or '.'")
    if name in model.tasks:
        raise DuplicateTaskError(f"task {name!r} already exists in the model", hint="Choose another name")
    layers: dict[str, ShareLayer] = model._layers
    chosen = _chosen_modules(layers, modules)
    convs = [path for path in chosen if layers[path].kind.conv]
    if convs:  # a trainable task computes ΔW x as a matrix product: no conv layer
        raise InvalidOptionError(
            f"{convs[0]} is a Conv2d: new tasks train on linear layers only",
            hint="Pass modules= with the model's linear layers",
        )
    head_modules = _chosen_heads(model, heads)
    gen = torch.Generator().manual_seed(seed)
    trainables: dict[str, TrainableModule] = {}
    for path in chosen:
        layer = layers[path]
        basis_B, basis_A, subspace = _subspace(layer, k, energy)
        if basis_B.dtype in (torch.float16, torch.bfloat16):  # trainable parameters in float32 (autocast for speed)
            basis_B, basis_A = basis_B.float(), basis_A.float()
        free = min(layer.out_features - basis_B.shape[1], layer.in_features - basis_A.shape[1])
        if new_directions > free:
            raise InvalidOptionError(
                f"new_directions={new_directions} is larger than the free dimension of {path} "
                f"({free} directions outside its bases)",
                hint=f"Use new_directions ≤ {free}, or leave {path} out of modules=",
            )
        trainables[path] = TrainableModule(path, basis_B, basis_A, rank, new_directions, subspace, gen)
    tid = model._append_task(name)
    copies = {}
    for path, head in head_modules.items():
        copies[path] = copy.deepcopy(head.base_module if isinstance(head, ShareHead) else head).requires_grad_(True)
    task = TrainableTask(name, tid, trainables, copies)
    for path, module in copies.items():
        attach_head(model, path, tid, module)
    # held by the model (moved by .to(), listed by .parameters()), keyed by id: names may hold dots
    if "trainable" not in model._modules:
        model.add_module("trainable", nn.ModuleDict())
    model.trainable[f"task{tid}"] = task
    model._trainable[name] = task
    for path, trainable in trainables.items():
        # also a submodule of its layer: the base model's parameters include it, so that code that
        # only sees the base model (the transformers Trainer, inside model.use(task)) trains it
        layers[path].add_module(f"trainable_task{tid}", trainable)
        task._hooks.append(layers[path].register_forward_hook(task.hook(layers[path])))
    set_training(model, [name])
    return task


def set_training(model: ServingModel, names: Sequence[str]) -> list[nn.Parameter]:
    """Make the added tasks ``names`` the ones that train; return their parameters (for an optimizer).

    Their parameters (coefficients, temporary directions, head copies) require grad; every other
    parameter of the model, the base model's and other added tasks', is frozen. Training a task
    that is frozen would otherwise fail inside torch's backward() with no word of which task.
    """
    if isinstance(names, str):
        raise InvalidOptionError("names must be a list of task names", hint=f"Use [{names!r}]")
    if not names:
        known = ", ".join(model._trainable) or "none"
        raise InvalidOptionError("no task named to train", hint=f"Name one of the added tasks: {known}")
    chosen = [trainable_task(model, n) for n in names]
    merged = [t.name for t in chosen if t.task_id == model._selection.merged]
    if merged:
        raise InvalidOptionError(
            f"task {merged[0]!r} is merged into the base weights: it cannot train there",
            hint="Call model.unmerge() first",
        )
    model.base_model.requires_grad_(False)
    for task in model._trainable.values():
        task.requires_grad_(False)
    for task in chosen:
        task.requires_grad_(True)
    return model.trainable_parameters()


def _chosen_modules(layers: dict[str, ShareLayer], modules: Sequence[str] | None) -> list[str]:
    if modules is None:
        return list(layers)
    if isinstance(modules, str):
        raise InvalidOptionError("modules must be a list of module names", hint=f"Use modules=[{modules!r}]")
    chosen = [model_path(m) for m in modules]
    unknown = [m for m in chosen if m not in layers]
    if unknown or not chosen:
        shown = ", ".join(list(layers)[:4]) + (", …" if len(layers) > 4 else "")
        what = f"{unknown[0]!r} is not a module of the checkpoint" if unknown else "modules= is empty"
        raise ModelMismatchError(f"{what} ({len(layers)} modules: {shown})", hint="Name modules of the checkpoint")
    if len(set(chosen)) != len(chosen):
        raise InvalidOptionError("modules= names a module twice", hint="Name each module once")
    return chosen


def _chosen_heads(model: ServingModel, heads: Sequence[str] | None) -> dict[str, nn.Module]:
    if heads is None:
        return dict(model._heads)
    if isinstance(heads, str):
        raise InvalidOptionError("heads must be a list of module names", hint=f"Use heads=[{heads!r}]")
    out: dict[str, nn.Module] = {}
    for h in heads:
        path = model_path(h)
        if path in model._heads:
            out[path] = model._heads[path]
            continue
        try:
            out[path] = model.base_model.get_submodule(path)
        except AttributeError:
            raise ModelMismatchError(
                f"the model has no module {path!r} to train as a head", hint="Name a module of the model"
            ) from None
        if path in model._layers or any(path.startswith(p + ".") or p.startswith(path + ".") for p in model._layers):
            raise ModelMismatchError(f"{path} is a LoRA target, not a head", hint="Train heads outside the modules")
    return out


def attach_head(model: ServingModel, path: str, tid: int, module: nn.Module) -> None:
    """Make ``module`` task ``tid``'s copy of the head at ``path`` (wrapping the model's module in a ShareHead first)."""
    head = model._heads.get(path)
    if head is None:  # no stored task saves this head: wrap it so that only this task's rows use the copy
        base = model.base_model.get_submodule(path)
        pad = next((h.pad_value for h in model._heads.values()), float("-inf"))
        head = ShareHead(base, path, {}, model._selection, pad)
        replace_module(model.base_model, path, head)
        model._heads[path] = head
    head.copies[str(tid)] = module


def _subspace(layer: ShareLayer, k: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The orthonormal subspaces (β n × k_B, α d × k_A) a new task trains in, at one layer."""
    dtype = layer.factors.coef_A.dtype
    beta, alpha = layer.bases()
    if beta is not None and beta.shape[1] and alpha.shape[1]:
        return _orthonormal(beta), _orthonormal(alpha), "shared"
    # k = 0 here: the principal subspace of the stored tasks' (private) factors, per side
    f = layer.factors
    Bs, As = [], []
    for task in f.private_ranks:
        B, A = f.private(task)
        Bc, Ac, _ = canonicalize(B, A.T)
        Bs.append(Bc)
        As.append(Ac)
    if not Bs:
        raise ModelMismatchError(
            f"module {layer.name} holds no factors of any loaded task: there is no subspace to train in",
            hint="Leave it out of modules=",
        )
    bases = []
    for stack in (torch.cat(Bs, 1), torch.cat(As, 1)):
        U, S, _ = principal_basis(stack, stack.shape[1])
        kk = (
            min(k, U.shape[1]) if k is not None else energy_k(S, float((S**2).sum()), energy or DEFAULT_SUBSPACE_ENERGY)
        )
        bases.append(U[:, :kk].to(dtype=dtype, device=f.coef_A.device).contiguous())
    return bases[0], bases[1], "principal"


def _orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """``basis`` itself when its columns are orthonormal (one group), else an orthonormal basis of its span
    (groups of bases side by side)."""
    b64 = basis.double()
    eye = torch.eye(basis.shape[1], dtype=torch.float64, device=basis.device)
    if (b64.T @ b64 - eye).abs().max() <= _ORTHONORMAL_TOL:
        return basis
    U, S, _ = torch.linalg.svd(b64, full_matrices=False)
    rank = int((S > RANK_RTOL * S[0]).sum())
    return U[:, :rank].to(basis.dtype).contiguous()


# -- the added tasks -------------------------------------------------------------------------------------------


def trainable_task(model: ServingModel, name: str) -> TrainableTask:
    """The task ``name`` added with :func:`add_trainable_task`; an error naming the added ones otherwise."""
    task = model._trainable.get(name)
    if task is None:
        known = ", ".join(model._trainable) or "none"
        raise UnknownTaskError(f"no trainable task named {name!r}", hint=f"Trainable tasks: {known} (add_task first)")
    return task


__all__ = [
    "DEFAULT_SUBSPACE_ENERGY",
    "ServingModel",
    "TrainableCount",
    "TrainableModule",
    "TrainableTask",
    "add_trainable_task",
    "attach_head",
    "set_training",
    "trainable_task",
]
