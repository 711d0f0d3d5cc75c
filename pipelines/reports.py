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
