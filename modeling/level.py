"""A per-entity recent-level correction on the model's scale (log Sales for Rossmann).

A network with one embedding per store learns each store's level over the whole training period.
A store whose sales moved lately (a refurbishment, a competitor opening next door) is then forecast
at its long-run level. `RecentLevel.fit` reads the networks' residuals (target minus prediction,
on the model scale) over the last `days` days of the rows they were trained on and keeps each
entity's mean residual, shrunk by empirical Bayes:

    offset_e = mean_e * n_e tau^2 / (n_e tau^2 + sigma^2)

sigma^2 is the residuals' variance within an entity, tau^2 the variance of the entities' true
recent levels: the spread of their means beyond what sigma^2 / n_e explains. Where levels did not
move (tau^2 ~ 0) every offset is ~0; an entity with few recent rows gets a small one; an entity
without recent rows, and the processor's unknown code 0, get none.

Offsets are kept only where levels are shown to carry over in time: the entities' mean residuals
in the window before the last one must predict those of the last window (the regression slope
through 0 at least two standard errors above 0); otherwise every offset is 0. On the real
Rossmann data the t statistic is 13-15. It is an in-sample check (both windows are training rows):
it guards against offsets that are pure noise, not against every offset that will not help; on
small synthetic sets (t 3-16) the correction helped 6 of 8 splits and hurt 2 by up to 2%
(docs/benchmarks.md). Nothing here is tuned: tau^2, sigma^2 and the persistence come from the
residuals themselves.

State is plain data: the offsets by the processor's code of `column` (a float64 array, kept in the
bundle's extras) and a JSON description (the bundle spec's `level`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modeling.errors import DataError

LEVEL_OFFSETS = "level/offsets"  # the bundle extra holding the offsets by code
MIN_PERSISTENCE_T = 2.0  # levels must persist between windows by two standard errors (as the ranking head's rule)


def _known(codes: np.ndarray, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = np.asarray(codes, dtype=np.int64)
    res = np.asarray(residuals, dtype=np.float64)
    if codes.shape != res.shape or codes.ndim != 1:
        raise ValueError(f"codes {codes.shape} and residuals {res.shape} must be 1-d and match")
    known = codes > 0  # the unknown token's rows say nothing about any one entity
    return codes[known], res[known]


def _means(codes: np.ndarray, residuals: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean residual, rows) per code; codes outside [0, n_codes) are a ValueError."""
    raw = np.asarray(codes, dtype=np.int64)
    if len(raw) and (raw.min() < 0 or raw.max() >= n_codes):
        raise ValueError(f"codes must lie in [0, {n_codes})")
    codes, res = _known(codes, residuals)
    n = np.bincount(codes, minlength=n_codes).astype(np.float64)
    total = np.bincount(codes, weights=res, minlength=n_codes)
    return np.divide(total, n, out=np.zeros(n_codes), where=n > 0), n


def _persistence(mean: np.ndarray, seen: np.ndarray, earlier: tuple[np.ndarray, np.ndarray] | None,
                 n_codes: int) -> tuple[float, float]:
    """(slope, t) of the last window's entity means regressed through 0 on the earlier window's,
    over the entities seen in both; (nan, nan) with fewer than 3 such entities."""
    if earlier is None:
        return float("nan"), float("nan")
    before, n0 = _means(*earlier, n_codes)
    both = seen & (n0 > 0)
    x, y = before[both], mean[both]
    sxx = float((x * x).sum())
    if both.sum() < 3 or sxx == 0:
        return float("nan"), float("nan")
    beta = float((x * y).sum() / sxx)
    resid = y - beta * x
    se = float(np.sqrt((resid * resid).sum() / (len(x) - 1) / sxx))
    return beta, (beta / se if se > 0 else float("inf"))


