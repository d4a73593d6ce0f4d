"""Inner products of low-rank matrices by traces of small products (spec, section 4).

For ΔW₁ = X₁ Y₁ᵀ and ΔW₂ = X₂ Y₂ᵀ (column factors, n × r and d × r), ⟨ΔW₁, ΔW₂⟩_F =
tr((X₁ᵀX₂)(Y₁ᵀY₂)ᵀ) = Σ (X₁ᵀX₂) ∘ (Y₁ᵀY₂): r × r work, never an n × d matrix. Squared norms,
errors, drifts and captured energies all come from this one identity; every site computes it
through :func:`trace_product`, in the operand order and dtype it always had (byte identity).
"""

from __future__ import annotations

import torch


def trace_product(
    X1: torch.Tensor,
    Y1: torch.Tensor,
    X2: torch.Tensor,
    Y2: torch.Tensor,
    G: torch.Tensor | None = None,
    H: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """⟨X1 Y1ᵀ, X2 Y2ᵀ⟩ per matrix of a batch (leading dimensions), as ((X1ᵀ X2) ∘ (Y1ᵀ Y2)).sum.

    With a metric ``G`` (``H``) the left (right) product is X1ᵀ G X2, evaluated left to right: the
    inner product under the bases' Gram matrices, ⟨β X1 (α Y1)ᵀ, β X2 (α Y2)ᵀ⟩ with G = βᵀβ, H = αᵀα.
    ``dtype``: the two small products are converted to it before the elementwise product (float32
    products summed in float64); by default they are multiplied in their own dtype.
    """
    left = X1.transpose(-1, -2) @ X2 if G is None else X1.transpose(-1, -2) @ G @ X2
    right = Y1.transpose(-1, -2) @ Y2 if H is None else Y1.transpose(-1, -2) @ H @ Y2
    if dtype is not None:
        left, right = left.to(dtype), right.to(dtype)
    return (left * right).sum((-1, -2))


def frobenius2(X: torch.Tensor, Y: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """‖X Yᵀ‖²_F per matrix of a batch: :func:`trace_product` of the pair with itself."""
    return trace_product(X, Y, X, Y, dtype=dtype)
