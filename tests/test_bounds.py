"""The error bounds recorded for old tasks after ``add`` (spec, section 5; planning.drift_bound).

Every test measures the true error of each task against its original adapter densely (small
modules) and compares it with what the checkpoint records.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint, RecordTable
from share_convert.engine import (
    FrozenTasks,
    ModulePlanner,
    add,
    chain,
    drift_bound,
    merge,
    old_tasks,
    projections,
)
from share_convert.io import checkpoint_tasks, open_adapters, write_synthetic_adapters

from .builders.adapters import random_factors, write_adapter
from .test_groups import two_families

#: recorded errors are computed from float32 coordinates (encoding.PRECISE_BELOW): their precision
ROUNDING = 1e-5


def noisy(root: Path, count: int, seed: int, prefix: str = "t", hidden: int = 48) -> list:
    """``count`` rank-4 adapters over two modules, a planted rank-6 subspace plus 10% noise."""
    write_synthetic_adapters(
        root, count=count, layers=1, hidden=hidden, rank=4, shared_rank=6, noise=0.1, seed=seed, prefix=prefix
    )
    return open_adapters([str(root)])


def true_error(ckpt: Checkpoint, source, module: str) -> float:
    f = source.read_module(module)
    dw = f.B.double() @ f.A.double()
    B, A = ckpt.reconstruction(source.task, module)
    return float((dw - B @ A.T).norm() / dw.norm())


def check_bounds(path: Path, sources: list) -> list[tuple[float, float, float]]:
    """Assert that every task's recorded error is at least its true error, and every old task's
    at most the triangle bound; return (true, recorded, triangle) of the tasks the last add moved."""
    ckpt = Checkpoint(path)
    moved = []
    for src in sources:
        for module, info in ckpt.modules.items():
            rec = info["tasks"].get(src.task)
            if rec is None:
                continue
            true = true_error(ckpt, src, module)
            assert rec["error"] >= true - ROUNDING, (src.task, module, rec, true)
            if rec.get("drift", -1) >= 0:
                triangle = rec["error_before"] + rec["drift"]
                assert rec["error"] <= triangle + 1e-12
                moved.append((true, rec["error"], triangle))
    return moved


# -- the bound itself ------------------------------------------------------------------------------


def test_without_structure_the_bound_is_the_triangle_one():
    f64 = torch.float64
    e, d, f = (torch.tensor(x, dtype=f64) for x in ([0.1, 0.3, 0.0], [0.2, 0.0, 0.5], [0.05, 0.0, 0.1]))
    assert torch.equal(drift_bound(e, d, f, torch.full((3,), torch.inf, dtype=f64)), e + d)


def test_a_drift_inside_the_span_adds_in_quadrature():
    e, d = torch.tensor([0.1, 0.05], dtype=torch.float64), torch.tensor([0.2, 0.01], dtype=torch.float64)
    out = drift_bound(e, d, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(out, (e**2 + d**2).sqrt())


@pytest.mark.parametrize("seed", range(5))
def test_the_bound_holds_for_residuals_orthogonal_to_the_span_but_for_the_slack(seed):
    g = torch.Generator().manual_seed(seed)
    n, d, k = 30, 20, 5
    beta = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    alpha = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q

    def project(X):
        return beta @ (beta.T @ X @ alpha) @ alpha.T

    for _ in range(20):
        R = torch.randn(n, d, generator=g, dtype=torch.float64)
        slack = float(torch.rand(1, generator=g)) * 0.3
        R = R - project(R)
        inside = project(torch.randn(n, d, generator=g, dtype=torch.float64))
        R = R + slack * inside / inside.norm()  # ‖Π R‖ = slack
        D = torch.randn(n, d, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g))
        e, dd, f = R.norm(), D.norm(), (D - project(D)).norm()
        true = (R + D).norm()  # ΔW − ΔŴ_after = R + D
        bound = drift_bound(*(torch.tensor([float(x)], dtype=torch.float64) for x in (e, dd, f, slack)))
        assert float(bound) >= float(true) - 1e-12
        assert float(bound) <= float(e + dd) + 1e-12


def test_the_planner_counts_the_tighter_bounds():
    g = torch.Generator().manual_seed(0)
    T, K, r = 3, 6, 2
    Eb, Ea = (
        torch.randn(T, K, r, generator=g, dtype=torch.float64),
        torch.randn(T, K, r, generator=g, dtype=torch.float64),
    )
    norm2 = ((Eb.transpose(1, 2) @ Eb) * (Ea.transpose(1, 2) @ Ea)).sum((1, 2))
    base = dict(Eb=Eb, Ea=Ea, norm2=norm2, ranks=torch.full((T,), r), prior=torch.full((T,), 0.05, dtype=torch.float64))
    scale = norm2.rsqrt() * 0.9
    plain = FrozenTasks(**base, scale=scale)
    # old bases = the first 4 new ones: keeping k ≤ 4 only drops directions of the old span
    inside = torch.eye(K, dtype=torch.float64)[:4]
    tight = FrozenTasks(**base, scale=scale, slack=torch.zeros(T, dtype=torch.float64), inside=(inside, inside))
    for k in (2, 3, 4):
        drift = plain.errors(k, k) - 0.05
        assert torch.allclose(tight.errors(k, k), (0.05**2 + drift**2).sqrt())
        assert plain.error_stats(k, k)[0] > tight.error_stats(k, k)[0]


# -- recorded bounds against true errors -----------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        ConsolidationConfig(target_error=0.05),
        ConsolidationConfig(k=4, private_rank=1),
        ConsolidationConfig(k=0, private_rank=2),
    ],
    ids=["target", "mixed", "private"],
)
def test_recorded_errors_bound_the_true_ones_over_repeated_adds(tmp_path, config):
    sources = noisy(tmp_path / "a", 8, seed=3)
    path = tmp_path / "c0.safetensors"
    merge(sources[:4], path, config)
    for step, part in enumerate((sources[4:6], sources[6:8]), start=1):
        nxt = tmp_path / f"c{step}.safetensors"
        add(path, part, nxt)
        check_bounds(nxt, sources[: 4 + 2 * step])
        path = nxt


def test_recorded_errors_bound_the_true_ones_through_a_chain(tmp_path, monkeypatch):
    monkeypatch.setattr(chain, "CHAIN_MIN_BYTES", 0)  # small rows are chained too
    sources = noisy(tmp_path / "a", 7, seed=5)
    config = ConsolidationConfig(k=6)
    paths = [tmp_path / "c0.safetensors"]
    merge(sources[:4], paths[0], config)
    for i, src in enumerate(sources[4:], start=1):
        paths.append(tmp_path / f"c{i}.safetensors")
        add(paths[-2], [src], paths[-1], config)
        check_bounds(paths[-1], sources[: 4 + i])
    assert Checkpoint(paths[-1]).manifest["format_version"] == 3


def test_recorded_errors_bound_the_true_ones_with_groups(tmp_path):
    sources = two_families(tmp_path)
    xs = [s for s in sources if s.task.startswith("x")]
    old = [s for s in sources if s is not xs[-1]]
    merge(old, tmp_path / "g.safetensors", ConsolidationConfig(target_error=0.02, groups="auto"))
    add(tmp_path / "g.safetensors", xs[-1:], tmp_path / "g2.safetensors")
    assert "groups" in next(iter(Checkpoint(tmp_path / "g2.safetensors").modules.values()))
    check_bounds(tmp_path / "g2.safetensors", sources)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_recorded_errors_bound_the_true_ones_in_half_precision(tmp_path, dtype):
    sources = noisy(tmp_path / "a", 6, seed=7, hidden=64)
    config = ConsolidationConfig(k=5, dtype=dtype)
    merge(sources[:4], tmp_path / "c0.safetensors", config)
    add(tmp_path / "c0.safetensors", sources[4:], tmp_path / "c1.safetensors", config)
    # half-precision storage rounds ΔŴ itself: its error is recorded as stored, the bound must follow
    check_bounds(tmp_path / "c1.safetensors", sources)


def test_an_original_consistent_with_the_checkpoint_reaches_the_bound(tmp_path):
    """No sound bound can be lower: ΔW' = ΔŴ_before + R, with R ⊥ span(β) ⊗ span(α) along the
    drift's outside part and ‖R‖ the recorded error, has the same projection (so the same stored
    task, error and norm) as the real original, and after the add its error is the bound."""
    old = [
        write_adapter(tmp_path / f"o{i}", {"layers.0.q": random_factors(24, 20, 2, seed=i)}, r=2, alpha=2)
        for i in range(6)
    ]
    new = write_adapter(tmp_path / "new", {"layers.0.q": random_factors(24, 20, 2, seed=50)}, r=2, alpha=2)
    config = ConsolidationConfig(k=4)
    merge(open_adapters([str(p) for p in old]), tmp_path / "c0.safetensors", config)
    add(tmp_path / "c0.safetensors", open_adapters([str(new)]), tmp_path / "c1.safetensors", config)
    before, after = Checkpoint(tmp_path / "c0.safetensors"), Checkpoint(tmp_path / "c1.safetensors")
    module = next(iter(before.modules))
    beta, alpha = (b.double() for b in before.bases(module))
    reached = 0
    for task in before.tasks:
        rec = after.modules[module]["tasks"][task]
        B0, A0 = before.reconstruction(task, module)
        B1, A1 = after.reconstruction(task, module)
        W0, W1 = B0 @ A0.T, B1 @ A1.T
        D = W0 - W1
        outside = D - beta @ (beta.T @ D @ alpha) @ alpha.T
        if outside.norm() < 1e-9:
            continue
        norm = rec["norm"]
        worst = W0 + rec["error_before"] * norm * outside / outside.norm()
        reaches = float((worst - W1).norm()) / norm
        assert rec["error"] >= reaches - 1e-6
        assert rec["error"] == pytest.approx(reaches, abs=1e-5)
        assert rec["error"] < rec["error_before"] + rec["drift"]
        reached += 1
    assert reached


def test_a_refit_to_private_plans_records_pythagoras_for_fresh_tasks(tmp_path):
    """The issue's experiment at a small size: the second add refits every module to private plans
    (cheaper than the shared bases would be); tasks encoded by the first add then lose only
    directions inside their old span, and their recorded bounds meet their true errors."""
    write_synthetic_adapters(tmp_path / "a", count=10, layers=1, hidden=128, rank=8, shared_rank=16, noise=0.1)
    sources = open_adapters([str(tmp_path / "a")])
    # in float: in fewer bits the first add's modules would already be private plans
    merge(sources[:4], tmp_path / "c0.safetensors", ConsolidationConfig(precision="float"))
    add(tmp_path / "c0.safetensors", sources[4:7], tmp_path / "c1.safetensors")
    add(tmp_path / "c1.safetensors", sources[7:], tmp_path / "c2.safetensors")
    shared = [m for m, info in Checkpoint(tmp_path / "c1.safetensors").modules.items() if info["kind"] == "shared"]
    assert shared and all(Checkpoint(tmp_path / "c2.safetensors").modules[m]["kind"] == "private" for m in shared)
    check_bounds(tmp_path / "c2.safetensors", sources)
    ckpt = Checkpoint(tmp_path / "c2.safetensors")
    tighter = 0
    for src in sources[4:7]:  # the tasks the first add encoded
        for module in shared:
            rec = ckpt.modules[module]["tasks"][src.task]
            assert rec["error"] == pytest.approx(true_error(ckpt, src, module), abs=1e-4)
            tighter += rec["error"] < rec["error_before"] + rec["drift"] - 1e-6
    assert tighter


def slacks(path: Path) -> dict[str, float]:
    """η of drift_bound per task in the checkpoint's first module (+inf: only the triangle bound)."""
    ckpt = Checkpoint(path)
    module = next(iter(ckpt.modules))
    info = ckpt.modules[module]
    table = RecordTable.from_dicts(info["tasks"])
    beta, alpha = (b.double() for b in ckpt.bases(module))
    old = old_tasks.OldCoefficients(ckpt, module, table.tasks, beta.shape[1], alpha.shape[1])
    norm2 = old.form([(1.0, None, None)])
    slack = projections.projection_slack(ckpt, ckpt.module(module), table, old, beta, alpha, norm2)
    return dict(zip(table.tasks, slack.tolist()))


