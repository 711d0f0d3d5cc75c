"""Predictors: a loaded bundle that turns raw records (not engineered features) into answers.

One object serves batch scoring, the HTTP service and the MLflow pyfunc wrapper, so the
feature pipeline that ran at training time is the one that runs at predict time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from modeling.bundle import RawBundle, read_bundle
from modeling.errors import DataError
from modeling.schema import InputSchema, canonical_strings

PREDICT_CHUNK = 65_536


@dataclass
class ModelSource:
    """Where a predictor came from (for /v1/models and batch-run logging)."""

    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Predictor:
    kind: str = ""

    def __init__(self, raw: RawBundle, source: ModelSource | None = None) -> None:
        self.raw = raw
        self.doc = raw.doc
        self.model = raw.model
        self.source = source or ModelSource(uri=str(raw.path))
        self.schema = InputSchema.from_dict(self.doc.get("inputs", []))

    @property
    def input_fields(self) -> list[dict[str, Any]]:
        return self.schema.to_dict()

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.doc.get("metrics", {}))

    def predict(self, df: pd.DataFrame) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def _forward_chunks(model: torch.nn.Module, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Run the model over pre-built arrays in large slices (no per-row Python)."""
    n = len(inputs[0])
    out = np.empty(n, dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, PREDICT_CHUNK):
            parts = [torch.from_numpy(np.ascontiguousarray(a[start : start + PREDICT_CHUNK])) for a in inputs]
            out[start : start + PREDICT_CHUNK] = model(*parts).float().numpy().reshape(-1)
    return out


