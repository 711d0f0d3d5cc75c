"""emb_sz_rule and get_emb_szs."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeling.embeddings import emb_sz_rule, get_emb_szs


@pytest.mark.parametrize(
    ("n_cat", "width"),
    [(1, 1), (2, 1), (3, 2), (8, 4), (99, 50), (100, 50), (1000, 50), (1001, 50)],
)
def test_rule_values(n_cat: int, width: int) -> None:
    assert emb_sz_rule(n_cat) == width


@pytest.mark.parametrize("bad", [0, -1, -100])
def test_rule_rejects_non_positive(bad: int) -> None:
    with pytest.raises(ValueError):
        emb_sz_rule(bad)


@given(st.integers(min_value=1, max_value=10**7))
def test_rule_is_bounded_and_monotone(n: int) -> None:
    width = emb_sz_rule(n)
    assert 1 <= width <= 50
    assert width <= n
    assert emb_sz_rule(n + 1) >= width


def test_get_emb_szs_keeps_mapping_order() -> None:
    cards = {"store": 1116, "dow": 8, "promo": 3}
    assert get_emb_szs(cards) == [(1116, 50), (8, 4), (3, 2)]


def test_get_emb_szs_overrides_by_name() -> None:
    cards = {"store": 1116, "dow": 8}
    assert get_emb_szs(cards, {"dow": 6}) == [(1116, 50), (8, 6)]


def test_get_emb_szs_unknown_override_raises() -> None:
    with pytest.raises(ValueError, match="nope"):
        get_emb_szs({"a": 4}, {"nope": 3})


def test_get_emb_szs_bad_override_width_raises() -> None:
    with pytest.raises(ValueError, match="a"):
        get_emb_szs({"a": 4}, {"a": 0})
