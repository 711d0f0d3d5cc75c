"""The datasets a run logs (`mlflow.log_input`), described without hashing their rows.

A training run logs its train and valid sets, a batch run its input: each as a `DataInput`
(name, context, source files, rows, columns, how the rows were picked, a profile). The digest
comes from the source files' content hashes (a regular file is read once per run, however
many datasets it feeds) plus the selection, row count and columns, so it costs one pass over
the files, never a pass over rows in Python. A source that can't be fingerprinted (a pipe,
which can be read only once; a directory of parts) is described from what is known of it,
with a note. This module imports no MLflow (`pipelines.tracking.log_datasets` logs them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass
class SourceInfo:
    """What is known of one input path without blocking on it: kind, size, a digest, a note."""

    path: str  # absolute
    kind: str  # "file" | "directory" | "pipe" | "missing" | "other"
    bytes: int | None
    sha256: str  # of the content for a file; of what is known (names, sizes, mtimes) otherwise
    note: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).name

    def label(self) -> str:
        """How the UI's dataset panel lists it: 'train.csv (38,000,000 bytes)', 'parts/ (directory, ...)'."""
        if self.kind == "file":
            return f"{self.name} ({self.bytes:,} bytes)"
        if self.kind == "directory":
            return f"{self.name}/ (directory, {self.bytes:,} bytes)"
        return f"{self.name} ({self.kind})"

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "path": self.path, "kind": self.kind, "bytes": self.bytes, "sha256": self.sha256}
        return {**d, "note": self.note} if self.note else d


@functools.lru_cache(maxsize=64)
def _content_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of a regular file, cached on (path, size, mtime) so a run hashes it once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_source(path: str | Path) -> SourceInfo:
    """A regular file is hashed; anything else is described from its metadata, never opened (a
    pipe can be read only once and blocks without a writer; a directory of parts can be huge)."""
    p = Path(path).absolute()
    try:
        st = p.stat()
    except OSError as exc:
        return SourceInfo(str(p), "missing", None, _sha(["missing", str(p)]), f"not readable: {exc.strerror}")
    if stat.S_ISREG(st.st_mode):
        return SourceInfo(str(p), "file", st.st_size, _content_sha256(str(p), st.st_size, st.st_mtime_ns))
    if stat.S_ISDIR(st.st_mode):
        parts = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith((".", "_")))
        stats = [(str(q.relative_to(p)), q.stat().st_size, q.stat().st_mtime_ns) for q in parts]
        return SourceInfo(str(p), "directory", sum(s[1] for s in stats), _sha(["directory", stats]),
                          f"directory of {len(parts)} files: digest over their names, sizes and "
                          "modification times, not their content")
    kind = "pipe" if stat.S_ISFIFO(st.st_mode) else "other"
    return SourceInfo(str(p), kind, None, _sha([kind, str(p)]),
                      f"a {'pipe' if kind == 'pipe' else 'special file'} can't be fingerprinted: "
                      "digest over its path and the rows read")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, default=str).encode()).hexdigest()


_MLFLOW_TYPES = {"b": "boolean", "i": "long", "u": "long", "f": "double", "M": "datetime"}


def frame_columns(frame: pd.DataFrame) -> dict[str, str]:
    """Column -> MLflow type name from the dtypes (no per-row work)."""
    return {str(c): _MLFLOW_TYPES.get(getattr(t, "kind", "O"), "string")
            for c, t in frame.dtypes.items()}


def arrow_columns(schema: Any) -> dict[str, str]:
    """Column -> MLflow type name from a pyarrow schema."""
    import pyarrow as pa

    def kind(t: Any) -> str:
        if pa.types.is_boolean(t):
            return "boolean"
        if pa.types.is_integer(t):
            return "long"
        if pa.types.is_floating(t):
            return "double"
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            return "datetime"
        return "string"

    return {f.name: kind(f.type) for f in schema}


@dataclass
class DataInput:
    """A dataset a run used, described for `mlflow.log_input` without hashing its rows.

    `sources` are the files the rows come from (the first is the dataset's MLflow source);
    `selection` says how the rows were picked from them (e.g. the validation window) and enters
    the digest with the sources' digests, the row count and the columns, so train and valid of
    one file get different digests and the same data always gets the same one."""

    name: str
    context: str  # "training" | "validation" | "scoring"
    sources: list[str]
    rows: int
    columns: dict[str, str] = field(default_factory=dict)  # name -> MLflow type (frame_columns)
    selection: str = ""
    profile: dict[str, Any] = field(default_factory=dict)  # extras: date range, counts of users/items
    target: str | None = None

    def describe(self) -> dict[str, Any]:
        """The dataset's digest, its profile (flat values: the UI's dataset panel shows each as one
        line) and its sources in full (what the run description reads)."""
        sources = [describe_source(s) for s in self.sources]
        notes = [s.note for s in sources if s.note]
        digest = _sha([[s.sha256 for s in sources], self.selection, self.rows, self.columns])[:10]
        profile = {"num_rows": int(self.rows), "num_elements": int(self.rows) * max(1, len(self.columns)),
                   **self.profile}
        if self.selection:
            profile["selection"] = self.selection
        if self.target:
            profile["target"] = self.target
        profile["sources"] = ", ".join(s.label() for s in sources)
        profile["sha256"] = ", ".join(s.sha256 for s in sources)
        if notes:
            profile["note"] = "; ".join(notes)
        return {"name": self.name, "context": self.context, "digest": digest, "profile": profile,
                "sources": [s.to_dict() for s in sources]}


