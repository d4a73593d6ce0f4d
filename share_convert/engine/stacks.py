"""One module's weighted stacks and their principal bases (spec, section 2, steps 3-5)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..config import ConsolidationConfig
from ..math.linalg import GramDecomposition, extend_basis, gram_cost, principal_basis, randomized_cost
from .members import ModuleMember
from .planning import ModulePlanner, TaskFit, task_weight

#: The Gram route is taken up to this many times the randomized route's operations: it is exact (the
#: randomized fit's last directions are its least accurate, and there the planner looks), and its
#: work is one large product, faster per operation than the range finder's QR factorizations.
GRAM_PREFERENCE = 2.0

#: Stacks of at most this many columns are fitted exactly by principal_basis (its ``exact_below``).
EXACT_COLUMNS = 128


class BasisFit(NamedTuple):
    """Top-K bases of a module's two stacks, their singular values, and a planner over them."""

    beta: torch.Tensor  # n × K_B, the output side's basis (on the compute device)
    alpha: torch.Tensor  # d × K_A
    s_B: torch.Tensor  # K_B, float64, on the CPU
    s_A: torch.Tensor
    planner: ModulePlanner


class ModuleStack:
    """One module's weighted stacks, ready for decomposition (spec, section 2, steps 3–4)."""

    def __init__(self, n: int, d: int, members: list[ModuleMember], config: ConsolidationConfig):
        self.n, self.d, self.members, self.config = n, d, members, config
        #: each task's rank here (its canonical singular values); uniform: one rank, and those columns stacked
        self.ranks = [int(m.s.numel()) for m in members]
        self.uniform = len(set(self.ranks)) == 1 and all(
            m.stacked[0].shape[1] == r for m, r in zip(members, self.ranks)
        )
        #: where this module is computed: the members' device
        self.device = members[0].s.device if members else config.torch_device()
        if self.uniform and members:  # one batched reduction, the same sums as one per task
            self.norm2 = (torch.stack([m.s for m in members]) ** 2).sum(1)
        else:
            self.norm2 = torch.tensor([float((m.s**2).sum()) for m in members], dtype=torch.float64, device=self.device)
        self.norms = [x**0.5 for x in self.norm2.tolist()]
        self.weights = [task_weight(nm, config.weighting) for nm in self.norms]
        self.stack_B, self.stack_A = (self._weighted(side) for side in (0, 1))
        m_total = self.stack_B.shape[1]
        self.cap = config.max_k or m_total
        #: the most basis vectors either side can have
        self.full = max(min(n, m_total, self.cap), min(d, m_total, self.cap))
        #: fit(K) by K, and widen(K, fit) by (the fit's widths, K): each computed once
        self._fits: dict[int, BasisFit] = {}
        self._widened: dict[tuple, BasisFit] = {}
        #: each side's Gram decomposition (0: B, 1: A), once computed; the planner without bases
        self._grams: dict[int, GramDecomposition] = {}
        self._bare: ModulePlanner | None = None

    def _weighted(self, side: int) -> torch.Tensor:
        """One side's stack: every task's columns times √weight, side by side (``n × Σr``)."""
        parts = [m.stacked[side] for m in self.members]
        roots = [w**0.5 for w in self.weights]
        if self.uniform and len(parts) > 1:  # one rank: a batched product, then one copy into place
            T, rows, r = len(parts), parts[0].shape[0], parts[0].shape[1]
            scale = torch.tensor(roots, dtype=torch.float32, device=self.device)[None, :, None]
            # stacked straight into the n × T × r layout (one copy), scaled in place: the same products
            return torch.stack(parts, 1).float().mul_(scale).view(rows, T * r)
        return torch.cat([p.float() * w for p, w in zip(parts, roots)], 1)

    @property
    def _fit_options(self) -> dict[str, int]:
        """The randomized range finder's settings (:func:`principal_basis`), from the config."""
        return {"n_oversamples": self.config.n_oversamples, "n_iter": self.config.n_iter}

    def energy_totals(self) -> tuple[float, float]:
        """Each stack's total energy ‖stack‖² (float64): what an energy fraction is of."""
        return float(self.stack_B.double().pow(2).sum()), float(self.stack_A.double().pow(2).sum())

    def fit(self, K: int) -> BasisFit:
        """Top-K bases of both stacks and a planner over them (computed once per K)."""
        if K not in self._fits:
            self._fits[K] = self._fit(K)
        return self._fits[K]

    def widen(self, K: int, fit: BasisFit) -> BasisFit:
        """``fit`` (the result of :meth:`fit` or :meth:`widen`) widened to K vectors per side.

        The vectors already computed are kept and new ones found in what they leave out
        (:func:`share_convert.math.linalg.extend_basis`), so widening costs the new vectors only, and
        the planner keeps every error it computed on the narrower bases (they are prefixes of the new).
        """
        beta, alpha, sB, sA, planner = fit
        if planner.projections is None:  # not built from projections: fit afresh
            return self.fit(K)
        key = (beta.shape[1], alpha.shape[1], K)
        if key not in self._widened:
            self._widened[key] = self._widen(K, fit)
        return self._widened[key]

    def _widen(self, K: int, fit: BasisFit) -> BasisFit:
        beta, alpha, sB, sA, planner = fit
        projB, projA = planner.projections
        seed = self.config.seed + 2 * beta.shape[1]  # fresh random directions for each widening
        beta, sB, projB = extend_basis(
            self.stack_B, beta, sB, projB, min(K, self.cap) - beta.shape[1], seed=seed, **self._fit_options
        )
        alpha, sA, projA = extend_basis(
            self.stack_A, alpha, sA, projA, min(K, self.cap) - alpha.shape[1], seed=seed + 1, **self._fit_options
        )
        wider = self._planner(projB, projA)
        wider.inherit(planner)
        return BasisFit(beta, alpha, sB, sA, wider)

    def _fit(self, K: int) -> BasisFit:
        side_B = principal_basis(self.stack_B, min(K, self.cap), seed=self.config.seed, **self._fit_options)
        side_A = principal_basis(self.stack_A, min(K, self.cap), seed=self.config.seed + 1, **self._fit_options)
        return self._assemble(side_B, side_A)

    @property
    def bounded(self) -> bool:
        """Whether this stack takes the wide-basis route of :func:`.consolidation.plan_group`: the
        sharing bound and one fit at the width it allows. Stacks of up to ``EXACT_COLUMNS`` columns
        are fitted exactly by :func:`principal_basis` anyway and keep the widening they always had
        (their outputs stay byte for byte); so do tasks that are reconstructions (the bound is
        about errors of this step alone)."""
        return (
            self.stack_B.shape[1] > EXACT_COLUMNS and bool(self.members) and all(m.prior is None for m in self.members)
        )

    def no_basis_planner(self) -> ModulePlanner:
        """A planner over these tasks with no bases: independent truncation, priced exactly from each
        task's own spectrum before any basis is fitted."""
        if self._bare is None:
            f64 = torch.float64
            if self.uniform:  # as the planners over bases are built: the same norms, to the bit
                T, r = len(self.members), self.ranks[0]
                none = torch.zeros(T, 0, r, dtype=f64, device=self.device)
                zeros, ones = (
                    torch.zeros(T, dtype=f64, device=self.device),
                    torch.ones(T, dtype=f64, device=self.device),
                )
                self._bare = ModulePlanner.stacked(
                    self.n, self.d, torch.stack([m.s for m in self.members]).to(f64), none, none,
                    ranks=torch.full((T,), r, dtype=torch.int64, device=self.device), norm2=self.norm2,
                    prior=zeros, ratio=ones,
                )  # fmt: skip
            else:
                self._bare = ModulePlanner(
                    self.n, self.d, [TaskFit.of(m.s, m.s.new_zeros((0, m.s.numel())), m.s.new_zeros((0, m.s.numel()))) for m in self.members]
                )  # fmt: skip
        return self._bare

    def wide_fit(self, K: int) -> BasisFit:
        """Bases of K vectors per side in one fit (no widening): per side, the eigendecomposition of
        the smaller Gram matrix (:class:`GramDecomposition`, every direction at once) where that costs
        at most ``GRAM_PREFERENCE`` times the randomized range finder at this width, else the range
        finder at width K.

        A side from a Gram decomposition has ``None`` for its basis in the fit (the planner needs only
        its coordinates): :meth:`bases` forms the directions a plan keeps.
        """
        K = min(K, self.cap)
        key = ("wide", K)
        if key not in self._widened:
            sides = []
            for side, (stack, seed) in enumerate(
                ((self.stack_B, self.config.seed), (self.stack_A, self.config.seed + 1))
            ):
                if self._exact(stack, K):
                    if side not in self._grams:
                        self._grams[side] = GramDecomposition(stack)
                    gram = self._grams[side]
                    # raw factors' planners need the basis itself (:meth:`_assemble`); canonical ones do not
                    U = None if self.config.canonicalize else gram.basis(K)
                    sides.append((U, gram.S[:K], gram.coordinates(K)))
                else:
                    sides.append(principal_basis(stack, K, seed=seed, **self._fit_options))
            self._widened[key] = self._assemble(*sides)
        return self._widened[key]

    def _exact(self, stack: torch.Tensor, K: int) -> bool:
        """Whether :meth:`wide_fit` takes ``stack``'s Gram decomposition at width K (by cost)."""
        rows, cols = stack.shape
        return gram_cost(rows, cols) <= GRAM_PREFERENCE * randomized_cost(rows, cols, K, **self._fit_options)

    def bases(self, fit: BasisFit, k_B: int, k_A: int) -> tuple[torch.Tensor, torch.Tensor]:
        """β and α of ``fit`` with at least the ``k_B`` and ``k_A`` vectors a plan keeps (the sides
        that :meth:`wide_fit` took from a Gram decomposition are formed here, those vectors only)."""
        beta = fit.beta if fit.beta is not None else self._grams[0].basis(k_B)
        alpha = fit.alpha if fit.alpha is not None else self._grams[1].basis(k_A)
        return beta, alpha

    def at_least(
        self, beta: torch.Tensor, alpha: torch.Tensor, k_B: int, k_A: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``beta`` and ``alpha`` with at least ``k_B`` and ``k_A`` vectors: a side that a wide fit took
        from a Gram decomposition and formed narrower (:meth:`bases`) is formed again at that width."""
        if beta.shape[1] < k_B and 0 in self._grams:
            beta = self._grams[0].basis(k_B)
        if alpha.shape[1] < k_A and 1 in self._grams:
            alpha = self._grams[1].basis(k_A)
        return beta, alpha

    def _assemble(self, side_B, side_A) -> BasisFit:
        """A :class:`BasisFit` from each side's (U, S, Uᵀ·stack), with its planner."""
        (beta, sB, projB), (alpha, sA, projA) = side_B, side_A
        if self.config.canonicalize and self.uniform:  # every task's coordinates, from the projections
            return BasisFit(beta, alpha, sB, sA, self._planner(projB, projA))
        if self.config.canonicalize:  # the projections hold every task's coordinates, weighted
            fits, off = [], 0
            for m, w in zip(self.members, self.weights):
                r = m.stacked[0].shape[1]
                scale = w**-0.5 if w > 0 else 0.0
                fits.append(
                    TaskFit.of(m.s, projB[:, off : off + r] * scale, projA[:, off : off + r] * scale, m.prior, m.slack)
                )
                off += r
        else:
            b64, a64 = beta.double(), alpha.double()
            fits = [
                TaskFit.of(m.s, b64.T @ m.Bc.double(), a64.T @ m.Ac.double(), m.prior, m.slack) for m in self.members
            ]
        return BasisFit(beta, alpha, sB, sA, ModulePlanner(self.n, self.d, fits))

    def _planner(self, projB: torch.Tensor, projA: torch.Tensor) -> ModulePlanner:
        """The planner over tasks of one rank, built from the projections without a Python object per
        task: the weighted stack's coordinates, unweighted column block by column block."""
        T, r = len(self.members), self.ranks[0] if self.members else 0
        f64, device = torch.float64, projB.device
        scale = torch.tensor([w**-0.5 if w > 0 else 0.0 for w in self.weights], dtype=f64, device=device)
        Eb = (projB.reshape(projB.shape[0], T, r).permute(1, 0, 2) * scale[:, None, None]).contiguous()
        Ea = (projA.reshape(projA.shape[0], T, r).permute(1, 0, 2) * scale[:, None, None]).contiguous()
        prior, ratio, slack = [0.0] * T, [1.0] * T, [math.inf] * T
        for i, m in enumerate(self.members):  # tasks that are reconstructions (a few, when any)
            if m.prior is not None:
                error, norm, _ = m.prior
                prior[i] = error
                ratio[i] = self.norms[i] / norm if norm > 0 else 0.0
                slack[i] = m.slack
        prior, ratio, slack = (torch.tensor(x, dtype=f64, device=device) for x in (prior, ratio, slack))
        s = torch.stack([m.s for m in self.members]).to(f64) if T else torch.zeros(0, 0, dtype=f64, device=device)
        ranks = torch.full((T,), r, dtype=torch.int64, device=device)
        planner = ModulePlanner.stacked(
            self.n, self.d, s, Eb, Ea, ranks=ranks, norm2=self.norm2, prior=prior, ratio=ratio, slack=slack
        )
        planner.projections = (projB, projA)
        return planner
