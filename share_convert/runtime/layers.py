"""The runtime's injected layer: a base layer plus the Share update of every loaded task.

:class:`ShareLayer` holds a module's bases once and every loaded task's coefficients and private
factors (:class:`TaskFactors`), and computes, for the row of task t (spec, sections 1 and 6),

    y = W x + β (E_B,t (E_A,tᵀ (αᵀ x))) + P_B,t (P_A,t x)

with the LoRA scale already folded into the stored tensors. In a batch whose rows belong to
different tasks, ``αᵀ x`` and the product with β are computed once for all rows; only the
k × p coefficient products are per task, gathered per row from zero-padded stacked tensors
(``index_select`` + ``bmm``), with no Python loop over rows or tasks. Private factors are held
without padding (share_convert.runtime.factors): a mixed batch applies them task by task, to the
rows of that task (a loop over the tasks present in the batch). In a grouped module
(``merge --groups``) each row pays its own group's k only: the rows are taken group by group (a
loop over the groups present in the batch, not over tasks). :class:`LayerKind` says how a base
layer's weight is laid out against the checkpoint's ΔW (n out × d in).

A ``Conv2d`` layer's ΔW is ``out × (in·kh·kw)`` (a conv LoRA: ``down`` a conv with the layer's kernel,
stride and padding, ``up`` a 1×1 conv): αᵀ and P_A are applied as convolutions of that kernel, and
everything after them acts on the channels, as for a linear layer on its last dimension.

This module sits below both the model (share_convert.runtime.model) and training
(share_convert.runtime.training), which use its layers and never each other's internals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BatchMismatchError, DeviceMismatchError
from ..io.peft import PEFT_PREFIX
from .coded import BasisStore
from .factors import TaskFactors
from .selection import Selection, TaskSelection

# -- which layers can be served ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKind:
    """How a base layer's weight relates to the checkpoint's ΔW (n out × d in).

    ``transposed``: the weight is stored d × n (transformers' ``Conv1D``, PEFT's
    ``fan_in_fan_out``). ``conv``: a ``Conv2d`` whose weight is n × in × kh × kw, d = in·kh·kw.
    """

    name: str
    transposed: bool
    conv: bool = False

    def fits(self, weight: torch.Tensor, n: int, d: int) -> bool:
        """Whether a layer of weight ``weight`` is the module of a ΔW of n × d."""
        if self.conv:
            return weight.dim() == 4 and weight.shape[0] == n and weight[0].numel() == d
        return tuple(weight.shape) == ((d, n) if self.transposed else (n, d))

    @property
    def layout(self) -> str:
        return "out×in×kh×kw" if self.conv else "in×out" if self.transposed else "out×in"

    def as_weight(self, delta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """ΔW (n × d) laid out like the layer's weight, of shape ``shape``."""
        return delta.T if self.transposed else delta.reshape(shape)


LINEAR = LayerKind("Linear", transposed=False)
CONV1D = LayerKind("Conv1D", transposed=True)
CONV2D = LayerKind("Conv2d", transposed=False, conv=True)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a layer the runtime can inject into, or None (see :func:`unsupported_conv` for Conv2d)."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv2d):
        return CONV2D
    try:  # transformers is optional: without it no model holds a Conv1D
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is in the test extra
        return None
    return CONV1D if isinstance(module, Conv1D) else None


def unsupported_conv(module: nn.Module) -> str | None:
    """Why a ``Conv2d`` cannot carry a LoRA the way PEFT and diffusers apply one (None: it can).

    Their ``down`` conv has the layer's kernel, stride and padding but no groups, no dilation and
    zero padding, so ΔW x is a convolution of ΔW only for such layers.
    """
    if not isinstance(module, nn.Conv2d):
        return None
    if module.groups != 1:
        return f"groups={module.groups}"
    if tuple(module.dilation) != (1, 1):
        return f"dilation={tuple(module.dilation)}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


def model_path(key: str) -> str:
    """The base model's submodule name for a PEFT key prefix (``base_model.model.`` stripped)."""
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


#: One piece of a layer's Share part, features last: ``(c, up, rows)`` stands for ``c @ up.T`` (``c``
#: alone when ``up`` is None) added at the batch rows ``rows`` (every row when None)
Part = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


