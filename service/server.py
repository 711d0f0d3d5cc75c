"""`tabrec serve`: validate settings in the parent process, then hand over to uvicorn.

Workers are started from the import string ``service.app:app_from_env`` (factory) and rebuild
the same settings from environment variables this function exports.
"""

from __future__ import annotations

import ipaddress
import logging
import os

from modeling.errors import DataError
from modeling.uri import ModelUri
from service.metrics import configure_logging, uvicorn_log_config
from service.settings import Settings, parse_calendar_specs, parse_model_specs

log = logging.getLogger("tabrec.service")
APP_FACTORY = "service.app:app_from_env"


def resolve_settings(
    host: str | None, port: int | None, models: list[str], workers: int | None,
    calendars: list[str] | None = None,
) -> Settings:
    """Environment settings with command-line values on top; DataError on anything unusable."""
    overrides = {"host": host, "port": port, "workers": workers,
                 "models": parse_model_specs(models) if models else None,
                 "calendars": parse_calendar_specs(calendars) if calendars else None}
    settings = Settings.from_env(**overrides)
    if not settings.models:
        raise DataError("no models to serve: pass --model NAME=URI (repeatable) or set TABREC_MODELS")
    for name, uri in settings.models.items():
        try:
            parsed = ModelUri.parse(uri)  # a malformed runs:/ or models:/ URI can never load
        except DataError as exc:
            raise DataError(f"--model {name}={uri}: {exc}") from None
        try:
            parsed.check_exists()  # a local path must exist; remote URIs are checked on load
        except DataError:
            raise DataError(f"--model {name}={uri}: no such file or directory") from None
    for name, path in settings.calendars.items():
        if not os.path.isfile(path):  # its content is checked against the model when it loads
            raise DataError(f"--calendar {name}={path}: no such file")
    return settings


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(host: str | None, port: int | None, models: list[str], workers: int | None,
          calendars: list[str] | None = None) -> None:
    """Run the HTTP service until interrupted (uvicorn, optionally several worker processes)."""
    settings = resolve_settings(host, port, models, workers, calendars)
    configure_logging(settings.log_level, root=True)
    if not settings.api_keys:
        level = logging.WARNING if is_loopback(settings.host) else logging.ERROR
        log.log(level, "no API keys configured (TABREC_API_KEYS / TABREC_API_KEYS_FILE): prediction "
                       "endpoints are open to anyone who can reach %s:%d", settings.host, settings.port)
    os.environ.update(settings.to_env())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    log.info("serving %s on http://%s:%d with %d worker(s)", sorted(settings.models), settings.host,
             settings.port, settings.workers)
    import uvicorn

    uvicorn.run(APP_FACTORY, factory=True, host=settings.host, port=settings.port, workers=settings.workers,
                log_config=uvicorn_log_config(settings.log_level), access_log=False, server_header=False,
                timeout_graceful_shutdown=30)
