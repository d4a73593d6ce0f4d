"""A ``--budget`` spent across modules: an error target per module (a merge's first pass).

The pass reads each module once; what it built is kept for the second pass within a memory bound
(:class:`KeptStacks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace as dc_replace

import torch

from ..config import ConsolidationConfig, parse_budget
from ..dtypes import itemsize
from ..io.stack import OpenFiles
from .consolidation import plan_group
from .members import TaskSource, read_members
from .parallel import ordered_map
from .stacks import ModuleStack


def budget_targets(
    sources: Sequence[TaskSource],
    modules: dict[str, tuple[int, int, list[int]]],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    total_original: int,
    fixed_bytes: int,
    workers: int,
    files: OpenFiles | None = None,
    kept: KeptStacks | None = None,
) -> dict[str, float]:
    """Under ``--budget``, the error target of each module that spends the budget best (else {}).

    A first pass reads every module once and plans it at each of ``BUDGET_TARGETS`` (the least
    storage meeting that error; the module's bases are fitted once for all of them); then, with
    ``target_metric`` 'mean', :func:`allocate_budget` chooses per module the least total error, and
    with 'max', :func:`common_target` the least error target that every module meets within the
    budget (the worst task's error, rather than the mean, is what is minimized). The second pass
    (``merge``) consolidates each module at its target. With ``kept``, the stacks of the first pass
    (members, bases and planners) are handed to the second up to ``kept.limit`` bytes, in module
    order: those modules are neither read nor decomposed again.

    Storage is counted in parameters with ``--precision float`` (as before precisions existed) and
    in bytes otherwise (each plan stored at the precision the plan step chooses for it, against the
    originals' bytes).
    """
    if config.mode() != "budget":
        return {}
    kind, value = parse_budget(config.budget)
    in_bytes = config.precision != "float"
    size = torch.empty((), dtype=dtype).element_size()
    if in_bytes:
        original = sum(
            src.module_shapes()[m][2] * (n + d) * itemsize(src.weights_dtype)
            for m, (n, d, idx) in modules.items()
            for src in (sources[i] for i in idx)
        )
        budget = original / value if kind == "ratio" else max(value - fixed_bytes, 0.0)
    else:
        budget = total_original / value if kind == "ratio" else max((value - fixed_bytes) / size, 0.0)
    worst = config.target_metric == "max"
    targets = MAX_TARGETS if worst else BUDGET_TARGETS

    def frontier(item: tuple[str, tuple[int, int, list[int]]]) -> tuple[list[tuple[int, float]], ModuleStack]:
        name, (n, d, idx) = item
        members = read_members([sources[i] for i in idx], name, config, files)
        stack = ModuleStack(n, d, members, config)
        points = []
        for eps in targets:
            at = dc_replace(config, budget=None, target_error=eps, target_metric="max" if worst else "mean")
            plan = plan_group(stack, at, dtype if in_bytes else None, bases=False)[2]
            cost = plan.bytes if in_bytes and plan.bytes is not None else plan.params * (size if in_bytes else 1)
            points.append((cost, max(plan.predicted_errors, default=0.0) if worst else plan.mean_error * len(members)))
        return points, stack

    frontiers = {}
    for name, (points, stack) in zip(modules, ordered_map(frontier, list(modules.items()), workers)):
        frontiers[name] = points
        if kept is not None:
            kept.offer(name, stack)
    if worst:
        j = common_target(frontiers, budget)
        return {m: MAX_TARGETS[j] for m in modules}
    return {m: BUDGET_TARGETS[j] for m, j in allocate_budget(frontiers, budget).items()}


def common_target(frontiers: dict[str, list[tuple[int, float]]], budget: float) -> int:
    """The least error target (an index into ``MAX_TARGETS``) whose plans fit ``budget`` summed over
    modules: the worst task's error is then at most that target in every module (the last when
    nothing fits). Storage falls as the target grows, so the first that fits is the answer; a binary
    search over the sorted targets would find the same index."""
    for j in range(len(MAX_TARGETS)):
        if sum(points[j][0] for points in frontiers.values()) <= budget:
            return j
    return len(MAX_TARGETS) - 1


#: Memory the budget pass may keep for the second pass (bytes): small sets are read once, large
#: ones keep their first modules and read the rest again.
KEEP_BYTES = 256 * 2**20


class KeptStacks:
    """The budget pass's module stacks kept for the merge's second pass, up to ``limit`` bytes.

    Modules are offered in order and kept while they fit (then none after: the second pass takes
    them in the same order, so the memory is released from the start). A kept stack holds its
    members' canonical factors, both stacks and the bases fitted on them, all computed from the
    same inputs as the second pass would compute them, so keeping changes no output.
    """

    def __init__(self, limit: int | None = None):
        self.limit, self.used, self.full = KEEP_BYTES if limit is None else limit, 0, False
        self._stacks: dict[str, ModuleStack] = {}

    def offer(self, name: str, stack: ModuleStack) -> None:
        size = stack_bytes(stack)
        if self.full or self.used + size > self.limit:
            self.full = True
            return
        self._stacks[name] = stack
        self.used += size

    def take(self, name: str) -> ModuleStack | None:
        """The kept stack of module ``name`` (then forgotten here), or None: read it again."""
        stack = self._stacks.pop(name, None)
        if stack is not None:
            self.used -= stack_bytes(stack)
        return stack

    def __contains__(self, name: str) -> bool:
        return name in self._stacks


def stack_bytes(stack: ModuleStack) -> int:
    """About what a stack holds in memory: the two weighted stacks, the members' canonical factors
    (as large), and the bases and Gram decompositions fitted on them (at most as large again)."""
    return 3 * (stack.stack_B.numel() + stack.stack_A.numel()) * stack.stack_B.element_size()


#: The error targets a --budget is allocated among, per module (mean ΔW error over the module's tasks).
BUDGET_TARGETS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)

#: The common worst-task error targets a --budget with --target-metric max chooses among: 0, then
#: steps of 30% from 0.2% to 90% (finer than the mean's grid: one target serves every module, so the
#: step is what the budget may leave unspent).
MAX_TARGETS = (0.0, *(round(0.002 * 1.3**i, 6) for i in range(24)), 0.9)


def allocate_budget(frontiers: dict[str, list[tuple[int, float]]], budget_params: float) -> dict[str, int]:
    """Spend a storage budget across modules: per module, which point of its frontier to take.

    ``frontiers[m][j]`` is (parameters, sum of task errors) of module m's least-storage plan at
    ``BUDGET_TARGETS[j]``. Two allocations are compared and the one with the lower total error is
    kept: the same target everywhere (the largest spending that fits), and a greedy by marginal error
    per parameter (each step moves the module whose step lowers the error most per extra parameter,
    while the total fits; a step may skip points where a frontier is not convex). The first
    guarantees that at the storage of the default target plan, a budget plan is never worse than
    it; the second spends storage where it pays most.
    Returns the index into ``BUDGET_TARGETS`` per module (the cheapest point when nothing fits).
    """
    import heapq

    names = list(frontiers)
    last = len(BUDGET_TARGETS) - 1

    def total(choice: dict[str, int]) -> tuple[float, int]:
        return (
            sum(frontiers[m][j][1] for m, j in choice.items()),
            sum(frontiers[m][j][0] for m, j in choice.items()),
        )

    fitting = []
    for j in range(len(BUDGET_TARGETS)):  # the same target everywhere
        choice = {m: j for m in names}
        if total(choice)[1] <= budget_params:
            fitting.append(choice)
    # greedy: from the cheapest point of every module, the best error drop per parameter first
    choice = {m: last for m in names}
    spent = total(choice)[1]
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        """Module i's steepest step from where it is: the point, among those that cost more, lower
        the error and still fit, with the largest error drop per parameter (on a frontier that is
        not convex this may skip points, as walking its lower convex hull does)."""
        m = names[i]
        j = choice[m]
        p0, e0 = frontiers[m][j]
        best: tuple[float, int] | None = None
        for nxt in range(j - 1, -1, -1):
            p1, e1 = frontiers[m][nxt]
            if e1 < e0 and p1 > p0 and spent + (p1 - p0) <= budget_params:
                rate = (e0 - e1) / (p1 - p0)
                if best is None or rate > best[0]:
                    best = (rate, nxt)
        if best is not None:
            heapq.heappush(heap, (-best[0], i, best[1]))

    for i in range(len(names)):
        push(i)
    while heap:  # each module has at most one step in the heap
        _rate, i, nxt = heapq.heappop(heap)
        m = names[i]
        extra = frontiers[m][nxt][0] - frontiers[m][choice[m]][0]
        if spent + extra > budget_params:  # no longer fits: the module's best step that does
            push(i)
            continue
        choice[m] = nxt
        spent += extra
        push(i)
    if spent <= budget_params:
        fitting.append(choice)
    if not fitting:  # nothing fits: the least storage each module can have
        return {m: last for m in names}
    return min(fitting, key=total)
