"""Ratings quality and speed: the full `train ratings` pipeline on a fixed split, per model.

Prints ONE JSON line: for each model (dot, nn) valid RMSE/MAE, ranking metrics, the bias
baseline of the same run (and our ratio to it), train seconds and peak RSS (each model runs
in its own subprocess so peaks don't mix). With --scale, also a synthetic 10M-rating run
(100k users x 20k items): seconds per epoch and peak RSS.

    python benchmarks/ratings_quality.py --data ../shared/data/ml-100k [--scale]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args: argparse.Namespace) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(args.workdir) / 'mlflow.db'}"
    os.chdir(args.workdir)
    from pipelines.jobs.ratings import RatingsConfig, train_ratings

    if args.child == "scale":
        from pipelines.synth import write_ratings

        t0 = time.perf_counter()
        files = write_ratings(Path(args.workdir) / "big", users=100_000, items=20_000, ratings=10_000_000, seed=0)
        gen_s = time.perf_counter() - t0
        cfg = RatingsConfig(ratings=str(files["u.data"]), epochs=args.scale_epochs, batch_size=8192,
                            lr="1e-2", quiet=True)
        res = train_ratings(cfg)
        out = {"generate_seconds": gen_s, "train_seconds": res["train_seconds"],
               "seconds_per_epoch": res["train_seconds"] / args.scale_epochs,
               "total_seconds": res["total_seconds"], "valid_rmse": res["metrics"]["valid_rmse"],
               "baseline_rmse": res["metrics"]["baseline_rmse"]}
    else:
        data = Path(args.data)
        cfg = RatingsConfig(ratings=str(data / "train.tsv"), valid=str(data / "valid.tsv"),
                            items=str(data / "movies.csv"), model=args.child, quiet=True)
        res = train_ratings(cfg)
        m = res["metrics"]
        out = {k: m[k] for k in ("valid_rmse", "valid_mae", "baseline_rmse", "global_mean_rmse",
                                 "precision_at_10", "recall_at_10", "ndcg_at_10", "coverage_at_10",
                                 "adversarial_auc", "rf_valid_rmse")}
        out.update(train_seconds=res["train_seconds"], total_seconds=res["total_seconds"],
                   rmse_vs_baseline=m["valid_rmse"] / m["baseline_rmse"])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def _run_child(kind: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        cmd = [sys.executable, __file__, "--child", kind, "--workdir", tmp, "--data", args.data,
               "--scale-epochs", str(args.scale_epochs)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/ml-100k"))
    parser.add_argument("--scale", action="store_true", help="also run the 10M-rating scale check")
    parser.add_argument("--scale-epochs", type=int, default=1)
    parser.add_argument("--child", choices=["dot", "nn", "scale"])
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    import torch

    out = {"benchmark": "ratings_quality", "data": args.data, "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    for kind in ("dot", "nn"):
        out[kind] = _run_child(kind, args)
    if args.scale:
        out["scale_10m"] = _run_child("scale", args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
