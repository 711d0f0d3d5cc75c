"""Regression and ranking metrics against hand-computed cases and a brute-force reference."""

import math

import numpy as np
import pytest
import torch

from modeling.metrics import (
    exp_rmspe,
    mae,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    rmse,
    rmspe,
)


def test_rmse_and_mae_hand_case():
    assert rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == pytest.approx(math.sqrt(4 / 3))
    assert mae([1.0, 2.0, 3.0], [2.0, 2.0, 5.0]) == pytest.approx(1.0)


def test_metrics_accept_tensors_with_grad():
    t = torch.tensor([1.0, 2.0, 4.0])
    p = torch.tensor([1.5, 2.0, 3.0], requires_grad=True)
    assert rmse(t, p) == pytest.approx(rmse(t.numpy(), p.detach().numpy()))
    assert isinstance(mae(t, p), float)
    assert rmse(t.to(torch.bfloat16), p.detach().to(torch.bfloat16)) == pytest.approx(
        math.sqrt((0.25 + 0 + 1) / 3), rel=1e-2
    )


def test_rmspe_ignores_zero_targets():
    # The zero-target row has a huge error that must not count; the others are both 10% off.
    assert rmspe([0.0, 100.0, 200.0], [5000.0, 110.0, 180.0]) == pytest.approx(0.1)


def test_rmspe_all_zero_targets_is_nan():
    assert math.isnan(rmspe([0.0, 0.0], [1.0, 2.0]))


def test_exp_rmspe_matches_rmspe_on_original_scale():
    y = np.array([100.0, 200.0, 50.0])
    p = np.array([110.0, 180.0, 55.0])
    assert exp_rmspe(np.log(y), np.log(p)) == pytest.approx(rmspe(y, p))
    assert exp_rmspe(np.log(y), np.log(p)) == pytest.approx(0.1)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="3 values"):
        rmse([1.0, 2.0, 3.0], [1.0, 2.0])


# ----------------------------------------------------------------------------- ranking

# user 0: relevant {2, 5}; recommends 1, 2, 3 -> one hit at rank 2 (3 is user 3's item, not 0's)
# user 1: relevant {4}; recommends 4 then padding -> hit at rank 1
# user 2: nothing relevant -> excluded from the means
# user 3: relevant {1, 3, 9, 10}; recommends 9, 3, 1 -> three hits
REC = np.array([[1, 2, 3], [4, -1, -1], [7, 8, 9], [9, 3, 1]])
INDPTR = np.array([0, 2, 3, 3, 7])
INDICES = np.array([2, 5, 4, 1, 3, 9, 10])
D2, D3 = 1 / math.log2(3), 1 / math.log2(4)


def test_precision_recall_ndcg_hand_case():
    rel = (INDPTR, INDICES)
    assert precision_at_k(REC, rel, 3) == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert recall_at_k(REC, rel, 3) == pytest.approx((1 / 2 + 1 + 3 / 4) / 3)
    ndcg_user0 = D2 / (1 + D2)  # hit at rank 2; ideal: two hits at ranks 1, 2
    assert ndcg_at_k(REC, rel, 3) == pytest.approx((ndcg_user0 + 1 + 1) / 3)


def test_k_truncates_recommendations():
    rel = (INDPTR, INDICES)
    assert precision_at_k(REC, rel, 1) == pytest.approx(2 / 3)
    assert recall_at_k(REC, rel, 1) == pytest.approx((0 + 1 + 1 / 4) / 3)
    assert ndcg_at_k(REC, rel, 1) == pytest.approx(2 / 3)


def test_ranking_accepts_tensors_and_no_relevant_users_is_nan():
    rel = (torch.from_numpy(INDPTR), torch.from_numpy(INDICES))
    assert precision_at_k(torch.from_numpy(REC), rel, 3) == pytest.approx(5 / 9)
    empty = (np.zeros(5, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert math.isnan(ndcg_at_k(REC, empty, 3))


def test_bad_csr_raises():
    with pytest.raises(ValueError, match="indptr"):
        precision_at_k(REC, (INDPTR[:-1], INDICES), 3)
    with pytest.raises(ValueError, match="indptr"):
        precision_at_k(REC, (INDPTR, INDICES[:-1]), 3)


def _reference(rec: np.ndarray, indptr: np.ndarray, indices: np.ndarray, k: int):
    """Per-user loop straight from the definitions."""
    p, r, n = [], [], []
    for u in range(rec.shape[0]):
        relevant = set(indices[indptr[u] : indptr[u + 1]].tolist())
        if not relevant:
            continue
        top = [i for i in rec[u, :k].tolist()]
        gains = [1.0 if (i >= 0 and i in relevant) else 0.0 for i in top]
        p.append(sum(gains) / k)
        r.append(sum(gains) / len(relevant))
        dcg = sum(g / math.log2(j + 2) for j, g in enumerate(gains))
        idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(relevant))))
        n.append(dcg / idcg)
    return np.mean(p), np.mean(r), np.mean(n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_matches_per_user_reference(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 40, 30, 5
    rec = np.stack([rng.permutation(n_items)[:k] for _ in range(n_users)])
    rec[rng.random(rec.shape) < 0.1] = -1
    counts = rng.integers(0, 8, n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = np.concatenate([rng.choice(n_items, c, replace=False) for c in counts])
    expected = _reference(rec, indptr, indices, k)
    got = (
        precision_at_k(rec, (indptr, indices), k),
        recall_at_k(rec, (indptr, indices), k),
        ndcg_at_k(rec, (indptr, indices), k),
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12)
