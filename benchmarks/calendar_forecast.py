"""Forecast check on the real Kaggle files: event calendar modes and the fallback beyond its horizon.

Cuts train.csv at `--cut`: the rows up to the cut train a model (`train rossmann` defaults unless
told), the `--days` days after it are the forecast window, written as a test.csv-style file
(Id, Store, DayOfWeek, Date, Open, Promo, StateHoliday, SchoolHoliday; Sales held back). The same
trained model then scores the window with its features read from:

  alone     the bundle's calendar only (what a record sent on its own gets; before the event
            calendar this was also the answer to a one-record HTTP request)
  calendar  the window file laid over the bundle's calendar (`tabrec score --calendar window.csv`;
            before the calendar, scoring the whole file as one batch gave exactly these features)
  oracle    the calendar extended by `--beyond` more days of train.csv's real events past the
            window (what a longer known calendar would give: the cost of the horizon)

each with the two fallbacks beyond the calendar's horizon: `cap` (no event known: distances read
the cap, window counts count known days) and `repeat` (Promo days of the last 14 days repeat
every 14 days). Prints ONE JSON line with RMSPE (Sales, open rows with Sales > 0) per mode.

    python benchmarks/calendar_forecast.py --data ../shared/data/rossmann --cut 2015-05-29
        [--days 42] [--beyond 21] [--epochs 4] [--no-external] [--train-repeat] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPEATS = {"cap": {}, "repeat": {"Promo": 14}}
RAW = ["Store", "DayOfWeek", "Date", "Open", "Promo", "StateHoliday", "SchoolHoliday"]


def with_repeat(bundle: Path, dest: Path, repeat: dict[str, int]) -> Path:
    """A copy of the bundle whose event step uses `repeat` beyond the calendar's horizon."""
    shutil.copytree(bundle, dest)
    doc_path = dest / "features" / "features.json"
    doc = json.loads(doc_path.read_text())
    for step in doc["steps"]:
        if step["name"] == "elapsed_events":
            step["params"]["repeat"] = repeat
    doc_path.write_text(json.dumps(doc))
    return dest


def rmspe(y: np.ndarray, pred: np.ndarray) -> float:
    keep = y > 0
    return float(np.sqrt(np.mean(((y[keep] - pred[keep]) / y[keep]) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/rossmann"))
    parser.add_argument("--cut", default="2015-05-29")
    parser.add_argument("--days", type=int, default=42)
    parser.add_argument("--beyond", type=int, default=21)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--no-external", action="store_true")
    parser.add_argument("--train-repeat", action="store_true",
                        help="train with the repeat fallback too (changes the last training rows' features)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="copy the bundle and the window files into this folder")
    args = parser.parse_args()

    from modeling.bundle import resolve_bundle_dir
    from modeling.predictors import load_predictor
    from pipelines.features import rossmann as features
    from pipelines.ingest.rossmann import read_train
    from pipelines.jobs.rossmann import RossmannConfig, train_rossmann

    data = Path(args.data)
    train = read_train(data / "train.csv")
    cut = pd.Timestamp(args.cut)
    end = cut + pd.Timedelta(days=args.days)
    window = train[(train["Date"] > cut) & (train["Date"] <= end)].reset_index(drop=True)
    beyond = train[(train["Date"] > end) & (train["Date"] <= end + pd.Timedelta(days=args.beyond))]
    if window["Date"].nunique() != args.days or beyond["Date"].nunique() != args.beyond:
        raise SystemExit(f"--cut {args.cut}: train.csv lacks {args.days} + {args.beyond} days after the cut")
    if args.train_repeat:
        features.EVENT_REPEAT = REPEATS["repeat"]  # the pipeline reads it when it is built
    with tempfile.TemporaryDirectory(prefix="bench-calendar-") as tmp_dir:
        tmp = Path(tmp_dir)
        train[train["Date"] <= cut].to_parquet(tmp / "train.parquet", index=False)
        test = window[RAW].assign(Date=window["Date"].dt.strftime("%Y-%m-%d")).rename_axis("Id").reset_index()
        test.to_csv(tmp / "window.csv", index=False)
        oracle = pd.concat([window, beyond])[RAW].assign(Date=lambda d: d["Date"].dt.strftime("%Y-%m-%d"))
        oracle.to_csv(tmp / "oracle.csv", index=False)
        kw = {} if args.epochs is None else {"epochs": args.epochs}
        cfg = RossmannConfig(train=str(tmp / "train.parquet"), store=str(data / "store.csv"),
                             external_dir=None if args.no_external else str(data / "external"),
                             seed=args.seed, quiet=True, **kw)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        cwd = Path.cwd()
        os.chdir(tmp)
        try:
            t0 = time.perf_counter()
            res = train_rossmann(cfg)
            seconds = time.perf_counter() - t0
            bundle = resolve_bundle_dir(res["model_uri"])
        finally:
            os.chdir(cwd)
        y = window["Sales"].to_numpy(np.float64)
        request = test.drop(columns=["Id"])
        out: dict[str, dict[str, float]] = {}
        for name, repeat in REPEATS.items():
            predictor = load_predictor(str(with_repeat(bundle, tmp / f"bundle-{name}", repeat)))
            alone = predictor.predict(request)
            sample = np.random.default_rng(0).choice(len(request), 50, replace=False)
            one_by_one = np.array([predictor.predict(request.iloc[[i]])[0] for i in sample])
            np.testing.assert_allclose(one_by_one, alone[sample], rtol=1e-5)  # records are independent
            t1 = time.perf_counter()
            with_cal = predictor.with_calendar_file(tmp / "window.csv")
            cal_seconds = time.perf_counter() - t1
            out[name] = {"alone": rmspe(y, alone), "calendar": rmspe(y, with_cal.predict(request)),
                         "oracle": rmspe(y, predictor.with_calendar_file(tmp / "oracle.csv").predict(request)),
                         "calendar_load_seconds": cal_seconds}
        if args.keep:
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copytree(bundle, keep / "bundle", dirs_exist_ok=True)
            for name in ("window.csv", "oracle.csv", "train.parquet"):
                shutil.copy(tmp / name, keep / name)
    print(json.dumps({
        "cut": args.cut, "window": [str((cut + pd.Timedelta(days=1)).date()), str(end.date())],
        "rows": int((window["Sales"] > 0).sum()), "external": not args.no_external,
        "train_repeat": args.train_repeat, "train_seconds": round(seconds, 1),
        "valid_rmspe": round(res["metrics"]["valid_rmspe"], 4),
        "rmspe": {k: {m: round(v, 4) for m, v in d.items()} for k, d in out.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    main()
