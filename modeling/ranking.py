"""The ranking head: a dot-product model trained on implicit feedback to rank items (top-k).

A model fitted to ratings learns how much a user likes what they chose to watch, not what they
will choose; for top-k, every rated (or clicked) item is a positive and the model must put it
above the items the user did not choose. Two losses, both `modeling.training.Objective`s so the
project's Trainer fits them (one-cycle, AdamW, seeded, progress bar, DDP):

- ``softmax``: a softmax over the whole catalogue per user (a multinomial likelihood of the
  user's items). Rows are users ("baskets"); one matmul scores every item for a batch of users,
  so an epoch costs users x items x factors, whatever the number of interactions. Best on
  MovieLens 100k by a clear margin (docs/benchmarks.md), and the default.
- ``bpr``: Bayesian personalised ranking. Rows are (user, item) pairs; each positive is
  compared with `n_negatives` items drawn uniformly per row from a seeded generator.

Duplicate (user, item) interactions count once: the pairs are deduplicated before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.collab import DotProductBias, csr_from_pairs, csr_rows, top_k, top_k_for_users
from modeling.metrics import ranking_report
from modeling.training import Objective, TensorData

__all__ = ["BPR", "RANKING_LOSSES", "CatalogSoftmax", "HoldoutTopK", "RankingTask", "build_ranking_head",
           "popularity", "ranking_task", "unique_pairs"]

RANKING_LOSSES = ("softmax", "bpr")


def unique_pairs(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) with each (user, item) pair once, sorted by user then item."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if len(users) == 0:
        return users, items
    span = int(items.max()) + 1
    keys = np.unique(users * span + items)
    return keys // span, keys % span


def popularity(items: np.ndarray, n_items: int) -> np.ndarray:
    """Interactions per item code (item 0, the unknown token, gets 0): the popularity ranking."""
    counts = np.bincount(np.asarray(items, dtype=np.int64), minlength=n_items).astype(np.float32)
    counts[0] = 0.0
    return counts


def build_ranking_head(n_users: int, n_items: int, n_factors: int) -> DotProductBias:
    """The ranking network: user . item + item bias, raw scores (logits), no y_range."""
    return DotProductBias(n_users, n_items, n_factors=n_factors, y_range=None)


def _csr_gather(indptr: Tensor, indices: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(batch row of each entry, column) of the CSR rows `rows`, vectorized."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    owner = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(int(lengths.sum()), device=rows.device) - first[owner]
    return owner, indices[starts[owner] + offsets]


class CatalogSoftmax(Objective):
    """Mean over the batch's (user, item) positives of -log softmax over every known item.

    Rows are baskets: xs = (user codes,), y = basket ids, the rows of the CSR (indptr,
    indices) of positive item codes. Item 0 (the unknown token) is left out of the softmax.
    Training and validation baskets can share one CSR (different rows)."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray) -> None:
        self.indptr = torch.as_tensor(np.asarray(indptr, dtype=np.int64))
        self.indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))

    def start(self, seed: int, device: torch.device) -> None:
        super().start(seed, device)
        self.indptr, self.indices = self.indptr.to(device), self.indices.to(device)

    def __call__(self, model: nn.Module, xs: tuple[Tensor, ...], y: Tensor) -> Tensor:
        logits = model(xs[0]).float()[:, 1:]
        owner, cols = _csr_gather(self.indptr, self.indices, y)
        # sum over positives of -log softmax = sum_rows n_row * logsumexp(row) - sum of positive logits
        n_pos = (self.indptr[y + 1] - self.indptr[y]).to(logits.dtype)
        total = (n_pos * torch.logsumexp(logits, dim=1)).sum() - logits[owner, cols - 1].sum()
        return total / max(len(cols), 1)


class BPR(Objective):
    """Bayesian personalised ranking: -log sigmoid(score(u, pos) - score(u, neg)), averaged,
    with `n_negatives` items per row drawn uniformly from the known items (seeded).

    Rows are pairs: xs = (user codes, positive item codes); y is not used."""

    def __init__(self, n_items: int, n_negatives: int = 1) -> None:
        if n_items < 2:
            raise ValueError(f"BPR needs at least one known item, got n_items={n_items}")
        if n_negatives < 1:
            raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
        self.n_items, self.n_negatives = int(n_items), int(n_negatives)

    def __call__(self, model: nn.Module, xs: tuple[Tensor, ...], y: Tensor) -> Tensor:
        users, pos = xs
        neg = torch.randint(1, self.n_items, (len(users), self.n_negatives), generator=self.generator,
                            device=users.device)
        scores = model(users, torch.cat([pos.unsqueeze(1), neg], dim=1)).float()
        return -F.logsigmoid(scores[:, :1] - scores[:, 1:]).mean()


@dataclass
class RankingTask:
    """What the Trainer fits a ranking head on: the objective and its train (valid) rows."""

    objective: Objective
    train: TensorData
    valid: TensorData | None


