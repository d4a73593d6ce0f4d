"""The numerical tolerances of the method, each named once with what it is for.

They differ because they decide different things: a basis's numerical rank, a task's own
numerical rank, whether a drift makes an error a bound, whether a plan meets its target. Changing
any of them changes what merge and add write.
"""

from __future__ import annotations

#: Basis vectors (singular values of a stack, or of an incremental update's middle matrix, or of a
#: trained task's bases) below ``RANK_RTOL × σ_max`` are treated as zero: a basis's numerical rank.
RANK_RTOL = 1e-6
#: One task's canonical factors (its own ΔW, its coordinates in the bases, its residual's private
#: part) keep the directions above ``CANONICAL_RTOL × σ_max``: far below any basis's tolerance, so
#: that a task loses nothing but exact (rounding-level) zeros.
CANONICAL_RTOL = 1e-10
#: Cholesky-QR is used when the triangular factor's diagonal ratio exceeds this (cond(X) < 1e5);
#: below it the factorization would lose digits and the Householder route is taken.
CHOLESKY_MIN_RATIO = 1e-5
#: A task whose reconstruction moved by more than this (relative to ‖ΔW‖) records its error as a
#: bound (``bound``), not as an exact figure: smaller moves are rounding.
DRIFT_BOUND_ABOVE = 1e-6
#: A plan meets an error target when its errors are within this of it: a running sum of errors
#: must not tip a plan that sits exactly on the target.
TARGET_TOL = 1e-12
#: An energy fraction τ is met at ``τ × (1 − ENERGY_RTOL)``: the cumulative sum's rounding must not
#: move the chosen k.
ENERGY_RTOL = 1e-9
#: The fewest private directions a target needs, a ratio of float sums, is rounded up only past
#: this margin (an exact integer must not round up to the next one).
COUNT_TOL = 1e-9
