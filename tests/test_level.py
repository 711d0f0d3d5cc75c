"""The recent-level correction (modeling/level.py): empirical-Bayes offsets per entity."""

from __future__ import annotations

import numpy as np
import pytest

from modeling.errors import DataError
from modeling.level import RecentLevel


def _residuals(levels: np.ndarray, rows: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(1, len(levels) + 1), rows)
    return codes, levels[codes - 1] + rng.normal(0, noise, len(codes))


def test_moved_levels_are_found_and_shrunk():
    rng = np.random.default_rng(0)
    true = rng.normal(0, 0.04, 300)
    codes, res = _residuals(true, 30, 0.1, seed=1)
    lvl = RecentLevel.fit("Store", 42, codes, res, n_codes=301)
    raw = np.bincount(codes, weights=res)[1:] / 30
    got = lvl.offsets[1:]
    assert lvl.tau == pytest.approx(0.04, rel=0.25) and lvl.sigma == pytest.approx(0.1, rel=0.05)
    # shrunk toward 0 by one factor (equal rows per store), and closer to the truth than the raw means
    factor = got / raw
    assert np.allclose(factor, factor[0]) and 0.5 < factor[0] < 0.9
    assert np.mean((got - true) ** 2) < 0.95 * np.mean((raw - true) ** 2)
    assert np.corrcoef(got, true)[0, 1] > 0.6


def test_no_moved_levels_give_next_to_nothing():
    codes, res = _residuals(np.zeros(300), 30, 0.1, seed=2)
    lvl = RecentLevel.fit("Store", 42, codes, res, n_codes=301)
    raw = np.bincount(codes, weights=res)[1:] / 30
    # noise alone: offsets are a small fraction of the raw means (often exactly 0)
    assert np.abs(lvl.offsets).max() <= 0.35 * np.abs(raw).max()
    assert lvl.tau < 0.01


def test_unknown_code_and_entities_without_rows_get_no_offset():
    codes, res = _residuals(np.array([0.2, -0.2, 0.1, -0.1]), 20, 0.05, seed=3)
    codes = np.concatenate([codes, [0, 0, 0]])
    res = np.concatenate([res, [5.0, 5.0, 5.0]])  # unknown-token rows say nothing about any store
    lvl = RecentLevel.fit("Store", 42, codes, res, n_codes=7)
    assert lvl.offsets[0] == 0 and lvl.offsets[5] == 0 and lvl.offsets[6] == 0
    assert lvl.entities == 4 and lvl.rows == 80
    assert np.all(np.sign(lvl.offsets[1:5]) == [1, -1, 1, -1])
    np.testing.assert_array_equal(lvl(np.array([0, 1, 6, 1])), lvl.offsets[[0, 1, 6, 1]])


def test_fewer_rows_shrink_more():
    codes = np.concatenate([np.full(40, 1), np.full(4, 2), np.repeat(np.arange(3, 53), 20)])
    rng = np.random.default_rng(4)
    res = rng.normal(0, 0.05, len(codes)) + np.where(codes <= 2, 0.1, rng.normal(0, 0.05, 53)[codes])
    lvl = RecentLevel.fit("Store", 42, codes, res, n_codes=53)
    mean = np.bincount(codes, weights=res, minlength=53) / np.maximum(np.bincount(codes, minlength=53), 1)
    assert lvl.offsets[1] / mean[1] > lvl.offsets[2] / mean[2] > 0


def test_round_trip_and_bad_state():
    codes, res = _residuals(np.array([0.1, -0.1, 0.05]), 10, 0.02, seed=5)
    lvl = RecentLevel.fit("Store", 14, codes, res, n_codes=4)
    back = RecentLevel.from_bundle(lvl.describe(), lvl.offsets.astype(np.float64), "b")
    np.testing.assert_array_equal(back.offsets, lvl.offsets)
    assert (back.column, back.days, back.tau, back.sigma) == ("Store", 14, lvl.tau, lvl.sigma)
    with pytest.raises(DataError, match="n_codes"):
        RecentLevel.from_bundle(lvl.describe(), lvl.offsets[:3], "b")
    with pytest.raises(ValueError, match="codes must lie"):
        RecentLevel.fit("Store", 14, np.array([1, 9]), np.array([0.1, 0.2]), n_codes=4)
    one_each = RecentLevel.fit("Store", 14, np.array([1, 2]), np.array([0.1, 0.2]), n_codes=4)
    assert not one_each.offsets.any()  # one row per store: no within-store variance to shrink against


def test_offsets_are_kept_only_when_levels_persist_between_windows():
    rng = np.random.default_rng(6)
    true = rng.normal(0, 0.04, 200)
    codes, last = _residuals(true, 30, 0.1, seed=7)
    # the same levels a window earlier: they persist, the offsets stay
    _, before = _residuals(true, 30, 0.1, seed=8)
    kept = RecentLevel.fit("Store", 42, codes, last, n_codes=201, earlier=(codes, before))
    assert kept.persistence_t > 5 and 0.5 < kept.persistence < 1.1 and kept.applied
    np.testing.assert_array_equal(kept.offsets, RecentLevel.fit("Store", 42, codes, last, n_codes=201).offsets)
    # other levels a window earlier (the last window's are noise or new): nothing carries over, no offsets
    _, unrelated = _residuals(rng.normal(0, 0.04, 200), 30, 0.1, seed=9)
    dropped = RecentLevel.fit("Store", 42, codes, last, n_codes=201, earlier=(codes, unrelated))
    assert dropped.persistence_t < 2 and not dropped.applied and dropped.tau > 0.02
    assert dropped.describe()["applied"] is False and kept.describe()["applied"] is True
    # too few entities in both windows: no evidence either way, no offsets
    few = RecentLevel.fit("Store", 42, codes, last, n_codes=201, earlier=(codes[:60], before[:60]))
    assert np.isnan(few.persistence_t) and not few.applied