class TabularPredictor(Predictor):
    kind = "tabular"

    def __init__(self, raw: RawBundle, source: ModelSource | None = None) -> None:
        super().__init__(raw, source)
        from modeling.processor import TabularProcessor

        self.processor = TabularProcessor.from_dict(self.doc["processor"])
        self.features = raw.features
        target = self.doc.get("target", {})
        self.target_name: str = target.get("name", "prediction")
        self.target_transform: str = target.get("transform", "identity")
        self.zero_when: list[dict[str, Any]] = self.doc.get("zero_when", [])
        self.key_columns: list[str] = self.doc.get("key_columns", [])
        self.uncertainty: dict[str, Any] = dict(self.doc.get("uncertainty") or {})
        self._forest: Any = None  # ForestArrays, built on the first predict_with_spread

    def engineer(self, df: pd.DataFrame, source: str = "request") -> pd.DataFrame:
        """Validate raw rows and compute the engineered features exactly as in training."""
        clean = self.schema.validate(df.reset_index(drop=True), source=source)
        return self.features.transform(clean) if self.features is not None else clean

    def predict(self, df: pd.DataFrame, source: str = "request") -> np.ndarray:
        return self._predict(df, source, None)[0]

    @property
    def has_spread(self) -> bool:
        """Whether the bundle carries a forest for per-row spread (bundles before it do not)."""
        from modeling.forest_arrays import FIELDS

        return bool(self.uncertainty) and all(f"forest_{k}" in self.raw.extra for k in FIELDS)

    def forest(self) -> Any:
        """The bundle's spread forest (`modeling.forest_arrays.ForestArrays`), loaded once."""
        if self._forest is None:
            if not self.has_spread:
                raise DataError(f"model {self.source.uri}: the bundle carries no forest for a per-row spread "
                                "(trained before uncertainty support, or with spread_trees=0); retrain it")
            from modeling.forest_arrays import ForestArrays

            columns = [*self.processor.cat_names_out, *self.processor.cont_names]
            if self.uncertainty.get("features", columns) != columns:
                raise DataError(f"model {self.source.uri}: the bundle's forest was fitted on columns "
                                f"{self.uncertainty.get('features')}, the processor gives {columns}")
            self._forest = ForestArrays.from_arrays(self.raw.extra, n_features=len(columns))
        return self._forest

    def predict_with_spread(self, df: pd.DataFrame, source: str = "request") -> tuple[np.ndarray, np.ndarray]:
        """(prediction, spread): spread = std of the bundle forest's trees' predictions on the target's
        model scale (log(Sales) for a log target), 0 where a zero_when rule answers (closed stores).
        DataError when the bundle has no forest."""
        pred, spread = self._predict(df, source, self.forest())
        assert spread is not None
        return pred, spread

    def _predict(self, df: pd.DataFrame, source: str, forest: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if len(df) == 0:
            return np.empty(0, dtype=np.float64), (None if forest is None else np.empty(0, dtype=np.float64))
        feats = self.engineer(df, source)
        x_cat, x_cont = self.processor.transform(feats)
        raw = _forward_chunks(self.model, (x_cat, x_cont)).astype(np.float64)
        pred = np.exp(raw) if self.target_transform == "log" else raw
        fixed = np.zeros(len(pred), dtype=bool)
        for rule in self.zero_when:
            col = rule["column"]
            if col in feats.columns:
                values = pd.to_numeric(feats[col], errors="coerce").to_numpy()
                fixed |= values == rule["equals"]
        pred[fixed] = 0.0
        if forest is None:
            return pred, None
        spread = np.zeros(len(pred), dtype=np.float64)
        scored = np.flatnonzero(~fixed)
        if len(scored):
            x = np.concatenate([x_cat[scored].astype(np.float32), x_cont[scored].astype(np.float32)], axis=1)
            spread[scored] = forest.predict_trees(x).std(axis=0)
        return pred, spread


class RatingsPredictor(Predictor):
    kind = "ratings"

    def __init__(self, raw: RawBundle, source: ModelSource | None = None) -> None:
        super().__init__(raw, source)
        self.users = pd.Index(self.doc["users"], dtype=object)
        self.items = pd.Index(self.doc["items"], dtype=object)
        titles = self.doc.get("item_titles")
        self.titles: list[str | None] | None = [None, *titles] if titles else None
        extra = raw.extra
        self.seen_indptr = extra["seen_indptr"].numpy().astype(np.int64)
        self.seen_indices = extra["seen_indices"].numpy().astype(np.int64)
        self.cold_start_rank = extra["cold_start_rank"].numpy().astype(np.int64)
        self.cold_start_scores = extra["cold_start_scores"].numpy().astype(np.float32)
        self.rating_scale = tuple(self.doc.get("rating_scale", (None, None)))

    @property
    def n_items(self) -> int:
        return len(self.items) + 1

    def user_index(self, users: Sequence[Any] | pd.Series) -> np.ndarray:
        """Map external user ids to model indices; unknown ids map to 0."""
        return self.users.get_indexer(canonical_strings(pd.Series(list(users), dtype=object))) + 1

    def item_index(self, items: Sequence[Any] | pd.Series) -> np.ndarray:
        return self.items.get_indexer(canonical_strings(pd.Series(list(items), dtype=object))) + 1

    def item_ids(self, idx: np.ndarray) -> np.ndarray:
        """Model item indices (>= 1) back to external ids."""
        return self.items.to_numpy()[idx - 1]

    def title(self, idx: int) -> str | None:
        return self.titles[idx] if self.titles else None

    def predict(self, df: pd.DataFrame, source: str = "request") -> np.ndarray:
        if len(df) == 0:
            return np.empty(0, dtype=np.float64)
        clean = self.schema.validate(df.reset_index(drop=True), source=source)
        u = self.user_index(clean["user"])
        i = self.item_index(clean["item"])
        return _forward_chunks(self.model, (u.astype(np.int64), i.astype(np.int64))).astype(np.float64)

    def recommend(
        self, users: Sequence[Any], k: int = 10, exclude_seen: bool = True
    ) -> list[dict[str, Any]]:
        """Top-k items per user (vectorized over users); unknown users get the cold-start list."""
        from modeling.collab import score_all_items, top_k

        if k < 1:
            raise DataError("k must be >= 1")
        uidx = self.user_index(users)
        known = uidx > 0
        results: list[dict[str, Any]] = [{} for _ in users]
        if known.any():
            ku = uidx[known]
            scores = score_all_items(self.model, torch.from_numpy(ku.astype(np.int64)))
            if exclude_seen:
                starts, ends = self.seen_indptr[ku], self.seen_indptr[ku + 1]
                lengths = ends - starts
                indptr = np.concatenate([[0], np.cumsum(lengths)])
                gather = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
                indices = self.seen_indices[gather]
                idx, sc = top_k(scores, k, indptr, indices)
            else:
                idx, sc = top_k(scores, k)
            for row, pos in enumerate(np.flatnonzero(known)):
                results[pos] = self._answer(users[pos], idx[row], sc[row], cold=False)
        if (~known).any():
            cold_idx, cold_sc = self.cold_start(k)
            for pos in np.flatnonzero(~known):
                results[pos] = self._answer(users[pos], cold_idx, cold_sc, cold=True)
        return results

    def cold_start(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Items ranked for an unknown user: mean predicted rating over known users, popular items only."""
        return self.cold_start_rank[:k], self.cold_start_scores[:k]

    def similar(self, item: Any, k: int = 10) -> list[dict[str, Any]]:
        from modeling.collab import item_factors, similar_items

        iidx = self.item_index([item])
        if iidx[0] <= 0:
            raise KeyError(item)
        idx, sims = similar_items(item_factors(self.model), torch.tensor(iidx), k)
        return [
            self._item(int(j), "similarity", float(s))
            for j, s in zip(idx[0], sims[0], strict=True)
            if j > 0
        ]

    def _item(self, j: int, score_name: str, score: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"item": str(self.items[j - 1]), score_name: score}
        if self.titles:
            entry["title"] = self.titles[j]
        return entry

    def _answer(self, user: Any, idx: np.ndarray, sc: np.ndarray, cold: bool) -> dict[str, Any]:
        items = [self._item(int(j), "score", float(s)) for j, s in zip(idx, sc, strict=True) if j > 0]
        return {"user": str(user), "cold_start": cold, "items": items}


PREDICTORS: dict[str, type[Predictor]] = {"tabular": TabularPredictor, "ratings": RatingsPredictor}


def load_predictor(uri: str) -> Predictor:
    """Load any accepted model URI (local bundle, runs:/, models:/name/version, models:/name@alias)."""
    raw = read_bundle(uri)
    source = _describe_source(uri)
    return PREDICTORS[raw.kind](raw, source)


def _describe_source(uri: str) -> ModelSource:
    source = ModelSource(uri=uri)
    if uri.startswith("models:/"):
        from mlflow import MlflowClient

        ref = uri[len("models:/") :]
        client = MlflowClient()
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.split("/", 1)
            mv = client.get_model_version(name, version)
        source.name, source.version, source.run_id = name, str(mv.version), mv.run_id
    elif uri.startswith("runs:/"):
        source.run_id = uri[len("runs:/") :].split("/", 1)[0]
    return source