# -- one target layer --------------------------------------------------------------------------------------


class ShareLayer(nn.Module):
    """A base layer plus the Share update of every loaded task (the bases held once).

    ``basis_A`` (d × K_A) and ``basis_B`` (n × K_B) are buffers (None where no loaded task has
    coefficients here, or where they are held as codes: then ``coded_A`` / ``coded_B``, a
    :class:`~share_convert.runtime.coded.BasisStore`, hold them and each call decodes the columns it
    uses; :meth:`basis` reads either). The Share part is computed in the factors' dtype: the input
    is cast to it and the result back to the base layer's output dtype.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        kind: LayerKind,
        name: str,
        basis_A: torch.Tensor | None,
        basis_B: torch.Tensor | None,
        factors: TaskFactors,
        selection: TaskSelection,
        coded: tuple[BasisStore | None, BasisStore | None] = (None, None),
    ):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.name = name
        self.register_buffer("basis_A", basis_A)
        self.register_buffer("basis_B", basis_B)
        self.coded_A, self.coded_B = coded
        self.factors = factors
        self.selection = selection
        self.out_features, self.in_features = factors.out_features, factors.in_features
        self._backup: torch.Tensor | None = None
        self._merged: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``module.weight``, e.g. for its dtype, still finds it)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def has_bases(self) -> bool:
        """Whether the layer holds bases (as values or as codes)."""
        return self.basis_A is not None or self.coded_A is not None

    def basis(self, side: str, c0: int, c1: int) -> torch.Tensor:
        """Columns ``c0:c1`` of ``basis_<side>`` ("A" or "B") in the serving dtype (decoded if held as codes)."""
        coded = self.coded_A if side == "A" else self.coded_B
        if coded is not None:
            return coded.take(c0, c1, self.factors.dtype)
        return (self.basis_A if side == "A" else self.basis_B)[:, c0:c1]

    def bases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The whole bases (β n × K_B, α d × K_A) in the serving dtype; (None, None) without bases."""
        if not self.has_bases:
            return None, None
        widths = [
            c.shape[1] if c is not None else b.shape[1]
            for c, b in ((self.coded_B, self.basis_B), (self.coded_A, self.basis_A))
        ]
        return self.basis("B", 0, widths[0]), self.basis("A", 0, widths[1])

    # forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sel = self.selection.current
        if sel.single is not None:
            if sel.single == self.selection.merged or not self.serves(sel.single):
                return self.base_layer(x, *args, **kwargs)
        elif not any(self.serves(t) for t in sel.distinct):
            return self.base_layer(x, *args, **kwargs)
        self._check_input(x)
        result = self.base_layer(x, *args, **kwargs)
        if self._adds_in_place(result):
            # serving: the Share part goes straight into the base output (β's product fused with the
            # addition), with no second n-wide tensor
            flat = result.view(-1, self.out_features)
            for c, up, rows in self._parts(self._cast(x), sel):
                if rows is None and up is not None:
                    flat.addmm_(c.reshape(-1, c.shape[-1]), up.T)
                elif rows is None:
                    result.add_(c)
                else:  # the rows of one group of a grouped module (not contiguous in general)
                    result.index_add_(0, rows, c if up is None else c @ up.T)
            return result
        delta = self.delta(x, sel)
        return result if delta is None else result + delta.to(result.dtype)

    def _adds_in_place(self, result: torch.Tensor) -> bool:
        """Whether the Share part can be added into ``result`` in place: nothing to differentiate, the
        features last (not a conv) and in the Share tensors' dtype."""
        return (
            not torch.is_grad_enabled()
            and not self.kind.conv
            and result.dtype == self.factors.coef_A.dtype
            and result.is_contiguous()
        )

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.factors.coef_A.dtype
        return x if x.dtype == dtype else x.to(dtype)

    def serves(self, task: int) -> bool:
        """Whether ``task`` changes this layer."""
        return task in self.factors.spans or task in self.factors.private_ranks

    def _check_input(self, x: torch.Tensor) -> None:
        here = self.factors.coef_slot.device
        if x.device != here:
            raise DeviceMismatchError(
                f"the input reaching {self.name} is on {x.device}, the model's Share tensors on {here}",
                hint=f"Move the inputs to {here}, or the model with model.to({str(x.device)!r})",
            )
        weight = getattr(self.base_layer, "weight", None)
        if (
            weight is not None
            and x.is_floating_point()
            and x.dtype != weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            raise DeviceMismatchError(
                f"the input reaching {self.name} is {x.dtype}, the layer's weights are {weight.dtype}",
                hint=f"Convert the inputs to {weight.dtype}, or the model with model.to({x.dtype})",
            )

    def delta(self, x: torch.Tensor, sel: Selection | None = None) -> torch.Tensor | None:
        """The Share part of the output for the tasks of ``sel`` (default: the running call's); None when zero."""
        sel = sel if sel is not None else self.selection.current
        h, out = self._cast(x), None
        for c, up, rows in self._parts(h, sel):
            out = _placed(out, c if up is None else c @ up.T, rows, h.shape[0])
        return None if out is None else self._up(out)

    def _parts(self, h: torch.Tensor, sel: Selection) -> Iterator[Part]:
        """The Share part for ``sel`` as :data:`Part` pieces, features last."""
        if sel.single is not None:
            return self._parts_single(h, sel.single)
        rows = sel.for_rows(h.shape[0]) if h.dim() >= 2 else None
        if rows is None:
            raise BatchMismatchError(
                f"{self.name} received {tuple(h.shape[:-1])} rows for a batch of {sel.batch} tasks: "
                "this model reshapes its rows before this layer",
                hint="Run one task per call for this model",
            )
        return self._parts_mixed(h, rows)

    def _down(self, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``Aᵀ x`` for A (d × k) with the features last: (…, k); for a conv, A's columns are kernels."""
        if not self.kind.conv:
            return h @ A
        conv = self.base_layer
        kernels = A.T.reshape(A.shape[1], *conv.weight.shape[1:])
        return F.conv2d(h, kernels, None, conv.stride, conv.padding).movedim(1, -1)

    def _up(self, out: torch.Tensor) -> torch.Tensor:
        """A result with the features last laid out like the layer's output (a conv's channels second)."""
        return out.movedim(-1, 1) if self.kind.conv else out

    def _parts_single(self, h: torch.Tensor, task: int) -> Iterator[Part]:
        f = self.factors
        span = f.spans.get(task)
        if span is not None:
            _, a0, a1, b0, b1, _ = span
            E_B, E_A = f.coefficients(task)
            z = self._down(h, self.basis("A", a0, a1))
            yield (z @ E_A) @ E_B.T, self.basis("B", b0, b1), None
        if task in f.private_ranks:
            B, A = f.private(task)
            yield self._down(h, A.T), B, None

    def _parts_mixed(self, h: torch.Tensor, sel: Selection) -> Iterator[Part]:
        """One task per row: αᵀx and β once per group present, the coefficients gathered by row."""
        f = self.factors
        index = sel.index(h.device)  # the base model's rows (id -1) take the last, all-zero slot entry
        groups: dict[tuple[int, int, int, int], list[int]] = {}
        for t in sel.distinct:
            if t in f.spans:
                groups.setdefault(f.spans[t][1:5], []).append(t)
        for (a0, a1, b0, b1), tasks in groups.items():
            # one group: every row (rows of no task here gather the zero slot); several: each its own rows
            rows = None if len(groups) == 1 else sel.rows(tuple(tasks), h.device)
            hg, ig = (h, index) if rows is None else (h.index_select(0, rows), index.index_select(0, rows))
            # task id -> entry of the stacks (all loaded tasks, padded; or, held ragged, the batch's own)
            entry, stack_A, stack_B = f.mixed_coefficients(tuple(tasks), (a0, a1, b0, b1), h.device)
            slots = entry[ig]
            z = self._down(hg, self.basis("A", a0, a1))  # αᵀx once for these rows: (R, …, k_A)
            zr = z.reshape(z.shape[0], -1, z.shape[-1])
            u = torch.bmm(zr, stack_A.index_select(0, slots))  # E_A,tᵀ per row: (R, L, P)
            v = torch.bmm(u, stack_B.index_select(0, slots).transpose(1, 2))  # E_B,t: (R, L, k_B)
            yield v.reshape(*z.shape[:-1], v.shape[-1]), self.basis("B", b0, b1), rows  # β once for these rows
        # private factors, ragged (no padding): task by task, each on its own rows (one matmul per side)
        privates = [t for t in sel.distinct if t in f.private_ranks]
        for t, (B, A) in zip(privates, f.privates(privates)):
            rows = sel.rows((t,), h.device)
            yield self._down(h.index_select(0, rows), A.T), B, rows

    # merging ---------------------------------------------------------------------------------------------
    def delta_weight(self, task: int) -> torch.Tensor:
        """ΔW of ``task`` (n × d, float64): β E_B E_Aᵀ αᵀ + P_B P_A."""
        f = self.factors
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float64, device=f.coef_A.device)
        span = f.spans.get(task)
        if span is not None:
            _, a0, a1, b0, b1, _ = span
            E_B, E_A = f.coefficients(task)
            B = self.basis("B", b0, b1).double() @ E_B.double()
            A = self.basis("A", a0, a1).double() @ E_A.double()
            delta += B @ A.T
        if task in f.private_ranks:
            B, A = f.private(task)
            delta += B.double() @ A.double()
        return delta

    @torch.no_grad()
    def merge(self, task: int, exact: bool = True, delta: torch.Tensor | None = None) -> None:
        """Add ``task``'s ΔW to the base weight (``delta``, n × d, where the task is held elsewhere: a trained task).

        ``exact`` keeps a copy of the original weight so that :meth:`unmerge` restores it bit for
        bit; without it, unmerging subtracts ΔW again (as PEFT does), which leaves rounding in the weight.
        """
        if delta is None and not self.serves(task):
            return
        weight = self.base_layer.weight
        self._merged = task
        self._backup = weight.detach().clone() if exact else None
        delta = self.delta_weight(task) if delta is None else delta.double()
        merged = weight.double() + self.kind.as_weight(delta, weight.shape).to(weight.device)
        weight.copy_(merged.to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        if self._backup is not None:
            weight.copy_(self._backup)
        elif self._merged is not None:
            delta = self.kind.as_weight(self.delta_weight(self._merged), weight.shape).to(weight.device)
            weight.copy_((weight.double() - delta).to(weight.dtype))
        self._backup = self._merged = None

    def extra_repr(self) -> str:
        k_a = (
            self.coded_A.shape[1] if self.coded_A is not None else 0 if self.basis_A is None else self.basis_A.shape[1]
        )
        k_b = (
            self.coded_B.shape[1] if self.coded_B is not None else 0 if self.basis_B is None else self.basis_B.shape[1]
        )
        return f"{self.kind.name} {self.out_features}×{self.in_features}, k_B={k_b}, k_A={k_a}"


def _placed(out: torch.Tensor | None, part: torch.Tensor, rows: torch.Tensor | None, batch: int) -> torch.Tensor:
    """``out`` with ``part`` added at ``rows`` (all rows when None); a zero ``out`` of ``batch`` rows made on first use."""
    if rows is None:
        return part if out is None else out + part
    if out is None:
        out = part.new_zeros(batch, *part.shape[1:])
    return out.index_add_(0, rows, part)


def submodule(model: Any, path: str) -> nn.Module:
    """The module at ``path`` of ``model``: a module, or a diffusers pipeline whose first path segment
    names a component (``unet.down_blocks.0…``); AttributeError when there is none."""
    if isinstance(model, nn.Module):
        return model.get_submodule(path)
    head, _, rest = path.partition(".")
    component = getattr(model, head, None)
    if not isinstance(component, nn.Module):
        raise AttributeError(f"{type(model).__name__} has no component {head}")
    return component.get_submodule(rest) if rest else component


def replace_module(model: Any, name: str, new: nn.Module) -> None:
    """Put ``new`` in ``model`` (a module or a pipeline) at the path ``name`` (injecting a layer or a head,
    or taking it out)."""
    parent, _, leaf = name.rpartition(".")
    setattr(submodule(model, parent) if parent else model, leaf, new)


__all__ = [
    "CONV1D",
    "CONV2D",
    "LINEAR",
    "LayerKind",
    "ShareLayer",
    "TaskFactors",
    "layer_kind",
    "model_path",
    "replace_module",
    "submodule",
    "unsupported_conv",
]
