"""The runtime's injected layer: a base layer plus the Share update of every loaded task.

:class:`ShareLayer` holds a module's bases once and every loaded task's coefficients and private
factors (:class:`TaskFactors`), and computes, for the row of task t (spec, sections 1 and 6),

    y = W x + β (E_B,t (E_A,tᵀ (αᵀ x))) + P_B,t (P_A,t x)

with the LoRA scale already folded into the stored tensors. In a batch whose rows belong to
different tasks, ``αᵀ x`` and the product with β are computed once for all rows; only the
k × p coefficient products are per task, gathered per row from zero-padded stacked tensors
(``index_select`` + ``bmm``), with no Python loop over rows or tasks. :class:`LayerKind` says
how a base layer's weight is laid out against the checkpoint's ΔW (n out × d in).

This module sits below both the model (share_convert.runtime.model) and training
(share_convert.runtime.training), which use its layers and never each other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BatchMismatchError, DeviceMismatchError
from ..io.peft import PEFT_PREFIX
from .selection import Selection, TaskSelection

# -- which layers can be served ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKind:
    """How a base layer's weight relates to the checkpoint's ΔW (n out × d in).

    ``transposed``: the weight is stored d × n (transformers' ``Conv1D``, PEFT's
    ``fan_in_fan_out``). A convolution kind would add how its input is unfolded into rows.
    """

    name: str
    transposed: bool

    def weight_shape(self, n: int, d: int) -> tuple[int, int]:
        return (d, n) if self.transposed else (n, d)

    def as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW (n × d) laid out like the layer's weight."""
        return delta.T if self.transposed else delta


LINEAR = LayerKind("Linear", transposed=False)
CONV1D = LayerKind("Conv1D", transposed=True)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a layer the runtime can inject into, or None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    try:  # transformers is optional: without it no model holds a Conv1D
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is in the test extra
        return None
    return CONV1D if isinstance(module, Conv1D) else None


def model_path(key: str) -> str:
    """The base model's submodule name for a PEFT key prefix (``base_model.model.`` stripped)."""
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


# -- one target layer --------------------------------------------------------------------------------------


class TaskFactors(nn.Module):
    """Every loaded task's tensors for one layer, stacked so that a batch gathers them by row.

    Slot 0 of each stack is all zeros (tasks without that part, and the base model); a task's
    slot is ``coef_slot[task id]`` / ``private_slot[task id]``. Shapes (S tasks with coefficients
    here, S' with a private correction, P and Q the largest ranks, zero-padded):

    - ``coef_A`` (S+1, K_A, P) and ``coef_B`` (S+1, K_B, P): E_A and E_B; with groups, K is the sum
      of the groups' k and a task's rows outside its group are zero;
    - ``private_A`` (S'+1, Q, d) and ``private_B`` (S'+1, n, Q): P_A and P_B.

    They are buffers; ``index_select`` and ``bmm`` are differentiable, so a training feature can
    register a stack (or a task's slot of it) as an ``nn.Parameter`` without changing the forward.
    """

    def __init__(
        self,
        coef_A: torch.Tensor,
        coef_B: torch.Tensor,
        coef_slot: torch.Tensor,
        private_A: torch.Tensor,
        private_B: torch.Tensor,
        private_slot: torch.Tensor,
        spans: dict[int, tuple[int, int, int, int, int, int]],
        private_ranks: dict[int, tuple[int, int]],
    ):
        super().__init__()
        self.register_buffer("coef_A", coef_A)
        self.register_buffer("coef_B", coef_B)
        self.register_buffer("coef_slot", coef_slot)
        self.register_buffer("private_A", private_A)
        self.register_buffer("private_B", private_B)
        self.register_buffer("private_slot", private_slot)
        #: task id -> (its slot, rows of its group in K_A: a0, a1 and in K_B: b0, b1, its rank p);
        #: kept on the host so that a single-task call reads no device tensor
        self.spans = spans
        #: task id -> (its slot, its private rank q > 0)
        self.private_ranks = private_ranks
        #: the bytes the checkpoint stores these tensors (and the layer's bases) in, for the parts it
        #: keeps as int8/NF4 codes, by precision: they are held here dequantized (see memory_report)
        self.dequantized_from: dict[str, int] = {}

    def add_empty_task(self) -> None:
        """One more task id with nothing stored here: its slot maps point at the zero slot (a new last id, the
        base model's moving up by one), so that stored tasks and mixed batches are unchanged."""
        self.coef_slot = torch.cat([self.coef_slot, self.coef_slot.new_zeros(1)])
        self.private_slot = torch.cat([self.private_slot, self.private_slot.new_zeros(1)])


