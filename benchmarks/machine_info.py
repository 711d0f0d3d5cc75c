"""What every benchmark's JSON line says about the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model (as /proc/cpuinfo names it), cores, memory, Python and, when importable, torch."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    out: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
                           "python": platform.python_version()}
    try:
        import torch
    except ImportError:
        return out
    return {**out, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
