"""The analyst's view of each domain's run: which datasets it logs, which features get partial
dependence panels, which segments the error is broken down by.

The training jobs call these from their `datasets()` and `analysis()` hooks; the computation is
`modeling.inspection` (vectorized through the model), the drawing `pipelines.reports`, and the
logging the skeleton's (`pipelines.jobs.base.run_job`). What is domain knowledge lives here:
Rossmann's segments (StoreType, Assortment, State, DayOfWeek, Promo; the worst stores) and
ratings' (user and item activity, known vs new users, the rating value; ranking by activity).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from modeling import inspection
from pipelines import reports
from pipelines.datasets import DataInput, frame_columns
from pipelines.jobs.base import Analysis, Checks, Fitted

if TYPE_CHECKING:
    from pipelines.jobs.config import RatingsConfig, RossmannConfig
    from pipelines.jobs.ratings import RatingsData
    from pipelines.jobs.rossmann import PreparedData

DAY_NAMES = np.array(["1 Mon", "2 Tue", "3 Wed", "4 Thu", "5 Fri", "6 Sat", "7 Sun"], dtype=object)
# shown when the forest's importance is missing (the course's usual suspects)
ROSSMANN_PDP_DEFAULT = ["Promo", "CompetitionDistance", "Dayofweek", "BeforeStateHoliday", "AfterStateHoliday",
                        "StoreType"]
PDP_ROWS, PDP_FEATURES, WORST_N, RANKING_USERS = 400, 6, 20, 5000


def _dates(frame: pd.DataFrame, column: str = "Date") -> dict[str, Any]:
    if column not in frame.columns or frame.empty:
        return {}
    d = pd.to_datetime(frame[column])
    return {"date_min": d.min().strftime("%Y-%m-%d"), "date_max": d.max().strftime("%Y-%m-%d")}


# ---------------------------------------------------------------- Rossmann


def rossmann_datasets(cfg: RossmannConfig, data: PreparedData) -> list[DataInput]:
    sources = [cfg.train, cfg.store, *([cfg.external_dir] if cfg.external_dir else []),
               *([cfg.calendar] if cfg.calendar else [])]
    cols = [c for c in dict.fromkeys([*data.cats, *data.conts, "Sales"]) if c in data.train_rows.columns]
    out = []
    for name, context, rows, selection in (
            ("rossmann-train", "training", data.train_rows, f"open days with Sales > 0 before the last "
                                                              f"{cfg.valid_days} days"),
            ("rossmann-valid", "validation", data.valid_rows, f"open days with Sales > 0 in the last "
                                                               f"{cfg.valid_days} days")):
        profile = {**_dates(rows), "n_stores": int(rows["Store"].nunique())}
        out.append(DataInput(name, context, [str(s) for s in sources], len(rows), frame_columns(rows[cols]),
                             selection, profile, target="Sales"))
    return out


def rossmann_segments(rows: pd.DataFrame) -> pd.DataFrame:
    """The validation rows' segment columns, labelled for reading (DayOfWeek '1 Mon'...)."""
    seg = pd.DataFrame(index=pd.RangeIndex(len(rows)))
    for col in ("Store", "StoreType", "Assortment", "State"):
        if col in rows.columns:
            seg[col] = rows[col].to_numpy()
    if "Dayofweek" in rows.columns:  # the pipeline's day of week, Monday = 0
        seg["DayOfWeek"] = DAY_NAMES[rows["Dayofweek"].to_numpy(dtype=np.int64) % 7]
    elif "DayOfWeek" in rows.columns:  # Kaggle's, Monday = 1
        seg["DayOfWeek"] = DAY_NAMES[(rows["DayOfWeek"].to_numpy(dtype=np.int64) - 1) % 7]
    if "Promo" in rows.columns:
        seg["Promo"] = np.where(rows["Promo"].to_numpy() == 1, "1 promo", "0 no promo")
    return seg


