"""Rossmann quality and speed on the real Kaggle files: one full `train rossmann` run.

Prints ONE JSON line: valid RMSPE of the model (weights chosen without the validation rows: each
network at the end of its schedule, the ensemble's mean in log space, plus the recent-level
correction), the networks' figure without that correction (`valid_rmspe_networks_only`), the
best-epoch figure (selected on the validation rows, for comparison only), each member's figure and the seconds of
training behind it, the forest baseline (same features, same split, same run: their ratio),
adversarial AUC, seconds of the validation run and of the refit, seconds per epoch, peak RSS, the
load average around the run, and the compute floor measured in the same run (this machine's fp32
matmul GFLOP/s x the Linear layers' training FLOPs per epoch) with our ratio to it.

With `--cut DATE` it is the forecast check instead of the last-42-days split: train.csv is cut at
DATE (rows <= DATE are the training file; its last --valid-days are the validation set), the model
is trained with the given options (refit included by default), and the 42 days after DATE are
scored with `tabrec score` from a test.csv-style file of those days (no Sales; `--calendar` that
file when this tabrec's `score` has the option); `forecast_rmspe` is RMSPE over those days' open
rows with Sales > 0 (the Kaggle metric).

    python benchmarks/rossmann_quality.py --data ../shared/data/rossmann [--no-external] [--trends]
        [--layers 500,250] [--batch-size auto] [--epochs auto] [--lr auto] [--ensemble N]
        [--ensemble-kind snapshot|seeds] [--cycle-epochs auto] [--no-refit] [--cut 2015-06-19]
        [--set '{"forest_rows": 20000, "forest_trees": 10, "spread_trees": 0}']

`first_k_valid_rmspe` / `first_k_train_seconds` are the means of the first k members (k = 1..N) and
the training behind them: what `--ensemble k` gives with the same seed and lr (snapshot: the run up
to the k-th cycle's end; seeds: k runs), so one `--ensemble 5` run gives accuracy per second for
N = 1..5. `--set` overrides other RossmannConfig fields (e.g. smaller forest checks for runs that
study the network only: their forest figures are then not the baseline's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

FORECAST_DAYS = 42
TEST_COLUMNS = ["Id", "Store", "DayOfWeek", "Date", "Open", "Promo", "StateHoliday", "SchoolHoliday"]


def matmul_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    """Sustained fp32 GEMM rate with the current torch thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def train_flops_per_row(model: torch.nn.Module) -> float:
    """2 FLOPs per multiply-add over the Linear layers, x3 for forward + backward."""
    macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 3 * 2 * macs


def cut_files(train_csv: Path, cut: str, out: Path) -> tuple[Path, Path, object]:
    """(train file up to `cut`, test.csv-style file of the next 42 days, their actual Sales frame)."""
    import pandas as pd

    df = pd.read_csv(train_csv, dtype={"StateHoliday": str}, low_memory=False)
    dates = pd.to_datetime(df["Date"])
    end = pd.Timestamp(cut)
    if not dates.min() < end < dates.max():
        raise SystemExit(f"--cut {cut} is outside {train_csv}'s dates")
    df[dates <= end].to_csv(out / "train.csv", index=False)
    future = df[(dates > end) & (dates <= end + pd.Timedelta(days=FORECAST_DAYS))].reset_index(drop=True)
    future.insert(0, "Id", range(1, len(future) + 1))
    future[TEST_COLUMNS].to_csv(out / "test.csv", index=False)
    return out / "train.csv", out / "test.csv", future[["Id", "Open", "Sales"]]


