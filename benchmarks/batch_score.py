"""Batch scoring throughput and memory; prints one JSON line on stdout (progress on stderr).

Usage: python benchmarks/batch_score.py [--rows 2000000] [--users 100000] [--model URI]
                                        [--batch-rows 100000] [--stores 300] [--skip-rss]

- score: rows/s of `pipelines.batch.score_file` end to end (Parquet in -> features -> model ->
  Parquet out, drift check and MLflow run included) on N synthetic Rossmann-schema rows: the
  synthetic test.csv of a store set, repeated with dates shifted forward, in Kaggle row order
  (date-major, so stores interleave across chunks; the event calendar makes that harmless).
- floor: rows/s of a bare forward pass of the same model over pre-built tensors of the same rows
  (same 65,536-row slices as the predictor); ratio = end-to-end seconds / floor seconds.
- recommend: users/s of `recommend_file` writing top-10 for every user of a synthetic ratings
  model with `--users` users.
- rss: peak RSS (ru_maxrss) of a fresh process scoring N rows, 4N rows, and only loading the model,
  each in its own subprocess so each figure is that run's own peak.

Without --model a tiny Rossmann bundle is trained first (1 epoch, small forests) into a temp
MLflow store; the model's architecture is the default one, so the forward cost is realistic.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import machine  # noqa: E402  (re-exported for spark_score.py)

PREDICT_SLICE = 65_536


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's own peak RSS in MiB.

    Linux carries the parent's high-water mark into an exec'd child's ru_maxrss (the forked
    copy's RSS is recorded at exec), so a child of a big parent would report the parent's peak;
    VmHWM in /proc/self/status is the peak of this process image only. Elsewhere: ru_maxrss.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale



# ---------------------------------------------------------------------------- data and models


def train_rossmann_bundle(root: Path, stores: int, seed: int) -> tuple[str, pd.DataFrame]:
    """Train a 1-epoch Rossmann model on synthetic data; return its bundle dir and the test rows."""
    from modeling.bundle import resolve_bundle_dir
    from pipelines.jobs.rossmann import RossmannConfig, train_rossmann
    from pipelines.synth import write_rossmann

    files = write_rossmann(root / "rossmann", stores=stores, days=240, seed=seed)
    res = train_rossmann(RossmannConfig(train=str(files["train.csv"]), store=str(files["store.csv"]),
                                        epochs=1, lr="3e-3", batch_size=1024, seed=seed, quiet=True, layers=(1000, 500),
                                        experiment="bench-rossmann", forest_rows=2000, forest_trees=5))
    return str(resolve_bundle_dir(res["model_uri"])), pd.read_csv(files["test.csv"])


def test_rows_for(stores: int, seed: int) -> pd.DataFrame:
    """Test-like rows for a given model: the synthetic test.csv of a store set of that size."""
    from pipelines.synth import synth_rossmann

    return synth_rossmann(stores=stores, days=240, seed=seed)[2]


def shifted_copy(test: pd.DataFrame, copy: int) -> pd.DataFrame:
    days = pd.to_datetime(test["Date"])
    span = (days.max() - days.min()).days + 1
    d = days + pd.Timedelta(days=span * copy)
    out = test.copy()
    out["Date"] = d.dt.date
    out["DayOfWeek"] = (d.dt.dayofweek + 1).astype(np.int64)
    out["Id"] = test["Id"].to_numpy() + copy * len(test)
    out["StateHoliday"] = out["StateHoliday"].astype(str)
    # Kaggle order: date descending, then store
    return out.sort_values(["Date", "Store"], ascending=[False, True], kind="stable")


def write_input(path: Path, test: pd.DataFrame, rows: int) -> int:
    """Append shifted copies of `test` until `rows` rows are written (one row group per copy)."""
    copies = -(-rows // len(test))
    writer = None
    written = 0
    for c in range(copies):
        part = shifted_copy(test, c).head(rows - written)
        table = pa.Table.from_pandas(part, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        written += len(part)
    assert writer is not None
    writer.close()
    return written


def prebuilt_tensors(bundle: str, test: pd.DataFrame, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs of the same rows, built copy by copy (whole stores) before timing starts."""
    from modeling.predictors import load_predictor

    pred = load_predictor(bundle)
    cats, conts, n = [], [], 0
    c = 0
    while n < rows:
        part = shifted_copy(test, c).head(rows - n)
        x_cat, x_cont = pred.processor.transform(pred.engineer(part))
        cats.append(x_cat)
        conts.append(x_cont)
        n += len(part)
        c += 1
    return np.concatenate(cats), np.concatenate(conts)


def forward_floor(bundle: str, x_cat: np.ndarray, x_cont: np.ndarray) -> float:
    """Seconds for a bare forward pass over pre-built tensors (no features, no I/O)."""
    import torch

    from modeling.predictors import load_predictor

    model = load_predictor(bundle).model.eval()
    out = np.empty(len(x_cat), dtype=np.float32)
    with torch.inference_mode():
        model(torch.from_numpy(x_cat[:1024]), torch.from_numpy(x_cont[:1024]))  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(x_cat), PREDICT_SLICE):
            out[s : s + PREDICT_SLICE] = model(torch.from_numpy(x_cat[s : s + PREDICT_SLICE]),
                                               torch.from_numpy(x_cont[s : s + PREDICT_SLICE])).numpy()
        return time.perf_counter() - t0


