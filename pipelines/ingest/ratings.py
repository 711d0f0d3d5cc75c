"""Readers and validation for ratings data: MovieLens layouts, generic CSV and Parquet.

``read_ratings`` returns one frame whatever the source: ``user`` (str), ``item`` (str),
``rating`` (float32), ``timestamp`` (int64 unix seconds, 0 when the source has none), in
file order. Bad input raises ``DataError`` naming the file, the column and the first
offending rows (1-based line numbers for text files, 1-based row numbers for Parquet;
line numbers assume one record per line). Duplicate (user, item) pairs are not an error:
the latest rating by timestamp is kept (ties: the later row) and the number dropped is
logged as a warning on the ``tabrec.ingest`` logger.

The frame's ``attrs`` carry ``source``, ``format``, ``rating_scale`` (the declared scale,
else the observed min/max), ``duplicates_dropped`` and ``implicit``.

Interaction data (clicks, purchases: user and item columns, no rating column) is read with
``require_rating=False``: ``rating`` is then NaN, ``attrs["implicit"]`` is True and the rating
scale is None; duplicate (user, item) interactions count once, as for ratings.

Format detection and the per-layout raw readers are in `pipelines.ingest.ratings_formats`;
this module validates their columns (and reads item metadata). `detect_format`,
`RATING_FORMATS` and `COLUMNS` are importable from here as before.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from modeling.errors import DataError
from pipelines.ingest.ratings_formats import (
    COLUMNS,
    RATING_FORMATS,
    base_name,
    check_file,
    decode,
    detect_format,
    fail_rows,
    head_line,
    norm,
    read_csv,
    read_raw,
    sniff_delimiter,
    where,
)

__all__ = ["COLUMNS", "ML_100K_GENRES", "RATING_FORMATS", "detect_format", "rating_scale", "read_items",
           "read_ratings"]

logger = logging.getLogger("tabrec.ingest")

ML_100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western")
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


# ---------------------------------------------------------------- column conversion
def _to_str_ids(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(ids as Python str, integer codes); numeric ids become '17', not '17.0'.

    Going through the distinct values shares one str object per id and yields the codes
    duplicate detection needs.
    """
    if pd.api.types.is_float_dtype(col):
        col = col.astype(np.int64)
    elif not (pd.api.types.is_integer_dtype(col) or pd.api.types.is_bool_dtype(col)):
        col = col.astype(str).str.strip()
    codes, uniques = pd.factorize(col)
    return np.asarray(uniques.astype(str), dtype=object)[codes], codes


def _ids(frame: pd.DataFrame, source: str, role: str, path: Path,
         first_line: int | None) -> tuple[np.ndarray, np.ndarray]:
    col = frame[source]
    bad = col.isna().to_numpy()
    if col.dtype == object:
        bad |= col.astype(str).str.strip().eq("").to_numpy()
    elif pd.api.types.is_float_dtype(col):
        bad |= ~bad & (col.fillna(0) % 1 != 0).to_numpy()
    if bad.any():
        raise fail_rows(path, source, f"has a missing or malformed {role} id", bad, frame,
                         source, first_line)
    return _to_str_ids(col)


def _ratings(frame: pd.DataFrame, source: str, path: Path, first_line: int | None,
             scale: tuple[float, float] | None) -> np.ndarray:
    col = frame[source]
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        col = pd.to_numeric(col, errors="coerce")
    values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise fail_rows(path, source, "has missing or non-numeric ratings", bad, frame, source,
                         first_line)
    if scale is not None:
        lo, hi = scale
        bad = (values < lo) | (values > hi)
        if bad.any():
            raise fail_rows(path, source, f"has ratings outside the scale [{lo:g}, {hi:g}]",
                             bad, frame, source, first_line)
    return values.astype(np.float32)


