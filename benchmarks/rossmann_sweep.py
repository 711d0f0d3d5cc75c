"""Rossmann accuracy per second: train several network shapes on the real Kaggle split, same run.

Prepares the data once (features, processor, tensors), then fits each configuration with the
training engine alone (no forest checks, no MLflow), so every row of the result differs only in
the network and optimiser settings. Prints ONE JSON line: per configuration the valid RMSPE after
each epoch, fit seconds and seconds per epoch.

    python benchmarks/rossmann_sweep.py [--data ../shared/data/rossmann] [--no-external] [--trends]
        [--configs '[{"layers": [500, 250], "lr": 2e-3, "epochs": 4, "seed": 0}, ...]']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIGS = [
    {"layers": [1000, 500], "lr": 2e-3, "epochs": 4, "seed": 0},
    {"layers": [1000, 500], "lr": 4e-3, "epochs": 4, "seed": 0, "batch_size": 1024},
    {"layers": [500, 250], "lr": 2e-3, "epochs": 4, "seed": 0},
    {"layers": [500, 250], "lr": 2e-3, "epochs": 4, "seed": 1},
    {"layers": [500, 250], "lr": 3e-3, "epochs": 4, "seed": 0},
    {"layers": [500, 250], "lr": 2e-3, "epochs": 6, "seed": 0},
    {"layers": [256, 128], "lr": 2e-3, "epochs": 4, "seed": 0},
    {"layers": [256, 128], "lr": 2e-3, "epochs": 4, "seed": 1},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/rossmann"))
    parser.add_argument("--no-external", action="store_true")
    parser.add_argument("--trends", action="store_true", help="also feed the Google Trends columns")
    parser.add_argument("--configs", default=json.dumps(DEFAULT_CONFIGS), help="JSON list of overrides")
    args = parser.parse_args()

    import torch

    from modeling.training import EarlyStopping, Trainer
    from pipelines.jobs.rossmann import (
        RossmannConfig,
        build_model,
        log_rmspe,
        prepare,
        rmspe_metric,
    )

    data_dir = Path(args.data)
    base = RossmannConfig(train=str(data_dir / "train.csv"), store=str(data_dir / "store.csv"),
                          external_dir=None if args.no_external else str(data_dir / "external"),
                          trends=args.trends, quiet=True)
    t0 = time.perf_counter()
    data = prepare(base)
    out = {"benchmark": "rossmann_sweep", "external": not args.no_external, "trends": args.trends, "n_train": len(data.train),
           "prepare_seconds": time.perf_counter() - t0, "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "runs": []}
    for override in json.loads(args.configs):
        cfg = RossmannConfig(**{**base.__dict__, **{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in override.items()}})
        cfg.lr = str(cfg.lr)
        torch.manual_seed(cfg.seed)
        trainer = Trainer(build_model(cfg, data), metrics={"rmspe": rmspe_metric}, lr=float(cfg.lr), wd=cfg.wd,
                          batch_size=cfg.batch_size, seed=cfg.seed, quiet=True,
                          callbacks=[EarlyStopping(monitor="rmspe", mode="min", patience=max(2, cfg.epochs))])
        start = time.perf_counter()
        history = trainer.fit(data.train, data.valid, epochs=cfg.epochs)
        seconds = time.perf_counter() - start
        rmspe = log_rmspe(data.valid.y.numpy(), trainer.predict(data.valid.xs).numpy())
        out["runs"].append({**override, "batch_size": cfg.batch_size, "valid_rmspe": rmspe, "fit_seconds": seconds,
                            "seconds_per_epoch": seconds / cfg.epochs,
                            "rmspe_by_epoch": [round(e["rmspe"], 4) for e in history]})
        print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
