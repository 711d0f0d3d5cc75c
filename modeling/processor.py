"""TabularProcessor: turn a DataFrame into (int64 category codes, float32 continuous) arrays.

Fit learns every piece of state (vocabularies, medians, means, stds); transform only applies it,
so training, batch scoring and serving share one mapping. State is plain JSON data.

Categorical values are canonicalised to strings before lookup, so the same id arriving as
1, 1.0, "1" or np.int64(1) gets one code; code 0 is the unknown/missing token.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from modeling.errors import DataError, TabrecError

FORMAT = "tabrec.tabular_processor"
VERSION = 1
NA_SUFFIX = "_na"
_INT64_LIMIT = 2.0**63


class NotFittedError(TabrecError, RuntimeError):
    """Raised when a processor is used before fit (a programming error, not bad input)."""


# ---------------------------------------------------------------- categorical canonicalisation


def _canon_timestamp(ts: pd.Timestamp) -> str:
    """Midnight timestamps become ISO dates so '2015-07-31' strings match parsed dates."""
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    if ts == ts.normalize():
        return ts.strftime("%Y-%m-%d")
    return ts.isoformat()


def _canon_scalar(v: Any) -> str | None:
    """Canonical string of one value (used only on unique values, never per row)."""
    if v is None or v is pd.NaT or v is pd.NA:
        return None
    if isinstance(v, bool | np.bool_):
        return "True" if v else "False"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return None if np.isnan(v) else _canon_float_native(np.asarray([v]))[0]
    if isinstance(v, str):
        return v
    if isinstance(v, dt.datetime | np.datetime64):
        ts = pd.Timestamp(v)
        return None if ts is pd.NaT else _canon_timestamp(ts)
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


def _canon_float_native(vals: np.ndarray) -> np.ndarray:
    """Integral floats -> '1'; others -> shortest repr in their own precision."""
    out = vals.astype(str).astype(object)
    wide = vals.astype(np.float64)
    integral = np.isfinite(wide) & (wide == np.floor(wide)) & (np.abs(wide) < _INT64_LIMIT)
    out[integral] = wide[integral].astype(np.int64).astype(str)
    return out


def _canon_index(u: pd.Index) -> np.ndarray:
    """Canonical strings (object array, None for missing) of the unique values of a column."""
    if isinstance(u, pd.CategoricalIndex):
        u = pd.Index(np.asarray(u))
    if len(u) == 0:
        return np.empty(0, dtype=object)
    dtype = u.dtype
    if ptypes.is_bool_dtype(dtype):
        return np.where(u.to_numpy(dtype=bool), "True", "False").astype(object)
    if ptypes.is_integer_dtype(dtype):
        return np.asarray(u.astype(str), dtype=object)
    if ptypes.is_float_dtype(dtype):
        native = u.to_numpy() if isinstance(dtype, np.dtype) else u.to_numpy(dtype=np.float64)
        return _canon_float_native(native)
    if ptypes.is_datetime64_any_dtype(dtype):
        return np.array([_canon_timestamp(ts) for ts in u], dtype=object)
    if ptypes.infer_dtype(u, skipna=True) == "string":
        return np.asarray(u, dtype=object)
    return np.array([_canon_scalar(v) for v in u], dtype=object)


def _factorize_canon(s: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row -> unique position, -1 when missing) and the canonical string of each unique."""
    codes, uniques = pd.factorize(s, use_na_sentinel=True)
    return codes, _canon_index(pd.Index(uniques))


_DENSE_SPAN = 1 << 20  # widest range of integer-looking vocabulary entries kept as a dense table
_INT_TEXT = r"0|-?[1-9][0-9]{0,17}"  # canonical ints that surely fit int64


def _int_table(vocab_index: pd.Index) -> tuple[int, np.ndarray] | None:
    """(lowest value, code per value from it) for the vocabulary entries that are canonical ints.

    Lets integer and integral-float columns skip factorize + string canonicalisation (the
    costly part for small frames). None when those entries span too wide a range for a table.
    """
    text = pd.Series(vocab_index.to_numpy(dtype=object), dtype=object)
    is_int = text.str.fullmatch(_INT_TEXT).fillna(False).to_numpy(dtype=bool)
    if not is_int.any():
        return 0, np.zeros(0, dtype=np.int64)
    values = text[is_int].astype(np.int64).to_numpy()
    lo, hi = int(values.min()), int(values.max())
    if hi - lo >= _DENSE_SPAN:
        return None
    table = np.zeros(hi - lo + 1, dtype=np.int64)
    table[values - lo] = np.flatnonzero(is_int) + 1
    return lo, table