def ranking_task(loss: str, train_users: np.ndarray, train_items: np.ndarray, n_users: int, n_items: int,
                 valid_users: np.ndarray | None = None, valid_items: np.ndarray | None = None,
                 n_negatives: int = 1) -> RankingTask:
    """The rows and objective of `loss` over deduplicated (user, item) pairs (codes > 0 only;
    validation pairs of unknown users or items are left out)."""
    if loss not in RANKING_LOSSES:
        raise ValueError(f"ranking loss must be one of {RANKING_LOSSES}, got {loss!r}")
    tu, ti = _known_pairs(train_users, train_items)
    if len(tu) == 0:
        raise ValueError("no (user, item) interactions to train a ranking head on")
    if valid_users is not None and valid_items is not None:
        vu, vi = _known_pairs(valid_users, valid_items)
    else:
        vu = vi = np.empty(0, dtype=np.int64)
    if loss == "bpr":
        def pairs(u: np.ndarray, i: np.ndarray) -> TensorData:
            return TensorData((torch.from_numpy(u), torch.from_numpy(i)), torch.zeros(len(u)))

        return RankingTask(BPR(n_items, n_negatives), pairs(tu, ti), pairs(vu, vi) if len(vu) else None)
    # softmax: one basket per user; validation baskets follow the training ones in one CSR
    t_users, v_users = np.unique(tu), np.unique(vu)
    rows = np.concatenate([np.searchsorted(t_users, tu), len(t_users) + np.searchsorted(v_users, vu)])
    indptr, indices = csr_from_pairs(rows, np.concatenate([ti, vi]), len(t_users) + len(v_users))
    train = TensorData((torch.from_numpy(t_users),), torch.arange(len(t_users)))
    valid = TensorData((torch.from_numpy(v_users),), torch.arange(len(t_users), len(t_users) + len(v_users))) \
        if len(v_users) else None
    return RankingTask(CatalogSoftmax(indptr, indices), train, valid)


def _known_pairs(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    keep = (users > 0) & (items > 0)
    return unique_pairs(users[keep], items[keep])


@dataclass
class HoldoutTopK:
    """Top-k evaluation under the common protocol for implicit feedback (Microsoft Recommenders'
    ML-100k table): every held-out item of a user is relevant whatever its rating, the user's
    training items are excluded from the ranking, users unknown in training are left out.

    `seen` is a CSR by user code; `relevant` has one row per evaluated user. A held-out item
    unknown in training still counts as relevant (recall and NDCG see it) but can never be hit."""

    users: np.ndarray
    seen: tuple[np.ndarray, np.ndarray]
    relevant: tuple[np.ndarray, np.ndarray]
    n_items: int  # item codes, 0 (unknown) included

    @classmethod
    def build(cls, train_users: np.ndarray, train_items: np.ndarray, valid_users: np.ndarray,
              valid_items: np.ndarray, n_users: int, n_items: int, max_users: int | None = None,
              seed: int = 0) -> HoldoutTopK:
        """The evaluation of the held-out (valid) pairs; at most `max_users` users, a seeded sample."""
        vu = np.asarray(valid_users, dtype=np.int64)
        vi = np.asarray(valid_items, dtype=np.int64).copy()
        keep = vu > 0
        users = np.unique(vu[keep])
        if max_users is not None and len(users) > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
        unknown = vi == 0
        vi[unknown] = n_items + np.arange(int(unknown.sum()))
        rel = csr_from_pairs(vu[keep], vi[keep], n_users)
        seen = csr_from_pairs(*unique_pairs(train_users, train_items), n_users)
        return cls(users, seen, csr_rows(rel[0], rel[1], users), n_items)

    def report(self, model: nn.Module, k: int = 10, prefix: str = "") -> dict[str, float]:
        """precision, recall, NDCG, MAP and coverage at k of `model`'s top-k (scores of every item)."""
        if len(self.users) == 0:
            return {}
        rec, _ = top_k_for_users(model, self.users, k, self.seen)
        return ranking_report(rec, self.relevant, k, self.n_items - 1, prefix)

    def report_scores(self, item_scores: np.ndarray, k: int = 10, prefix: str = "",
                      chunk: int = 2048) -> dict[str, float]:
        """The same for one ranking shared by every user (e.g. `popularity`), seen items excluded."""
        if len(self.users) == 0:
            return {}
        scores = np.asarray(item_scores, dtype=np.float32)
        rec = np.empty((len(self.users), k), dtype=np.int64)
        for start in range(0, len(self.users), chunk):
            part = self.users[start : start + chunk]
            ptr, ind = csr_rows(self.seen[0], self.seen[1], part)
            rec[start : start + len(part)] = top_k(np.broadcast_to(scores, (len(part), len(scores))), k, ptr, ind)[0]
        return ranking_report(rec, self.relevant, k, self.n_items - 1, prefix)
