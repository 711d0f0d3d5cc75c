"""tabrec HTTP service: FastAPI app factory, settings, auth, model registry, metrics.

`create_app` and `Settings` are imported lazily so `import service` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "create_app": "service.app",
    "app_from_env": "service.app",
    "Settings": "service.settings",
    "ModelRegistry": "service.registry",
    "serve": "service.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