class TreeMemory:
    """Samples, twice a second, the proportional set size (Pss: shared pages split between the
    processes that map them) of this process plus its children, e.g. the refit worker training
    beside the validation run; `peak_mb` is the largest sum seen, the memory the run needed at once."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss_kb(pid: int) -> int:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            return 0
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:")), 0)

    @staticmethod
    def _children(pid: int) -> list[int]:
        out: list[int] = []
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in task.read_text().split()]
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            pids, todo = [], [os.getpid()]
            while todo:
                pid = todo.pop()
                pids.append(pid)
                todo += self._children(pid)
            self.peak_mb = max(self.peak_mb, sum(self._pss_kb(p) for p in pids) / 1024)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def score_forecast(model_uri: str, test_csv: Path, actual: object, tmp: Path) -> dict[str, object]:
    """`tabrec score` the forecast file (with `--calendar` when supported) and its RMSPE."""
    import numpy as np
    import pandas as pd

    from modeling.metrics import rmspe

    cli = [sys.executable, "-m", "pipelines.cli", "score"]
    calendar = "--calendar" in subprocess.run([*cli, "--help"], capture_output=True, text=True,
                                              env={**os.environ, "COLUMNS": "200"}).stdout
    out = tmp / "forecast.parquet"
    cmd = [*cli, "--model", model_uri, "--input", str(test_csv), "--output", str(out), "--no-track", "--quiet",
           "--json", *(["--calendar", str(test_csv)] if calendar else [])]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    if done.returncode != 0:
        raise SystemExit(f"tabrec score failed ({done.returncode}): {done.stderr[-2000:]}")
    # `tabrec score` writes the key columns and `prediction`; `actual` has Id, Open and Sales
    pred = pd.read_parquet(out)[["Id", "prediction"]].merge(actual, on="Id", validate="one_to_one")
    keep = (pred["Open"] == 1) & (pred["Sales"] > 0)
    return {"forecast_rmspe": rmspe(pred.loc[keep, "Sales"].to_numpy(np.float64),
                                    pred.loc[keep, "prediction"].to_numpy(np.float64)),
            "forecast_rows": int(keep.sum()), "forecast_calendar": calendar,
            "score_seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/rossmann"))
    parser.add_argument("--no-external", action="store_true")
    parser.add_argument("--trends", action="store_true", help="also feed the Google Trends columns")
    parser.add_argument("--layers", default="500,250")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--epochs", default="auto")
    parser.add_argument("--steps", type=int, default=None, help="step budget of --epochs auto (default: the config's)")
    parser.add_argument("--lr", default="auto")
    parser.add_argument("--ensemble", type=int, default=None, help="members (default: the config's)")
    parser.add_argument("--ensemble-kind", default=None, help="snapshot|seeds (default: the config's)")
    parser.add_argument("--cycle-epochs", default=None)
    parser.add_argument("--no-refit", action="store_true")
    parser.add_argument("--valid-days", type=int, default=42)
    parser.add_argument("--cut", default=None, help="forecast check: cut train.csv at this date (see above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", default="{}", help="JSON overrides of other RossmannConfig fields")
    args = parser.parse_args()

    from mlflow import MlflowClient

    from modeling.predictors import load_predictor
    from pipelines.jobs.rossmann import RossmannConfig, train_rossmann

    load_before = os.getloadavg()
    data = Path(args.data)
    layers = tuple(int(x) for x in args.layers.split(",") if x)
    optional = {k: v for k, v in {"steps": args.steps, "ensemble": args.ensemble, "ensemble_kind": args.ensemble_kind,
                                  "cycle_epochs": args.cycle_epochs}.items() if v is not None}
    optional.update(json.loads(args.set))
    gflops = matmul_gflops()
    forecast: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rossmann-") as tmp_dir:
        tmp = Path(tmp_dir)
        train_csv, test_csv, actual = data / "train.csv", None, None
        if args.cut:
            train_csv, test_csv, actual = cut_files(data / "train.csv", args.cut, tmp)
        cfg = RossmannConfig(train=str(train_csv), store=str(data / "store.csv"),
                             external_dir=None if args.no_external else str(data / "external"), trends=args.trends,
                             layers=layers, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                             valid_days=args.valid_days, refit=not args.no_refit, seed=args.seed, quiet=True,
                             **optional)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        cwd = Path.cwd()
        os.chdir(tmp)
        try:
            with TreeMemory() as tree:
                res = train_rossmann(cfg)
            # the trained network and the row count come from the run itself (no second prepare)
            flops_row = train_flops_per_row(load_predictor(res["model_uri"]).model)
            n_train = int(MlflowClient().get_run(res["run_id"]).data.params["n_train"])
            if args.cut:
                forecast = score_forecast(res["model_uri"], test_csv, actual, tmp)
        finally:
            os.chdir(cwd)
    m, c = res["metrics"], res["config"]
    floor = flops_row * n_train / (gflops * 1e9)
    members = int(m["ensemble_members"])
    print(json.dumps({
        "benchmark": "rossmann_quality", "external": not args.no_external, "trends": args.trends,
        "cut": args.cut, "overrides": json.loads(args.set), "layers": list(layers), "batch_size": c["batch_size"], "epochs": c["epochs"],
        "ensemble": c["ensemble"], "ensemble_kind": c["ensemble_kind"], "cycle_epochs": c["cycle_epochs"],
        "refit": c["refit"], "lr": m["lr"],
        "valid_rmspe": m["valid_rmspe"],
        # the networks alone, before the recent-level correction (--level-days; absent when it is off)
        "valid_rmspe_networks_only": m.get("valid_rmspe_networks_only", m["valid_rmspe"]),
        "level_tau": m.get("level_tau"), "level_sigma": m.get("level_sigma"),
        "level_persistence_t": m.get("level_persistence_t"), "level_applied": m.get("level_applied"),
        "valid_rmspe_best_epoch_selected_on_valid": m["valid_rmspe_best_epoch_selected_on_valid"],
        "member_valid_rmspe": [m.get(f"valid_rmspe_member_{i}", m["valid_rmspe"]) for i in range(members)],
        "member_train_seconds": [m.get(f"train_seconds_member_{i}", m["valid_run_seconds"]) for i in range(members)],
        # the mean of the first k members (k = 1..N): `--ensemble k`'s figure, and its training seconds
        "first_k_valid_rmspe": [m.get(f"valid_rmspe_first_{k}", m["valid_rmspe"]) for k in range(1, members + 1)],
        "first_k_train_seconds": [m.get(f"train_seconds_first_{k}", m["valid_run_seconds"])
                                  for k in range(1, members + 1)],
        "rf_valid_rmspe": m["rf_valid_rmspe"], "nn_vs_rf": m["valid_rmspe"] / m["rf_valid_rmspe"],
        "rf_oob_r2": m["rf_oob_r2"], "rf_embeddings_valid_rmspe": m["rf_embeddings_valid_rmspe"],
        "adversarial_auc": m["adversarial_auc"], **forecast,
        "train_seconds": res["train_seconds"], "valid_run_seconds": m["valid_run_seconds"],
        "refit_seconds": m.get("refit_seconds", 0.0), "seconds_per_epoch": m["seconds_per_epoch"],
        "total_seconds": res["total_seconds"], "n_train_rows": n_train,
        "matmul_gflops": gflops, "train_mflop_per_row": flops_row / 1e6, "floor_seconds_per_epoch": floor,
        "epoch_vs_floor": m["seconds_per_epoch"] / floor,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # the largest child's peak: the refit worker beside the validation run (and, with --cut, `tabrec score`)
        "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "peak_pss_tree_mb": tree.peak_mb,
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