class ShareLayer(nn.Module):
    """A base layer plus the Share update of every loaded task (the bases held once).

    ``basis_A`` (d × K_A) and ``basis_B`` (n × K_B) are buffers (None where no loaded task has
    coefficients here). The Share part is computed in the dtype of these tensors: the input is cast
    to it and the result back to the base layer's output dtype.
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
    ):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.name = name
        self.register_buffer("basis_A", basis_A)
        self.register_buffer("basis_B", basis_B)
        self.factors = factors
        self.selection = selection
        self.out_features, self.in_features = factors.private_B.shape[1], factors.private_A.shape[2]
        self._backup: torch.Tensor | None = None
        self._merged: int | None = None

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
        delta = self.delta(x, sel)
        return result if delta is None else result + delta.to(result.dtype)

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
        sel, f = sel if sel is not None else self.selection.current, self.factors
        dtype = f.coef_A.dtype
        h = x if x.dtype == dtype else x.to(dtype)
        if sel.single is not None:
            return self._delta_single(h, sel.single)
        batch = sel.batch
        if h.dim() < 2 or h.shape[0] != batch:
            raise BatchMismatchError(
                f"{self.name} received {tuple(x.shape[:-1])} rows for a batch of {batch} tasks: "
                "this model reshapes its rows before this layer",
                hint="Run one task per call for this model",
            )
        rows = h.reshape(batch, -1, h.shape[-1])  # (B, L, d)
        index = sel.index(h.device)  # the base model's rows (id -1) take the last, all-zero slot entry
        out = None
        if self.basis_A is not None and any(t in f.spans for t in sel.distinct):
            slots = f.coef_slot[index]
            z = rows @ self.basis_A  # αᵀx once for all rows: (B, L, K_A)
            u = torch.bmm(z, f.coef_A.index_select(0, slots))  # E_A,tᵀ per row: (B, L, P)
            v = torch.bmm(u, f.coef_B.index_select(0, slots).transpose(1, 2))  # E_B,t: (B, L, K_B)
            out = v @ self.basis_B.T  # β once for all rows
        if any(t in f.private_ranks for t in sel.distinct):
            slots = f.private_slot[index]
            w = torch.bmm(rows, f.private_A.index_select(0, slots).transpose(1, 2))  # (B, L, Q)
            w = torch.bmm(w, f.private_B.index_select(0, slots).transpose(1, 2))  # (B, L, n)
            out = w if out is None else out + w
        return None if out is None else out.reshape(*x.shape[:-1], out.shape[-1])

    def _delta_single(self, h: torch.Tensor, task: int) -> torch.Tensor | None:
        f, out = self.factors, None
        span = f.spans.get(task)
        if span is not None:
            slot, a0, a1, b0, b1, p = span
            z = h @ self.basis_A[:, a0:a1]
            z = (z @ f.coef_A[slot, a0:a1, :p]) @ f.coef_B[slot, b0:b1, :p].T
            out = z @ self.basis_B[:, b0:b1].T
        if task in f.private_ranks:
            slot, q = f.private_ranks[task]
            w = (h @ f.private_A[slot, :q].T) @ f.private_B[slot, :, :q].T
            out = w if out is None else out + w
        return out

    # merging ---------------------------------------------------------------------------------------------
    def delta_weight(self, task: int) -> torch.Tensor:
        """ΔW of ``task`` (n × d, float64): β E_B E_Aᵀ αᵀ + P_B P_A."""
        f = self.factors
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float64, device=f.coef_A.device)
        span = f.spans.get(task)
        if span is not None:
            slot, a0, a1, b0, b1, p = span
            B = self.basis_B[:, b0:b1].double() @ f.coef_B[slot, b0:b1, :p].double()
            A = self.basis_A[:, a0:a1].double() @ f.coef_A[slot, a0:a1, :p].double()
            delta += B @ A.T
        if task in f.private_ranks:
            slot, q = f.private_ranks[task]
            delta += f.private_B[slot, :, :q].double() @ f.private_A[slot, :q].double()
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
        merged = weight.double() + self.kind.as_weight(delta).to(weight.device)
        weight.copy_(merged.to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        if self._backup is not None:
            weight.copy_(self._backup)
        elif self._merged is not None:
            delta = self.kind.as_weight(self.delta_weight(self._merged)).to(weight.device)
            weight.copy_((weight.double() - delta).to(weight.dtype))
        self._backup = self._merged = None

    def extra_repr(self) -> str:
        k_a = 0 if self.basis_A is None else self.basis_A.shape[1]
        k_b = 0 if self.basis_B is None else self.basis_B.shape[1]
        return f"{self.kind.name} {self.out_features}×{self.in_features}, k_B={k_b}, k_A={k_a}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in ``model`` at the submodule path ``name`` (injecting a layer or a head, or taking it out)."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


__all__ = ["CONV1D", "LINEAR", "LayerKind", "ShareLayer", "TaskFactors", "layer_kind", "model_path", "replace_module"]
