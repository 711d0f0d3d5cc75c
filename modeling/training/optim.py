"""AdamW with one lr per model param group (discriminative lrs), no weight decay on biases/norms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["freeze", "make_optimizer", "model_groups", "resolve_lrs", "spread_lrs", "unfreeze"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def model_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The model's param_groups() (input side first); parameters it leaves out join the last group."""
    groups = [list(g) for g in model.param_groups()] if hasattr(model, "param_groups") else []
    groups = [g for g in groups if g] or [[]]
    seen: set[int] = set()
    for g in groups:
        for p in g:
            if id(p) in seen:
                raise ValueError(f"{type(model).__name__}.param_groups() lists a parameter twice")
            seen.add(id(p))
    groups[-1].extend(p for p in model.parameters() if id(p) not in seen)
    return groups


def spread_lrs(low: float, high: float, n: int) -> list[float]:
    """n lrs spaced geometrically from low (first, input-side group) to high (last group)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if low <= 0 or high <= 0:
        raise ValueError(f"lrs must be positive, got ({low}, {high})")
    if n == 1:
        return [float(high)]
    ratio = math.log(high / low) / (n - 1)
    return [float(low * math.exp(ratio * i)) for i in range(n)]


def resolve_lrs(lr: float | Sequence[float], n_groups: int) -> list[float]:
    """One lr per group: a float is shared; a (low, high) tuple is spread; a list must match n_groups."""
    if isinstance(lr, int | float):
        return [float(lr)] * n_groups
    if isinstance(lr, tuple) and len(lr) == 2:
        return spread_lrs(float(lr[0]), float(lr[1]), n_groups)
    lrs = [float(v) for v in lr]
    if len(lrs) != n_groups:
        raise ValueError(f"got {len(lrs)} lrs for a model with {n_groups} param groups")
    return lrs


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Ids of bias and normalization-layer parameters (weight decay would only hurt them)."""
    ids: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_TYPES) or name == "bias":
                ids.add(id(p))
    return ids


def make_optimizer(
    model: nn.Module,
    lr: float | Sequence[float] = 1e-3,
    wd: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-5,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW (decoupled wd) with one lr per model param group.

    Bias / norm parameters get wd=0 but keep their group's lr. Optimizer groups are keyed by
    (lr, wd), so model groups sharing an lr share a group (fewer groups = less per-step
    overhead); each records one of its model groups in the extra key "model_group" (any of
    them: a schedule scales equal lrs equally). `fused=None` uses the fused AdamW kernel when
    every parameter is a float tensor on cpu/cuda (much less per-step overhead), else the default.
    """
    groups = model_groups(model)
    lrs = resolve_lrs(lr, len(groups))
    no_decay = _no_decay_ids(model)
    by_key: dict[tuple[float, float], dict] = {}
    for i, (params, group_lr) in enumerate(zip(groups, lrs, strict=True)):
        for p in params:
            key = (group_lr, 0.0 if id(p) in no_decay else wd)
            group = by_key.setdefault(
                key, {"params": [], "lr": key[0], "weight_decay": key[1], "model_group": i}
            )
            group["params"].append(p)
    if not by_key:
        raise ValueError(f"{type(model).__name__} has no parameters to optimize")
    opt_groups = list(by_key.values())
    params = [p for g in opt_groups for p in g["params"]]
    if fused is None:
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        opt_groups, lr=lrs[-1], betas=betas, eps=eps, weight_decay=wd, fused=fused or None
    )


def freeze(model: nn.Module, upto_group: int = -1) -> None:
    """Stop training groups[:upto_group] (default: all but the last), train the rest."""
    groups = model_groups(model)
    n_frozen = upto_group % len(groups) if upto_group < 0 else min(upto_group, len(groups))
    for i, params in enumerate(groups):
        for p in params:
            p.requires_grad_(i >= n_frozen)


def unfreeze(model: nn.Module) -> None:
    """Train every parameter again."""
    for p in model.parameters():
        p.requires_grad_(True)
