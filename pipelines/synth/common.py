"""What both generators share: writing a file atomically."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temp file in the target directory so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