def _timestamps(frame: pd.DataFrame, source: str | None, path: Path,
                first_line: int | None) -> np.ndarray:
    """Unix seconds; numeric columns as they are, date/time strings parsed as UTC."""
    if source is None:
        return np.zeros(len(frame), dtype=np.int64)
    col = frame[source]
    if not pd.api.types.is_datetime64_any_dtype(col) and not pd.api.types.is_numeric_dtype(col):
        numeric = pd.to_numeric(col, errors="coerce")
        if numeric.notna().sum() >= col.notna().sum():
            col = numeric
        else:
            col = pd.to_datetime(col, utc=True, errors="coerce", format="mixed")
    if pd.api.types.is_datetime64_any_dtype(col):
        col = (pd.to_datetime(col, utc=True) - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    seconds = np.where(bad, 0, values).astype(np.int64)
    if bad.any():
        raise fail_rows(path, source, "has missing or unparseable timestamps", bad, frame,
                         source, first_line)
    return seconds


def _drop_duplicates(df: pd.DataFrame, u_codes: np.ndarray, i_codes: np.ndarray,
                     path: Path, what: str = "rating") -> tuple[pd.DataFrame, int]:
    """Keep the latest rating per (user, item) by timestamp, then by position."""
    key = u_codes.astype(np.int64) * (int(i_codes.max()) + 1) + i_codes
    sorted_key = np.sort(key)
    if not (sorted_key[1:] == sorted_key[:-1]).any():
        return df, 0
    order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy()))
    later = pd.Series(key[order]).duplicated(keep="last").to_numpy()
    keep = np.sort(order[~later])
    dropped = len(df) - len(keep)
    logger.warning("%s: dropped %d duplicate (user, item) %s(s), keeping the latest by "
                   "timestamp", path, dropped, what)
    return df.iloc[keep].reset_index(drop=True), dropped


# ---------------------------------------------------------------- public API
def read_ratings(path: str | Path, fmt: str = "auto", user_col: str | None = None,
                 item_col: str | None = None, rating_col: str | None = None,
                 time_col: str | None = None,
                 scale: tuple[float, float] | None = None,
                 require_rating: bool = True) -> pd.DataFrame:
    """Read and validate a ratings file into user/item/rating/timestamp (see module doc).

    Column names apply to the csv and parquet formats (and override guessing there); the
    MovieLens layouts have fixed columns. ``scale=(lo, hi)`` rejects ratings outside it;
    without it nothing is rejected and the observed range becomes the scale. With
    ``require_rating=False`` a CSV/Parquet file without a rating column is read as
    interactions (rating NaN, ``attrs["implicit"]`` True) instead of being an error.
    """
    if fmt not in RATING_FORMATS:
        raise DataError(f"unknown ratings format {fmt!r}; choose one of {RATING_FORMATS}")
    if scale is not None and not scale[0] < scale[1]:
        raise DataError(f"rating scale must be (low, high) with low < high, got {scale}")
    p = check_file(path)
    fmt = detect_format(p) if fmt == "auto" else fmt
    frame, roles, first_line = read_raw(p, fmt, user_col, item_col, rating_col, time_col, require_rating)
    implicit = "rating" not in roles

    if first_line is not None:   # blank lines were kept so line numbers stay right; drop them
        frame = frame[frame.notna().any(axis=1).to_numpy()]
    if frame.empty:
        raise DataError(f"{p}: no {'interactions' if implicit else 'ratings'} in file")
    users, u_codes = _ids(frame, roles["user"], "user", p, first_line)
    items, i_codes = _ids(frame, roles["item"], "item", p, first_line)
    df = pd.DataFrame({
        "user": users,
        "item": items,
        "rating": (np.full(len(frame), np.nan, dtype=np.float32) if implicit
                   else _ratings(frame, roles["rating"], p, first_line, scale)),
        "timestamp": _timestamps(frame, roles.get("timestamp"), p, first_line),
    })
    df, dropped = _drop_duplicates(df, u_codes, i_codes, p, "interaction" if implicit else "rating")
    observed = None if implicit else (float(df["rating"].min()), float(df["rating"].max()))
    df.attrs.update({"source": str(p), "format": fmt, "duplicates_dropped": dropped, "implicit": implicit,
                     "rating_scale": tuple(map(float, scale)) if scale and not implicit else observed})
    return df


def rating_scale(df: pd.DataFrame) -> tuple[float, float]:
    """(low, high): the scale recorded by read_ratings, else the observed min and max rating."""
    recorded = df.attrs.get("rating_scale")
    if recorded is not None:
        return float(recorded[0]), float(recorded[1])
    if df.empty or "rating" not in df:
        raise DataError("cannot infer a rating scale from an empty frame")
    return float(df["rating"].min()), float(df["rating"].max())


