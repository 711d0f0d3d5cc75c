"""A real Apache Airflow 3 for the schedule tests, in its own cached virtualenv.

Airflow is never installed into the project's .venv (its pins would fight the project's). The venv
is built once per (Airflow version, Python minor, pinned versions) under the cache directory and
reused by every later run of the slow suite:

    $TABREC_AIRFLOW_CACHE, else $XDG_CACHE_HOME/tabrec-airflow, else ~/.cache/tabrec-airflow

`python tests/airflow_env.py` (or `make airflow-venv`) builds it ahead of time and prints its path.
The versions come from tests/airflow-constraints.txt (see its header for why it is not Airflow's
published constraints file). Where pip cannot build it (no network to the package registry), the
tests skip with pip's message, except where CI=1 or TABREC_REQUIRE_AIRFLOW=1 is set: there it is a
failure, so CI can never pass by skipping them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

AIRFLOW_VERSION = "3.3.2"
STANDARD_PROVIDER = "1.21.0"
CONSTRAINTS = Path(__file__).with_name("airflow-constraints.txt")
TRUTHY = ("1", "true", "yes", "on")
STAMP = ".tabrec-complete"


class AirflowUnavailable(RuntimeError):
    """The Airflow venv could not be built here; the message says why."""


def airflow_required() -> bool:
    return any(os.environ.get(v, "").strip().lower() in TRUTHY for v in ("CI", "TABREC_REQUIRE_AIRFLOW"))


def cache_root() -> Path:
    if os.environ.get("TABREC_AIRFLOW_CACHE"):
        return Path(os.environ["TABREC_AIRFLOW_CACHE"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "tabrec-airflow"


def venv_dir() -> Path:
    digest = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:10]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"airflow-{AIRFLOW_VERSION}-{py}-{digest}"


def airflow_venv() -> tuple[Path, dict]:
    """The venv's path and its build record ({"seconds": install time, ...}); builds it if needed.

    A build runs under a lock (two sessions wait for one build) and is complete only once the
    stamp file is written last, so a killed build is thrown away and redone, never half-used.
    """
    target = venv_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = target / STAMP
        if stamp.exists():
            return target, {**json.loads(stamp.read_text()), "cached": True}
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        _check(subprocess.run([sys.executable, "-m", "venv", str(target)], capture_output=True, text=True,
                              timeout=300), "python -m venv")
        python = target / "bin" / "python"
        cmd = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--retries", "2",
               "--timeout", "30", "-c", str(CONSTRAINTS), f"apache-airflow=={AIRFLOW_VERSION}",
               f"apache-airflow-providers-standard=={STANDARD_PROVIDER}"]
        _check(subprocess.run(cmd, capture_output=True, text=True, timeout=1800), "pip install apache-airflow")
        _check(subprocess.run([str(python), "-c", "import airflow.sdk, airflow.providers.standard.operators.bash"],
                              capture_output=True, text=True, timeout=300), "import airflow")
        record = {"airflow": AIRFLOW_VERSION, "standard_provider": STANDARD_PROVIDER,
                  "seconds": round(time.perf_counter() - started, 1)}
        stamp.write_text(json.dumps(record))
        return target, {**record, "cached": False}


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or "").strip()[-1500:]
        raise AirflowUnavailable(f"cannot build the Airflow {AIRFLOW_VERSION} venv for the schedule tests "
                                 f"({what} exited {result.returncode}; no network to the package registry?): "
                                 f"{tail}")


if __name__ == "__main__":
    try:
        path, info = airflow_venv()
    except AirflowUnavailable as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"venv": str(path), **info}))
