"""Top-k quality of tabrec's ranking head against popularity and the `implicit` library, in one run.

Protocol (Microsoft Recommenders' ML-100k table): a per-user stratified random split 75/25
(`--split user-stratified`, seeded; or `--split time`, a global time cut-off), every held-out
item relevant whatever its rating, training items excluded, k = 10; precision, recall, NDCG,
MAP at 10 and catalogue coverage over the validation users known in training.

Each model runs in its own subprocess (peak RSS does not mix): `tabrec` is the full
`train ratings` pipeline with its defaults (rating model + ranking head, forest checks, MLflow)
on the split's files, its metrics as the job reports them (the popularity ranking's beside
them); `implicit` fits ALS (64 factors, 15 iterations, reg 0.05) and BPR (64 factors, 200
iterations, lr 0.01) on the same training pairs, scored by the same evaluation code.
`implicit` is the benchmark-only extra (`pip install tabrec[bench]`); without it those rows
say so. With `--scale`, the 10M synthetic ratings check with the head on (100k users x 20k
items, 1 epoch each; the head's inner fit and search, then its refit): seconds per epoch and peak RSS. With `--batch N`, top-10 for N synthetic
users from a bundle with the head and one without (`recommend_file`, same run).

    python benchmarks/ranking_quality.py --data ../shared/data/ml-100k/u.data [--seed 0]
        [--split user-stratified|time] [--subsample 0.5] [--models dot nn] [--scale] [--batch 100000]

Prints ONE JSON line.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
K = 10


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (its threads included): on a machine shared
    with other jobs, a steadier measure of the work than wall seconds."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _tracking(workdir: Path) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.chdir(workdir)


# ---------------------------------------------------------------- children
def child_tabrec(args: argparse.Namespace, model: str) -> dict:
    _tracking(Path(args.workdir))
    from pipelines.jobs.ratings import RatingsConfig, train_ratings

    cfg = RatingsConfig(ratings=str(Path(args.workdir) / "train.csv"), valid=str(Path(args.workdir) / "valid.csv"),
                        model=model, seed=args.seed, quiet=True)
    res = train_ratings(cfg)
    m = res["metrics"]
    keys = [f"{p}{k}_at_{K}" for p in ("", "pop_", "rating_model_")
            for k in ("precision", "recall", "ndcg", "map", "coverage")]
    out = {k: m[k] for k in keys if k in m}
    out.update(train_seconds=res["train_seconds"], ranking_train_seconds=m.get("ranking_train_seconds"),
               rating_train_seconds=res["train_seconds"] - m.get("ranking_train_seconds", 0.0),
               total_seconds=res["total_seconds"], valid_rmse=m.get("valid_rmse"),
               baseline_rmse=m.get("baseline_rmse"), eval_users=m["ranking_eval_users"],
               **{k: m[k] for k in ("ranking_epochs_chosen", "ranking_prior_beta", "ranking_head_weight",
                                    "ranking_inner_seconds", "ranking_refit_seconds") if k in m})
    return out


def _encoded(workdir: Path) -> tuple:
    import numpy as np
    import pandas as pd

    tr = pd.read_csv(workdir / "train.csv", dtype={"user": str, "item": str})
    va = pd.read_csv(workdir / "valid.csv", dtype={"user": str, "item": str})
    users, items = pd.Index(tr["user"].unique()), pd.Index(tr["item"].unique())
    codes = [(users.get_indexer(df["user"]) + 1, items.get_indexer(df["item"]) + 1) for df in (tr, va)]
    (tu, ti), (vu, vi) = [(u.astype(np.int64), i.astype(np.int64)) for u, i in codes]
    return tu, ti, vu, vi, len(users) + 1, len(items) + 1


def child_implicit(args: argparse.Namespace, kind: str) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import torch

    from modeling.collab import DotProductBias
    from modeling.ranking import HoldoutTopK, popularity, unique_pairs

    tu, ti, vu, vi, n_users, n_items = _encoded(Path(args.workdir))
    holdout = HoldoutTopK.build(tu, ti, vu, vi, n_users, n_items)
    if kind == "popularity":
        t0 = time.perf_counter()
        scores = popularity(unique_pairs(tu, ti)[1], n_items)
        return {**holdout.report_scores(scores, K), "fit_seconds": time.perf_counter() - t0}
    try:
        import implicit
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking
    except ImportError:
        return {"skipped": "the `implicit` package is not installed (pip install tabrec[bench])"}
    u, i = unique_pairs(tu, ti)
    user_items = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=(n_users, n_items))
    if kind == "als":
        algo = AlternatingLeastSquares(factors=64, iterations=15, regularization=0.05, random_state=args.seed)
    else:
        algo = BayesianPersonalizedRanking(factors=64, iterations=200, learning_rate=0.01, random_state=args.seed)
    t0 = time.perf_counter()
    algo.fit(user_items, show_progress=False)
    fit_s = time.perf_counter() - t0
    uf, itf = np.asarray(algo.user_factors), np.asarray(algo.item_factors)
    scorer = DotProductBias(n_users, n_items, uf.shape[1], y_range=None)  # same top-k code as the head
    with torch.no_grad():
        scorer.user_emb.weight.copy_(torch.from_numpy(uf))
        scorer.item_emb.weight.copy_(torch.from_numpy(itf))
    return {**holdout.report(scorer.eval(), K), "fit_seconds": fit_s, "implicit": implicit.__version__}


def child_scale(args: argparse.Namespace) -> dict:
    _tracking(Path(args.workdir))
    from pipelines.jobs.ratings import RatingsConfig, train_ratings
    from pipelines.synth import write_ratings

    t0 = time.perf_counter()
    files = write_ratings(Path(args.workdir) / "big", users=100_000, items=20_000, ratings=10_000_000, seed=0)
    gen_s = time.perf_counter() - t0
    cfg = RatingsConfig(ratings=str(files["u.data"]), epochs=1, batch_size=8192, lr="1e-2", ranking_epochs=1,
                        quiet=True)
    res = train_ratings(cfg)
    m = res["metrics"]
    head_s = m["ranking_train_seconds"]
    # the head trains twice: the inner fit (1 epoch on ~90% of the pairs, plus the prior search)
    # and the refit on every pair (1 epoch)
    return {"generate_seconds": gen_s, "rating_seconds_per_epoch": res["train_seconds"] - head_s,
            "ranking_seconds": head_s, "ranking_inner_seconds": m["ranking_inner_seconds"],
            "ranking_refit_seconds_per_epoch": m["ranking_refit_seconds"], "total_seconds": res["total_seconds"],
            "valid_rmse": m["valid_rmse"], "baseline_rmse": m["baseline_rmse"],
            **{k: m[k] for k in (f"precision_at_{K}", f"pop_precision_at_{K}", "ranking_eval_users")}}


def child_batch(args: argparse.Namespace, ranking: bool) -> dict:
    _tracking(Path(args.workdir))
    from pipelines.batch import recommend_file
    from pipelines.jobs.ratings import RatingsConfig, train_ratings
    from pipelines.synth import write_ratings

    files = write_ratings(Path(args.workdir) / "users", users=args.batch, items=1682, ratings=args.batch * 12,
                          seed=args.seed)
    res = train_ratings(RatingsConfig(ratings=str(files["u.data"]), epochs=1, ranking=ranking, ranking_epochs=1,
                                      quiet=True))
    t0 = time.perf_counter()
    rec = recommend_file(res["model_uri"], Path(args.workdir) / "top10.parquet", k=K, quiet=True, track=False)
    return {"users": rec["users"], "seconds": time.perf_counter() - t0, "rows_out": rec["rows_out"]}


# ---------------------------------------------------------------- parent
def _run_child(kind: str, args: argparse.Namespace, workdir: Path, python: str) -> dict:
    cmd = [python, __file__, "--child", kind, "--workdir", str(workdir), "--seed", str(args.seed),
           "--batch", str(args.batch)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _write_split(args: argparse.Namespace, workdir: Path) -> dict:
    from pipelines.ingest.ratings import read_ratings
    from pipelines.jobs.ratings_eval import split_ratings

    df = read_ratings(args.data)
    if args.subsample < 1.0:
        df = df.sample(frac=args.subsample, random_state=args.seed).sort_index()
    train, valid = split_ratings(df.reset_index(drop=True), 0.25, args.split, args.seed)
    train.to_csv(workdir / "train.csv", index=False)
    valid.to_csv(workdir / "valid.csv", index=False)
    return {"train_rows": len(train), "valid_rows": len(valid), "users": int(df["user"].nunique()),
            "items": int(df["item"].nunique())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/ml-100k/u.data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="user-stratified", choices=["user-stratified", "time", "random"])
    parser.add_argument("--subsample", type=float, default=1.0, help="keep this fraction of the rows first")
    parser.add_argument("--models", nargs="+", default=["dot"], choices=["dot", "nn"])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the `implicit` children (a venv with tabrec[bench])")
    parser.add_argument("--scale", action="store_true", help="also the 10M-rating scale check")
    parser.add_argument("--batch", type=int, default=0, help="also top-10 for this many users, head on/off")
    parser.add_argument("--child")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        kind = args.child
        if kind.startswith("tabrec-"):
            out = child_tabrec(args, kind.split("-", 1)[1])
        elif kind == "scale":
            out = child_scale(args)
        elif kind.startswith("batch-"):
            out = child_batch(args, kind == "batch-head")
        else:
            out = child_implicit(args, kind)
        out["peak_rss_mb"] = _rss_mb()
        out["process_cpu_seconds"] = _cpu_seconds()
        print(json.dumps(out))
        return
    import torch

    out: dict = {"benchmark": "ranking_quality", "data": args.data, "split": args.split, "seed": args.seed,
                 "subsample": args.subsample, "k": K, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "load_avg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-ranking-") as tmp:
        work = Path(tmp)
        out["sizes"] = _write_split(args, work)
        for model in args.models:
            out[f"tabrec_{model}"] = _run_child(f"tabrec-{model}", args, work, sys.executable)
        out["popularity"] = _run_child("popularity", args, work, sys.executable)
        out["implicit_als"] = _run_child("als", args, work, args.python)
        out["implicit_bpr"] = _run_child("bpr", args, work, args.python)
        head = out[f"tabrec_{args.models[0]}"]
        for name in ("popularity", "implicit_als", "implicit_bpr"):
            base = out[name].get(f"precision_at_{K}")
            if base:
                out[f"precision_ratio_vs_{name}"] = head[f"precision_at_{K}"] / base
        if args.scale:
            out["scale_10m"] = _run_child("scale", args, work, sys.executable)
        if args.batch:
            head_b = _run_child("batch-head", args, work, sys.executable)
            plain = _run_child("batch-plain", args, work, sys.executable)
            out["batch_top10"] = {"with_head": head_b, "rating_model_only": plain,
                                  "ratio": head_b["seconds"] / plain["seconds"]}
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
