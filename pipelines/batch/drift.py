"""Drift glue for `score`: the gate that warns (or raises DriftError) and the lines it logs.

The check itself is generic and lives in `modeling.drift`: the predictor builds a sampler
(`TabularPredictor.drift_sampler`) against its bundle's sample of processed training features,
scoring feeds it each chunk's engineered features (`predict(..., on_features=sampler.add)`, no
second pass), and `sampler.result()` gives the adversarial AUC. This module decides what a job
does with the answer. Ratings models have no drift check.
"""

from __future__ import annotations

import logging
from typing import Any

from modeling.drift import DriftSampler
from modeling.errors import DataError
from modeling.predictors import Predictor, TabularPredictor

log = logging.getLogger("tabrec.score")


class DriftError(DataError):
    """The batch's features differ from the training sample beyond --max-drift-auc."""


def drift_exclusions(predictor: Predictor) -> dict[str, str]:
    """Model inputs the drift check leaves out, with the reason: the columns that are a function of
    the row's date, so a batch from another period differs there by construction, not by drift.

    The feature pipeline declares them (`FeaturePipeline.time_relative_columns`): calendar parts
    (Year, Month, Week, Day, Dayofyear, Elapsed), per-group event distances and window counts (the
    Before*/*_fw values are computed from the events inside the batch and cap where the next event
    lies past its end; After*/*_bw are exact but seasonal), durations to the date, month-of-date
    flags and tables joined on a date column (weather, trends). Their `<col>_na` flags stay in: a
    join that stops matching is real skew.
    """
    return predictor.drift_exclusions() if isinstance(predictor, TabularPredictor) else {}


def drift_sampler(predictor: Predictor, total_rows: int, rows: int) -> DriftSampler | None:
    """The sampler scoring feeds (tabular models), or None (no drift check for this kind)."""
    return predictor.drift_sampler(total_rows, rows) if isinstance(predictor, TabularPredictor) else None


def drift_gate(sampler: DriftSampler | None, max_auc: float, fail: bool) -> dict[str, Any]:
    """Warn, or raise DriftError, when the adversarial AUC exceeds `max_auc`."""
    if sampler is None:
        return {"checked": False, "note": "drift check applies to tabular models only"}
    drift = sampler.result()
    if not drift["checked"]:
        log.info("%s", drift["note"])
        return drift
    log.info("drift check: comparing %d columns %s with the training sample; left out as functions "
             "of the date: %s", len(drift["compared_columns"]), drift["compared_columns"], drift["excluded_columns"])
    scope = drift["reference"]
    if scope.get("narrowed_to"):
        log.info("drift check: reference = the training sample's rows of the %d %s value(s) in the batch "
                 "(%d rows)", scope["groups"], scope["narrowed_to"], scope["rows"])
    log.info("drift check: adversarial AUC %.3f on %d rows; features separating batch from training: %s",
             drift["auc"], drift["rows"], ", ".join(f"{n} ({v:.2f})" for n, v in drift["top_features"]))
    drift["max_auc"] = max_auc
    drift["exceeded"] = drift["auc"] > max_auc
    if drift["exceeded"]:
        top = ", ".join(n for n, _ in drift["top_features"][:3])
        msg = (f"drift: adversarial AUC {drift['auc']:.3f} > --max-drift-auc {max_auc} "
               f"(batch vs training features; most telling: {top})")
        if fail:
            raise DriftError(msg + "; nothing written")
        log.warning("%s", msg)
    return drift