def _dense_codes(values: np.ndarray, int_table: tuple[int, np.ndarray]) -> np.ndarray:
    lo, table = int_table
    out = np.zeros(len(values), dtype=np.int64)
    inside = (values >= lo) & (values < lo + len(table))
    out[inside] = table[values[inside].astype(np.int64) - lo]
    return out


def _fast_codes(s: pd.Series | np.ndarray, vocab_index: pd.Index,
                int_table: tuple[int, np.ndarray] | None) -> np.ndarray | None:
    """Codes for plain numpy int/float/bool/str columns without canonicalising; None: general path.

    Gives exactly what the general path gives: an integral float canonicalises like the int.
    """
    dtype = s.dtype
    if not isinstance(dtype, np.dtype):
        return None
    values = s if isinstance(s, np.ndarray) else s.to_numpy()
    if dtype.kind == "O":
        if ptypes.infer_dtype(values, skipna=True) != "string":
            return None  # mixed or non-string objects need canonicalising
        # a str is its own canonical form; missing values (None, NaN) are in no vocabulary: code 0
        return (vocab_index.get_indexer(values) + 1).astype(np.int64)
    if dtype.kind == "b":
        pair = vocab_index.get_indexer(pd.Index(["False", "True"], dtype=object)) + 1
        return pair.astype(np.int64)[values.astype(np.int64)]
    if int_table is None:
        return None
    if dtype.kind == "i" or (dtype.kind == "u" and dtype.itemsize < 8):
        return _dense_codes(values.astype(np.int64, copy=False), int_table)
    if dtype.kind == "f":
        x = values
        missing = integral_or_missing(x)
        if missing is None:
            return None  # fractional or infinite values canonicalise as float strings
        codes = _dense_codes(np.where(missing, 0, x).astype(np.int64), int_table)
        codes[missing] = 0
        return codes
    return None


def integral_or_missing(x: np.ndarray) -> np.ndarray | None:
    """For a float array whose values are all whole numbers within int64 or NaN: the NaN mask
    (those read as ints through an int table); None when any value has a fraction or is infinite."""
    missing = np.isnan(x)
    return missing if np.all(missing | ((x == np.floor(x)) & (np.abs(x) < _INT64_LIMIT))) else None


def _lookup_codes(s: pd.Series | np.ndarray, vocab_index: pd.Index, int_table: tuple[int, np.ndarray] | None = None) -> np.ndarray:
    """Vectorised value -> code; code = vocab position + 1, 0 for unseen or missing."""
    fast = _fast_codes(s, vocab_index, int_table)
    return fast if fast is not None else _general_codes(s, vocab_index)


def _general_codes(s: pd.Series | np.ndarray, vocab_index: pd.Index) -> np.ndarray:
    """Any dtype: factorize, canonicalise the uniques, look them up."""
    row_pos, canon = _factorize_canon(s)
    found = vocab_index.get_indexer(pd.Index(canon, dtype=object)) + 1
    found[pd.isna(canon)] = 0
    table = np.append(found, 0).astype(np.int64)  # row_pos -1 (missing) picks the trailing 0
    return table[row_pos]


# ---------------------------------------------------------------- continuous conversion


def _to_float(s: pd.Series | np.ndarray, col: str) -> np.ndarray:
    """Continuous column as float64 with NaN for missing; bad strings raise DataError."""
    if isinstance(s, np.ndarray):
        if s.dtype.kind in "biuf":
            return s.astype(np.float64)
        s = pd.Series(s, copy=False)
    dtype = s.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        s = s.astype(object)
        dtype = s.dtype
    if ptypes.is_bool_dtype(dtype):
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    if ptypes.is_datetime64_any_dtype(dtype):
        if getattr(dtype, "tz", None) is not None:
            s = s.dt.tz_convert("UTC").dt.tz_localize(None)
        secs = (s - pd.Timestamp(0)) / pd.Timedelta(seconds=1)
        return secs.to_numpy(dtype=np.float64, na_value=np.nan)
    if ptypes.is_timedelta64_dtype(dtype):
        return (s / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64, na_value=np.nan)
    if ptypes.is_numeric_dtype(dtype):
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    return _parse_numeric(s.astype(object), col)


_WORDS = {"": np.nan, "true": 1.0, "false": 0.0, "nan": np.nan, "na": np.nan, "null": np.nan}