def test_only_tasks_encoded_in_the_current_bases_without_private_parts_get_the_tighter_bound(tmp_path):
    sources = noisy(tmp_path / "a", 6, seed=11)
    merge(sources[:3], tmp_path / "c0.safetensors", ConsolidationConfig(k=6))
    assert all(0 <= s < 1e-3 for s in slacks(tmp_path / "c0.safetensors").values())  # fresh, float32: tiny
    add(tmp_path / "c0.safetensors", sources[3:4], tmp_path / "c1.safetensors", ConsolidationConfig(k=6))
    after = slacks(tmp_path / "c1.safetensors")
    assert all(after[s.task] == float("inf") for s in sources[:3])  # moved by the add: no longer projections
    assert after[sources[3].task] < 1e-3
    merge(sources[4:], tmp_path / "m.safetensors", ConsolidationConfig(k=4, private_rank=1))
    assert all(s == float("inf") for s in slacks(tmp_path / "m.safetensors").values())  # private parts
    merge(
        [*checkpoint_tasks(Checkpoint(tmp_path / "c0.safetensors")), *sources[4:]],
        tmp_path / "r.safetensors",
        ConsolidationConfig(k=6),
    )
    again = slacks(tmp_path / "r.safetensors")
    assert all(again[s.task] == float("inf") for s in sources[:3])  # errors relative to reconstructions
    assert all(again[s.task] < 1e-3 for s in sources[4:])


