"""A batch job's outputs: checked paths, an exclusive lock, and all-or-nothing writes.

Outputs are built under a hidden temp name in the output's directory and `os.replace`d into
place only when the whole job succeeded, so a crash or a bad row never leaves a partial file (a
rerun rebuilds it). A non-blocking `flock` on `<output>.lock` keeps two overlapping runs on one
output from interleaving; the holder of the lock may delete what a killed run left behind.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from modeling.errors import DataError
from pipelines.batch.inputs import CSV_SUFFIXES

log = logging.getLogger("tabrec.score")

TMP_SUFFIX = ".tmp"
SPILL_SUFFIX = ".spill"


class OutputError(DataError):
    """The output cannot be written: bad path, no permission, disk full."""


class OutputLockedError(OutputError):
    """Another run holds the lock on this output."""


def output_path(output: str | Path, inputs_root: Path | None = None) -> Path:
    """The absolute output path; DataError for a CSV name, a directory, or a path the input covers."""
    out = Path(output).absolute()
    if out.name.lower().endswith(CSV_SUFFIXES):
        raise DataError(f"output {out}: batch output is Parquet; name it .parquet "
                        "(a Kaggle submission CSV is a separate option)")
    if out.exists() and out.is_dir():
        raise DataError(f"output {out}: is a directory; give a file path")
    if inputs_root is not None:
        root = inputs_root.absolute()
        if root == out:
            raise DataError(f"output {out}: same path as the input")
        if root.is_dir() and root in out.parents:
            raise DataError(f"output {out}: inside the input directory {root}; the next run would read it")
    return out


def submission_path(path: str | Path, output: Path) -> Path:
    sub = Path(path).absolute()
    if not sub.name.lower().endswith(".csv"):
        raise DataError(f"submission CSV {sub}: name it .csv")
    if sub == output:
        raise DataError(f"submission CSV {sub}: same path as the output")
    return sub


@contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Map OSError (permission, disk full, ...) to an OutputError naming the output."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or errno.errorcode.get(exc.errno or 0, "error")
        raise OutputError(f"cannot write output {path}: {reason}") from exc


@contextmanager
def output_lock(output: Path) -> Iterator[Path]:
    """Exclusive, non-blocking flock on `<output>.lock`; released when the process ends, even on kill -9.

    The lock file is left in place on purpose: deleting it would let two runs lock different inodes.
    """
    lock_path = output.with_name(output.name + ".lock")
    with output_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise OutputLockedError(f"output {output} is locked by another run (pid {holder}, lock file "
                                    f"{lock_path}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        os.close(fd)


def remove_stale_temps(output: Path) -> list[Path]:
    """Delete temp files/spill dirs a crashed run left beside `output` (call only under its lock)."""
    removed = []
    for p in output.parent.glob(f".{glob.escape(output.name)}.*"):
        if p.name.endswith(TMP_SUFFIX) and p.is_file():
            p.unlink(missing_ok=True)
        elif p.name.endswith(SPILL_SUFFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            continue
        removed.append(p)
    if removed:
        log.info("removed %d leftover temp file(s) of an interrupted run beside %s", len(removed), output)
    return removed


def temp_name(path: Path, suffix: str) -> Path:
    """A hidden, unique name beside `path` that remove_stale_temps recognises by `suffix`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicTableWriter:
    """A Parquet (or CSV) file built under a hidden temp name beside `path`; publish() renames it in.

    The temp file is created on the first write, so a job that fails before writing leaves nothing.
    """

    def __init__(self, path: Path, schema: pa.Schema, fmt: str = "parquet") -> None:
        self.path, self.schema, self.fmt = path, schema, fmt
        self.tmp = temp_name(path, TMP_SUFFIX)
        self.rows = 0
        self._writer: Any = None

    def _open(self) -> None:
        with output_errors(self.path):
            if self.fmt == "parquet":
                self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="snappy")
            else:
                self._writer = pacsv.CSVWriter(self.tmp, self.schema,
                                               write_options=pacsv.WriteOptions(quoting_header="none"))

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._open()
        with output_errors(self.path):
            self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is None:
            self._open()
        with output_errors(self.path):
            self._writer.close()
            _fsync(self.tmp)

    def publish(self) -> None:
        with output_errors(self.path):
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            with suppress(Exception):  # already failing: the temp file is deleted below anyway
                self._writer.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_outputs(writers: Sequence[AtomicTableWriter]) -> Iterator[Sequence[AtomicTableWriter]]:
    """Abort every writer (delete its temp file) unless the body published them."""
    try:
        yield writers
    except BaseException:
        for w in writers:
            w.abort()
        raise


def publish(writers: Sequence[AtomicTableWriter]) -> None:
    """Close all first (a failure leaves nothing published), then rename each into place."""
    for w in writers:
        w.close()
    for w in writers:
        w.publish()
    with output_errors(writers[0].path):
        dir_fd = os.open(writers[0].path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
