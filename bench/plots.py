"""Leaderboard plots: accuracy against cost (with the Pareto front) and against budget.

Drawn with matplotlib's Agg backend, so no display is needed. One figure
per leaderboard group (dataset, protocol, hardware).
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.records import write_atomic  # noqa: E402

logger = logging.getLogger(__name__)


def pareto_front(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats on both lower cost and higher accuracy, by cost."""
    order = np.lexsort((-accuracy, cost))
    front, best = [], -np.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return np.asarray(front, dtype=int)


def _label(row) -> str:
    name = row.get("label", row["method"])
    return name if pd.isna(row["budget"]) else f"{name}@{int(row['budget'])}"


def _save(fig, path: Path) -> None:
    """Save ``fig`` as PNG through a temp file and a rename, so a killed save leaves no truncated image."""
    write_atomic(path, lambda handle: fig.savefig(handle, dpi=120, format="png"))


def plot_accuracy_vs_cost(table: pd.DataFrame, path: Path, metric: str = "recall@10", title: str = "") -> Path | None:
    """Scatter mean test ``metric`` against mean distillation wall seconds, Pareto front drawn."""
    rows = table.dropna(subset=["distill_wall_s", f"{metric}_mean"]).reset_index(drop=True)
    if rows.empty:
        return None
    cost = np.maximum(rows["distill_wall_s"].to_numpy(dtype=float), 1e-3)
    accuracy = rows[f"{metric}_mean"].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.errorbar(cost, accuracy, yerr=rows[f"{metric}_std"].fillna(0.0).to_numpy(dtype=float), fmt="o", capsize=3)
    for i, row in rows.iterrows():
        ax.annotate(_label(row), (cost[i], accuracy[i]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(cost, accuracy)
    ax.plot(cost[front], accuracy[front], "--", color="grey", label="Pareto front")
    # A log axis only helps when costs span orders of magnitude.
    log_scale = cost.max() / cost.min() > 20
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlabel("distillation wall time per cell (s" + (", log scale)" if log_scale else ")"))
    ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_accuracy_vs_budget(table: pd.DataFrame, path: Path, metric: str = "recall@10", title: str = "") -> Path | None:
    """Lines of mean test ``metric`` per method over budgets; full-data and pop as horizontal lines."""
    budgeted = table.dropna(subset=["budget"])
    if budgeted.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, rows in budgeted.groupby("label" if "label" in budgeted else "method"):
        rows = rows.sort_values("budget")
        ax.errorbar(rows["budget"], rows[f"{metric}_mean"], yerr=rows[f"{metric}_std"].fillna(0.0), marker="o", capsize=3,
                    label=method)
    for method, style in (("full", "-"), ("pop", ":")):
        ref = table[(table["method"] == method) & table["budget"].isna()].dropna(subset=[f"{metric}_mean"])
        if len(ref):
            ax.axhline(float(ref[f"{metric}_mean"].iloc[0]), linestyle=style, color="black", label=f"{method} (all data)")
    ax.set_xlabel("budget (sequences)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