def test_a_refit_plans_tasks_that_keep_their_own_directions_on_pythagoras():
    g = torch.Generator().manual_seed(1)
    T, K, r = 2, 5, 3
    f64 = torch.float64
    s = torch.rand(T, r, generator=g, dtype=f64).sort(descending=True).values + 0.5
    Eb, Ea = torch.randn(T, K, r, generator=g, dtype=f64), torch.randn(T, K, r, generator=g, dtype=f64)
    common = dict(ranks=torch.full((T,), r), norm2=(s**2).sum(1), prior=torch.full((T,), 0.04, dtype=f64))
    ratio = torch.full((T,), 0.99, dtype=f64)
    triangle = ModulePlanner.stacked(8, 6, s, Eb, Ea, **common, ratio=ratio)
    tight = ModulePlanner.stacked(8, 6, s, Eb, Ea, **common, ratio=ratio, slack=torch.tensor([0.0, math.inf]))
    drift = triangle.tails(0, 0) - 0.04  # ratio × the error of keeping q of each task's own directions
    expected = torch.stack([(0.04**2 + drift[0] ** 2).sqrt(), 0.04 + drift[1]])
    assert torch.allclose(tight.tails(0, 0), expected)
    assert torch.equal(tight.tails(2, 2), triangle.tails(2, 2))  # shared bases may leave the old span
