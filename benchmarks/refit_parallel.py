"""Validation run + refit: one after the other with all torch threads, against side by side (the
refit in a worker process, half of the threads each); prints one JSON line.

Usage: python benchmarks/refit_parallel.py [--rows 200000] [--epochs 2] [--rounds 2]

Synthetic data of `benchmarks/train_step.py`'s shapes (22 categorical columns and 18 continuous
ones, from an earlier feature set of the real data; today's real network is about twice as wide in
its first layer: see that script's doc), the default network and batch (layers 500 and 250, batch
512) and the default precision for this machine. The
validation run trains on the first 95% of the rows and validates on the rest each epoch; the
refit trains on all rows, as `train rossmann` does. The two ways take turns within each round and
the figure is the median over rounds of each way's wall seconds, so a noisy machine shifts both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import CARDS, N_CONT, build  # noqa: E402
from modeling.training import TensorData  # noqa: E402
from modeling.training.background import BackgroundFit, split_threads, train_members_worker  # noqa: E402
from modeling.training.ensemble import train_members  # noqa: E402
from modeling.training.trainer import resolve_precision  # noqa: E402


def data(rows: int) -> tuple[TensorData, TensorData, TensorData]:
    g = torch.Generator().manual_seed(0)
    x_cat = torch.stack([torch.randint(0, c, (rows,), generator=g) for c in CARDS], 1)
    x_cont = torch.randn(rows, N_CONT, generator=g)
    y = 8.0 + 0.3 * x_cont[:, 0] + 0.1 * (x_cat[:, 0] % 7).float() + 0.05 * torch.randn(rows, generator=g)
    cut = int(rows * 0.95)
    both = TensorData((x_cat, x_cont), y)
    return both.subset(slice(0, cut)), both.subset(slice(cut, rows)), both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    split = split_threads(threads)
    if split is None:
        sys.exit("needs two torch threads or more (unset OMP_NUM_THREADS)")
    train, valid, both = data(args.rows)
    precision = resolve_precision("auto")
    options = dict(members=1, kind="snapshot", epochs=args.epochs, cycle_epochs=1, seed=0,
                   trainer_kwargs={"lr": 3e-3, "wd": 0.2, "batch_size": 512, "quiet": True,
                                   "mixed_precision": precision == "bf16"})
    new_model = partial(build, True)  # train_step's network with SparseDropout, picklable for the worker

    def sequential() -> float:
        t0 = time.perf_counter()
        train_members(new_model, train, valid, **options)
        train_members(new_model, both, None, **options)
        return time.perf_counter() - t0

    def side_by_side() -> float:
        t0 = time.perf_counter()
        worker = BackgroundFit(train_members_worker, (new_model, both, options), threads=split[1])
        torch.set_num_threads(split[0])
        try:
            train_members(new_model, train, valid, **options)
        finally:
            torch.set_num_threads(threads)
        worker.result()
        return time.perf_counter() - t0

    out: dict = {"benchmark": "refit_parallel", "rows": args.rows, "epochs": args.epochs, "torch_threads": threads,
                 "split": list(split), "precision": precision, "load_avg_before": os.getloadavg()}
    times: dict[str, list[float]] = {"sequential": [], "side_by_side": []}
    for r in range(args.rounds):
        order = [("sequential", sequential), ("side_by_side", side_by_side)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(fn())
            print(f"round {r}: {name} {times[name][-1]:.1f} s", file=sys.stderr)
    seq, par = statistics.median(times["sequential"]), statistics.median(times["side_by_side"])
    out.update(sequential_s=round(seq, 2), side_by_side_s=round(par, 2), ratio=round(par / seq, 3),
               all_s={k: [round(t, 2) for t in v] for k, v in times.items()}, load_avg_after=os.getloadavg(),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               worker_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
