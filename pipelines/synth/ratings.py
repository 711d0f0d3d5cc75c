"""Seeded MovieLens-format ratings (u.data, u.item, ratings.csv layouts)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from modeling.errors import DataError
from pipelines.synth.common import _atomic_write

GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western")

_CHUNK = 1 << 21
_T0 = 857_174_400        # 1997-03-01 00:00 UTC
_T1 = 915_148_799        # 1998-12-31 23:59:59 UTC


def _user_counts(users: int, ratings: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Ratings per user: at least 5 each, the rest spread with long-tailed (log-normal) activity."""
    weight = np.exp(rng.normal(0.0, 1.1, users))
    counts = 5 + rng.multinomial(ratings - 5 * users, weight / weight.sum())
    while (over := counts > cap).any():   # hand the excess of capped users to the others
        excess = int((counts[over] - cap).sum())
        counts[over] = cap
        free = counts < cap
        w = weight * free
        counts += rng.multinomial(excess, w / w.sum())
    return counts


def _draw_items(n: int, cdf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw n item indices from a popularity CDF, in chunks to bound temporaries."""
    out = np.empty(n, dtype=np.int64)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        out[lo:hi] = np.searchsorted(cdf, rng.random(hi - lo) * cdf[-1], side="right")
    return np.minimum(out, len(cdf) - 1)


Accept = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _sample_pairs(counts: np.ndarray, pop: np.ndarray, rng: np.random.Generator,
                  accept: Accept | None = None) -> np.ndarray:
    """Sorted unique user*n_items+item keys with exactly counts[u] distinct items per user.

    `accept(users, items)` -> bool mask keeps a popularity-drawn pair or sends it back to be
    drawn again (rejection sampling: P(item | user) ~ popularity x acceptance)."""
    n_items = len(pop)
    cdf = np.cumsum(pop)
    uniform = np.cumsum(np.ones(n_items))
    keys = np.empty(0, dtype=np.int64)
    need = counts.astype(np.int64)
    for round_ in range(64):
        if not need.any():
            return keys
        users = np.repeat(np.arange(len(counts), dtype=np.int64), need)
        # After a few popularity-weighted rounds, top up uniformly so heavy users converge.
        items = _draw_items(len(users), cdf if round_ < 8 else uniform, rng)
        if accept is not None and round_ < 8:
            keep = accept(users, items)
            users, items = users[keep], items[keep]
        new = np.sort(users * n_items + items)
        new = new[np.r_[True, new[1:] != new[:-1]]]
        if len(keys):
            pos = np.minimum(np.searchsorted(keys, new), len(keys) - 1)
            new = new[keys[pos] != new]
        keys = np.sort(np.concatenate([keys, new]), kind="stable")  # merges two sorted runs
        need = counts - np.bincount(keys // n_items, minlength=len(counts))
    raise RuntimeError("synth_ratings: could not place every rating; lower --ratings")


def _genres(item_f: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Genre strings tied to item factors, so genres carry some of the taste signal."""
    direction = rng.normal(size=(len(GENRES), item_f.shape[1]))
    score = item_f @ direction.T + rng.gumbel(0.0, 0.5, (len(item_f), len(GENRES)))
    order = np.argsort(-score, axis=1)
    n_genres = 1 + (rng.random(len(item_f)) < 0.45) + (rng.random(len(item_f)) < 0.15)
    chosen = np.zeros(score.shape, dtype=bool)
    np.put_along_axis(chosen, order[:, :3], np.arange(3)[None, :] < n_genres[:, None], axis=1)
    text = np.full(len(item_f), "", dtype=object)
    for g, name in enumerate(GENRES):     # 18 genres, vectorized over items
        text = np.where(chosen[:, g], text + "|" + name, text)
    return pd.Series(text).str.slice(1).to_numpy(dtype=object)


def synth_ratings(users: int = 943, items: int = 1682, ratings: int = 100_000, seed: int = 0,
                  factors: int = 8, choice: float = 0.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ratings, movies) from latent factors + user/item biases + noise, rounded to 1..5.

    Item popularity is Zipf-like, user activity log-normal (>= 5 ratings each), pairs are
    unique, rows are in timestamp order. The factor term (sd ~0.8) dominates the residual
    noise (sd 0.5), so a factor model beats a bias-only model by a clear margin.

    Which items a user rates follows popularity alone with `choice=0` (the default, and the
    files of earlier versions, byte for byte). With `choice > 0` users also pick by taste: a
    popularity-drawn item is kept with probability sigmoid(choice * z), z = a user's choice
    factors . the item's (sd 1, drawn from a second generator seeded from `seed`), so a ranking
    model has structure to find beyond popularity.
    """
    cap = items // 2                            # no user rates more than half the catalogue
    if users < 1 or items < 10 or factors < 1:
        raise DataError(f"synth_ratings: need users >= 1, items >= 10, factors >= 1 "
                        f"(got {users}, {items}, {factors})")
    if not 5 * users <= ratings <= users * cap:
        raise DataError(f"synth_ratings: ratings must lie in [5*users, users*items/2] = "
                        f"[{5 * users}, {users * cap}] (got {ratings})")
    rng = np.random.default_rng(seed)
    rank = rng.permutation(items).astype(np.float64)
    pop = (rank + 0.02 * items) ** -1.2
    counts = _user_counts(users, ratings, cap, rng)
    keys = _sample_pairs(counts, pop, rng, _taste_acceptance(users, items, factors, choice, seed))
    user_idx, item_idx = np.divmod(keys, items)

    scale = (0.65 ** 2 / factors) ** 0.25       # makes sd(p_u . q_i) ~ 0.65
    user_f = rng.normal(0.0, scale, (users, factors)).astype(np.float32)
    item_f = rng.normal(0.0, scale, (items, factors)).astype(np.float32)
    log_pop = np.log(pop)
    user_b = rng.normal(0.0, 0.45, users)
    item_b = rng.normal(0.0, 0.35, items) + 0.25 * (log_pop - log_pop.mean()) / log_pop.std()
    rating = np.empty(len(keys), dtype=np.int64)
    for lo in range(0, len(keys), _CHUNK):
        u, i = user_idx[lo:lo + _CHUNK], item_idx[lo:lo + _CHUNK]
        raw = (3.3 + user_b[u] + item_b[i] + np.einsum("nk,nk->n", user_f[u], item_f[i])
               + rng.normal(0.0, 0.55, len(u)))
        rating[lo:lo + _CHUNK] = np.clip(np.rint(raw), 1, 5)

    span = _T1 - _T0
    first = rng.integers(_T0, _T1 - span // 10, users)
    active = np.minimum(rng.exponential(span / 12, users), _T1 - first).astype(np.int64)
    stamp = first[user_idx] + (rng.random(len(keys)) * active[user_idx]).astype(np.int64)
    order = np.argsort(stamp, kind="stable")
    frame = pd.DataFrame({"user": user_idx[order] + 1, "item": item_idx[order] + 1,
                          "rating": rating[order], "timestamp": stamp[order]})

    year = (1998 - np.minimum(rng.exponential(9.0, items), 78)).astype(np.int64)
    ids = np.arange(1, items + 1, dtype=np.int64)
    titles = ("Synthetic Movie " + pd.Series(ids).astype(str) + " ("
              + pd.Series(year).astype(str) + ")")
    movies = pd.DataFrame({"movieId": ids, "title": titles.to_numpy(dtype=object), "year": year,
                           "genres": _genres(item_f, rng)})
    return frame, movies


def _taste_acceptance(users: int, items: int, factors: int, choice: float, seed: int) -> Accept | None:
    """The acceptance rule of `synth_ratings(choice=...)`; None (popularity only) for choice 0."""
    if choice < 0:
        raise DataError(f"synth_ratings: choice must be >= 0 (got {choice})")
    if choice == 0:
        return None
    taste = np.random.default_rng([seed, 1])  # its own stream: the main one stays as it was
    scale = factors ** -0.25                  # makes sd(a_u . b_i) ~ 1
    user_c = taste.normal(0.0, scale, (users, factors)).astype(np.float32)
    item_c = taste.normal(0.0, scale, (items, factors)).astype(np.float32)

    def accept(u: np.ndarray, i: np.ndarray) -> np.ndarray:
        keep = np.empty(len(u), dtype=bool)
        for lo in range(0, len(u), _CHUNK):
            z = np.einsum("nk,nk->n", user_c[u[lo:lo + _CHUNK]], item_c[i[lo:lo + _CHUNK]])
            keep[lo:lo + _CHUNK] = taste.random(len(z)) < 1.0 / (1.0 + np.exp(-choice * z))
        return keep

    return accept


def write_ratings(out_dir: str | Path, users: int = 943, items: int = 1682,
                  ratings: int = 100_000, seed: int = 0, choice: float = 0.0) -> dict[str, Path]:
    """Write u.data (MovieLens-100k: tab-separated, no header) and movies.csv atomically."""
    out = Path(out_dir)
    frame, movies = synth_ratings(users=users, items=items, ratings=ratings, seed=seed, choice=choice)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    return {
        "u.data": _atomic_write(out / "u.data", lambda p: pacsv.write_csv(table, str(p), opts)),
        "movies.csv": _atomic_write(out / "movies.csv",
                                    lambda p: movies.to_csv(p, index=False, lineterminator="\n")),
    }