def rossmann_analysis(data: PreparedData, fit: Fitted, checks: Checks, seed: int) -> Analysis:
    """Partial dependence + ICE of predicted Sales for the forest's most important inputs, RMSPE by
    segment and the worst stores, on the validation rows."""
    tmp = fit.tmp
    y_true, y_pred = np.exp(data.valid.y.numpy().astype(np.float64)), np.exp(fit.valid_pred.astype(np.float64))
    overall = float(np.sqrt(inspection.squared_errors(y_true, y_pred, "rmspe")[0].mean()))
    seg = rossmann_segments(data.valid_rows)
    by = [c for c in ("StoreType", "Assortment", "State", "DayOfWeek", "Promo") if c in seg.columns]
    table = inspection.error_breakdown(seg, y_true, y_pred, by, "rmspe")
    describe = [c for c in ("StoreType", "Assortment", "State") if c in seg.columns]
    worst = inspection.worst_groups(seg, y_true, y_pred, "Store", WORST_N, "rmspe", describe)

    x_cat, x_cont = (t.numpy() for t in data.valid.xs)
    importance = [(str(c), float(v)) for c, v in checks.report.get("importance", [])]
    features = inspection.pick_features(importance, data.processor, PDP_FEATURES,
                                        prefer=() if importance else ROSSMANN_PDP_DEFAULT, exclude=("Store",))
    predict = inspection.module_predictor(fit.model, transform=np.exp)
    rows = inspection.sample_rows(len(x_cat), PDP_ROWS, seed)
    pds = [inspection.partial_dependence(predict, x_cat, x_cont,
                                         _day_names(inspection.feature_grid(data.processor, f, x_cat, x_cont)), rows)
           for f in features]
    plots = [
        reports.partial_dependence(pds, tmp / "partial_dependence.png",
                                   "Partial dependence of predicted Sales (valid rows; top inputs by forest "
                                   "importance)", "predicted Sales"),
        reports.error_breakdown(table, "rmspe", overall, tmp / "error_breakdown.png",
                                "Where the model is wrong: valid RMSPE by segment (red: above overall)"),
        reports.worst_groups(worst, "Store", "rmspe", overall, tmp / "worst_stores.png",
                             f"The {len(worst)} stores with the highest valid RMSPE", describe),
    ]
    return Analysis(
        plots=plots,
        tables={"error_breakdown.csv": table, "worst_stores.csv": worst, "partial_dependence.csv": _pd_table(pds)},
        highlights=["plots/pred_vs_actual.png", "plots/error_breakdown.png", "plots/partial_dependence.png"],
        findings=_findings(table, "rmspe", overall) + _worst_line(worst, "Store", "rmspe") + _level_line(fit, y_true, overall),
    )


def _level_line(fit: Fitted, y_true: np.ndarray, after: float) -> list[str]:
    """What the recent-level correction (modeling/level.py) did to the validation figure (`after`:
    the overall RMSPE, with it)."""
    if fit.level is None or "valid_pred_networks" not in fit.info:
        return []
    alone = np.exp(np.asarray(fit.info["valid_pred_networks"], dtype=np.float64))
    before = float(np.sqrt(inspection.squared_errors(y_true, alone, "rmspe")[0].mean()))
    lvl = fit.level
    if not lvl.applied:
        t = lvl.persistence_t
        why = (f"too few stores with rows in both of the last two {lvl.days}-day windows to check that levels persist"
               if np.isnan(t) else
               f"the stores' mean log residuals over the last {lvl.days} training days were not shown to persist "
               f"from the {lvl.days} days before (t = {t:.1f}, under 2)" if t < 2 else
               f"the stores' mean log residuals over the last {lvl.days} training days are no wider than their noise")
        return [f"Recent-level correction not applied: {why}; valid RMSPE {before:.4f} is the networks' alone."]
    return [f"Recent-level correction (each store's mean log residual over the last {lvl.days} training days, "
            f"shrunk: spread of store levels {lvl.tau:.3f} against residual noise {lvl.sigma:.3f}; persistence "
            f"t = {lvl.persistence_t:.1f}): valid RMSPE {before:.4f} from the networks alone, {after:.4f} with it."]


def _day_names(grid: inspection.FeatureGrid) -> inspection.FeatureGrid:
    """Day-of-week codes as day names on the plot's axis ('0' -> '1 Mon' for the pipeline's
    Monday = 0, '1' -> '1 Mon' for Kaggle's Monday = 1)."""
    first = {"Dayofweek": 0, "DayOfWeek": 1}.get(grid.name)
    if first is None:
        return grid
    grid.labels = [str(DAY_NAMES[(int(lbl) - first) % 7]) if lbl.lstrip("-").isdigit() else lbl
                   for lbl in grid.labels]
    return grid


def _pd_table(pds: list[inspection.PartialDependence]) -> pd.DataFrame:
    return pd.DataFrame([{"feature": p.grid.name, "value": label, "average_prediction": float(avg),
                          "rows": p.rows} for p in pds for label, avg in zip(p.grid.labels, p.average, strict=True)])


def _findings(table: pd.DataFrame, metric: str, overall: float, n: int = 3, min_share: float = 0.03) -> list[str]:
    """The segments furthest above the overall error that hold at least `min_share` of the rows."""
    if table.empty:
        return []
    big = table[(table["share"] >= min_share) & (table[metric] > overall)]
    top = big.sort_values(metric, ascending=False, kind="stable").head(n)
    return [f"{s} = {v}: {metric} {e:.4f} on {sh:.0%} of rows (overall {overall:.4f})"
            for s, v, e, sh in zip(top["segment"], top["value"], top[metric], top["share"], strict=True)]


def _worst_line(worst: pd.DataFrame, key: str, metric: str) -> list[str]:
    if worst.empty:
        return []
    w = worst.iloc[0]
    direction = "over" if w["bias"] >= 0 else "under"
    return [f"worst {key.lower()}: {key} {w[key]}, {metric} {w[metric]:.4f} over {int(w['rows'])} rows, "
            f"{direction}-predicted by {abs(w['bias']):.1%} on average (see `analysis/worst_stores.csv`)"]


# ---------------------------------------------------------------- ratings


