"""Ratings quality and speed: the full `train ratings` pipeline on a fixed split, per model.

Prints ONE JSON line: for each model (dot, nn) valid RMSE/MAE, ranking metrics, the bias
baseline of the same run (and our ratio to it), train seconds and peak RSS (each model runs
in its own subprocess so peaks don't mix). With --scale, also a synthetic 10M-rating run
(100k users x 20k items): seconds per epoch and peak RSS. With --new-users, also a split of
ML-100k where most validation rows belong to users unseen in training (a seeded 20% of the users
held out whole, plus 5% of the other users' rows): RMSE on the unknown users' rows against the
bias baseline's and the global mean's on the same rows, per model.

The ranking metrics follow the held-out protocol (every valid item relevant, training items
excluded; `modeling.ranking.HoldoutTopK`), from the ranking head the defaults train beside the
rating model; `pop_*` is the popularity ranking of the same run.

    python benchmarks/ratings_quality.py --data ../shared/data/ml-100k [--scale] [--new-users]
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
                            lr="1e-2", ranking_epochs=args.scale_epochs, quiet=True)
        res = train_ratings(cfg)
        head_s = res["metrics"]["ranking_train_seconds"]
        out = {"generate_seconds": gen_s, "train_seconds": res["train_seconds"],
               "seconds_per_epoch": (res["train_seconds"] - head_s) / args.scale_epochs,
               "ranking_seconds_per_epoch": head_s / args.scale_epochs,
               "total_seconds": res["total_seconds"], "valid_rmse": res["metrics"]["valid_rmse"],
               "baseline_rmse": res["metrics"]["baseline_rmse"]}
    elif args.child.startswith("new-users-"):
        train, valid = _new_user_split(Path(args.data) / "u.data", Path(args.workdir), args.seed)
        cfg = RatingsConfig(ratings=str(train), valid=str(valid), model=args.child.rsplit("-", 1)[1], quiet=True,
                            seed=args.seed)
        m = train_ratings(cfg)["metrics"]
        out = {k: m[k] for k in ("valid_rmse", "baseline_rmse", "global_mean_rmse", "valid_rows_unknown_user",
                                 "valid_rows_known_user", "valid_rmse_unknown_user", "baseline_rmse_unknown_user",
                                 "valid_rmse_known_user", "baseline_rmse_known_user", "rf_valid_rmse")}
        unknown = _unknown_user_mean_rmse(train, valid)
        out["global_mean_rmse_unknown_user"] = unknown
    else:
        data = Path(args.data)
        cfg = RatingsConfig(ratings=str(data / "train.tsv"), valid=str(data / "valid.tsv"),
                            items=str(data / "movies.csv"), model=args.child, quiet=True, seed=args.seed)
        res = train_ratings(cfg)
        m = res["metrics"]
        out = {k: m[k] for k in ("valid_rmse", "valid_mae", "baseline_rmse", "global_mean_rmse",
                                 "precision_at_10", "recall_at_10", "ndcg_at_10", "coverage_at_10",
                                 "pop_precision_at_10", "rating_model_precision_at_10",
                                 "adversarial_auc", "rf_valid_rmse")}
        out.update(train_seconds=res["train_seconds"], total_seconds=res["total_seconds"],
                   ranking_train_seconds=m.get("ranking_train_seconds"),
                   rmse_vs_baseline=m["valid_rmse"] / m["baseline_rmse"])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def _new_user_split(data: Path, workdir: Path, seed: int) -> tuple[Path, Path]:
    """ML-100k with a seeded 20% of the users held out whole, plus 5% of the others' rows."""
    import numpy as np
    import pandas as pd

    df = pd.read_csv(data, sep="\t", names=["user", "item", "rating", "timestamp"])
    rng = np.random.default_rng(seed)
    users = df["user"].unique()
    new = rng.choice(users, size=len(users) // 5, replace=False)
    valid = df["user"].isin(new).to_numpy() | (rng.random(len(df)) < 0.05)
    paths = workdir / "nu_train.csv", workdir / "nu_valid.csv"
    df[~valid].to_csv(paths[0], index=False)
    df[valid].to_csv(paths[1], index=False)
    return paths


def _unknown_user_mean_rmse(train: Path, valid: Path) -> float:
    """RMSE of the training mean rating on the validation rows of users unseen in training."""
    import numpy as np
    import pandas as pd

    tr, va = pd.read_csv(train), pd.read_csv(valid)
    rows = va[~va["user"].isin(tr["user"])]
    return float(np.sqrt(np.mean((rows["rating"] - tr["rating"].mean()) ** 2)))


def _run_child(kind: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        cmd = [sys.executable, __file__, "--child", kind, "--workdir", tmp, "--data", args.data,
               "--scale-epochs", str(args.scale_epochs), "--seed", str(args.seed)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/ml-100k"))
    parser.add_argument("--scale", action="store_true", help="also run the 10M-rating scale check")
    parser.add_argument("--scale-epochs", type=int, default=1)
    parser.add_argument("--new-users", action="store_true", help="also the split of mostly new users")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["dot", "nn", "scale", "new-users-dot", "new-users-nn"])
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    import torch

    out = {"benchmark": "ratings_quality", "data": args.data, "seed": args.seed, "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0]}
    for kind in ("dot", "nn"):
        out[kind] = _run_child(kind, args)
    if args.new_users:
        for kind in ("dot", "nn"):
            out[f"new_users_{kind}"] = _run_child(f"new-users-{kind}", args)
    if args.scale:
        out["scale_10m"] = _run_child("scale", args)
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
