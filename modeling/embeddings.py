"""Embedding-size heuristics for categorical columns."""

from __future__ import annotations

from collections.abc import Mapping

MAX_EMB_SZ = 50


def emb_sz_rule(n_cat: int) -> int:
    """Embedding width for a column with `n_cat` codes (categories plus the unknown token)."""
    if int(n_cat) != n_cat or n_cat < 1:
        raise ValueError(f"n_cat must be a positive integer, got {n_cat!r}")
    return max(1, min(MAX_EMB_SZ, (int(n_cat) + 1) // 2))


def get_emb_szs(
    cardinalities: Mapping[str, int], overrides: Mapping[str, int] | None = None
) -> list[tuple[int, int]]:
    """(n_codes, width) per column in mapping order; `overrides` pins widths by column name."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(cardinalities))
    if unknown:
        raise ValueError(f"embedding size overrides name unknown columns: {unknown}")
    out: list[tuple[int, int]] = []
    for name, n_cat in cardinalities.items():
        width = emb_sz_rule(n_cat)
        if name in overrides:
            width = int(overrides[name])
            if width < 1:
                raise ValueError(f"embedding size override for {name!r} must be >= 1, got {width}")
        out.append((int(n_cat), width))
    return out
