"""A real sqlite MLflow store made the current one for a block of test code (the fixtures that
train into their own store share this)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tracking_env(uri: str, cwd: Path) -> Iterator[str]:
    """MLFLOW_TRACKING_URI = `uri` and the working directory `cwd` (runs keep their artifacts
    under it) inside the block; both put back after, whatever happens in it."""
    old_env, old_cwd = os.environ.get("MLFLOW_TRACKING_URI"), Path.cwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(cwd)
    try:
        yield uri
    finally:
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
