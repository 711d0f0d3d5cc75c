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
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from modeling.errors import DataError

logger = logging.getLogger("tabrec.ingest")

RATING_FORMATS = ("auto", "ml-100k", "ml-1m", "ml-latest", "csv", "parquet")
COLUMNS = ("user", "item", "rating", "timestamp")
ML_100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western")

# Common spellings per role, compared after lower-casing and dropping "_", "-" and spaces.
_GUESSES = {
    "user": ("user", "userid", "uid", "users", "customer", "customerid", "visitorid"),
    "item": ("item", "itemid", "movieid", "movie", "iid", "product", "productid", "bookid",
             "isbn", "asin"),
    "rating": ("rating", "ratings", "score", "stars", "rate"),
    "timestamp": ("timestamp", "time", "ts", "unixtime", "datetime", "date"),
}
_ML_LATEST_HEADER = ["userId", "movieId", "rating", "timestamp"]
_SHOW = 5   # offending rows quoted in an error message
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


# ---------------------------------------------------------------- small helpers
def _open_bytes(path: Path) -> IO[bytes]:
    """Open a possibly compressed file (by extension) for binary reading."""
    suffix = path.suffix.lower()
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)
    return opener(path, "rb")


def _base_name(path: Path) -> str:
    """File name without a compression suffix, lower-cased."""
    name = path.name.lower()
    for ext in (".gz", ".bz2", ".xz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    return p


def _first_line(path: Path) -> str:
    """First non-empty line, decoded leniently, without its line ending."""
    try:
        with _open_bytes(path) as fh:
            for raw in fh:
                line = raw.decode("latin-1").rstrip("\r\n")
                if line.strip():
                    return line
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc
    raise DataError(f"{path}: file is empty")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _sniff_delimiter(line: str) -> str:
    counts = {d: line.count(d) for d in (",", "\t", ";", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


def _where(labels: Sequence[int] | np.ndarray, first_line: int | None) -> str:
    """'line 3, line 7' for text files (first_line = line of data row 0), else 'row 1, row 5'."""
    if first_line is None:
        return ", ".join(f"row {int(i) + 1}" for i in labels[:_SHOW])
    return ", ".join(f"line {int(i) + first_line}" for i in labels[:_SHOW])


def _show(value: object) -> str:
    """A cell as quoted in messages: 'empty' for missing, else its Python repr."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "empty"
    return repr(value.item() if isinstance(value, np.generic) else value)


def _fail_rows(path: Path, column: str, problem: str, bad: np.ndarray, frame: pd.DataFrame,
               source_col: str, first_line: int | None) -> DataError:
    """A DataError naming file, column, the first offending rows and their values."""
    labels = frame.index.to_numpy()[bad]
    values = frame[source_col].to_numpy()[bad][:_SHOW]
    shown = ", ".join(f"{w} ({_show(v)})" for w, v in zip(
        _where(labels, first_line).split(", "), values, strict=True))
    return DataError(f"{path}: column {column!r} {problem} at {shown}"
                     f" ({int(bad.sum())} row(s) in all)")


def _read_csv(path: Path, **kwargs: object) -> pd.DataFrame:
    """pd.read_csv with parser failures turned into DataError naming the file."""
    try:
        return pd.read_csv(path, skip_blank_lines=False, **kwargs)  # type: ignore[call-overload]
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot parse file: {str(exc).strip()}") from exc


# ---------------------------------------------------------------- format detection
def detect_format(path: str | Path) -> str:
    """Guess the ratings layout from the file name and its first line."""
    p = _check_file(path)
    name = _base_name(p)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    line = _first_line(p)
    if "::" in line:
        return "ml-1m"
    fields = line.split("\t")
    if len(fields) == 4 and all(f.strip().lstrip("-").isdigit() for f in fields):
        return "ml-100k"
    if [f.strip().strip('"') for f in line.split(",")] == _ML_LATEST_HEADER:
        return "ml-latest"
    if name in ("u.data", "ua.base", "ua.test", "ub.base", "ub.test") and "\t" in line:
        return "ml-100k"
    if name.endswith(".dat") and "::" in line:
        return "ml-1m"
    return "csv"


# ---------------------------------------------------------------- raw readers
# Each returns (frame with the source's columns, {role: source column}, first_line or None).
_Raw = tuple[pd.DataFrame, dict[str, str], int | None]


def _raw_ml100k(path: Path) -> _Raw:
    frame = _read_csv(path, sep="\t", header=None, names=list(COLUMNS), encoding="latin-1")
    return frame, {c: c for c in COLUMNS}, 1


def _raw_ml1m(path: Path) -> _Raw:
    # '::' splits on ':' into 7 fields with empty ones between: the fast C parser can do it.
    names = ["user", "_1", "item", "_3", "rating", "_5", "timestamp"]
    frame = _read_csv(path, sep=":", header=None, names=names, encoding="latin-1")
    gaps = frame[["_1", "_3", "_5"]].notna().any(axis=1).to_numpy()
    if gaps.any():
        lines = _where(frame.index.to_numpy()[gaps], 1)
        raise DataError(f"{path}: expected 'user::item::rating::timestamp' at {lines}")
    return frame[list(COLUMNS)], {c: c for c in COLUMNS}, 1


def _pick(columns: list[str], role: str, given: str | None, path: Path,
          required: bool) -> str | None:
    """The source column for a role: the one given, else the first common spelling present."""
    if given is not None:
        if given not in columns:
            raise DataError(f"{path}: no column {given!r} for {role} (columns: {columns})")
        return given
    by_norm = {_norm(c): c for c in reversed(columns)}
    for guess in _GUESSES[role]:
        if guess in by_norm:
            return by_norm[guess]
    if required:
        option = {"user": "user_col", "item": "item_col", "rating": "rating_col"}[role]
        raise DataError(f"{path}: cannot find the {role} column among {columns}; "
                        f"name it with {option}")
    return None


def _roles(columns: list[str], path: Path, user_col: str | None, item_col: str | None,
           rating_col: str | None, time_col: str | None, require_rating: bool = True) -> dict[str, str]:
    found = {
        "user": _pick(columns, "user", user_col, path, True),
        "item": _pick(columns, "item", item_col, path, True),
        "rating": _pick(columns, "rating", rating_col, path, require_rating),
        "timestamp": _pick(columns, "timestamp", time_col, path, False),
    }
    return {k: v for k, v in found.items() if v is not None}


def _raw_csv(path: Path, user_col: str | None, item_col: str | None, rating_col: str | None,
             time_col: str | None, require_rating: bool = True) -> _Raw:
    line = _first_line(path)
    sep = _sniff_delimiter(line)
    header = [f.strip().strip('"') for f in line.split(sep)]
    if all(_is_number(f) for f in header):     # headerless: user, item, rating[, timestamp]
        low = 3 if require_rating else 2       # or, for interactions, just user, item
        if not low <= len(header) <= 4:
            need = ("3 or 4 columns (user, item, rating[, timestamp])" if require_rating
                    else "2 to 4 columns (user, item[, rating[, timestamp]])")
            raise DataError(f"{path}: a file without a header needs {need}, line 1 has {len(header)}")
        names = list(COLUMNS[: len(header)])
        frame = _read_csv(path, sep=sep, header=None, names=names)
        return frame, {c: c for c in names}, 1
    frame = _read_csv(path, sep=sep, nrows=0)
    roles = _roles([str(c) for c in frame.columns], path, user_col, item_col, rating_col,
                   time_col, require_rating)
    for encoding in ("utf-8", "latin-1"):
        try:
            # Only empty cells are missing: ids such as "NA" stay ids.
            frame = pd.read_csv(path, sep=sep, usecols=list(dict.fromkeys(roles.values())),
                                encoding=encoding, dtype={roles["user"]: str, roles["item"]: str},
                                keep_default_na=False, na_values=[""], skip_blank_lines=False)
            break
        except UnicodeDecodeError:
            continue
        except (pd.errors.ParserError, ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot parse file: {str(exc).strip()}") from exc
    return frame, roles, 2


def _raw_ml_latest(path: Path) -> _Raw:
    return _raw_csv(path, *_ML_LATEST_HEADER)


def _raw_parquet(path: Path, user_col: str | None, item_col: str | None,
                 rating_col: str | None, time_col: str | None, require_rating: bool = True) -> _Raw:
    try:
        columns = list(pq.read_schema(path).names)
        roles = _roles(columns, path, user_col, item_col, rating_col, time_col, require_rating)
        frame = pd.read_parquet(path, columns=list(dict.fromkeys(roles.values())))
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from exc
    return frame.reset_index(drop=True), roles, None


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
        raise _fail_rows(path, source, f"has a missing or malformed {role} id", bad, frame,
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
        raise _fail_rows(path, source, "has missing or non-numeric ratings", bad, frame, source,
                         first_line)
    if scale is not None:
        lo, hi = scale
        bad = (values < lo) | (values > hi)
        if bad.any():
            raise _fail_rows(path, source, f"has ratings outside the scale [{lo:g}, {hi:g}]",
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
        raise _fail_rows(path, source, "has missing or unparseable timestamps", bad, frame,
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
    p = _check_file(path)
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt == "ml-100k":
        frame, roles, first_line = _raw_ml100k(p)
    elif fmt == "ml-1m":
        frame, roles, first_line = _raw_ml1m(p)
    elif fmt == "ml-latest":
        frame, roles, first_line = _raw_ml_latest(p)
    elif fmt == "parquet":
        frame, roles, first_line = _raw_parquet(p, user_col, item_col, rating_col, time_col,
                                                require_rating)
    else:
        frame, roles, first_line = _raw_csv(p, user_col, item_col, rating_col, time_col,
                                            require_rating)
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
def _decode(path: Path) -> str:
    """File text as UTF-8, else latin-1 (older MovieLens files)."""
    try:
        with _open_bytes(path) as fh:
            raw = fh.read()
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _items_uitem(path: Path) -> tuple[pd.DataFrame, int]:
    """u.item: id|title|release date|video date|url|19 genre flags, latin-1, no header."""
    text = _decode(path)
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
    parts = pd.Series(_decode(path).splitlines()).str.split("::", n=2, expand=True)
    if parts.shape[1] < 2:
        raise DataError(f"{path}: expected 'id::title::genres' lines")
    out = pd.DataFrame({"item": parts[0], "title": parts[1]})
    if parts.shape[1] == 3:
        out["genres"] = parts[2].fillna("")
    return out, 1


def _items_csv(path: Path) -> tuple[pd.DataFrame, int]:
    """CSV with a header: an id column (movieId, item, ...), title, optional year and genres."""
    line = _first_line(path)
    sep = _sniff_delimiter(line)
    frame = None
    for encoding in ("utf-8", "latin-1"):
        try:
            frame = _read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                              encoding=encoding)
            break
        except DataError as exc:
            if not isinstance(exc.__cause__, UnicodeDecodeError):
                raise
    assert frame is not None
    by_norm = {_norm(c): c for c in reversed(list(frame.columns))}
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
    p = _check_file(path)
    name = _base_name(p)
    line = _first_line(p)
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
        raise _fail_rows(p, "item", "has a missing item id", bad, frame, "item", first_line)
    if "year" not in frame:
        frame["year"] = frame["title"].str.extract(_YEAR_IN_TITLE, expand=False)
    year = pd.to_numeric(frame["year"].replace("", np.nan), errors="coerce")
    frame["year"] = year.where(year % 1 == 0).astype("Int64")
    dup = frame["item"].duplicated().to_numpy()
    if dup.any():
        logger.warning("%s: %d duplicate item id(s), keeping the first (%s)", p, int(dup.sum()),
                       _where(frame.index.to_numpy()[dup], first_line))
        frame = frame[~dup]
    columns = [c for c in ("item", "title", "year", "genres") if c in frame]
    out = frame[columns].reset_index(drop=True)
    out.attrs["source"] = str(p)
    return out
