"""The processor's transform for small requests, over tables built once per loaded processor.

`TabularProcessor.transform` looks codes up through a pandas Index per column and call; for a
request of a few records the Index construction is most of the processor's time. `ArrayEncoder`
holds the same vocabularies as plain lookups built at load time: one flat code table for every
column whose vocabulary is integer-like (all such columns of a request in one vectorized take)
and a dict per column for strings; the continuous columns are filled and scaled as one matrix.
The codes and float32 values are exactly `transform`'s (the same lookups, the same float64
operations per element); any column this module does not read plainly (mixed objects, floats
with fractions, bools, datetimes) goes through the processor's own per-column lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from modeling.processor import TabularProcessor


class ArrayEncoder:
    """(x_cat, x_cont) for arrays by column name, as `TabularProcessor.transform` gives them."""

    def __init__(self, proc: TabularProcessor) -> None:
        from modeling.processor import _lookup_codes, _to_float, integral_or_missing

        self._lookup, self._integral_or_missing, self._to_float = _lookup_codes, integral_or_missing, _to_float
        self.proc = proc
        self.cat_names = list(proc.cat_names)
        self.cont_names = list(proc.cont_names)
        self.n_cat_out = len(proc.cat_names_out)
        # integer-like vocabularies: one flat table (column j's codes at start[j]..) and a zero slot
        tables_all = [proc._int_tables[c] for c in self.cat_names]
        tables = [(j, c, t) for j, (c, t) in enumerate(zip(self.cat_names, tables_all, strict=True))]
        tables = [(j, c, t) for j, c, t in tables if t is not None]
        self.int_pos = np.array([j for j, _, _ in tables], dtype=np.intp)
        self.int_names = [c for _, c, _ in tables]
        sizes = [len(t[1]) for _, _, t in tables]
        self.int_low = np.array([t[0] for _, _, t in tables], dtype=np.int64)
        self.int_span = np.array(sizes, dtype=np.int64)
        self.int_start = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
        self.int_flat = np.concatenate([*(t[1] for _, _, t in tables), np.zeros(1, np.int64)])
        self.zero_slot = len(self.int_flat) - 1
        self.int_high = self.int_low + self.int_span
        self.rest = [j for j, t in enumerate(tables_all) if t is None]
        # strings: a str is its own canonical form; code = vocabulary position + 1
        self.str_codes = {c: {v: i + 1 for i, v in enumerate(proc.vocab[c])} for c in self.cat_names}
        self.medians = np.array([proc.medians[c] for c in self.cont_names], dtype=np.float64)
        self.means = np.array([proc.means[c] for c in self.cont_names], dtype=np.float64)
        self.stds = np.array([proc.stds[c] for c in self.cont_names], dtype=np.float64)
        cont_pos = {c: i for i, c in enumerate(self.cont_names)}
        self.na_src = np.array([cont_pos[c] for c in proc.na_cols], dtype=np.intp)
        self.na_dst = np.arange(len(self.cat_names), self.n_cat_out, dtype=np.intp)

    def __call__(self, cols: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        x_cat = np.zeros((n, self.n_cat_out), dtype=np.int64)
        rest = self.rest  # columns without an int table: strings or the processor's lookup
        if len(self.int_pos):
            # every int-table column read as ints in one matrix: plain ints as they are, integral
            # floats (NaN: missing, code 0) converted, anything else left to the per-column path
            ints = np.zeros((n, len(self.int_pos)), dtype=np.int64)
            zeroed: list[tuple[int, np.ndarray]] = []
            rest = list(rest)
            for k, c in enumerate(self.int_names):
                a = cols[c]
                kind = a.dtype.kind
                if kind == "i" or (kind == "u" and a.dtype.itemsize < 8):
                    ints[:, k] = a
                elif kind == "f":
                    missing = self._integral_or_missing(a)
                    if missing is None:
                        rest.append(self.int_pos[k])  # fractions, infinities: canonicalised there
                        continue
                    ints[:, k] = np.where(missing, 0.0, a)
                    if missing.any():
                        zeroed.append((k, missing))
                else:
                    rest.append(self.int_pos[k])
            inside = (ints >= self.int_low) & (ints < self.int_high)  # no wrap-around
            at = np.where(inside, ints - self.int_low + self.int_start, self.zero_slot)
            for k, missing in zeroed:
                at[missing, k] = self.zero_slot
            x_cat[:, self.int_pos] = self.int_flat[at]
        for j in rest:
            c = self.cat_names[j]
            codes = _string_codes(cols[c], self.str_codes[c])
            x_cat[:, j] = codes if codes is not None else \
                self._lookup(cols[c], self.proc._index[c], self.proc._int_tables[c])
        x_cont = np.zeros((n, len(self.cont_names)), dtype=np.float32)
        if self.cont_names:
            x = np.stack([self._to_float(cols[c], c) for c in self.cont_names], axis=1)
            missing = ~np.isfinite(x)  # infinities are missing, as in `transform`
            x = np.where(missing, self.medians, x)
            if self.proc.normalize:
                x = (x - self.means) / self.stds
            x_cont[:] = x
            if len(self.na_src):
                x_cat[:, self.na_dst] = np.where(missing[:, self.na_src], 2, 1)
        return x_cat, x_cont


def _string_codes(a: np.ndarray, codes: dict[str, int]) -> np.ndarray | None:
    """Codes of an object array of str and missing values (None, NaN: code 0), or None when it
    holds anything else (ints, bytes, str subclasses...: the processor canonicalises those)."""
    if a.dtype.kind != "O":
        return None
    out = np.zeros(len(a), dtype=np.int64)
    for i, v in enumerate(a.tolist()):  # a request's few values; a batch never comes here
        if type(v) is str:
            out[i] = codes.get(v, 0)
        elif not (v is None or (type(v) is float and v != v)):
            return None
    return out
