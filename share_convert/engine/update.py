"""The incremental basis update: a module's bases from its old bases and new members (spec, section 5).

Per module, the old tasks are known only through the bases and their coefficients: the new bases
come from a QR of ``[β, B'_new]`` and the eigendecomposition of a (k+m) × (k+m) matrix weighted by
the old tasks' Gram matrix (Brand 2006), so the n-sized work does not grow with the number of old
tasks; the old coefficients are rotated into the new bases as one batch (k-sized work). In a module
with groups of bases, only the groups that new tasks join are updated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import RecordTable, TaskRows
from ..config import ConsolidationConfig
from ..math.bounds import block_form, inside_coordinates, quadratic_form
from ..math.linalg import canonicalize_padded, fix_signs, left_batched
from ..math.tolerances import DRIFT_BOUND_ABOVE, RANK_RTOL
from ..math.traces import frobenius2, trace_product
from .chain import appended_rows, chain_step
from .encoding import StoredBases, encode_in_bases, store_bases, store_grams
from .members import ModuleMember
from .old_tasks import OldCoefficients, batch_gram, dropped_here, grams_of
from .planning import (
    BasisSpectra,
    FrozenTasks,
    ModulePlanner,
    TaskFit,
    choose_plan,
    drift_bound,
    task_weight,
    task_weights,
)
from .precision import Precisions
from .projections import projection_slack
from .refit import refit_module
from .results import GroupPart, ModuleResult, assemble_groups, rows_precision


def entry_precision(entry) -> dict[str, str]:
    """A module entry's stored precisions (role -> name; empty in files older than precisions)."""
    return dict(getattr(entry, "precision", None) or {})


def module_precisions(entry, dtype: torch.dtype) -> Precisions:
    """Where a module of a checkpoint stores each kind of factor, for its update: its manifest's
    precisions, a role stored in the module's float dtype (or not named) as that dtype."""
    stored = entry_precision(entry)
    float_name = str(dtype).replace("torch.", "")

    def of(role: str) -> str | None:
        name = stored.get(role)
        return None if name is None or name == float_name else name

    return Precisions(of("basis_B"), of("coefs_B"), of("private_B"))


