"""Plots an analyst opens in the MLflow UI; each writes one PNG and returns its path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: Sequence[Mapping[str, Any]], path: Path, metric: str | None = None) -> Path:
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    ncols = 2 if metric else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [h.get("train_loss") for h in history], marker="o", label="train loss")
    if any(h.get("valid_loss") is not None for h in history):
        ax.plot(epochs, [h.get("valid_loss") for h in history], marker="o", label="valid loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Learning curves")
    if metric:
        ax2 = axes[0][1]
        ax2.plot(epochs, [h.get(metric) for h in history], marker="o", color="C2")
        ax2.set_xlabel("epoch")
        ax2.set_title(f"valid {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def predicted_vs_actual(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str, discrete: bool = False) -> Path:
    """Scatter (hexbin for many rows) for continuous targets; side-by-side histograms for ratings."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    if discrete:
        levels = np.unique(y_true)
        data = [y_pred[y_true == v] for v in levels]
        axes[0].boxplot(data, labels=[f"{v:g}" for v in levels], showfliers=False)
        axes[0].set_xlabel("actual rating")
        axes[0].set_ylabel("predicted rating")
    else:
        axes[0].hexbin(y_true, y_pred, gridsize=60, bins="log", mincnt=1)
        lo, hi = float(np.nanmin(y_true)), float(np.nanmax(y_true))
        axes[0].plot([lo, hi], [lo, hi], color="red", lw=1)
        axes[0].set_xlabel("actual")
        axes[0].set_ylabel("predicted")
    bins = np.linspace(min(y_true.min(), y_pred.min()), max(y_true.max(), y_pred.max()), 40)
    axes[1].hist(y_true, bins=bins, alpha=0.5, label="actual")
    axes[1].hist(y_pred, bins=bins, alpha=0.5, label="predicted")
    axes[1].legend()
    axes[1].set_title("distribution")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def bias_bars(labels: Sequence[str], biases: np.ndarray, path: Path, n: int = 15) -> Path:
    """Top and bottom n items by learned bias."""
    plt = _plt()
    order = np.argsort(biases)
    low, high = order[:n], order[::-1][:n]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.35 * n + 1.5))
    for ax, idx, title in ((axes[0], high, f"top {n} by learned bias"), (axes[1], low, f"bottom {n}")):
        ax.barh([_short(labels[i]) for i in idx][::-1], biases[idx][::-1], color="C0" if ax is axes[0] else "C3")
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def embedding_map(emb: np.ndarray, labels: Sequence[str], path: Path, title: str, annotate: int = 40) -> Path:
    """2-D PCA of embedding vectors; the first `annotate` labels are written on the map."""
    plt = _plt()
    x = emb - emb.mean(axis=0, keepdims=True)
    if x.shape[0] >= 2 and x.shape[1] >= 2:
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T
    else:
        xy = np.pad(x, ((0, 0), (0, max(0, 2 - x.shape[1]))))[:, :2]
    fig, ax = plt.subplots(figsize=(9, 7))
    ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.5)
    for i in range(min(annotate, len(labels))):
        ax.annotate(_short(labels[i]), xy[i], fontsize=7)
    ax.set_title(title)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _short(s: Any, n: int = 40) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def partial_dependence(pds: Sequence[Any], path: Path, title: str, ylabel: str, ncols: int = 2) -> Path | None:
    """One panel per feature: the average prediction (thick) over a few rows' own curves (ICE, thin).

    `pds` are `modeling.inspection.PartialDependence`; categorical features are drawn at their
    category labels, continuous ones at their raw values. Each ICE line is shifted to start where
    the average starts, so the panel shows whether single rows bend the same way as the average
    (rows of different stores otherwise sit at different levels and hide the shapes). Two
    columns keep the figure about 950 px wide, the width of the UI's artifact viewer."""
    if not pds:
        return None
    plt = _plt()
    ncols = min(ncols, len(pds))
    nrows = -(-len(pds) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.3 * ncols, 3.7 * nrows), squeeze=False)
    for ax, pd_ in zip(axes.ravel(), pds, strict=False):
        grid = pd_.grid
        x = grid.raw if grid.kind == "cont" and grid.raw is not None else np.arange(len(grid.values))
        style = {"marker": "o", "ms": 3} if grid.kind == "cat" else {}
        for line in pd_.ice:
            ax.plot(x, line - line[0] + pd_.average[0], color="0.6", lw=0.8, alpha=0.7, **style)
        ax.plot(x, pd_.average, color="C3", lw=2.5, label=f"average of {pd_.rows} rows", **style)
        if grid.kind == "cat":
            ax.set_xticks(x)
            ax.set_xticklabels([_short(lbl, 12) for lbl in grid.labels], rotation=45 if len(x) > 6 else 0,
                               ha="right" if len(x) > 6 else "center", fontsize=9)
        ax.set_title(grid.name)
        ax.set_xlabel(grid.name + (" (category)" if grid.kind == "cat" else ""))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(pds):]:
        ax.set_visible(False)
    axes[0][0].legend(loc="best", fontsize=8, title="thin: single rows (ICE), aligned at the first value",
                      title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def error_breakdown(table: Any, metric: str, overall: float, path: Path, title: str, ncols: int = 2) -> Path | None:
    """One bar panel per segment column (`modeling.inspection.error_breakdown`'s table): the metric
    per value, with the overall value as a dashed line and each bar's row count written on it."""
    if table is None or len(table) == 0:
        return None
    plt = _plt()
    segments = list(dict.fromkeys(table["segment"]))
    ncols = min(ncols, len(segments))
    nrows = -(-len(segments) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.3 * ncols, 3.3 * nrows), squeeze=False)
    for ax, seg in zip(axes.ravel(), segments, strict=False):
        part = table[table["segment"] == seg]
        y = np.arange(len(part))
        values = part[metric].to_numpy()
        colors = np.where(values > overall * (1 + 1e-9), "C3", "C0")  # a one-value segment equals overall
        ax.barh(y, values, color=colors)
        ax.set_yticks(y)
        ax.set_yticklabels([_short(v, 18) for v in part["value"]], fontsize=9)
        ax.invert_yaxis()
        ax.axvline(overall, color="k", ls="--", lw=1)
        for yi, (v, n) in enumerate(zip(values, part["rows"], strict=True)):
            ax.text(v, yi, f" {int(n):,}", va="center", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})  # over the dashed line
        ax.set_title(f"{metric} by {seg}")
        ax.set_xlabel(f"{metric} (bar label: rows)")
        ax.set_xlim(0, float(np.nanmax(values)) * 1.25 if np.isfinite(values).any() else 1)
    for ax in axes.ravel()[len(segments):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\ndashed line: overall {metric} {overall:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def worst_groups(table: Any, key: str, metric: str, overall: float, path: Path, title: str,
                 describe: Sequence[str] = ()) -> Path | None:
    """Horizontal bars of the worst groups (e.g. stores), labelled with their describing columns,
    coloured by bias (over- or under-prediction on average)."""
    if table is None or len(table) == 0:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(table) + 1.8))
    y = np.arange(len(table))
    bias = table["bias"].to_numpy(dtype=np.float64)
    ax.barh(y, table[metric], color=np.where(bias >= 0, "C1", "C0"))
    labels = [f"{key} {row[key]}" + (" (" + ", ".join(str(row[c]) for c in describe) + ")" if describe else "")
              for _, row in table.iterrows()]  # at most n (20) labels, not rows of data
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    ax.invert_yaxis()
    ax.axvline(overall, color="k", ls="--", lw=1, label=f"overall {overall:.4f}")
    for yi, (v, b, n) in enumerate(zip(table[metric], bias, table["rows"], strict=True)):
        ax.text(v, yi, f" bias {b:+.1%}, {int(n)} rows", va="center", fontsize=8)
    ax.set_xlim(0, float(table[metric].max()) * 1.45)
    ax.set_xlabel(f"{metric} (orange: over-predicted on average, blue: under-predicted)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title + (f"\nlabels: {key} ({', '.join(describe)})" if describe else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def ranking_breakdown(table: Any, k: int, path: Path, title: str) -> Path | None:
    """Grouped bars of precision/recall/NDCG@k per user group (e.g. activity bins)."""
    if table is None or len(table) == 0:
        return None
    plt = _plt()
    names = [f"precision_at_{k}", f"recall_at_{k}", f"ndcg_at_{k}"]
    x = np.arange(len(table))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(table) + 3), 4.5))
    for i, name in enumerate(names):
        ax.bar(x + (i - 1) * width, table[name], width, label=name.replace("_at_", "@"))
    ax.set_xticks(x)
    ax.set_xticklabels([f"{g}\n{int(n):,} users" for g, n in zip(table["group"], table["users"], strict=True)],
                       fontsize=8)
    ax.set_xlabel("training ratings per user")
    ax.set_ylabel(f"metric @{k}")
    ax.legend(fontsize=8)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
