"""Training throughput of the engine vs a plain hand-written PyTorch loop; prints one JSON line.

Usage: python benchmarks/train_throughput.py [--repeats 3] [--tab-rows 200000] [--ratings 500000]

For each (model, batch size) it times one epoch with `Trainer.fit` and one with a minimal
hand-written loop over the same tensors and batch sizes, with default AdamW ("plain", the
reference) and with the fused AdamW the engine picks ("plain_fused": isolates the engine's own
per-batch overhead), rotating which goes first, and reports medians over the repeats. Progress goes to stderr; stdout carries only the JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.collab import DotProductBias  # noqa: E402
from modeling.embeddings import emb_sz_rule  # noqa: E402
from modeling.tabular import TabularModel  # noqa: E402
from modeling.training import TensorData, Trainer  # noqa: E402

# Rossmann-like: 20 categorical columns (Store, DayOfWeek, Year, Month, Day, Week, StateHoliday,
# ..., event counters) and 15 continuous ones.
ROSSMANN_CARDS = [1116, 8, 4, 13, 32, 53, 3, 4, 4, 25, 5, 13, 26, 27, 9, 22, 7, 7, 9, 9]
N_CONT = 15
LR, WD, BETAS, EPS = 1e-3, 0.01, (0.9, 0.99), 1e-5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` fp32 square matmul rate: a ceiling for dense layers on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def linear_flops_per_row(model: nn.Module) -> int:
    """Forward + backward multiply-adds of every nn.Linear, as flops per row (2 fwd + 4 bwd)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(6 * m.in_features * m.out_features for m in linears)


def tabular_case(rows: int, seed: int = 0) -> tuple[nn.Module, TensorData]:
    g = torch.Generator().manual_seed(seed)
    x_cat = torch.stack([torch.randint(0, c, (rows,), generator=g) for c in ROSSMANN_CARDS], 1)
    x_cont = torch.randn(rows, N_CONT, generator=g)
    y = (8.5 + 0.3 * x_cont[:, 0] + 0.1 * torch.randn(rows, generator=g)).float()
    torch.manual_seed(seed)
    model = TabularModel(
        [(c, emb_sz_rule(c)) for c in ROSSMANN_CARDS],
        N_CONT,
        layers=(1000, 500),
        ps=(0.001, 0.01),
        embed_p=0.04,
        y_range=(0.0, 12.0),
    )
    return model, TensorData((x_cat, x_cont), y)


def ratings_case(rows: int, seed: int = 0) -> tuple[nn.Module, TensorData]:
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, 1000, (rows,), generator=g)
    items = torch.randint(0, 2000, (rows,), generator=g)
    y = torch.randint(1, 6, (rows,), generator=g).float()
    torch.manual_seed(seed)
    model = DotProductBias(1000, 2000, n_factors=50, y_range=(0.0, 5.5))
    return model, TensorData((users, items), y)


def engine_epoch(model: nn.Module, data: TensorData, batch_size: int, seed: int) -> float:
    t0 = time.perf_counter()
    Trainer(
        model, lr=LR, wd=WD, betas=BETAS, batch_size=batch_size, device="cpu", seed=seed, quiet=True
    ).fit(data, epochs=1)
    return time.perf_counter() - t0


def plain_epoch(
    model: nn.Module, data: TensorData, batch_size: int, seed: int, fused: bool | None = None
) -> float:
    """The loop a person would write by hand: AdamW, shuffled index slices, mse, step."""
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=fused
    )
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    model.train()
    xs, y = data.xs, data.y
    for idx in perm.split(batch_size):
        loss = F.mse_loss(model(*(x[idx] for x in xs)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def plain_fused_epoch(model: nn.Module, data: TensorData, batch_size: int, seed: int) -> float:
    """The same hand-written loop with the fused AdamW kernel the engine uses."""
    return plain_epoch(model, data, batch_size, seed, fused=True)


RUNNERS: dict[str, Callable[..., float]] = {
    "engine": engine_epoch,
    "plain": plain_epoch,
    "plain_fused": plain_fused_epoch,
}


def compare(
    name: str, model: nn.Module, data: TensorData, batch_size: int, repeats: int
) -> dict[str, object]:
    """Median epoch seconds per runner; the run order rotates each round, all start from the same
    weights. Paired ratios compare runs of the same round (similar machine load); process CPU seconds
    are less sensitive than wall time to other processes sharing the cores."""
    warm = data.subset(slice(0, 16 * batch_size))
    for run in RUNNERS.values():  # warm-up on 16 batches: allocator, thread pool, lazy init
        run(copy.deepcopy(model), warm, batch_size, 0)
    kinds = list(RUNNERS)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats):
        for kind in kinds[r % 3 :] + kinds[: r % 3]:
            fresh = copy.deepcopy(model)
            c0 = time.process_time()
            times[kind].append(RUNNERS[kind](fresh, data, batch_size, r))
            cpu[kind].append(time.process_time() - c0)
        log(
            f"{name} bs={batch_size} round {r + 1}/{repeats}: "
            + " ".join(f"{k} {times[k][-1]:.2f}s" for k in kinds)
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [e / p for e, p in zip(times["engine"], times["plain"], strict=True)]
    paired_fused = [e / p for e, p in zip(times["engine"], times["plain_fused"], strict=True)]
    return {
        "model": name,
        "batch_size": batch_size,
        "rows": len(data),
        "engine_s": round(med["engine"], 3),
        "plain_s": round(med["plain"], 3),
        "plain_fused_s": round(med["plain_fused"], 3),
        "ratio": round(med["engine"] / med["plain"], 3),
        "ratio_paired_median": round(statistics.median(paired), 3),
        "ratio_vs_plain_fused": round(med["engine"] / med["plain_fused"], 3),
        "ratio_vs_plain_fused_paired_median": round(statistics.median(paired_fused), 3),
        "cpu_ratio": round(statistics.median(cpu["engine"]) / statistics.median(cpu["plain"]), 3),
        "engine_rows_per_s": round(len(data) / med["engine"]),
        "plain_rows_per_s": round(len(data) / med["plain"]),
        "runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "cpu_runs_s": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tab-rows", type=int, default=200_000)
    parser.add_argument("--ratings", type=int, default=500_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()

    load_before = os.getloadavg()
    gflops = matmul_gflops()
    log(f"fp32 matmul: {gflops:.1f} GFLOP/s, torch threads {torch.get_num_threads()}")
    results = []
    tab_model, tab_data = tabular_case(args.tab_rows)
    floor = linear_flops_per_row(tab_model) * args.tab_rows / (gflops * 1e9)
    for bs in args.batch_sizes:
        res = compare("TabularModel", tab_model, tab_data, bs, args.repeats)
        res["matmul_floor_s"] = round(floor, 3)
        results.append(res)
    del tab_model, tab_data
    dot_model, dot_data = ratings_case(args.ratings)
    for bs in args.batch_sizes:
        results.append(compare("DotProductBias", dot_model, dot_data, bs, max(args.repeats, 5)))

    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "nproc": os.cpu_count(),
                "matmul_gflops_fp32": round(gflops, 1),
                "tabular_linear_gflop_per_epoch": round(
                    linear_flops_per_row(tabular_case(1)[0]) * args.tab_rows / 1e9, 1
                ),
                "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