def _updated_basis(
    basis: torch.Tensor | None, gram: torch.Tensor | None, new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and values of [β E … , N] from β, G = Σ w E Eᵀ and N (spec, section 5).

    M Mᵀ = β G βᵀ + N Nᵀ = Q R blockdiag(G, I) Rᵀ Qᵀ with Q R = qr([β, N]); the eigenvectors U of
    the small middle matrix give the new basis Q U. Cost O(n (k+m)²), whatever the number of old tasks.
    """
    n = new.shape[0]
    k = 0 if basis is None else basis.shape[1]
    parts = ([basis.double()] if k else []) + [new.double()]
    Q, R = torch.linalg.qr(torch.cat(parts, 1))
    middle = torch.zeros(R.shape[1], R.shape[1], dtype=torch.float64)
    if k:
        middle[:k, :k] = gram.double()
    middle[k:, k:] = torch.eye(new.shape[1], dtype=torch.float64)
    K = R @ middle @ R.T
    evals, U = torch.linalg.eigh((K + K.T) / 2)
    evals, U = evals.flip(0).clamp_min(0), U.flip(1)
    s = evals.sqrt()
    rank = int((s > RANK_RTOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    B = (Q @ U[:, :rank]) if rank else torch.zeros(n, 0, dtype=torch.float64)
    B = B * fix_signs(B)
    return B.to(torch.float32), s[:rank]


def update_module(
    ckpt: Checkpoint,
    name: str,
    old_tasks: list[str],
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    *,
    prefix: str | None = None,
) -> ModuleResult:
    """Fold new members into one module of ``ckpt`` incrementally; old tasks keep their private parts.

    Old tasks are handled as one batch of k-sized coefficient matrices: rotating them into the new
    bases and measuring their drift are a few batched products (spec, section 5). Tasks not in
    ``old_tasks`` (replaced ones) leave the bases' weights. ``prefix`` names one group's bases in a
    module with groups (``old_tasks`` are then that group's tasks).

    When every old task stays and the bases keep their widths, the old coefficient rows stay as
    they are stored: the rotation β_newᵀ β_old joins the chain (format version 3), the stored rows
    are copied with their block checksums and only the new tasks' rows are written and hashed, and
    no old task is rebalanced (spec, section 5: E ← β_newᵀ β_old E). Otherwise (a task replaced,
    the widths or the dtype changed, small rows, or a chain that would take more bytes than the rows
    it rotates; see :func:`chain_step`) the old rows are rotated, rebalanced and written again,
    chain-free.
    """
    entry = ckpt.module(name)
    n, d = entry.shape
    # an incremental update is k-sized products over the old tasks' coefficients as read from the
    # checkpoint, and a few new tasks: CPU work, where a GPU would pay a transfer and a launch per step
    members = [m.to(torch.device("cpu")) for m in members]
    prefix = prefix or f"modules/{name}/"
    beta = alpha = None
    if ckpt.has(f"{prefix}basis_B"):
        beta, alpha = ckpt.tensor(f"{prefix}basis_B"), ckpt.tensor(f"{prefix}basis_A")
    b_old = beta.double() if beta is not None else torch.zeros(n, 0, dtype=torch.float64)
    a_old = alpha.double() if alpha is not None else torch.zeros(d, 0, dtype=torch.float64)
    # Old tasks stay in coordinates: their shared part is β x_b (α x_a)ᵀ with (x_b, x_a) their
    # coefficients, so nothing n-sized is computed per old task (section 5). Their weighted Gram
    # matrix E Eᵀ is recomputed from them in float64 (they are read anyway, for the drift): the
    # stored float32 copy would add rounding noise that reads as weak extra directions.
    old = OldCoefficients(ckpt, name, old_tasks, b_old.shape[1], a_old.shape[1], prefix)
    table = RecordTable.from_dicts(ckpt.modules[name]["tasks"]).select(old_tasks)
    old_norms, old_errors = table.float_column("norm"), table.float_column("error")
    root = task_weights(old_norms, config.weighting).sqrt()[:, None, None]
    GB, GA = batch_gram(old.XB * root), batch_gram(old.XA * root)
    norms = [float((m.s**2).sum()) ** 0.5 for m in members]
    weights = [task_weight(nm, config.weighting) for nm in norms]
    NB = torch.cat([m.stacked[0].double() * w**0.5 for m, w in zip(members, weights)], 1)
    NA = torch.cat([m.stacked[1].double() * w**0.5 for m, w in zip(members, weights)], 1)
    new_beta, sB = _updated_basis(beta, GB, NB)
    new_alpha, sA = _updated_basis(alpha, GA, NA)
    nb64, na64 = new_beta.double(), new_alpha.double()
    norm2 = old.form([(1.0, None, None)])  # ‖shared part‖², the bases taken as orthonormal (as the planner does)
    gram_B, gram_A = b_old.T @ b_old, a_old.T @ a_old  # the old bases' Grams, used below four times
    slack = projection_slack(ckpt, entry, table, old, b_old, a_old, norm2, (gram_B, gram_A))
    inside = None
    if bool(torch.isfinite(slack).any()):
        LB, LA = torch.linalg.cholesky(gram_B), torch.linalg.cholesky(gram_A)
        inside = (inside_coordinates(b_old, nb64, LB), inside_coordinates(a_old, na64, LA))
    frozen = FrozenTasks(
        Eb=left_batched(nb64.T @ b_old, old.XB),
        Ea=left_batched(na64.T @ a_old, old.XA),
        norm2=norm2,
        ranks=old.ranks,
        prior=torch.from_numpy(old_errors.copy()),
        scale=task_weights(old_norms, "equal"),
        slack=slack,
        inside=inside,
    )
    fits = [TaskFit.of(m.s, nb64.T @ m.Bc.double(), na64.T @ m.Ac.double(), m.prior) for m in members]
    planner = ModulePlanner(n, d, fits, frozen=frozen)
    # the module keeps where its factors are stored (its old rows' codes are copied as they are)
    precision = module_precisions(entry, dtype)
    # the new bases are the update's whole stack: their energy is what a fraction is of
    spectra = BasisSpectra(sB, sA, lambda: (float((sB**2).sum()), float((sA**2).sum())))
    plan = choose_plan(planner, config, spectra, dtype, None if precision.is_float else precision)
    result = ModuleResult(plan=plan)
    if not precision.is_float:
        result.precision = precision.roles(dtype)
    beta_s, alpha_s = store_bases(name, new_beta, new_alpha, plan, dtype, result, prefix, precision)
    stored = StoredBases.of(beta_s, alpha_s)
    chain = chain_step(ckpt, name, prefix, old_tasks, b_old.shape[1], a_old.shape[1], plan, dtype)
    # drift² = ‖before‖² − 2⟨before, after⟩ + ‖after‖², all from k-sized products (batched); for the
    # tasks drift_bound can do more for, outside² = ‖after‖² − ‖Π_old after‖² (before is inside the old span)
    before = (1.0, gram_B, gram_A)
    T = len(old_tasks)
    known = None
    outside2 = torch.zeros(T, dtype=torch.float64)
    tighter = inside is not None
    if stored is not None:
        RB, RA = stored.beta.T @ b_old, stored.alpha.T @ a_old  # old coordinates -> new (k × k_old)
        if tighter:
            VB, VA = inside_coordinates(b_old, stored.beta, LB), inside_coordinates(a_old, stored.alpha, LA)
        if chain is not None:
            # the rows stay; readers rotate them: after = β_new (R_B x_b)(α_new R_A x_a)ᵀ exactly
            ranks = old.ranks
            # ⟨before, after⟩ with R = β_newᵀβ_old (G = R_BᵀR_B), ‖after‖² with the stored bases' Grams
            after = (1.0, RB.T @ stored.gram_beta @ RB, RA.T @ stored.gram_alpha @ RA)
            drift2 = old.form([before, (-2.0, RB.T @ RB, RA.T @ RA), after])
            # f² as a difference of float64 sums: rounding (~1e-16 ‖after‖²) moves f by ~1e-8 ‖after‖
            # at most, far below the slack: the blocks, much cheaper than the cores here, suffice
            if tighter:
                WB, WA = VB @ RB, VA @ RA
                outside2 = block_form(old.XB, old.XA, [after, (-1.0, WB.T @ WB, WA.T @ WA)])
            known = {"B": RB @ GB @ RB.T, "A": RA @ GA @ RA.T}  # the old tasks' part of Σ w c cᵀ
        else:
            EB, EA = left_batched(RB, old.XB), left_batched(RA, old.XA)
            CB, CA, _S, ranks = canonicalize_padded(EB, EA)
            CB, CA = CB.to(dtype), CA.to(dtype)  # as stored
            # as read back (each stored row, a column of E, at the coefficients' precision)
            CB64 = precision.rows_as_stored(CB.transpose(1, 2), "coefs", dtype).transpose(1, 2).double()
            CA64 = precision.rows_as_stored(CA.transpose(1, 2), "coefs", dtype).transpose(1, 2).double()
            cross = trace_product(EB, EA, CB64, CA64)
            after2 = quadratic_form(CB64, CA64, [(1.0, stored.gram_beta, stored.gram_alpha)])
            drift2 = old.form([before]) - 2 * cross + after2
            if tighter:
                gram = (1.0, stored.gram_beta, stored.gram_alpha)
                outside2 = block_form(CB64, CA64, [gram, (-1.0, VB.T @ VB, VA.T @ VA)])
            known = {side: batch_gram(C * root) for side, C in (("B", CB64), ("A", CA64))}
    else:
        ranks = torch.zeros(T, dtype=torch.int64)
        drift2 = old.form([before])  # nothing is kept: the drift is the shared part, inside the old span
    drifts_abs = drift2.clamp_min(0).sqrt().numpy()
    drift = np.where(old_norms > 0, drifts_abs / np.where(old_norms > 0, old_norms, 1.0), 0.0)
    outside = outside2.clamp_min(0).sqrt() * task_weights(old_norms, "equal")
    error = drift_bound(torch.from_numpy(old_errors.copy()), torch.from_numpy(drift), outside, slack).numpy()
    result.records = table.updated(
        error_before=old_errors,
        drift=drift,
        error=error,
        rank=ranks.numpy(),
        bound=table.int_column("bound") | (drift > DRIFT_BOUND_ABOVE),
    )
    # the new tasks through the one encoder, with add's float64 coordinates, factorization and errors
    encoded = encode_in_bases(
        members, plan.private_ranks, stored, dtype, norms, factors="per_task", errors="stored", precision=precision
    )
    weighted, new_records = [], {}
    for j, (m, (tensors, rec)) in enumerate(zip(members, encoded)):
        result.task_parts[m.task] = tensors
        new_records[m.task] = rec
        weighted.append((m.task, weights[j]))
    store_grams(name, result, weighted, plan, prefix, known=known, precision=precision)
    new_rows = TaskRows.of_parts([(m.task, prefix, result.task_parts[m.task]) for m in members], dtype)
    new_rows.precision = rows_precision(result.precision)
    if chain is not None:
        result.rows = appended_rows(ckpt, name, prefix, table, new_rows, chain, RB, RA)
    else:
        # the old tasks' rows rewritten: coefficients rotated into the new bases, private factors unchanged
        old_rows = ckpt.task_rows(name, old_tasks)
        coef_row = ranks.cumsum(0) - ranks
        coefs = {}
        if stored is not None and T:
            kept = torch.arange(CB.shape[2])[None, :] < ranks[:, None]  # T × p_max: each task's columns
            coefs[prefix] = (CB.transpose(1, 2)[kept], CA.transpose(1, 2)[kept])
        old_rows = TaskRows(old_tasks, [prefix] * T, coefs, coef_row.numpy(), old_rows.private, old_rows.private_row)
        result.rows = TaskRows.concat([old_rows, new_rows], dtype)
    result.rows.precision = rows_precision(result.precision)
    result.records = RecordTable.concat([result.records, new_records])
    return result


def update_grouped_module(
    ckpt: Checkpoint,
    name: str,
    old_tasks: list[str],
    dropped: Sequence[str],
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
) -> ModuleResult:
    """Fold new members into a module with groups of bases: each joins the group whose bases
    capture most of it, and only those groups are updated (incrementally, as one module each);
    the other groups are copied unchanged. Falls back to :func:`refit_module` when a group would
    be left empty or no group has bases."""
    entry = ckpt.module(name)
    records = ckpt.modules[name]["tasks"]  # the tasks' records as stored (dicts, version 1)
    groups = entry.groups
    kept = set(old_tasks)
    members = [m.to(torch.device("cpu")) for m in members]  # as in update_module
    prefixes = [f"modules/{name}/g{j}/" if g.k_B else None for j, g in enumerate(groups)]
    if not any(prefixes) or any(not [t for t in g.tasks if t in kept] for g in groups):
        return refit_module(ckpt, name, old_tasks, members, config, dtype)
    joins: dict[int, list[ModuleMember]] = {}
    for m in members:
        captured = []
        for prefix in prefixes:
            if prefix is None:
                captured.append(-1.0)
                continue
            Eb = ckpt.tensor(f"{prefix}basis_B").double().T @ m.Bc.double()
            Ea = ckpt.tensor(f"{prefix}basis_A").double().T @ m.Ac.double()
            captured.append(float(frobenius2(Eb, Ea)))
        joins.setdefault(max(range(len(groups)), key=lambda j: captured[j]), []).append(m)
    parts: list[GroupPart] = []
    for j, g in enumerate(groups):
        tasks = [t for t in g.tasks if t in kept]
        new_tasks = [m.task for m in joins.get(j, [])]
        if j in joins:
            res = update_module(ckpt, name, tasks, joins[j], config, dtype, prefix=prefixes[j])
            parts.append(GroupPart.of(res, tasks + new_tasks))
            continue
        # unchanged: bases and tasks copied; the Gram matrices are recomputed without dropped tasks
        part = GroupPart(g.k_B, g.k_A, g.kind, g.params, tasks + new_tasks, {}, rows=ckpt.task_rows(name, tasks))
        part.precision = module_precisions(entry, dtype).roles(dtype) if entry_precision(entry) else {}
        if prefixes[j] is not None:
            part.carried += [f"{prefixes[j]}basis_B", f"{prefixes[j]}basis_A"]
            if dropped_here(ckpt, name, prefixes[j], dropped):
                grams = grams_of(ckpt, name, prefixes[j], tasks, config.weighting)
                for side in ("B", "A"):
                    part.tensors[f"{prefixes[j]}gram_{side}"] = grams[side].to(torch.float32)
            else:
                part.carried += [f"{prefixes[j]}gram_B", f"{prefixes[j]}gram_A"]
        part.records = {t: dict(records[t], error_before=records[t]["error"], drift=0.0) for t in tasks}
        gone = [t for t in g.tasks if t not in kept]
        part.params -= sum(
            records[t]["rank"] * (g.k_B + g.k_A) + records[t]["private_rank"] * (entry.out_features + entry.in_features)
            for t in gone
        )
        parts.append(part)
    # the records in the module's order of tasks, new ones last
    order = [t for t in entry.task_names if t in kept] + [m.task for m in members]
    return assemble_groups(parts, order, entry.alternatives, dtype)
