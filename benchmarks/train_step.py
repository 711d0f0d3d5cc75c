"""Seconds per training step of the default Rossmann network: before (nn.Dropout, float32) against
SparseDropout in float32 and in bf16 autocast; prints one JSON line.

`composed_fp32` is SparseDropout as it was written before its autograd function (a multiply and an
in-place fill through autograd, whose backward clones each dropped layer's gradient): the same
numbers at a higher cost, kept as the reference for that change.

Usage: python benchmarks/train_step.py [--batch-sizes 512 1024] [--rounds 5] [--steps 20]

Each variant is its own model and fused AdamW over the same random batch (the step cost does not
depend on the values); the variants take turns within each round (in reverse order every other
round), and each figure is the median over the rounds of the mean step time, so a noisy machine
shifts every variant alike. The shapes are
kept from an earlier feature set of the real data: 22 categorical columns (Store 1116 codes ... ;
216 embedding columns), 18 continuous ones, hidden layers 500 and 250, the default dropouts. Today's
default run with external tables has 28 categorical inputs (411 embedding columns) and 17
continuous ones, so its first layer is about twice as wide and its step about 1.4x these (35 ms at
one thread on the 2-core AMD VM where this network takes 24-26 ms). `epoch_seconds_804k` scales a
step to the real data's 804,056 training rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.dropout import SparseDropout, dropped_positions  # noqa: E402
from modeling.tabular import TabularModel  # noqa: E402
from modeling.training.optim import make_optimizer  # noqa: E402

CARDS = [1116, 8, 4, 13, 32, 3, 26, 27, 5, 4, 4, 25, 13, 53, 23, 8, 8, 3, 3, 9, 9, 4]
N_CONT, LAYERS, ROWS = 18, (500, 250), 804_056


class ComposedDropout(SparseDropout):
    """SparseDropout's layer as plain autograd ops (before `modeling.dropout._SparseDrop`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        out = x * (1.0 / (1.0 - self.p))
        pos = dropped_positions(out.numel(), self.p, out.device)
        if pos.numel():
            out.view(-1).index_fill_(0, pos, 0.0)
        return out


def build(sparse: bool, composed: bool = False) -> TabularModel:
    model = TabularModel([(c, min(50, (c + 1) // 2)) for c in CARDS], N_CONT, layers=LAYERS, y_range=(0.0, 12.0))
    if not sparse or composed:  # nn.Dropout draws one random number per unit; composed: see the doc
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, SparseDropout):
                    setattr(module, name, ComposedDropout(child.p) if sparse else nn.Dropout(child.p))
    return model.train()


def step(model: TabularModel, opt: torch.optim.Optimizer, bf16: bool, batch: tuple[torch.Tensor, ...]) -> None:
    x_cat, x_cont, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pred = model(x_cat, x_cont)
    loss = ((pred.float() - y) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    out: dict = {"benchmark": "train_step", "torch_threads": torch.get_num_threads(), "load_avg_before": os.getloadavg()}
    for bs in args.batch_sizes:
        x_cat = torch.stack([torch.randint(0, c, (bs,)) for c in CARDS], 1)
        batch = (x_cat, torch.randn(bs, N_CONT), torch.rand(bs) * 10)
        variants = {"dense_fp32": (False, False, False), "composed_fp32": (True, True, False),
                    "sparse_fp32": (True, False, False), "sparse_bf16": (True, False, True)}
        runs = {}
        for name, (sparse, composed, bf16) in variants.items():
            model = build(sparse, composed)
            runs[name] = (model, make_optimizer(model, lr=1e-3), bf16)

        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):  # the order alternates, so a drifting machine favours no variant
            for name, run in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
                for _ in range(3):
                    step(*run, batch)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(*run, batch)
                times[name].append((time.perf_counter() - t0) / args.steps)
        med = {name: statistics.median(v) for name, v in times.items()}
        out[f"bs{bs}"] = {name: {"ms_per_step": round(1e3 * s, 3), "epoch_seconds_804k": round(s * ROWS / bs, 2),
                                 "vs_dense_fp32": round(s / med["dense_fp32"], 3)} for name, s in med.items()}
        print(f"batch {bs}: {out[f'bs{bs}']}", file=sys.stderr)
    out["load_avg_after"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
