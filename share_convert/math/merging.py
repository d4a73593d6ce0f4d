"""Rules that merge tasks' updates into one: linear (task arithmetic), TIES and DARE (docs/combine.md).

Each rule takes a batch of task matrices ``X`` (``T × k_B × k_A``, float64: the tasks'
coefficient cores C_t = E_B^t E_A^tᵀ in one set of shared bases) and their weights w_t, and
returns one matrix of the same shape:

- ``linear``: Σ w_t X_t (exact: the combination of the tasks' updates in those bases);
- ``ties`` (Yadav et al. 2023, "TIES-Merging"): keep each X_t's ⌊density · k_B k_A⌋ entries of
  largest magnitude (trim), elect each entry's sign as the sign of the sum of the trimmed entries
  (≥ 0 is +), and average, per entry, the weighted trimmed entries w_t X̂_t whose sign is the elected
  one (disjoint mean; entries no task keeps are 0);
- ``dare`` (Yu et al. 2023, "Language Models are Super Mario"): drop each entry of X_t with
  probability 1 − density, rescale what is kept by 1/density, then Σ w_t X̃_t. The drops come
  from a generator seeded per (seed, module, task) (:func:`dare_mask`), so the same inputs and
  seed give the same bytes, in any order and on any number of threads.

Weights enter as PEFT's ``add_weighted_adapter`` applies them (peft/utils/merge_utils.py): the
sign election uses the unweighted trimmed entries, the disjoint mean the weighted ones. With every
weight equal to λ, ``ties`` is the paper's rule with scaling λ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

#: The rules :func:`merge_cores` knows, in the order the CLI lists them.
METHODS = ("linear", "ties", "dare")


def trim_mask(X: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: per matrix of the batch ``X`` (``T × …``), True at its ⌊density · size⌋ entries of
    largest magnitude. Equal magnitudes at the cut are taken in row-major order (a stable sort), so
    the mask does not depend on the sorting algorithm."""
    flat = X.reshape(X.shape[0], -1)
    keep = int(density * flat.shape[1])
    order = torch.sort(flat.abs(), dim=1, descending=True, stable=True).indices[:, :keep]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask.reshape(X.shape)


def ties(X: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-Merging of the batch ``X`` (``T × …``) with per-task ``weights`` (module docstring)."""
    trimmed = X * trim_mask(X, density)
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(X.dtype)
    agree = torch.sign(trimmed) == elected  # a trimmed (zero) entry agrees with no sign
    weighted = trimmed * weights.to(X.dtype).reshape(-1, *([1] * (X.dim() - 1)))
    count = agree.sum(0).clamp(min=1).to(X.dtype)
    return (weighted * agree).sum(0) / count


def dare_seed(seed: int, module: str, task: str) -> int:
    """The seed of one task's drops in one module: from ``seed`` and the two names (SHA-256), so that
    every (module, task) draws its own stream whatever order they are computed in."""
    digest = hashlib.sha256(f"{int(seed)}\0{module}\0{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_mask(shape: Sequence[int], density: float, seed: int) -> torch.Tensor:
    """DARE's drops for one task: True (kept) with probability ``density``, from a CPU generator
    seeded with ``seed`` (float64 uniforms, so the stream is the same on every platform torch supports)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(tuple(shape), generator=g, dtype=torch.float64) < density


def dare(X: torch.Tensor, weights: torch.Tensor, density: float, seeds: Sequence[int]) -> torch.Tensor:
    """DARE of the batch ``X`` (``T × …``): each X_t's entries kept by ``dare_mask(…, seeds[t])``,
    rescaled by 1/density, then summed with ``weights``."""
    masks = torch.stack([dare_mask(X.shape[1:], density, s) for s in seeds]).to(X.device)
    kept = X * masks / density
    return (kept * weights.to(X.dtype).reshape(-1, *([1] * (X.dim() - 1)))).sum(0)


def merge_cores(
    method: str, X: torch.Tensor, weights: torch.Tensor, *, density: float = 1.0, seeds: Sequence[int] = ()
) -> torch.Tensor:
    """One matrix from the batch ``X`` by ``method`` (one of :data:`METHODS`)."""
    if method == "linear":
        return (X * weights.to(X.dtype).reshape(-1, *([1] * (X.dim() - 1)))).sum(0)
    if method == "ties":
        return ties(X, weights, density)
    if method == "dare":
        return dare(X, weights, density, seeds)
    raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")


def factored_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B Aᵀ‖_F (``B`` n × r, ``A`` d × r) from thin QRs of both factors: ‖R_B R_Aᵀ‖_F, r × r, in
    float64. Unlike the trace form tr((BᵀB)(AᵀA)), it does not square the entries first, so the norm
    of a difference written as side-by-side factors ([B₁, −B₂], [A₁, A₂]) keeps its digits when the
    two nearly cancel."""
    if B.shape[1] == 0:
        return 0.0
    RB = torch.linalg.qr(B.to(torch.float64), mode="r").R
    RA = torch.linalg.qr(A.to(torch.float64), mode="r").R
    return float(torch.linalg.matrix_norm(RB @ RA.T))
