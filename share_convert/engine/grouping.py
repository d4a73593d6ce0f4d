"""Groups of tasks with separate bases in one module (spec, section 6).

When a module's tasks fall into families that occupy different subspaces, one basis per family
can be cheaper than one for all at the same error. :func:`cluster_tasks` proposes the families;
:func:`share_convert.engine.consolidation.consolidate_module` keeps a split only where it is cheaper.
"""

from __future__ import annotations

import torch

from .planning import TaskFit


def cluster_tasks(fits: list[TaskFit], groups: int, rounds: int = 5) -> list[int]:
    """Split tasks into ``groups`` by the subspaces they occupy (k-subspaces in basis coordinates).

    Each task is represented by the projector onto its output-side directions in the module's
    shared coordinates; tasks start from the farthest-first seeds and are reassigned, a few
    rounds, to the group whose mean projector captures most of them. Deterministic.
    """
    if not fits or fits[0].Eb.shape[0] == 0:
        return [0] * len(fits)
    bases = []
    for f in fits:
        if f.rank == 0 or f.norm2 == 0:
            bases.append(torch.zeros(f.Eb.shape[0], 1, dtype=torch.float64))
            continue
        # on the CPU: a T × T loop of small products, which a GPU would pay a launch per step for
        q, _ = torch.linalg.qr(f.Eb.cpu() * f.s.cpu().clamp_min(0).sqrt().unsqueeze(0))
        bases.append(q)
    T = len(fits)
    aff = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(i, T):
            a = float((bases[i].T @ bases[j]).pow(2).sum()) / max(min(bases[i].shape[1], bases[j].shape[1]), 1)
            aff[i, j] = aff[j, i] = a
    seeds = [0]
    while len(seeds) < min(groups, T):
        closest = aff[:, seeds].max(1).values
        closest[seeds] = float("inf")
        seeds.append(int(closest.argmin()))
    labels = [int(aff[i, seeds].argmax()) for i in range(T)]
    for _ in range(rounds):
        centers = []
        for g in range(len(seeds)):
            idx = [i for i in range(T) if labels[i] == g]
            centers.append(sum(bases[i] @ bases[i].T for i in idx) / max(len(idx), 1) if idx else None)
        new = []
        for i in range(T):
            scores = [float((bases[i].T @ c @ bases[i]).trace()) if c is not None else -1.0 for c in centers]
            new.append(max(range(len(scores)), key=lambda g: scores[g]))
        if new == labels:
            break
        labels = new
    return labels
