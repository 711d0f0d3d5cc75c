"""Adversarial drift check on processed features, generic over tabular models.

A batch job samples the processed features of what it scores (in proportion from every chunk,
seeded) and a random forest tries to tell that sample from the training sample kept in the
bundle: an AUC near 0.5 means the batch looks like training, near 1.0 that it does not.

Columns that are a function of the row's date (the feature pipeline declares them) differ in a
batch from another period by construction, not by drift, so they are left out of the comparison;
with a group column (a store), the training sample is narrowed to the groups in the batch.
Nothing here logs or raises on drift: the caller decides (warn, or fail before writing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

MIN_DRIFT_ROWS = 30


class DriftSampler:
    """Sample processed features of a batch and compare them with a training sample.

    `processor`: the fitted `TabularProcessor` (turns engineered features into model inputs).
    `reference`: (x_cat, x_cont) of the training sample, or None (then `note` says why).
    `exclusions`: model input -> why it is left out (time-relative columns).
    `groups`: candidate group columns (the first one among the processor's categorical outputs
    narrows the reference)."""

    def __init__(self, processor: Any, reference: tuple[np.ndarray, np.ndarray] | None, *, total_rows: int,
                 rows: int = 5000, seed: int = 0, exclusions: Mapping[str, str] | None = None,
                 groups: Sequence[str] = (), note: str | None = None) -> None:
        self.processor = processor
        self.columns = [*processor.cat_names_out, *processor.cont_names]
        self.total, self.target, self.seed = max(total_rows, 1), rows, seed
        self.rng = np.random.default_rng(seed)
        self.exclusions = {c: r for c, r in (exclusions or {}).items() if c in self.columns}
        self.groups = [g for g in groups if g in processor.cat_names_out]
        self.parts: list[pd.DataFrame] = []
        self.note = note
        self.train: pd.DataFrame | None = None
        if reference is not None:
            x_cat, x_cont = reference
            if x_cat.shape[1] != len(processor.cat_names_out) or x_cont.shape[1] != len(processor.cont_names):
                self.note = "bundle training sample does not match the processor's columns: drift check skipped"
            else:
                self.train = self._frame(x_cat, x_cont)

    def _frame(self, x_cat: np.ndarray, x_cont: np.ndarray) -> pd.DataFrame:
        data = np.concatenate([x_cat.astype(np.float64), x_cont.astype(np.float64)], axis=1)
        return pd.DataFrame(data, columns=self.columns)

    @property
    def active(self) -> bool:
        return self.train is not None

    def add(self, feats: pd.DataFrame, fixed: np.ndarray) -> None:
        """Take this chunk's share of the sample from its engineered features; rows a rule answers
        without the model (`fixed`, e.g. closed stores) are left out, as they were from training."""
        if not self.active or len(feats) == 0:
            return
        pos = np.flatnonzero(~fixed)
        n = min(len(pos), math.ceil(self.target * len(feats) / self.total))
        if n == 0:
            return
        take = np.sort(self.rng.choice(pos, size=n, replace=False))
        x_cat, x_cont = self.processor.transform(feats.iloc[take].reset_index(drop=True))
        self.parts.append(self._frame(x_cat, x_cont))

    def result(self) -> dict[str, Any]:
        """{"checked": False, "note"} or {"checked": True, "auc", "rows", "top_features",
        "compared_columns", "excluded_columns", "excluded_reasons", "reference"}."""
        if self.train is None:
            return {"checked": False, "note": self.note}
        batch = pd.concat(self.parts, ignore_index=True) if self.parts else pd.DataFrame()
        if len(batch) < MIN_DRIFT_ROWS:
            return {"checked": False, "note": f"only {len(batch)} model-scored rows in the batch sample "
                                              f"(need {MIN_DRIFT_ROWS}): drift check skipped"}
        from modeling.forest import ForestConfig, adversarial_validation

        cols = [c for c in self.columns if c not in self.exclusions]
        if not cols:
            return {"checked": False, "note": "every model input is time-relative: drift check skipped"}
        reference, scope = self._reference(batch)
        cfg = ForestConfig(n_estimators=25, max_rows=2 * self.target, seed=self.seed)
        res = adversarial_validation(reference[cols], batch[cols], cfg)
        reasons: dict[str, list[str]] = {}
        for c, r in self.exclusions.items():
            reasons.setdefault(r, []).append(c)
        return {"checked": True, "auc": float(res.auc), "rows": int(res.n_rows),
                "top_features": [[n, float(v)] for n, v in res.top_features[:5]],
                "compared_columns": cols, "excluded_columns": sorted(self.exclusions),
                "excluded_reasons": reasons, "reference": scope}

    def _reference(self, batch: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The training sample, narrowed to the groups (stores) the batch holds: a batch of some known
        stores is not drift, so the group mix is taken as given and the rest is compared within it.
        Rows of groups the model never saw (code 0) stay in the batch and stand out."""
        assert self.train is not None
        if len(self.groups) != 1:
            return self.train, {"rows": len(self.train), "narrowed_to": None}
        g = self.groups[0]
        present = self.train[g].isin(batch[g].unique()).to_numpy()
        narrow = not present.all() and int(present.sum()) >= MIN_DRIFT_ROWS
        ref = self.train[present] if narrow else self.train
        return ref, {"rows": len(ref), "narrowed_to": g if narrow else None,
                     "groups": int(ref[g].nunique()), "groups_in_training_sample": int(self.train[g].nunique())}