def train_ratings_bundle(root: Path, users: int, seed: int) -> str:
    from modeling.bundle import resolve_bundle_dir
    from pipelines.jobs.ratings import RatingsConfig, train_ratings
    from pipelines.synth import write_ratings

    files = write_ratings(root / "ratings", users=users, items=1682, ratings=users * 12, seed=seed)
    res = train_ratings(RatingsConfig(ratings=str(files["u.data"]), items=str(files["movies.csv"]),
                                      epochs=1, lr="1e-2", batch_size=8192, seed=seed, quiet=True,
                                      experiment="bench-ratings"))
    return str(resolve_bundle_dir(res["model_uri"]))


# ---------------------------------------------------------------------------- child processes


def child(argv: list[str]) -> None:
    """`--child score BUNDLE INPUT OUTPUT BATCH_ROWS` or `--child load BUNDLE`: JSON with own peak RSS."""
    kind, bundle = argv[0], argv[1]
    t0 = time.perf_counter()
    if kind == "load":
        from modeling.predictors import load_predictor

        load_predictor(bundle)
        res: dict[str, Any] = {}
    else:
        from pipelines.batch import score_file

        res = score_file(bundle, argv[2], argv[3], quiet=True, batch_rows=int(argv[4]))
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                      "rows": res.get("rows_out")}))


def run_child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]})
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--model", help="Rossmann model URI to reuse (its store count must match --stores)")
    ap.add_argument("--stores", type=int, default=300)
    ap.add_argument("--batch-rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-rss", action="store_true", help="skip the N / 4N peak-RSS subprocesses")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return

    from pipelines.batch import recommend_file, score_file

    with tempfile.TemporaryDirectory(prefix="tabrec-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        if not args.model:  # keep the throwaway models out of the user's store
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        if args.model:
            from modeling.bundle import resolve_bundle_dir

            bundle = str(resolve_bundle_dir(args.model))
            test = test_rows_for(args.stores, args.seed)
        else:
            log(f"training a 1-epoch Rossmann model on {args.stores} synthetic stores ...")
            bundle, test = train_rossmann_bundle(tmp, args.stores, args.seed)

        src = tmp / "input.parquet"
        n = write_input(src, test, args.rows)
        log(f"input: {n} rows ({src.stat().st_size / 2**20:.1f} MiB Parquet); timing end to end ...")
        t0 = time.perf_counter()
        res = score_file(bundle, src, tmp / "scored.parquet", quiet=True, batch_rows=args.batch_rows)
        e2e = time.perf_counter() - t0
        log(f"end to end {e2e:.1f} s ({res['chunk_mode']}, {res['chunks']} chunks); building tensors ...")
        x_cat, x_cont = prebuilt_tensors(bundle, test, n)
        floor = forward_floor(bundle, x_cat, x_cont)
        del x_cat, x_cont
        log(f"forward floor {floor:.1f} s")

        log(f"training a ratings model with {args.users} users ...")
        rbundle = train_ratings_bundle(tmp, args.users, args.seed)
        t0 = time.perf_counter()
        rec = recommend_file(rbundle, tmp / "top10.parquet", k=10, quiet=True)
        rec_s = time.perf_counter() - t0
        log(f"top-10 for {rec['users']} users in {rec_s:.1f} s")

        rss: dict[str, Any] = {}
        if not args.skip_rss:
            src4 = tmp / "input4.parquet"
            n4 = write_input(src4, test, 4 * args.rows)
            (tmp / "scored.parquet").unlink()
            for label, path, rows in (("n", src, n), ("4n", src4, n4)):
                log(f"peak RSS child: {rows} rows ...")
                r = run_child(["score", bundle, str(path), str(tmp / f"rss-{label}.parquet"), str(args.batch_rows)])
                rss[label] = {"rows": rows, "peak_rss_mb": round(r["peak_rss_mb"], 1),
                              "rows_per_s": round(rows / r["seconds"], 1)}
            rss["load_only_peak_rss_mb"] = round(run_child(["load", bundle])["peak_rss_mb"], 1)

        print(json.dumps({
            "benchmark": "batch_score", "date": dt.date.today().isoformat(), "machine": machine(),
            "rows": n, "batch_rows": args.batch_rows, "chunk_mode": res["chunk_mode"], "chunks": res["chunks"],
            "score_seconds": round(e2e, 2), "score_rows_per_s": round(n / e2e, 1),
            "floor_seconds": round(floor, 2), "floor_rows_per_s": round(n / floor, 1),
            "ratio_e2e_over_floor": round(e2e / floor, 3), "drift_auc": res["drift"].get("auc"),
            "recommend": {"users": rec["users"], "k": 10, "seconds": round(rec_s, 2),
                          "users_per_s": round(rec["users"] / rec_s, 1), "rows_out": rec["rows_out"]},
            "rss": rss,
        }))


if __name__ == "__main__":
    main()
