"""Predictors: a loaded bundle that turns raw records (not engineered features) into answers.

One object serves batch scoring, the HTTP service and the MLflow pyfunc wrapper, so the
feature pipeline that ran at training time is the one that runs at predict time. Everything
is read from the bundle's typed spec (`modeling.bundle`); callers never read bundle keys.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modeling.baselines import BiasBaseline, cold_start_fill
from modeling.bundle import (
    BASELINE_ITEM_BIAS,
    BASELINE_USER_BIAS,
    COLD_START_RANK,
    COLD_START_SCORES,
    DRIFT_X_CAT,
    DRIFT_X_CONT,
    FOREST_PREFIX,
    SEEN_INDICES,
    SEEN_INDPTR,
    Bundle,
    RatingsSpec,
    TabularSpec,
    load_bundle,
)
from modeling.drift import DriftSampler
from modeling.errors import DataError
from modeling.features.base import numbers
from modeling.forward import forward_chunks, forward_members, forward_small, prepared
from modeling.level import LEVEL_OFFSETS, RecentLevel
from modeling.schema import InputSchema, RecordsError, canonical_strings
from modeling.uri import ModelUri

FeaturesSink = Callable[[pd.DataFrame, np.ndarray], None]


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

    def __init__(self, bundle: Bundle, source: ModelSource | None = None) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.model = bundle.model
        self.source = source or ModelSource(uri=str(bundle.path))
        self.schema: InputSchema = self.spec.inputs

    @property
    def input_fields(self) -> list[dict[str, Any]]:
        return self.schema.to_dict()

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.spec.metrics)

    @property
    def version(self) -> str | None:
        """Registry version when known, else the training run id."""
        return self.source.version or self.source.run_id or self.spec.run_id

    def predict(self, df: pd.DataFrame, source: str = "request") -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def warm_up(self) -> None:
        """Build now what the first request would otherwise pay for (the service calls it after a
        load, before the model serves); nothing for predictors without such state."""


class TabularPredictor(Predictor):
    kind = "tabular"
    spec: TabularSpec

    def __init__(self, bundle: Bundle, source: ModelSource | None = None) -> None:
        super().__init__(bundle, source)
        from modeling.processor import TabularProcessor

        self.processor = TabularProcessor.from_dict(self.spec.processor)
        self.features = bundle.features
        self.networks = bundle.networks  # the model, then ensemble members: averaged
        self.target_name: str = self.spec.target.name
        self.target_transform: str = self.spec.target.transform
        self.zero_when = list(self.spec.zero_when)
        self.key_columns: list[str] = list(self.spec.key_columns)
        self.uncertainty: dict[str, Any] = dict(self.spec.uncertainty or {})
        self._forest: Any = None  # ForestArrays, built on the first predict_with_spread
        self._small: dict[str, Any] = {}  # the networks' forward (every path), prepared on first use
        self.level: RecentLevel | None = None  # the recent-level correction, added on the model scale
        if self.spec.level is not None:
            where = f"model {self.source.uri}"
            if LEVEL_OFFSETS not in bundle.extras:
                raise DataError(f"{where}: the bundle describes a level correction but carries no {LEVEL_OFFSETS}")
            self.level = RecentLevel.from_bundle(self.spec.level, bundle.extras[LEVEL_OFFSETS].numpy(), where)
            self._level_col = self.processor.cat_names_out.index(self.level.column)

    def _leveled(self, raw: np.ndarray, x_cat: np.ndarray) -> np.ndarray:
        """The networks' output (model scale, float64) plus the recent-level offsets of its rows."""
        if self.level is not None:
            raw += self.level(x_cat[:, self._level_col])
        return raw

    def engineer(self, df: pd.DataFrame, source: str = "request") -> pd.DataFrame:
        """Validate raw rows and compute the engineered features exactly as in training."""
        clean = self.schema.validate(df.reset_index(drop=True), source=source)
        return self.features.transform(clean) if self.features is not None else clean

    def fixed_rows(self, feats: pd.DataFrame) -> np.ndarray:
        """Rows a zero_when rule answers without the model (True = answered 0)."""
        fixed = np.zeros(len(feats), dtype=bool)
        for rule in self.zero_when:
            if rule.column in feats.columns:
                fixed |= pd.to_numeric(feats[rule.column], errors="coerce").to_numpy() == rule.equals
        return fixed

    def predict(self, df: pd.DataFrame, source: str = "request",
                on_features: FeaturesSink | None = None) -> np.ndarray:
        """Predictions for raw rows. `on_features(feats, fixed)` receives each call's engineered
        features and zero_when mask (the batch drift check samples them: no second pass)."""
        return self._predict(df, source, None, on_features)[0]

    def predict_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
        """`predict` for parsed JSON records (dicts), without a DataFrame: the small-request path.

        The bundle's schema reads the records into typed arrays (`InputSchema.validate_records`),
        the same feature steps and processor run over them (`transform_arrays`), then the
        networks, the target transform and the zero_when rules as in `predict`; the answers equal
        `predict` on the records' frame (tests/test_fastpath.py). None when a value needs the
        frame path's reading or error (numeric strings, NaN, bad values): call `predict` then."""
        n = len(records)
        cols = self.schema.validate_records(records)
        if cols is None:
            return None
        if n == 0:
            return np.empty(0, dtype=np.float64)
        feats = self.features.transform_arrays(cols, n) if self.features is not None else cols
        if feats is None:
            return None
        fixed = np.zeros(n, dtype=bool)
        for rule in self.zero_when:
            if rule.column in feats:
                fixed |= numbers(feats[rule.column]) == rule.equals
        x_cat, x_cont = self.processor.transform_arrays(feats, n)
        raw = self._leveled(forward_small(self.networks, (x_cat, x_cont), self._small), x_cat)
        pred = np.exp(raw) if self.target_transform == "log" else raw
        pred[fixed] = 0.0
        return pred

    def warm_up(self) -> None:
        """The networks' forward (projected tables) and its small-request padding for this thread
        count: tens of ms that the first small request would pay."""
        forward = prepared(self.networks, self._small)
        if forward is not None:
            forward.warm_up()

    @property
    def has_spread(self) -> bool:
        """Whether the bundle carries a forest for per-row spread (bundles before it do not)."""
        from modeling.forest_arrays import FIELDS

        return bool(self.uncertainty) and all(FOREST_PREFIX + k in self.bundle.extras for k in FIELDS)

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
            self._forest = ForestArrays.from_arrays(self.bundle.extras, n_features=len(columns),
                                                    prefix=FOREST_PREFIX)
        return self._forest

    def predict_with_spread(self, df: pd.DataFrame, source: str = "request",
                            on_features: FeaturesSink | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, spread): spread = std of the bundle forest's trees' predictions on the target's
        model scale (log(Sales) for a log target), 0 where a zero_when rule answers (closed stores).
        DataError when the bundle has no forest."""
        pred, spread = self._predict(df, source, self.forest(), on_features)
        assert spread is not None
        return pred, spread

    @property
    def n_members(self) -> int:
        """Networks averaged per prediction (1 for a single model, N for an ensemble bundle)."""
        return len(self.networks)

    def predict_with_member_spread(self, df: pd.DataFrame, source: str = "request",
                                   on_features: FeaturesSink | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, spread) for an ensemble bundle: the prediction is the same as `predict` (the
        members' mean on the model scale), the spread is the std of the members' outputs on that scale
        (log(Sales) for a log target), 0 where a zero_when rule answers. DataError for a single network."""
        if self.n_members < 2:
            raise DataError(f"model {self.source.uri}: a members' spread needs an ensemble bundle (this one has "
                            "one network); train with --ensemble N (N >= 2)")
        if len(df) == 0:
            return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64)
        feats = self.engineer(df, source)
        fixed = self.fixed_rows(feats)
        if on_features is not None:
            on_features(feats, fixed)
        x_cat, x_cont = self.processor.transform(feats)
        outs = forward_members(self.networks, (x_cat, x_cont), self._small).astype(np.float64)
        raw = self._leveled(outs.mean(axis=0), x_cat)
        pred = np.exp(raw) if self.target_transform == "log" else raw
        spread = outs.std(axis=0)
        pred[fixed] = 0.0
        spread[fixed] = 0.0
        return pred, spread

    def drift_reference(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The bundle's sample of processed training features (x_cat, x_cont), or None."""
        extras = self.bundle.extras
        if DRIFT_X_CAT not in extras or DRIFT_X_CONT not in extras:
            return None
        return extras[DRIFT_X_CAT].numpy(), extras[DRIFT_X_CONT].numpy()

    def drift_exclusions(self) -> dict[str, str]:
        """Model inputs that are a function of the row's date (declared by the feature pipeline),
        with the reason: left out of the drift check."""
        return self.features.time_relative_columns() if self.features is not None else {}

    def group_columns(self) -> list[str]:
        """Raw columns whose rows must be engineered together; [] for tabrec's feature steps (a
        record's features never depend on the other records of its batch)."""
        return self.features.group_columns() if self.features is not None else []

    def entity_columns(self) -> list[str]:
        """Raw columns naming what a row belongs to (e.g. Store): the drift check narrows its
        training sample to the ones a batch holds."""
        return self.features.entity_columns() if self.features is not None else []

    # ------------------------------------------------------------------ event calendars

    @property
    def calendar_columns(self) -> list[str]:
        """Raw columns of the event calendar the features read ([] when none)."""
        return self.features.calendar_columns() if self.features is not None else []

    def with_calendar(self, frame: pd.DataFrame, source: str = "calendar",
                      row_label: Callable[[int], str] | None = None) -> TabularPredictor:
        """A predictor whose features read known future events from `frame` (raw rows with the
        calendar columns, e.g. Kaggle's test.csv) laid over the bundle's calendar; this predictor
        is left untouched (the new one shares its networks, processor and tables), so a server
        can swap it in while requests run on the old one.

        `frame` is validated by the bundle's input schema (types, allowed codes), then checked
        against the calendar (duplicate rows, unknown groups, contradictions with the training
        rows): a DataError naming `source`, the column and the rows (`row_label(position)`,
        default "row N")."""
        columns = self.calendar_columns
        if not columns:
            raise DataError(f"{source}: model {self.source.uri} reads no event calendar")
        label = row_label or (lambda i: f"row {i + 1}")
        fields = [replace(f, required=True) for f in self.schema.fields if f.name in columns]
        frame = frame.reset_index(drop=True)
        try:
            clean = InputSchema(fields).validate(frame[[c for c in columns if c in frame.columns]],
                                                 source=source)
        except RecordsError as exc:
            where = "; ".join(f"{label(e.record) if e.record >= 0 else 'header'} column {e.field!r}: {e.msg}"
                              for e in exc.errors[:5])
            more = f" (+{len(exc.errors) - 5} more)" if len(exc.errors) > 5 else ""
            raise DataError(f"{source}: calendar rows rejected: {where}{more}") from None
        assert self.features is not None
        new = copy.copy(self)
        new.features = self.features.with_calendar(clean, source, label)
        new.source = replace(self.source, extra={**self.source.extra, "calendar": source})
        return new

    def with_calendar_file(self, path: str | Path) -> TabularPredictor:
        """`with_calendar` from a CSV or Parquet file in the test.csv layout (Store, Date, Promo,
        StateHoliday, SchoolHoliday; other columns ignored); errors name the file, the column and
        the CSV line or Parquet row."""
        from modeling.features.calendar import read_calendar_file

        frame, label = read_calendar_file(path, self.calendar_columns)
        return self.with_calendar(frame, source=str(path), row_label=label)

    def calendar_info(self) -> list[dict[str, Any]]:
        """Per calendar step: rows, future rows, groups, horizon range, event days."""
        return self.features.calendar_info() if self.features is not None else []

    def drift_sampler(self, total_rows: int, rows: int = 5000, seed: int = 0) -> DriftSampler:
        """A `modeling.drift.DriftSampler` against the bundle's training sample; feed it with
        `predict(..., on_features=sampler.add)`."""
        reference = self.drift_reference()
        note = None if reference is not None else \
            f"bundle has no training sample ({DRIFT_X_CAT}/{DRIFT_X_CONT}): drift check skipped"
        return DriftSampler(self.processor, reference, total_rows=total_rows, rows=rows, seed=seed,
                            exclusions=self.drift_exclusions(), groups=self.entity_columns(), note=note)

    def _predict(self, df: pd.DataFrame, source: str, forest: Any,
                 on_features: FeaturesSink | None) -> tuple[np.ndarray, np.ndarray | None]:
        if len(df) == 0:
            return np.empty(0, dtype=np.float64), (None if forest is None else np.empty(0, dtype=np.float64))
        feats = self.engineer(df, source)
        fixed = self.fixed_rows(feats)
        if on_features is not None:
            on_features(feats, fixed)
        x_cat, x_cont = self.processor.transform(feats)
        raw = self._leveled(forward_chunks(self.networks, (x_cat, x_cont), self._small).astype(np.float64), x_cat)
        pred = np.exp(raw) if self.target_transform == "log" else raw
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
    """Ratings from the rating model; top-k and similar items from the ranking network when the
    bundle has one (else from the rating model).

    A rating for an unknown user or item is the bias baseline's (global mean plus the known
    side's bias, `modeling.baselines.cold_start_fill`) when the bundle keeps one. A bundle
    trained on interactions without ratings has no rating model: `predict` is a DataError."""

    kind = "ratings"
    spec: RatingsSpec

    def __init__(self, bundle: Bundle, source: ModelSource | None = None) -> None:
        super().__init__(bundle, source)
        self.users = pd.Index(self.spec.users, dtype=object)
        self.items = pd.Index(self.spec.items, dtype=object)
        titles = self.spec.item_titles
        self.titles: list[str | None] | None = [None, *titles] if titles else None
        self.ranker = bundle.network(self.spec.ranking) if self.spec.ranking is not None else self.model
        extras = bundle.extras
        self.seen_indptr = extras[SEEN_INDPTR].numpy().astype(np.int64)
        self.seen_indices = extras[SEEN_INDICES].numpy().astype(np.int64)
        self.cold_start_rank = extras[COLD_START_RANK].numpy().astype(np.int64)
        self.cold_start_scores = extras[COLD_START_SCORES].numpy().astype(np.float32)
        self.rating_scale = tuple(self.spec.rating_scale or (None, None))
        self.baseline: BiasBaseline | None = None
        if self.spec.global_mean is not None and BASELINE_USER_BIAS in extras and BASELINE_ITEM_BIAS in extras:
            self.baseline = BiasBaseline(float(self.spec.global_mean),
                                         extras[BASELINE_USER_BIAS].numpy().astype(np.float64),
                                         extras[BASELINE_ITEM_BIAS].numpy().astype(np.float64))
        self._small: dict[str, Any] = {}  # the small-request forward, prepared on first use

    @property
    def predicts_ratings(self) -> bool:
        """False for a bundle trained on interactions without ratings (ranking only)."""
        return not self.spec.interactions_only

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
        if not self.predicts_ratings:
            raise DataError(f"model {self.source.uri}: trained on interactions without ratings, it has no "
                            "rating model and answers recommendations and similar items only; train on "
                            "data with a rating column to predict ratings")
        if len(df) == 0:
            return np.empty(0, dtype=np.float64)
        clean = self.schema.validate(df.reset_index(drop=True), source=source)
        u = self.user_index(clean["user"]).astype(np.int64)
        i = self.item_index(clean["item"]).astype(np.int64)
        return self._served(forward_chunks([self.model], (u, i)).astype(np.float64), u, i)

    def _served(self, pred: np.ndarray, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """The network's ratings with the cold-start rule applied (unknown user or item: the bias
        baseline's answer)."""
        if self.baseline is None:  # a bundle from before the cold-start rule
            return pred
        scale = self.spec.rating_scale
        return cold_start_fill(pred, u, i, self.baseline, None if scale is None else (scale[0], scale[1]))

    def predict_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
        """`predict` for parsed JSON records (dicts) without a DataFrame (the small-request path):
        ids read and canonicalised by the schema (`validate_records`), looked up in the prepared
        user and item indexes; None when a value needs `predict`'s reading or error."""
        if not self.predicts_ratings:
            return None  # `predict` gives the error
        cols = self.schema.validate_records(records)
        if cols is None:
            return None
        if len(records) == 0:
            return np.empty(0, dtype=np.float64)
        u = (self.users.get_indexer(cols["user"]) + 1).astype(np.int64)
        i = (self.items.get_indexer(cols["item"]) + 1).astype(np.int64)
        return self._served(forward_small([self.model], (u, i), self._small), u, i)

    def top_k(self, users: Sequence[Any], k: int = 10,
              exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorized top-k: (item indices [m, k] padded with -1, scores [m, k] NaN-padded,
        cold-start flags [m]); unknown users get the cold-start ranking."""
        from modeling.collab import top_k_for_users

        if k < 1:
            raise DataError("k must be >= 1")
        uidx = self.user_index(users)
        known = uidx > 0
        idx = np.full((len(uidx), k), -1, dtype=np.int64)
        sc = np.full((len(uidx), k), np.nan, dtype=np.float32)
        if known.any():
            seen = (self.seen_indptr, self.seen_indices) if exclude_seen else None
            idx[known], sc[known] = top_k_for_users(self.ranker, uidx[known].astype(np.int64), k, seen)
        if (~known).any():
            c_idx, c_sc = self.cold_start(k)
            idx[~known, : len(c_idx)] = c_idx
            sc[~known, : len(c_sc)] = c_sc
        return idx, sc, ~known

    def recommend(self, users: Sequence[Any], k: int = 10, exclude_seen: bool = True) -> list[dict[str, Any]]:
        """Top-k items per user as answers {"user", "cold_start", "items": [{"item", "score", "title"?}]}."""
        idx, sc, cold = self.top_k(users, k, exclude_seen)
        return [self._answer(u, idx[r], sc[r], bool(cold[r])) for r, u in enumerate(users)]

    def cold_start(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Items ranked for an unknown user (computed at training time, kept in the bundle)."""
        return self.cold_start_rank[:k], self.cold_start_scores[:k]

    def similar(self, item: Any, k: int = 10) -> list[dict[str, Any]]:
        from modeling.collab import item_factors, similar_items

        iidx = self.item_index([item])
        if iidx[0] <= 0:
            raise KeyError(item)
        idx, sims = similar_items(item_factors(self.ranker), torch.tensor(iidx), k)
        return [self._item(int(j), "similarity", float(s)) for j, s in zip(idx[0], sims[0], strict=True) if j > 0]

    def _item(self, j: int, score_name: str, score: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"item": str(self.items[j - 1]), score_name: score}
        if self.titles:
            entry["title"] = self.titles[j]
        return entry

    def _answer(self, user: Any, idx: np.ndarray, sc: np.ndarray, cold: bool) -> dict[str, Any]:
        items = [self._item(int(j), "score", float(s)) for j, s in zip(idx, sc, strict=True) if j > 0]
        return {"user": str(user), "cold_start": cold, "items": items}


PREDICTORS: dict[str, type[Predictor]] = {"tabular": TabularPredictor, "ratings": RatingsPredictor}


def load_predictor(uri: str | ModelUri) -> Predictor:
    """Load any accepted model URI (local bundle, runs:/, models:/name/version, models:/name@alias)."""
    parsed = uri if isinstance(uri, ModelUri) else ModelUri.parse(uri)
    bundle = load_bundle(parsed)
    source = ModelSource(uri=parsed.text, **parsed.describe())
    return PREDICTORS[bundle.kind](bundle, source)
