"""Rossmann quality and speed on the real Kaggle files: one full `train rossmann` run.

Prints ONE JSON line: valid RMSPE of the NN and of the forest baseline (same features, same
split, same run: their ratio), adversarial AUC, seconds per epoch, peak RSS, and the compute
floor measured in the same run: this machine's fp32 matmul GFLOP/s times the model's training
FLOPs per epoch (forward + backward ~ 3x the forward multiply-adds x 2), with our ratio to it.

    python benchmarks/rossmann_quality.py --data ../shared/data/rossmann [--no-external] [--trends]
        [--layers 500,250] [--batch-size 512] [--epochs 4] [--lr auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/rossmann"))
    parser.add_argument("--no-external", action="store_true")
    parser.add_argument("--trends", action="store_true", help="also feed the Google Trends columns")
    parser.add_argument("--layers", default="500,250")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from mlflow import MlflowClient

    from modeling.predictors import load_predictor
    from pipelines.jobs.rossmann import RossmannConfig, train_rossmann

    data = Path(args.data)
    layers = tuple(int(x) for x in args.layers.split(",") if x)
    cfg = RossmannConfig(train=str(data / "train.csv"), store=str(data / "store.csv"),
                         external_dir=None if args.no_external else str(data / "external"), trends=args.trends,
                         layers=layers, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                         seed=args.seed, quiet=True)
    gflops = matmul_gflops()
    with tempfile.TemporaryDirectory(prefix="bench-rossmann-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        cwd = Path.cwd()
        os.chdir(tmp)
        try:
            res = train_rossmann(cfg)
            # the trained network and the row count come from the run itself (no second prepare)
            flops_row = train_flops_per_row(load_predictor(res["model_uri"]).model)
            n_train = int(MlflowClient().get_run(res["run_id"]).data.params["n_train"])
        finally:
            os.chdir(cwd)
    m = res["metrics"]
    floor = flops_row * n_train / (gflops * 1e9)
    print(json.dumps({
        "benchmark": "rossmann_quality", "external": not args.no_external, "trends": args.trends,
        "layers": list(layers),
        "batch_size": args.batch_size, "epochs": args.epochs, "lr": m["lr"],
        "valid_rmspe": m["valid_rmspe"], "rf_valid_rmspe": m["rf_valid_rmspe"],
        "nn_vs_rf": m["valid_rmspe"] / m["rf_valid_rmspe"], "rf_oob_r2": m["rf_oob_r2"],
        "rf_embeddings_valid_rmspe": m["rf_embeddings_valid_rmspe"], "adversarial_auc": m["adversarial_auc"],
        "train_seconds": res["train_seconds"], "seconds_per_epoch": m["seconds_per_epoch"],
        "total_seconds": res["total_seconds"], "n_train_rows": n_train,
        "matmul_gflops": gflops, "train_mflop_per_row": flops_row / 1e6, "floor_seconds_per_epoch": floor,
        "epoch_vs_floor": m["seconds_per_epoch"] / floor,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