# ---------------------------------------------------------------- items
def _items_uitem(path: Path) -> tuple[pd.DataFrame, int]:
    """u.item: id|title|release date|video date|url|19 genre flags, latin-1, no header."""
    text = decode(path)
    lines = pd.Series(text.splitlines())
    parts = lines.str.split("|", expand=True)
    if parts.shape[1] < 2:
        raise DataError(f"{path}: expected '|'-separated 'id|title|...' lines")
    out = pd.DataFrame({"item": parts[0], "title": parts[1]})
    if parts.shape[1] >= 5:
        released = parts[2].fillna("").str.extract(r"(\d{4})\s*$", expand=False)
        out["year"] = released.fillna(parts[1].fillna("").str.extract(_YEAR_IN_TITLE,
                                                                       expand=False))
    if parts.shape[1] == 5 + len(ML_100K_GENRES):
        flags = parts.iloc[:, 5:].eq("1").to_numpy()
        genres = np.full(len(parts), "", dtype=object)
        for g, genre in enumerate(ML_100K_GENRES):   # 19 flags, vectorized over items
            genres = np.where(flags[:, g], genres + "|" + genre, genres)
        out["genres"] = pd.Series(genres).str.slice(1)
    return out, 1


def _items_dat(path: Path) -> tuple[pd.DataFrame, int]:
    """movies.dat: id::title::genres (ml-1m/ml-10m)."""
    parts = pd.Series(decode(path).splitlines()).str.split("::", n=2, expand=True)
    if parts.shape[1] < 2:
        raise DataError(f"{path}: expected 'id::title::genres' lines")
    out = pd.DataFrame({"item": parts[0], "title": parts[1]})
    if parts.shape[1] == 3:
        out["genres"] = parts[2].fillna("")
    return out, 1


def _items_csv(path: Path) -> tuple[pd.DataFrame, int]:
    """CSV with a header: an id column (movieId, item, ...), title, optional year and genres."""
    line = head_line(path)
    sep = sniff_delimiter(line)
    frame = None
    for encoding in ("utf-8", "latin-1"):
        try:
            frame = read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                              encoding=encoding)
            break
        except DataError as exc:
            if not isinstance(exc.__cause__, UnicodeDecodeError):
                raise
    assert frame is not None
    by_norm = {norm(c): c for c in reversed(list(frame.columns))}
    item = next((by_norm[g] for g in ("movieid", "itemid", "item", "id", "movie")
                 if g in by_norm), None)
    title = next((by_norm[g] for g in ("title", "name", "movietitle") if g in by_norm), None)
    if item is None or title is None:
        raise DataError(f"{path}: items file needs an id column (movieId/item) and a title "
                        f"column; found {list(frame.columns)}")
    out = pd.DataFrame({"item": frame[item], "title": frame[title]})
    if "year" in by_norm:
        out["year"] = frame[by_norm["year"]]
    for g in ("genres", "genre"):
        if g in by_norm:
            out["genres"] = frame[by_norm[g]]
            break
    return out, 2


def read_items(path: str | Path) -> pd.DataFrame:
    """Item metadata (u.item, movies.dat or a movies CSV) as item, title[, year][, genres].

    ``year`` (nullable Int64) comes from a year column, a release date, or a trailing
    "(1995)" in the title. Duplicate item ids keep the first row (logged on tabrec.ingest).
    """
    p = check_file(path)
    name = base_name(p)
    line = head_line(p)
    if name == "u.item" or (line.count("|") >= 4 and line.split("|")[0].strip().isdigit()):
        frame, first_line = _items_uitem(p)
    elif name.endswith(".dat") or "::" in line:
        frame, first_line = _items_dat(p)
    else:
        frame, first_line = _items_csv(p)
    frame = frame.fillna("")
    blank_line = frame.apply(lambda c: c.astype(str).str.strip().eq("")).all(axis=1).to_numpy()
    frame = frame[~blank_line]
    if frame.empty:
        raise DataError(f"{p}: no items in file")
    frame = frame.assign(item=frame["item"].astype(str).str.strip(),
                         title=frame["title"].astype(str))
    bad = frame["item"].eq("").to_numpy()
    if bad.any():
        raise fail_rows(p, "item", "has a missing item id", bad, frame, "item", first_line)
    if "year" not in frame:
        frame["year"] = frame["title"].str.extract(_YEAR_IN_TITLE, expand=False)
    year = pd.to_numeric(frame["year"].replace("", np.nan), errors="coerce")
    frame["year"] = year.where(year % 1 == 0).astype("Int64")
    dup = frame["item"].duplicated().to_numpy()
    if dup.any():
        logger.warning("%s: %d duplicate item id(s), keeping the first (%s)", p, int(dup.sum()),
                       where(frame.index.to_numpy()[dup], first_line))
        frame = frame[~dup]
    columns = [c for c in ("item", "title", "year", "genres") if c in frame]
    out = frame[columns].reset_index(drop=True)
    out.attrs["source"] = str(p)
    return out
