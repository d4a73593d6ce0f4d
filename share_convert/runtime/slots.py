"""A task's rows in a layer's stacked tensors, put in and freed while the model serves.

A :class:`~share_convert.runtime.factors.TaskFactors` holds every loaded task's coefficients
stacked and zero-padded, slot 0 all zeros, (or, held as codes, ragged: share_convert.runtime.coded) and their private factors as ragged rows (no padding).
:func:`put_coefficients` appends a task's slot (widening the padding when its rank is larger) and
:func:`put_private` its private rows; :func:`free_task` takes its slot and rows out, renumbers the
slots and moves the rows above them down and trims the padding to the largest rank left, so that a
model after ``delete_task`` holds what one loaded without the task holds.
A layer built for a module the checkpoint lacks (:func:`empty_factors`) starts with no slot but the zero one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .factors import RowStore, TaskFactors


def empty_factors(n: int, d: int, count: int, dtype: torch.dtype, device: torch.device) -> TaskFactors:
    """The factors of a layer that serves no task yet: only the zero slot (``count`` task ids)."""

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    slots = torch.zeros(count + 1, dtype=torch.long, device=device)
    return TaskFactors(
        zeros(1, 0, 0), zeros(1, 0, 0), slots, RowStore(d, dtype, device), RowStore(n, dtype, device), {}, {}
    )


def _padded(stack: torch.Tensor, width: int) -> torch.Tensor:
    """``stack`` zero-padded in its last dimension to ``width`` (itself when it is that wide)."""
    return stack if stack.shape[-1] >= width else F.pad(stack, (0, width - stack.shape[-1]))


@torch.no_grad()
def put_coefficients(
    f: TaskFactors, task: int, coef_B: torch.Tensor, coef_A: torch.Tensor, group: tuple[int, int, int, int]
) -> None:
    """Give ``task`` a coefficient slot: ``coef_B`` (k_B × p) and ``coef_A`` (k_A × p) in the rows of its
    ``group`` (a0, a1, b0, b1: its bases' columns in ``basis_A`` and ``basis_B``)."""
    a0, a1, b0, b1 = group
    p = coef_B.shape[1]
    if f.ragged is not None:  # held ragged (as codes): its rows after the others of its group
        f.ragged.append(task, group, coef_B.T, coef_A.T)
        f.spans[task] = (-1, a0, a1, b0, b1, p)
        return
    width = max(f.coef_A.shape[2], p)
    row_A = f.coef_A.new_zeros(1, f.coef_A.shape[1], width)
    row_B = f.coef_B.new_zeros(1, f.coef_B.shape[1], width)
    row_A[0, a0:a1, :p] = coef_A.to(row_A)
    row_B[0, b0:b1, :p] = coef_B.to(row_B)
    slot = f.coef_A.shape[0]
    f.coef_A = torch.cat([_padded(f.coef_A, width), row_A])
    f.coef_B = torch.cat([_padded(f.coef_B, width), row_B])
    f.coef_slot[task] = slot
    f.spans[task] = (slot, a0, a1, b0, b1, p)


@torch.no_grad()
def put_private(f: TaskFactors, task: int, private_B: torch.Tensor, private_A: torch.Tensor) -> None:
    """Give ``task`` its private rows after the others: ``private_B`` (n × q) and ``private_A`` (q × d)."""
    offset = f.private_A.append(private_A)
    f.private_Bt.append(private_B.T)
    f.private_ranks[task] = (offset, private_B.shape[1])
    f.rows_changed()


@torch.no_grad()
def free_task(f: TaskFactors, task: int) -> None:
    """Take ``task``'s slots out of the stacks (its id then maps to the zero slot)."""
    span = f.spans.pop(task, None)
    if span is not None and f.ragged is not None:
        f.ragged.remove(task)
    elif span is not None:
        slot = span[0]
        width = max((s[5] for s in f.spans.values()), default=0)
        f.coef_A = _without(f.coef_A, slot)[:, :, :width].contiguous()
        f.coef_B = _without(f.coef_B, slot)[:, :, :width].contiguous()
        f.coef_slot = _renumbered(f.coef_slot, task, slot)
        f.spans = {t: (s[0] - (s[0] > slot), *s[1:]) for t, s in f.spans.items()}
    private = f.private_ranks.pop(task, None)
    if private is not None:
        offset, q = private
        f.private_A.remove(offset, offset + q)
        f.private_Bt.remove(offset, offset + q)
        f.private_ranks = {t: (o - q * (o > offset), r) for t, (o, r) in f.private_ranks.items()}
        f.rows_changed()


def _without(stack: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.cat([stack[:slot], stack[slot + 1 :]])


def _renumbered(slots: torch.Tensor, task: int, slot: int) -> torch.Tensor:
    """The slot map once ``slot`` is gone: ``task`` at the zero slot, the slots above it one lower."""
    out = slots - (slots > slot).to(slots.dtype)
    out[task] = 0
    return out


__all__ = ["empty_factors", "free_task", "put_coefficients", "put_private"]
