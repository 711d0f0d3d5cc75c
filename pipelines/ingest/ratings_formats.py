"""Ratings file formats: opening (possibly compressed) files, detecting the layout, and the raw
readers that turn each layout into its source columns plus the role of each column.

`pipelines.ingest.ratings` validates what these readers return (ids, ratings, timestamps,
duplicates) into the one frame every ratings consumer reads; the split keeps format quirks
(MovieLens '::' files, headerless CSV, column-name guessing, Parquet) apart from validation.
The error helpers (`fail_rows`, `where`) live here so both modules quote rows the same way.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from modeling.errors import DataError

__all__ = ["COLUMNS", "RATING_FORMATS", "Raw", "check_file", "decode", "detect_format", "fail_rows", "head_line",
           "base_name", "norm", "read_csv", "read_raw", "sniff_delimiter", "where"]

RATING_FORMATS = ("auto", "ml-100k", "ml-1m", "ml-latest", "csv", "parquet")
COLUMNS = ("user", "item", "rating", "timestamp")

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

# ---------------------------------------------------------------- small helpers
def open_bytes(path: Path) -> IO[bytes]:
    """Open a possibly compressed file (by extension) for binary reading."""
    suffix = path.suffix.lower()
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)
    return opener(path, "rb")


def base_name(path: Path) -> str:
    """File name without a compression suffix, lower-cased."""
    name = path.name.lower()
    for ext in (".gz", ".bz2", ".xz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    return p


def head_line(path: Path) -> str:
    """First non-empty line, decoded leniently, without its line ending."""
    try:
        with open_bytes(path) as fh:
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


def sniff_delimiter(line: str) -> str:
    counts = {d: line.count(d) for d in (",", "\t", ";", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


def where(labels: Sequence[int] | np.ndarray, first_line: int | None) -> str:
    """'line 3, line 7' for text files (first_line = line of data row 0), else 'row 1, row 5'."""
    if first_line is None:
        return ", ".join(f"row {int(i) + 1}" for i in labels[:_SHOW])
    return ", ".join(f"line {int(i) + first_line}" for i in labels[:_SHOW])


def _show(value: object) -> str:
    """A cell as quoted in messages: 'empty' for missing, else its Python repr."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "empty"
    return repr(value.item() if isinstance(value, np.generic) else value)


def fail_rows(path: Path, column: str, problem: str, bad: np.ndarray, frame: pd.DataFrame,
               source_col: str, first_line: int | None) -> DataError:
    """A DataError naming file, column, the first offending rows and their values."""
    labels = frame.index.to_numpy()[bad]
    values = frame[source_col].to_numpy()[bad][:_SHOW]
    shown = ", ".join(f"{w} ({_show(v)})" for w, v in zip(
        where(labels, first_line).split(", "), values, strict=True))
    return DataError(f"{path}: column {column!r} {problem} at {shown}"
                     f" ({int(bad.sum())} row(s) in all)")


def read_csv(path: Path, **kwargs: object) -> pd.DataFrame:
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
    p = check_file(path)
    name = base_name(p)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    line = head_line(p)
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
Raw = tuple[pd.DataFrame, dict[str, str], int | None]


def _raw_ml100k(path: Path) -> Raw:
    frame = read_csv(path, sep="\t", header=None, names=list(COLUMNS), encoding="latin-1")
    return frame, {c: c for c in COLUMNS}, 1


def _raw_ml1m(path: Path) -> Raw:
    # '::' splits on ':' into 7 fields with empty ones between: the fast C parser can do it.
    names = ["user", "_1", "item", "_3", "rating", "_5", "timestamp"]
    frame = read_csv(path, sep=":", header=None, names=names, encoding="latin-1")
    gaps = frame[["_1", "_3", "_5"]].notna().any(axis=1).to_numpy()
    if gaps.any():
        lines = where(frame.index.to_numpy()[gaps], 1)
        raise DataError(f"{path}: expected 'user::item::rating::timestamp' at {lines}")
    return frame[list(COLUMNS)], {c: c for c in COLUMNS}, 1


def _pick(columns: list[str], role: str, given: str | None, path: Path,
          required: bool) -> str | None:
    """The source column for a role: the one given, else the first common spelling present."""
    if given is not None:
        if given not in columns:
            raise DataError(f"{path}: no column {given!r} for {role} (columns: {columns})")
        return given
    by_norm = {norm(c): c for c in reversed(columns)}
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
             time_col: str | None, require_rating: bool = True) -> Raw:
    line = head_line(path)
    sep = sniff_delimiter(line)
    header = [f.strip().strip('"') for f in line.split(sep)]
    if all(_is_number(f) for f in header):     # headerless: user, item, rating[, timestamp]
        low = 3 if require_rating else 2       # or, for interactions, just user, item
        if not low <= len(header) <= 4:
            need = ("3 or 4 columns (user, item, rating[, timestamp])" if require_rating
                    else "2 to 4 columns (user, item[, rating[, timestamp]])")
            raise DataError(f"{path}: a file without a header needs {need}, line 1 has {len(header)}")
        names = list(COLUMNS[: len(header)])
        frame = read_csv(path, sep=sep, header=None, names=names)
        return frame, {c: c for c in names}, 1
    frame = read_csv(path, sep=sep, nrows=0)
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


def _raw_ml_latest(path: Path) -> Raw:
    return _raw_csv(path, *_ML_LATEST_HEADER)


def _raw_parquet(path: Path, user_col: str | None, item_col: str | None,
                 rating_col: str | None, time_col: str | None, require_rating: bool = True) -> Raw:
    try:
        columns = list(pq.read_schema(path).names)
        roles = _roles(columns, path, user_col, item_col, rating_col, time_col, require_rating)
        frame = pd.read_parquet(path, columns=list(dict.fromkeys(roles.values())))
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from exc
    return frame.reset_index(drop=True), roles, None

def decode(path: Path) -> str:
    """File text as UTF-8, else latin-1 (older MovieLens files)."""
    try:
        with open_bytes(path) as fh:
            raw = fh.read()
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_raw(p: Path, fmt: str, user_col: str | None, item_col: str | None, rating_col: str | None,
             time_col: str | None, require_rating: bool) -> Raw:
    """The raw reader of layout `fmt` (already detected: not "auto")."""
    if fmt == "ml-100k":
        return _raw_ml100k(p)
    if fmt == "ml-1m":
        return _raw_ml1m(p)
    if fmt == "ml-latest":
        return _raw_ml_latest(p)
    if fmt == "parquet":
        return _raw_parquet(p, user_col, item_col, rating_col, time_col, require_rating)
    return _raw_csv(p, user_col, item_col, rating_col, time_col, require_rating)
