"""Drawing a plan's curves (share_convert.report.curves) as a PNG: error against compression, one line per rule.

matplotlib is optional (``pip install 'share-convert[plot]'``): without it ``--plot`` is one clear error,
given before any work (:func:`check_plot_target`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError
from .curves import STRATEGIES


def ratio_ticks(result: dict[str, Any]) -> list[float]:
    """Labelled compression ticks: the budgets (and powers of two beyond them) up to the largest ratio
    reached, at least 30% apart on the log axis so that the labels do not overlap."""
    reached = [r[s]["ratio"] for r in result["curves"] for s in STRATEGIES if r[s]["ratio"]]
    top = max(reached, default=1.0) * 1.2
    candidates = sorted({r["budget_ratio"] for r in result["curves"]} | {64.0, 128.0, 256.0})
    ticks: list[float] = []
    for t in candidates:
        if t <= top and (not ticks or t / ticks[-1] >= 1.3):
            ticks.append(t)
    return ticks


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or the one-line error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidOptionError("--plot needs matplotlib", hint="pip install matplotlib") from None
    return plt


def check_plot_target(path: str | Path) -> None:
    """Before any work: the image can be drawn (matplotlib) and written (its folder exists, is writable)."""
    from ..checkpoint.publish import check_parent_writable

    _pyplot()
    check_parent_writable(Path(path))


def plot_curves(result: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Draw the curves as a PNG (needs matplotlib: pip install matplotlib)."""
    plt = _pyplot()
    labels = {
        "shared_unweighted": "pure sharing, weighted by ‖ΔW‖ (paper)",
        "shared": "pure sharing, tasks weighted equally",
        "private": "no sharing (truncate each adapter, equal ranks)",
        "private_allocated": "no sharing (ranks allocated)",
        "mixed": "shared + private (planner)",
        "groups": "shared + private, with groups",
    }
    # curves that coincide (the planner often equals the allocated truncation) stay visible through
    # distinct markers, line styles and widths drawn from the widest down
    styles = {
        "shared_unweighted": dict(marker="s", linestyle="--", linewidth=1.2, markersize=5),
        "shared": dict(marker="D", linestyle="-", linewidth=1.2, markersize=5),
        "private": dict(marker="v", linestyle=":", linewidth=1.5, markersize=6),
        "private_allocated": dict(marker="o", linestyle="-", linewidth=5, markersize=10, alpha=0.35),
        "mixed": dict(marker="o", linestyle="-", linewidth=2.5, markersize=6, alpha=0.8),
        "groups": dict(marker="x", linestyle="--", linewidth=1.2, markersize=7),
    }
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    for s in STRATEGIES:
        pts = [(r[s]["ratio"], r[s]["mean_error"]) for r in result["curves"] if r[s]["ratio"]]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], label=labels[s], **styles[s])
    dp = result["default_plan"]
    if dp["ratio"]:
        ax.scatter(
            [dp["ratio"]],
            [100 * dp["mean_error"]],
            color="black",
            marker="*",
            s=160,
            zorder=5,
            label=f"default ({dp['rule']})",
        )
    ax.set_xscale("log")
    ax.set_xticks(ratio_ticks(result))
    ax.set_xticklabels([f"{t:g}×" for t in ratio_ticks(result)])
    ax.minorticks_off()
    ax.set_xlabel("compression (original LoRA parameters / stored, bases counted)")
    ax.set_ylabel("mean relative ΔW error (%)")
    ax.set_title(title or f"{result['tasks']} adapters, {result['modules']} modules")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # outside the data
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
