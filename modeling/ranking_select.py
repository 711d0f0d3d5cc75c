"""How long the ranking head trains and how much popularity it leans on, chosen on the training
pairs alone.

The head's best settings depend on the data: on MovieLens users choose by taste and a long
catalogue-wide softmax fit ranks far above popularity; on data where choices follow popularity
(the demo's synthetic ratings) the same fit learns noise and ranks below "most popular". Fixed
defaults cannot hold on both, and the validation rows the run reports must never pick anything.
So the choice is made on inner splits of the training pairs:

1. `inner_split` holds out 25% of each user's training positives (seeded; users with fewer
   than 5 positives keep them all);
2. the head trains on the rest under its usual one-cycle schedule; at about six epochs of it
   `PriorSearch` scores the inner holdout with score = head_weight * head + beta * log(1 +
   popularity) for every (head_weight, beta) of `PRIOR_GRID` (head_weight 0: popularity alone);
3. `choose` keeps the best (epochs, head_weight, beta) by precision at k, unless it beats
   popularity alone by less than two standard errors of the paired per-user difference: a
   choice among ~40 settings on noise would otherwise rank a little below popularity on data
   where popularity is all there is. While that test is undecided (|t| < 3) a fresh inner split
   is drawn and the per-user figures pooled, up to 5 splits (small data: a few hundred users
   hold out too few items for one split to tell a real 5% edge from noise). The 25% mirrors the
   reported protocol: with 10% held out a user has too few relevant items for precision at 10
   to separate the settings;
4. the head is refitted on all training pairs under the same schedule, stopped after the chosen
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

__all__ = ["PRIOR_GRID", "FittedHead", "PriorSearch", "Scored", "StopAt", "choose", "fit_ranking_head",
           "head_vs_popularity", "inner_split", "log_popularity", "pooled", "search_epochs", "with_prior"]

# (head_weight, beta): the head alone, the head with a growing popularity prior, popularity alone
PRIOR_GRID: tuple[tuple[float, float], ...] = (
    (1.0, 0.0), (1.0, 0.25), (1.0, 0.5), (1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (0.0, 1.0),
)
INNER_FRAC = 0.25  # share of each user's training positives held out to choose on (as the 75/25 protocol)
MIN_POSITIVES = 5  # users with fewer training positives hold none out
INNER_USERS = 5000  # at most this many inner-holdout users are scored (a seeded sample)
FALLBACK_Z = 2.0  # the head must beat popularity by this many standard errors on the inner holdout
MAX_FOLDS = 5  # inner splits (fresh holdouts) pooled while the head-vs-popularity test is undecided
EARLY_Z = 3.0  # |t| that ends the splits early (stricter than FALLBACK_Z: looking after each split
#                 and stopping at the first |t| >= 2 would let noise through more often than once)


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

    def evaluate(self, model: torch.nn.Module, chunk: int = 1024) -> list[tuple[float, float, np.ndarray]]:
        """(head_weight, beta, per-user precision@k) of `model` for every grid entry; users are
        scored `chunk` at a time (a [chunk, n_items] matrix at once)."""
        n_items = len(self.log_pop)
        hits = np.zeros((len(self.grid), len(self.users)))
        for start in range(0, len(self.users), chunk):
            stop = min(start + chunk, len(self.users))
            scores = score_all_items(model, torch.from_numpy(self.users[start:stop])).float().cpu()
            in_chunk = (self.seen_rows >= start) & (self.seen_rows < stop)
            rows = np.arange(start, stop, dtype=np.int64)[:, None]
            for g, (w, b) in enumerate(self.grid):
                s = scores * w + self.log_pop * b
                s[:, 0] = -math.inf
                s[self.seen_rows[in_chunk] - start, self.seen_cols[in_chunk]] = -math.inf
                top = torch.topk(s, min(self.k, n_items), dim=1).indices.numpy()
                hits[g, start:stop] = np.isin(rows * n_items + top, self.relevant_keys).sum(axis=1)
        return [(w, b, hits[g] / self.k) for g, (w, b) in enumerate(self.grid)]


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


def pooled(tables: Sequence[Sequence[Scored]]) -> list[Scored]:
    """One table from the tables of several inner splits: per user, the mean precision over the
    splits of each (epoch, head_weight, beta) (the same users are scored in every split)."""
    if len(tables) == 1:
        return list(tables[0])
    return [Scored(r.epoch, r.head_weight, r.beta, np.mean([t[j].precision for t in tables], axis=0))
            for j, r in enumerate(tables[0])]


def head_vs_popularity(table: Sequence[Scored]) -> tuple[Scored, Scored | None, float]:
    """(best head row by mean precision (ties: fewer epochs, less popularity), popularity's row,
    t statistic of their paired per-user difference; +inf without a popularity row)."""
    heads = [r for r in table if r.head_weight != 0.0]
    pops = [r for r in table if r.head_weight == 0.0]
    best = max(heads or table, key=lambda r: (r.mean, -r.epoch, -r.beta))
    if not pops or best is pops[0]:
        return best, pops[0] if pops else None, math.inf
    diff = best.precision - pops[0].precision
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
    t = float(diff.mean() / se) if se > 0 else (math.inf if diff.mean() > 0 else 0.0)
    return best, pops[0], t


def choose(table: Sequence[Scored], schedule_epochs: int, inner_users: int, inner_pairs: int, folds: int = 1,
           z: float = FALLBACK_Z) -> RankingChoice:
    """The best (epoch, head_weight, beta) of `table` by inner precision, unless it beats
    popularity alone (head_weight 0) by less than `z` standard errors of the paired per-user
    difference: then popularity, the simpler ranking, as good within the noise of the inner
    holdout (a choice among ~40 settings on noise would otherwise rank below it)."""
    if not table:  # nothing to choose on (no user with enough positives): the plain head
        return RankingChoice(epochs=schedule_epochs, schedule_epochs=schedule_epochs, head_weight=1.0, beta=0.0,
                             inner_users=0, inner_pairs=inner_pairs, inner_folds=folds)
    best, pop, t = head_vs_popularity(table)
    epochs = best.epoch  # the head's item factors (similar items) come from this fit either way
    if pop is not None and not t > z:
        best = pop
    return RankingChoice(epochs=epochs, schedule_epochs=schedule_epochs, head_weight=best.head_weight, beta=best.beta,
                         inner_precision=best.mean, inner_pop_precision=None if pop is None else pop.mean,
                         inner_t=None if math.isinf(t) else t, inner_users=inner_users, inner_pairs=inner_pairs,
                         inner_folds=folds)


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
    t0 = time.perf_counter()
    tables: list[list[Scored]] = []
    users = 0
    for fold in range(MAX_FOLDS):
        hold = inner_split(pu, frac=INNER_FRAC, seed=seed + 7919 * fold)
        seen, relevant = inner_csrs(pu, pi, hold, n_users)
        search = PriorSearch(seen, relevant, log_popularity(pi[~hold], n_items), search_epochs(epochs), k=k,
                             seed=seed)
        users = len(search.users)
        if not users:
            break
        inner = ranking_task(loss, pu[~hold], pi[~hold], n_users, n_items, n_negatives=negatives)
        torch.manual_seed(seed)
        head = build_ranking_head(n_users, n_items, factors)
        make_trainer(head, inner.objective, [search], False).fit(inner.train, None, epochs=epochs)
        tables.append(search.table)
        if abs(head_vs_popularity(pooled(tables))[2]) >= EARLY_Z:  # decided: no further split
            break
    table = pooled(tables) if tables else []
    choice = choose(table, epochs, users, int(len(pu) - hold.sum()), folds=len(tables))
    t1 = time.perf_counter()
    task = ranking_task(loss, pu, pi, n_users, n_items, valid_users, valid_items, n_negatives=negatives)
    torch.manual_seed(seed)
    head = build_ranking_head(n_users, n_items, factors)
    history = make_trainer(head, task.objective, [StopAt(choice.epochs)], True).fit(task.train, task.valid, epochs=epochs)
    t2 = time.perf_counter()
    ranker = with_prior(head, log_popularity(pi, n_items), choice.head_weight, choice.beta)
    return FittedHead(ranker, choice, history, t1 - t0, t2 - t1)