def ratings_datasets(cfg: RatingsConfig, data: RatingsData) -> list[DataInput]:
    split = (f"file {Path(cfg.valid).name}" if cfg.valid
             else f"{cfg.split} split, valid fraction {cfg.valid_frac:g}, seed {cfg.seed}")
    train_sources = [cfg.ratings, *([cfg.items] if cfg.items else [])]
    valid_sources = [cfg.valid] if cfg.valid else train_sources
    out = []
    for name, context, frame, sources, selection in (
            ("ratings-train", "training", data.train_df, train_sources, f"training part ({split})"),
            ("ratings-valid", "validation", data.valid_df, valid_sources, f"validation part ({split})")):
        profile: dict[str, Any] = {"n_users": int(frame["user"].nunique()), "n_items": int(frame["item"].nunique())}
        ts = frame["timestamp"].to_numpy() if "timestamp" in frame.columns else np.zeros(0)
        if len(ts) and ts.max() > 0:
            profile.update(_dates(pd.DataFrame({"Date": pd.to_datetime(ts[ts > 0], unit="s")})))
        out.append(DataInput(name, context, [str(s) for s in sources], len(frame), frame_columns(frame),
                             selection, profile, target="rating"))
    return out


def ratings_segments(data: RatingsData) -> pd.DataFrame:
    u_cnt = np.bincount(data.tu, minlength=data.n_users)
    i_cnt = np.bincount(data.ti, minlength=data.n_items)
    u_cnt[0] = i_cnt[0] = 0  # code 0: an id the training part never saw
    levels = np.unique(data.vr)
    return pd.DataFrame({
        "user activity": inspection.activity_bins(u_cnt[data.vu]),
        "item activity": inspection.activity_bins(i_cnt[data.vi]),
        "known ids": np.select([(data.vu > 0) & (data.vi > 0), data.vi > 0, data.vu > 0],
                               ["both known", "new user", "new item"], "both new"),
        "rating": pd.Categorical(data.vr, categories=levels, ordered=True).rename_categories(
            [f"{v:g}" for v in levels]),
    })


def ratings_analysis(data: RatingsData, fit: Fitted, metrics: dict[str, float], seed: int,
                     ranker: Any | None = None, k: int = 10) -> Analysis:
    """RMSE of the served ratings (unknown users and items answered by the bias baseline, as
    predictors answer them) by user/item activity (training ratings), known vs new users and
    items, and the rating value; with ranking metrics in `metrics`, precision/recall/NDCG@k by
    user activity from `ranker` (the job's ranking head; default: the rating model). Data
    without ratings (interactions only) has no rating error to break down."""
    from modeling.baselines import cold_start_fill

    tmp = fit.tmp
    plots: list[Path | None] = []
    tables: dict[str, pd.DataFrame] = {}
    highlights: list[str] = []
    findings: list[str] = []
    if fit.valid_pred is not None and data.baseline is not None:
        served = cold_start_fill(fit.valid_pred, data.vu, data.vi, data.baseline, data.scale)
        seg = ratings_segments(data)
        overall = float(np.sqrt(np.mean((data.vr - served) ** 2)))
        by = ["user activity", "item activity", "known ids", "rating"]
        table = inspection.error_breakdown(seg, data.vr, served, by, "rmse")
        plots.append(reports.error_breakdown(table, "rmse", overall, tmp / "error_breakdown.png",
                                             "Where the model is wrong: valid RMSE by segment (activity = "
                                             "training ratings; red: above overall)"))
        tables["error_breakdown.csv"] = table
        highlights += ["plots/pred_vs_actual.png", "plots/error_breakdown.png"]
        findings = _findings(table, "rmse", overall)
    if f"precision_at_{k}" in metrics:
        ranking = ranking_by_activity(data, ranker if ranker is not None else fit.model, seed, k)
        if not ranking.empty:
            plots.append(reports.ranking_breakdown(ranking, k, tmp / "ranking_by_activity.png",
                                                   f"Top-{k} ranking by user activity (held-out items relevant)"))
            tables["ranking_by_activity.csv"] = ranking
            highlights.append("plots/ranking_by_activity.png")
    return Analysis(plots=plots, tables=tables, highlights=highlights, findings=findings)


def ranking_by_activity(data: RatingsData, ranker: Any, seed: int, k: int = 10) -> pd.DataFrame:
    """The job's ranking metrics per user-activity bin, under the job's protocol (every
    held-out item of a known user relevant, training items excluded), on at most RANKING_USERS
    users."""
    from modeling.collab import csr_from_pairs, csr_rows, top_k_for_users

    mask = (data.vu > 0) & (data.vi > 0)
    users = np.unique(data.vu[mask])
    if len(users) == 0:
        return pd.DataFrame()
    if len(users) > RANKING_USERS:
        users = users[inspection.sample_rows(len(users), RANKING_USERS, seed)]
    seen = csr_from_pairs(data.tu, data.ti, data.n_users)
    rel_ptr, rel_idx = csr_from_pairs(data.vu[mask], data.vi[mask], data.n_users)
    rec, _ = top_k_for_users(ranker, users, k, seen)
    groups = inspection.activity_bins(np.bincount(data.tu, minlength=data.n_users)[users])
    return inspection.ranking_breakdown(rec, csr_rows(rel_ptr, rel_idx, users), groups, k)
