"""Do the Rossmann defaults hold across data sizes? Synthetic sets of several sizes and seeds, each
trained with `train rossmann`'s defaults (or given overrides) on two validation windows.

For every (stores x days, data seed) a synthetic Kaggle-schema set is written; window "last" is the
usual split (validation = the last 42 days), window "earlier" drops the last 42 days of train.csv
first, so validation is the 42 days before them. Each run is a full `train_rossmann` (lr finder,
validation run, refit, forest checks, MLflow in a temporary store): the network's valid RMSPE
against its own forest check's on the same split. Prints ONE JSON line (each run also on stderr).

    python benchmarks/rossmann_sizes.py [--sizes 20x300,30x300,50x500,100x600] [--seeds 0,1,2]
        [--windows last,earlier] [--set '{"steps": 1500}']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20x300,30x300,50x500,100x600", help="stores x days, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="data seeds")
    parser.add_argument("--windows", default="last,earlier")
    parser.add_argument("--set", default="{}", help="JSON overrides of RossmannConfig fields")
    args = parser.parse_args()

    import pandas as pd

    from pipelines.jobs.rossmann import RossmannConfig, train_rossmann
    from pipelines.synth import write_rossmann

    overrides = json.loads(args.set)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-sizes-") as tmp_dir:
        tmp = Path(tmp_dir)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        os.chdir(tmp)
        for size in args.sizes.split(","):
            stores, days = (int(x) for x in size.split("x"))
            for seed in (int(s) for s in args.seeds.split(",")):
                files = write_rossmann(tmp / f"{size}_{seed}", stores=stores, days=days, seed=seed)
                for window in args.windows.split(","):
                    train = files["train.csv"]
                    if window == "earlier":
                        df = pd.read_csv(train, dtype={"StateHoliday": str})
                        dates = pd.to_datetime(df["Date"])
                        train = train.with_name("train_earlier.csv")
                        df[dates <= dates.max() - pd.Timedelta(days=42)].to_csv(train, index=False)
                    load = os.getloadavg()[0]
                    t0 = time.perf_counter()
                    res = train_rossmann(RossmannConfig(train=str(train), store=str(files["store.csv"]), quiet=True,
                                                        **overrides))
                    m, c = res["metrics"], res["config"]
                    run = {"size": size, "data_seed": seed, "window": window, "n_train": None,
                           "batch_size": c["batch_size"], "epochs": c["epochs"], "ensemble": c["ensemble"],
                           "ensemble_kind": c["ensemble_kind"], "lr": round(m["lr"], 5),
                           "valid_rmspe": round(m["valid_rmspe"], 4),
                           # before the recent-level correction (--level-days); the same figure when it is off
                           "networks_only": round(m.get("valid_rmspe_networks_only", m["valid_rmspe"]), 4),
                           "level_tau": round(m.get("level_tau", 0.0), 4),
                           "level_t": round(m.get("level_persistence_t", float("nan")), 2),
                           "level_applied": bool(m.get("level_applied", 0.0)),
                           "rf_valid_rmspe": round(m["rf_valid_rmspe"], 4),
                           "nn_vs_rf": round(m["valid_rmspe"] / m["rf_valid_rmspe"], 3),
                           "member_valid_rmspe": [round(m[k], 4) for k in sorted(m) if k.startswith("valid_rmspe_member_")],
                           "train_seconds": round(res["train_seconds"], 1),
                           "total_seconds": round(time.perf_counter() - t0, 1), "load_avg_1m": round(load, 2)}
                    from mlflow import MlflowClient

                    run["n_train"] = int(MlflowClient().get_run(res["run_id"]).data.params["n_train"])
                    runs.append(run)
                    print(json.dumps(run), file=sys.stderr, flush=True)
    wins = sum(r["valid_rmspe"] <= r["rf_valid_rmspe"] for r in runs)
    print(json.dumps({"benchmark": "rossmann_sizes", "overrides": overrides, "runs": runs,
                      "nn_at_least_as_good_as_rf": f"{wins}/{len(runs)}",
                      "worst_nn_vs_rf": max(r["nn_vs_rf"] for r in runs),
                      "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