def _parse_numeric(obj: pd.Series, col: str) -> np.ndarray:
    """Object column -> float64; blank/'nan'/'null' are missing, 'true'/'false' are 1/0."""
    num = pd.to_numeric(obj, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(num) & obj.notna().to_numpy()
    if bad.any():  # only rows that failed to parse are inspected (usually none)
        rows = np.flatnonzero(bad)
        words = obj.iloc[rows].astype(str).str.strip().str.lower()
        known = words.isin(list(_WORDS)).to_numpy()
        num[rows[known]] = words[known].map(_WORDS).to_numpy(dtype=np.float64)
        bad[rows[known]] = False
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        label = obj.index[first]
        label = label.item() if isinstance(label, np.generic) else label
        raise DataError(f"column {col!r}: non-numeric value {obj.iloc[first]!r} at row {label!r}")
    return num


def _finite_or_nan(x: np.ndarray) -> np.ndarray:
    """Infinities are treated as missing so they never reach normalisation."""
    return np.where(np.isfinite(x), x, np.nan)


# ---------------------------------------------------------------- processor


class TabularProcessor:
    """Categorify (0 = unknown/missing), fill missing continuous values (+ `<col>_na` flags), normalise."""

    def __init__(
        self,
        cat_names: Sequence[str],
        cont_names: Sequence[str],
        normalize: bool = True,
        add_na_flags: bool = True,
    ) -> None:
        self.cat_names = [str(c) for c in cat_names]
        self.cont_names = [str(c) for c in cont_names]
        self.normalize = bool(normalize)
        self.add_na_flags = bool(add_na_flags)
        self._check_names()
        self.vocab: dict[str, list[str]] = {}
        self.na_cols: list[str] = []
        self.medians: dict[str, float] = {}
        self.means: dict[str, float] = {}
        self.stds: dict[str, float] = {}
        self._fitted = False
        self._index: dict[str, pd.Index] = {}
        self._int_tables: dict[str, tuple[int, np.ndarray] | None] = {}
        self._arrays: Any = None

    def _check_names(self) -> None:
        """A column may be both categorical and continuous, but not listed twice in one role."""
        for role, names in (("cat_names", self.cat_names), ("cont_names", self.cont_names)):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"columns listed more than once in {role}: {dupes}")

    # ---- state

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @property
    def na_flag_names(self) -> list[str]:
        return [c + NA_SUFFIX for c in self.na_cols]

    @property
    def cat_names_out(self) -> list[str]:
        """Categorical output columns: the input categoricals, then one `<col>_na` flag per na col."""
        return self.cat_names + self.na_flag_names

    @property
    def cardinalities(self) -> dict[str, int]:
        """Codes per output categorical column, counting the unknown token (0)."""
        self._require_fitted()
        out = {c: len(self.vocab[c]) + 1 for c in self.cat_names}
        out.update({c: 3 for c in self.na_flag_names})
        return out

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError("TabularProcessor is not fitted: call fit() or from_dict() first")

    def _rebuild_index(self) -> None:
        self._index = {c: pd.Index(v, dtype=object) for c, v in self.vocab.items()}
        self._int_tables = {c: _int_table(ix) for c, ix in self._index.items()}
        self._arrays = None  # the small-request encoder over these tables, built on first use

    # ---- fit / transform

    def fit(self, df: pd.DataFrame) -> TabularProcessor:
        """Learn vocabularies, medians and mean/std (ddof=0, of the median-filled column)."""
        _require_columns(df, self.cat_names + self.cont_names)
        vocab = {c: _fit_vocab(df[c]) for c in self.cat_names}
        na_cols: list[str] = []
        medians, means, stds = {}, {}, {}
        for c in self.cont_names:
            x = _finite_or_nan(_to_float(df[c], c))
            missing = np.isnan(x)
            median = float(np.median(x[~missing])) if (~missing).any() else 0.0
            filled = np.where(missing, median, x)
            mean = float(filled.mean()) if len(filled) else 0.0
            std = float(filled.std()) if len(filled) else 1.0
            medians[c], means[c] = median, mean
            stds[c] = std if math.isfinite(std) and std > 0 else 1.0
            if self.add_na_flags and missing.any():
                na_cols.append(c)
        clash = sorted(set(c + NA_SUFFIX for c in na_cols) & set(self.cat_names + self.cont_names))
        if clash:
            raise ValueError(f"missing-value flag columns would clash with input columns: {clash}")
        self.vocab, self.na_cols = vocab, na_cols
        self.medians, self.means, self.stds = medians, means, stds
        self._rebuild_index()
        self._fitted = True
        return self

    def transform(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(x_cat int64 [n, len(cat_names_out)], x_cont float32 [n, len(cont_names)])."""
        self._require_fitted()
        _require_columns(df, self.cat_names + self.cont_names)
        return self._encode(df, len(df))

    def transform_arrays(self, cols: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        """`transform` over plain arrays by column name (the small-request path): the same
        lookups and scaling, without a DataFrame or a pandas Index per call
        (`modeling.processor_arrays.ArrayEncoder`, built once per fitted state)."""
        self._require_fitted()
        missing = [c for c in self.cat_names + self.cont_names if c not in cols]
        if missing:
            raise DataError(f"input is missing required column(s): {missing}")
        if self._arrays is None:
            from modeling.processor_arrays import ArrayEncoder

            self._arrays = ArrayEncoder(self)
        return self._arrays(cols, n)

    def _encode(self, df: pd.DataFrame | Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        x_cat = np.zeros((n, len(self.cat_names_out)), dtype=np.int64)
        x_cont = np.zeros((n, len(self.cont_names)), dtype=np.float32)
        for j, c in enumerate(self.cat_names):
            x_cat[:, j] = _lookup_codes(df[c], self._index[c], self._int_tables[c])
        na_pos = {c: len(self.cat_names) + i for i, c in enumerate(self.na_cols)}
        for j, c in enumerate(self.cont_names):
            x = _finite_or_nan(_to_float(df[c], c))
            missing = np.isnan(x)
            x = np.where(missing, self.medians[c], x)
            if self.normalize:
                x = (x - self.means[c]) / self.stds[c]
            x_cont[:, j] = x
            if c in na_pos:
                x_cat[:, na_pos[c]] = np.where(missing, 2, 1)
        return x_cat, x_cont

    def fit_transform(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return self.fit(df).transform(df)

    def classes_to_code(self, col: str, values: Any) -> np.ndarray:
        """Codes (int64) of raw values for one categorical column; unknown/missing -> 0."""
        self._require_fitted()
        if col not in self._index:
            raise KeyError(f"{col!r} is not a vocabulary column; have {sorted(self._index)}")
        return _lookup_codes(pd.Series(values, dtype=object), self._index[col])

    def code_to_class(self, col: str, codes: Any) -> np.ndarray:
        """Inverse of classes_to_code: canonical string per code, None for code 0."""
        self._require_fitted()
        table = np.array([None, *self.vocab[col]], dtype=object)
        return table[np.asarray(codes, dtype=np.int64)]

    # ---- serialisation

    def to_dict(self) -> dict[str, Any]:
        """Pure-JSON state (no numpy scalars, no NaN) that from_dict restores exactly."""
        self._require_fitted()
        return {
            "format": FORMAT,
            "version": VERSION,
            "cat_names": list(self.cat_names),
            "cont_names": list(self.cont_names),
            "normalize": self.normalize,
            "add_na_flags": self.add_na_flags,
            "vocab": {c: [str(v) for v in self.vocab[c]] for c in self.cat_names},
            "na_cols": list(self.na_cols),
            "medians": {c: float(self.medians[c]) for c in self.cont_names},
            "means": {c: float(self.means[c]) for c in self.cont_names},
            "stds": {c: float(self.stds[c]) for c in self.cont_names},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TabularProcessor:
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(
                f"not a {FORMAT} v{VERSION} state: format={d.get('format')!r}, "
                f"version={d.get('version')!r}"
            )
        proc = cls(d["cat_names"], d["cont_names"], d["normalize"], d["add_na_flags"])
        missing = [c for c in proc.cat_names if c not in d["vocab"]]
        missing += [c for c in proc.cont_names if c not in d["medians"]]
        if missing:
            raise ValueError(f"processor state lacks entries for columns: {missing}")
        proc.vocab = {c: [str(v) for v in d["vocab"][c]] for c in proc.cat_names}
        proc.na_cols = [str(c) for c in d["na_cols"]]
        proc.medians = {c: float(d["medians"][c]) for c in proc.cont_names}
        proc.means = {c: float(d["means"][c]) for c in proc.cont_names}
        proc.stds = {c: float(d["stds"][c]) for c in proc.cont_names}
        proc._rebuild_index()
        proc._fitted = True
        return proc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> TabularProcessor:
        return cls.from_dict(json.loads(s))

    def __repr__(self) -> str:
        state = (
            f"{len(self.cat_names_out)} cat, {len(self.cont_names)} cont"
            if self._fitted
            else "unfitted"
        )
        return f"TabularProcessor({state})"


def _fit_vocab(s: pd.Series) -> list[str]:
    """Sorted canonical training values (missing excluded)."""
    _, canon = _factorize_canon(s)
    return sorted({v for v in canon if v is not None})


def _require_columns(df: pd.DataFrame, names: Sequence[str]) -> None:
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise DataError(f"input is missing required column(s): {missing}")
