"""Scoring a registered Rossmann pyfunc with `mlflow.pyfunc.spark_udf` in local Spark vs `tabrec score`.

Usage: python benchmarks/spark_score.py [--rows 200000] [--stores 300] [--partitions 4]
                                        [--cores 2] [--model URI]

Prints one JSON line on stdout (progress on stderr). Needs the `spark` extra and Java 17+.

Same machine, same run, same input Parquet file (N synthetic Kaggle-schema test rows: the
synthetic test.csv of a store set, repeated with dates shifted forward, as in batch_score.py):
- tabrec: the `tabrec score --model URI --input IN --output OUT --json` command in a fresh
  process (drift check and batch MLflow run included, as a user runs it): wall seconds of the
  whole process and the job's own `seconds`.
- spark: local[cores] session start; `spark_udf(..., env_manager="local")` creation (downloads
  the model); then the docs/spark.md job - read Parquet, `repartition(P, "Store")`,
  maxRecordsPerBatch 0, udf over the signature columns, write Parquet - timed twice: cold (Python
  workers start, import torch, load the model) and warm (workers reused; in local mode the model
  is still loaded once per task).
- max_abs_diff / max_rel_diff / rows_differing: |spark - tabrec| predictions over all rows,
  joined on Id (float32 forward passes over differently shaped batches may differ in the last
  bit of the log-sale output, ~1e-6 relative after exp).
- worker_torch_threads / worker_omp_num_threads: what a Spark Python worker reports.

Without --model a 1-epoch Rossmann model is trained on --stores synthetic stores into a
temporary MLflow store, as in batch_score.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_score import log, machine, test_rows_for, write_input  # noqa: E402


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def train_model(root: Path, stores: int, seed: int) -> tuple[str, pd.DataFrame]:
    """A 1-epoch Rossmann model in the current MLflow store; its runs:/ URI and test rows."""
    from pipelines.jobs.rossmann import RossmannConfig, train_rossmann
    from pipelines.synth import write_rossmann

    files = write_rossmann(root / "rossmann", stores=stores, days=240, seed=seed)
    res = train_rossmann(RossmannConfig(train=str(files["train.csv"]), store=str(files["store.csv"]),
                                        epochs=1, lr="3e-3", batch_size=1024, seed=seed, quiet=True, layers=(1000, 500),
                                        experiment="bench-spark", forest_rows=2000, forest_trees=5))
    return res["model_uri"], pd.read_csv(files["test.csv"], dtype={"StateHoliday": str})


def tabrec_score(model: str, src: Path, out: Path) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("tabrec")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "score", "--model", model, "--input", str(src), "--output", str(out),
                           "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"tabrec score failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_seconds": wall, "job_seconds": float(res["seconds"]), "chunk_mode": res.get("chunk_mode")}


def start_spark(cores: int, local_dir: Path):
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{cores}]").appName("tabrec-bench-spark")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "2g").config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.local.dir", str(local_dir)).getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def stop_spark(spark) -> None:
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    spark.stop()
    if gateway is not None and getattr(gateway, "proc", None) is not None:
        gateway.shutdown()
        gateway.proc.stdin.close()
        gateway.proc.wait(timeout=60)
        SparkContext._gateway = SparkContext._jvm = None


def spark_job(spark, predict, inputs: list[str], src: Path, out: Path, partitions: int) -> float:
    from pyspark.sql.functions import struct

    t0 = time.perf_counter()
    (spark.read.parquet(str(src)).repartition(partitions, "Store")
     .withColumn("prediction", predict(struct(*inputs)))
     .select("Id", "prediction").write.mode("overwrite").parquet(str(out)))
    return time.perf_counter() - t0


def worker_threads(spark) -> dict[str, Any]:
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("string")
    def probe(s: pd.Series) -> pd.Series:
        import torch

        return pd.Series([f"{torch.get_num_threads()}|{os.environ.get('OMP_NUM_THREADS')}"] * len(s))

    vals = {r[0] for r in spark.range(0, 8, numPartitions=2).select(probe("id")).collect()}
    threads, omp = sorted(vals)[0].split("|")
    return {"worker_torch_threads": int(threads), "worker_omp_num_threads": omp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--stores", type=int, default=300)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="Rossmann pyfunc model URI to reuse (its store count must match --stores)")
    args = ap.parse_args()

    import mlflow

    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="tabrec-bench-spark-") as tmp_dir:
        tmp = Path(tmp_dir)
        if not args.model:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}")
        if args.model:
            model, test = args.model, test_rows_for(args.stores, args.seed)
        else:
            log(f"training a 1-epoch Rossmann model on {args.stores} synthetic stores ...")
            model, test = train_model(tmp, args.stores, args.seed)
        src = tmp / "input.parquet"
        n = write_input(src, test, args.rows)
        log(f"input: {n} rows; tabrec score ...")
        t0 = time.perf_counter()
        mlflow.pyfunc.load_model(model)
        load_s = time.perf_counter() - t0
        tab = tabrec_score(model, src, tmp / "tabrec.parquet")
        log(f"tabrec score: {tab['wall_seconds']:.1f} s wall; starting Spark local[{args.cores}] ...")

        t0 = time.perf_counter()
        spark = start_spark(args.cores, tmp / "spark-local")
        start_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            predict = mlflow.pyfunc.spark_udf(spark, model, result_type="double", env_manager="local")
            udf_s = time.perf_counter() - t0
            inputs = predict.metadata.get_input_schema().input_names()
            spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "0")
            cold = spark_job(spark, predict, inputs, src, tmp / "spark-cold", args.partitions)
            log(f"spark job cold {cold:.1f} s")
            warm = spark_job(spark, predict, inputs, src, tmp / "spark-warm", args.partitions)
            log(f"spark job warm {warm:.1f} s")
            threads = worker_threads(spark)
        finally:
            stop_spark(spark)

        a = pd.read_parquet(tmp / "tabrec.parquet").set_index("Id")["prediction"]
        b = pd.read_parquet(tmp / "spark-warm").set_index("Id")["prediction"]
        assert len(a) == len(b) == n, (len(a), len(b), n)
        a, b = a.sort_index().to_numpy(), b.sort_index().to_numpy()
        diff = np.abs(a - b)
        rel = diff / np.maximum(np.abs(a), 1e-12)

    print(json.dumps({
        "benchmark": "spark_score", "date": dt.date.today().isoformat(), "machine": machine(),
        "rows": n, "stores": args.stores, "partitions": args.partitions, "cores": args.cores,
        "pyfunc_load_seconds": round(load_s, 2),
        "tabrec": {"wall_seconds": round(tab["wall_seconds"], 2), "job_seconds": round(tab["job_seconds"], 2),
                   "chunk_mode": tab["chunk_mode"],
                   "rows_per_s_wall": round(n / tab["wall_seconds"], 1),
                   "rows_per_s_job": round(n / tab["job_seconds"], 1)},
        "spark": {"session_start_seconds": round(start_s, 2), "udf_create_seconds": round(udf_s, 2),
                  "job_cold_seconds": round(cold, 2), "job_warm_seconds": round(warm, 2),
                  "rows_per_s_cold": round(n / cold, 1), "rows_per_s_warm": round(n / warm, 1),
                  "rows_per_s_incl_start": round(n / (start_s + udf_s + cold), 1), **threads},
        "max_abs_diff": float(diff.max()), "max_rel_diff": float(rel.max()),
        "rows_differing": int((diff > 0).sum()), "loadavg_before": load_before, "loadavg_after": loadavg(),
    }))


if __name__ == "__main__":
    main()
