"""How long the ranking head trains and how much popularity it leans on, chosen on the training
pairs alone.

The head's best settings depend on the data: on MovieLens users choose by taste and a long
catalogue-wide softmax fit ranks far above popularity; on data where choices follow popularity
(the demo's synthetic ratings) the same fit learns noise and ranks below "most popular". Fixed
defaults cannot hold on both, and the validation rows the run reports must never pick anything.
So the choice is made on an inner split of the training pairs:

1. `inner_split` holds out ~10% of each user's training positives (seeded; users with few
   positives keep them all);
2. the head trains on the rest under its usual one-cycle schedule; at a few epochs
   `PriorSearch` scores the inner holdout with score = head_weight * head + beta * log(1 +
   popularity) for every (head_weight, beta) of `PRIOR_GRID` (head_weight 0: popularity alone,
   the fall-back), and `choose` keeps the best (epochs, head_weight, beta) by precision at k
   (NDCG breaks ties, then fewer epochs, then less popularity);
3. the head is refitted on all training pairs under the same schedule, stopped after the chosen
   epochs (`StopAt`), and `with_prior` folds the prior into its item bias.

`with_prior` is the one scorer: it returns a plain `DotProductBias` whose scores are the chosen
mix, so batch `recommend`, HTTP recommendations and similar items (cosine of its item factors,
which the prior leaves untouched) all read the same network from the bundle.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from modeling.bundle import RankingChoice
from modeling.collab import DotProductBias, csr_from_pairs, csr_rows, score_all_items
from modeling.ranking import build_ranking_head, popularity, ranking_task, unique_pairs
from modeling.training import History, Trainer
from modeling.training.callbacks import Callback

__all__ = ["PRIOR_GRID", "FittedHead", "PriorSearch", "StopAt", "choose", "fit_ranking_head", "inner_split",
           "log_popularity", "search_epochs", "with_prior"]

# (head_weight, beta): the head alone, the head with a growing popularity prior, popularity alone
PRIOR_GRID: tuple[tuple[float, float], ...] = (
    (1.0, 0.0), (1.0, 0.25), (1.0, 0.5), (1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (0.0, 1.0),
)
INNER_FRAC = 0.1  # share of each user's training positives held out to choose on
MIN_POSITIVES = 5  # users with fewer training positives hold none out
INNER_USERS = 5000  # at most this many inner-holdout users are scored (a seeded sample)


def log_popularity(items: np.ndarray, n_items: int) -> np.ndarray:
    """log(1 + interactions per item code) of deduplicated pairs; item 0 (unknown) gets 0."""
    return np.log1p(popularity(items, n_items)).astype(np.float32)


def inner_split(users: np.ndarray, frac: float = INNER_FRAC, seed: int = 0,
                min_positives: int = MIN_POSITIVES) -> np.ndarray:
    """Boolean mask over (deduplicated) pairs given by their user codes: True = held out.

    Each user with at least `min_positives` pairs holds out max(1, floor(frac * n)) of them,
    drawn at random (seeded); vectorized (one lexsort, no per-user Python)."""
    users = np.asarray(users, dtype=np.int64)
    n = len(users)
    hold = np.zeros(n, dtype=bool)
    if n == 0:
        return hold
    order = np.lexsort((np.random.default_rng(seed).random(n), users))
    counts = np.bincount(users)
    starts = np.cumsum(counts) - counts
    sorted_users = users[order]
    rank = np.arange(n) - starts[sorted_users]
    quota = np.where(counts >= min_positives, np.maximum(1, np.floor(frac * counts)), 0).astype(np.int64)
    hold[order] = rank < quota[sorted_users]
    return hold


def search_epochs(epochs: int) -> list[int]:
    """The epochs at which the inner fit is scored: about six points up to `epochs`, the last included."""
    return sorted({max(1, round(epochs * f / 6)) for f in range(1, 7)})


class PriorSearch(Callback):
    """Scores the inner holdout at the epochs `at_epochs` for every (head_weight, beta) of `grid`.

    `seen`/`relevant`: CSRs by user code of the inner-training and inner-holdout items. `table`
    collects a `Scored` per (epoch, grid entry)."""

    def __init__(self, seen: tuple[np.ndarray, np.ndarray], relevant: tuple[np.ndarray, np.ndarray],
                 log_pop: np.ndarray, at_epochs: Sequence[int], grid: Sequence[tuple[float, float]] = PRIOR_GRID,
                 k: int = 10, max_users: int = INNER_USERS, seed: int = 0) -> None:
        users = np.flatnonzero(np.diff(relevant[0]) > 0)
        if len(users) > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
        self.users = users
        self.k, self.grid, self.at_epochs = k, list(grid), set(at_epochs)
        self.log_pop = torch.from_numpy(np.asarray(log_pop, dtype=np.float32))
        ptr, ind = csr_rows(seen[0], seen[1], users)
        self.seen_rows = torch.from_numpy(np.repeat(np.arange(len(users)), np.diff(ptr)))
        self.seen_cols = torch.from_numpy(ind)
        rptr, rind = csr_rows(relevant[0], relevant[1], users)
        n_items = len(log_pop)
        self.relevant_keys = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(rptr)) * n_items + rind
        self.table: list[Scored] = []

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:  # type: ignore[no-untyped-def]
        if epoch + 1 in self.at_epochs and len(self.users):
            self.table.extend(Scored(epoch + 1, w, b, p) for w, b, p in self.evaluate(trainer.model))

    def evaluate(self, model: torch.nn.Module) -> list[tuple[float, float, np.ndarray]]:
        """(head_weight, beta, per-user precision@k) of `model` for every grid entry."""
        scores = score_all_items(model, torch.from_numpy(self.users)).float().cpu()
        n_items = scores.shape[1]
        rows = np.arange(len(self.users), dtype=np.int64)[:, None]
        out = []
        for w, b in self.grid:
            s = scores * w + self.log_pop * b
            s[:, 0] = -math.inf
            s[self.seen_rows, self.seen_cols] = -math.inf
            top = torch.topk(s, min(self.k, n_items), dim=1).indices.numpy()
            hits = np.isin(rows * n_items + top, self.relevant_keys)
            out.append((w, b, hits.sum(axis=1) / self.k))
        return out


@dataclass
class Scored:
    """One (epoch, head_weight, beta) of the search and its per-user precision on the inner holdout."""

    epoch: int
    head_weight: float
    beta: float
    precision: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.precision.mean())


class StopAt(Callback):
    """Stops a fit after `epochs` epochs (of a longer one-cycle schedule: the inner fit's)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None:  # type: ignore[no-untyped-def]
        if epoch + 1 >= self.epochs:
            trainer.stop_training = True


def choose(search: PriorSearch, schedule_epochs: int, inner_pairs: int, z: float = 2.0) -> RankingChoice:
    """The best (epoch, head_weight, beta) of `search.table` by inner precision (ties: fewer
    epochs, then less popularity), unless it beats popularity alone (head_weight 0) by less than
    `z` standard errors of the paired per-user difference: then popularity, the simpler ranking,
    whose figure on the inner holdout is as good within its noise."""
    if not search.table:  # nothing to choose on (no user with enough positives): the plain head
        return RankingChoice(epochs=schedule_epochs, schedule_epochs=schedule_epochs, head_weight=1.0, beta=0.0,
                             inner_users=0, inner_pairs=inner_pairs)
    heads = [r for r in search.table if r.head_weight != 0.0]
    pops = [r for r in search.table if r.head_weight == 0.0]
    best = max(heads or search.table, key=lambda r: (r.mean, -r.epoch, -r.beta))
    pop = pops[0] if pops else None
    epochs = best.epoch  # the head's item factors (similar items) come from this fit either way
    if pop is not None and best is not pop:
        diff = best.precision - pop.precision
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
        if not diff.mean() > z * se:
            best = pop
    return RankingChoice(epochs=epochs, schedule_epochs=schedule_epochs, head_weight=best.head_weight, beta=best.beta,
                         inner_precision=best.mean, inner_pop_precision=None if pop is None else pop.mean,
                         inner_users=len(search.users), inner_pairs=inner_pairs)


def inner_csrs(users: np.ndarray, items: np.ndarray, hold: np.ndarray,
               n_users: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(seen, relevant) CSRs by user code of the inner-training and inner-holdout pairs."""
    return (csr_from_pairs(users[~hold], items[~hold], n_users), csr_from_pairs(users[hold], items[hold], n_users))


def with_prior(head: DotProductBias, log_pop: np.ndarray | Tensor, head_weight: float, beta: float) -> DotProductBias:
    """A copy of `head` scoring head_weight * head(u, i) + beta * log_pop[i]: the user side is
    scaled by head_weight and the prior added to the item bias; item factors are untouched (so
    similar items keep the head's neighbours, even with head_weight 0)."""
    out = copy.deepcopy(head).eval()
    prior = torch.as_tensor(np.asarray(log_pop, dtype=np.float32)).to(out.item_bias.weight)
    with torch.no_grad():
        out.user_emb.weight.mul_(head_weight)
        out.user_bias.weight.mul_(head_weight)
        out.item_bias.weight.mul_(head_weight).add_(beta * prior.unsqueeze(1))
    return out


@dataclass
class FittedHead:
    """The served ranker (`with_prior` of the refitted head), the choice and the refit's curves."""

    ranker: DotProductBias
    choice: RankingChoice
    history: History
    inner_seconds: float
    refit_seconds: float


# Builds the Trainer of one head fit from (model, objective, extra callbacks, refit?): the caller's
# optimiser settings, progress bar and tracking callbacks (refit False: the inner fit).
MakeTrainer = Callable[[DotProductBias, object, list[Callback], bool], Trainer]


def fit_ranking_head(loss: str, train_users: np.ndarray, train_items: np.ndarray, n_users: int, n_items: int,
                     epochs: int, factors: int, make_trainer: MakeTrainer, seed: int = 0, negatives: int = 1,
                     valid_users: np.ndarray | None = None, valid_items: np.ndarray | None = None,
                     k: int = 10) -> FittedHead:
    """Inner fit and search, then the refit on every training pair stopped at the chosen epochs.

    `valid_*` (the run's validation pairs) only feed the refit's logged valid loss; nothing is
    chosen on them."""
    keep = (np.asarray(train_users) > 0) & (np.asarray(train_items) > 0)
    pu, pi = unique_pairs(np.asarray(train_users)[keep], np.asarray(train_items)[keep])
    hold = inner_split(pu, seed=seed)
    seen, relevant = inner_csrs(pu, pi, hold, n_users)
    search = PriorSearch(seen, relevant, log_popularity(pi[~hold], n_items), search_epochs(epochs), k=k, seed=seed)
    t0 = time.perf_counter()
    if len(search.users):
        inner = ranking_task(loss, pu[~hold], pi[~hold], n_users, n_items, n_negatives=negatives)
        torch.manual_seed(seed)
        head = build_ranking_head(n_users, n_items, factors)
        make_trainer(head, inner.objective, [search], False).fit(inner.train, None, epochs=epochs)
    choice = choose(search, epochs, int(len(pu) - hold.sum()))
    t1 = time.perf_counter()
    task = ranking_task(loss, pu, pi, n_users, n_items, valid_users, valid_items, n_negatives=negatives)
    torch.manual_seed(seed)
    head = build_ranking_head(n_users, n_items, factors)
    history = make_trainer(head, task.objective, [StopAt(choice.epochs)], True).fit(task.train, task.valid, epochs=epochs)
    t2 = time.perf_counter()
    ranker = with_prior(head, log_popularity(pi, n_items), choice.head_weight, choice.beta)
    return FittedHead(ranker, choice, history, t1 - t0, t2 - t1)