@dataclass
class RecentLevel:
    column: str  # the categorical input naming the entity (e.g. "Store")
    days: int  # the window the residuals came from (last N days of the training rows)
    offsets: np.ndarray  # float64 [n_codes]: by the processor's code of `column` (0: unknown, always 0)
    tau: float  # std of the entities' recent levels (beyond noise), model scale
    sigma: float  # residual std within an entity, model scale
    rows: int  # residuals the offsets came from
    entities: int  # entities with at least one of those rows
    persistence: float = float("nan")  # regression of the last window's means on the earlier window's
    persistence_t: float = float("nan")  # its t statistic; offsets are kept when >= MIN_PERSISTENCE_T

    @property
    def applied(self) -> bool:
        """Whether any offset is non-zero (levels persisted and moved)."""
        return bool(np.any(self.offsets))

    @classmethod
    def fit(cls, column: str, days: int, codes: np.ndarray, residuals: np.ndarray, n_codes: int,
            earlier: tuple[np.ndarray, np.ndarray] | None = None) -> RecentLevel:
        """Offsets from the residuals of the last window's rows (codes, residuals), vectorized.

        `earlier`: (codes, residuals) of the window before it (None: no check). The offsets are kept only when the
        entities' levels are shown to persist from that window to the last one: the regression
        (through 0) of the last window's means on the earlier window's is two standard errors above
        0 (`persistence`, `persistence_t`); otherwise every offset is 0 (levels that are pure noise
        do not carry over from one window to the next)."""
        mean, n = _means(codes, residuals, n_codes)
        seen = n > 0
        res_codes, res = _known(codes, residuals)
        offsets = np.zeros(n_codes, dtype=np.float64)
        dof = len(res) - int(seen.sum())
        if dof < 1:  # at most one row per entity: no within-entity variance to shrink against
            return cls(column, days, offsets, 0.0, 0.0, len(res), int(seen.sum()))
        sigma2 = float(((res - mean[res_codes]) ** 2).sum() / dof)
        tau2 = max(0.0, float((mean[seen] ** 2).mean() - (sigma2 / n[seen]).mean()))
        beta, t = _persistence(mean, seen, earlier, n_codes)
        if tau2 > 0 and (earlier is None or t >= MIN_PERSISTENCE_T):
            offsets[seen] = mean[seen] * n[seen] * tau2 / (n[seen] * tau2 + sigma2)
        return cls(column, days, offsets, float(np.sqrt(tau2)), float(np.sqrt(sigma2)), len(res), int(seen.sum()),
                   beta, t)

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        """Offsets for rows with these codes (float64)."""
        return self.offsets[np.asarray(codes, dtype=np.int64)]

    def describe(self) -> dict[str, Any]:
        """The JSON half of the state (the bundle spec's `level`)."""
        return {"column": self.column, "days": self.days, "tau": self.tau, "sigma": self.sigma, "rows": self.rows,
                "entities": self.entities, "n_codes": len(self.offsets), "persistence": self.persistence,
                "persistence_t": self.persistence_t, "applied": self.applied,
                "method": "mean residual per entity over the last `days` days of the training rows, "
                          "shrunk by empirical Bayes (n tau^2 / (n tau^2 + sigma^2))"}

    @classmethod
    def from_bundle(cls, doc: dict[str, Any], offsets: np.ndarray, where: str) -> RecentLevel:
        offsets = np.asarray(offsets, dtype=np.float64).reshape(-1)
        if len(offsets) != int(doc.get("n_codes", len(offsets))) or (len(offsets) and offsets[0] != 0):
            raise DataError(f"{where}: the level offsets ({len(offsets)}) do not match the spec's n_codes "
                            f"({doc.get('n_codes')}) or give the unknown code an offset")
        return cls(str(doc["column"]), int(doc["days"]), offsets, float(doc["tau"]), float(doc["sigma"]),
                   int(doc.get("rows", 0)), int(doc.get("entities", 0)),
                   float(doc.get("persistence", "nan")), float(doc.get("persistence_t", "nan")))


def level_of(networks: Any, parts: Sequence[tuple[Any, Any, np.ndarray]], days: int, column: str, col_index: int,
             n_codes: int) -> RecentLevel:
    """`RecentLevel.fit` on the residuals of `networks` (their mean, as the bundle averages them) over
    the rows dated in the last `days` days, with the `days` days before them as the earlier window.
    `parts`: (xs, y, dates) row sets taken together (e.g. train and valid; one datetime64 per row);
    only their rows in the two windows are gathered, never the whole sets. xs[0] holds the
    categorical codes, `column` at `col_index`."""
    import torch

    from modeling.training.ensemble import predict_mean

    dates = [np.asarray(d, dtype="datetime64[D]") for _, _, d in parts]
    start = max(d.max() for d in dates) - np.timedelta64(days, "D")
    picks = [torch.from_numpy(np.flatnonzero(d > start - np.timedelta64(days, "D"))) for d in dates]
    xs = tuple(torch.cat([p[0][j][k] for p, k in zip(parts, picks, strict=True)]) for j in range(len(parts[0][0])))
    y = torch.cat([p[1][k] for p, k in zip(parts, picks, strict=True)])
    last = np.concatenate([d[k.numpy()] for d, k in zip(dates, picks, strict=True)]) > start
    residuals = y.numpy().astype(np.float64) - predict_mean(networks, xs).numpy().astype(np.float64)
    codes = xs[0][:, col_index].numpy()
    return RecentLevel.fit(column, days, codes[last], residuals[last], n_codes,
                           earlier=(codes[~last], residuals[~last]))
