"""Service settings: one frozen object built from environment variables and CLI arguments.

Every value can come from the environment so that uvicorn worker processes (started from an
import string) rebuild the same settings the parent process validated.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from modeling.errors import DataError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_RECORDS = 10_000
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 10.0
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# environment variable -> Settings field, for plain scalar values
_SCALAR_ENV = {
    "TABREC_HOST": "host",
    "TABREC_PORT": "port",
    "TABREC_WORKERS": "workers",
    "TABREC_MAX_RECORDS": "max_records",
    "TABREC_MAX_BODY_BYTES": "max_body_bytes",
    "TABREC_BODY_TIMEOUT": "body_timeout",
    "TABREC_DEFAULT_MODEL": "default_model",
    "TABREC_RELOAD_INTERVAL": "reload_interval",
    "TABREC_TORCH_THREADS": "torch_threads",
    "TABREC_LOG_LEVEL": "log_level",
    "MLFLOW_TRACKING_URI": "tracking_uri",
}


class Settings(BaseModel):
    """Everything the app needs; secrets are SecretStr so they never show in reprs or logs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: dict[str, str] = Field(default_factory=dict, description="model name -> model URI")
    calendars: dict[str, str] = Field(default_factory=dict, description=(
        "model name -> event calendar file (test.csv layout) laid over that model's bundle calendar; "
        "re-read on reload"))
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    api_keys: tuple[SecretStr, ...] = ()
    admin_token: SecretStr | None = None
    max_records: int = Field(DEFAULT_MAX_RECORDS, ge=1)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    body_timeout: float = Field(DEFAULT_BODY_TIMEOUT, gt=0.0,
                                description="seconds a client may take to send a request body (408 after)")
    default_model: str | None = Field(None, description="the model plain /invocations scores with")
    reload_interval: float = Field(0.0, ge=0.0, description="seconds between alias polls; 0 = off")
    torch_threads: int | None = Field(None, ge=1)
    log_level: str = "INFO"
    tracking_uri: str | None = None

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @model_validator(mode="after")
    def _default_is_served(self) -> Settings:
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(f"TABREC_DEFAULT_MODEL {self.default_model!r} is not one of the served models "
                             f"{sorted(self.models)}")
        return self

    @model_validator(mode="after")
    def _calendars_are_served(self) -> Settings:
        unknown = sorted(set(self.calendars) - set(self.models))
        if unknown:
            raise ValueError(f"calendar(s) for {unknown}, which are not among the served models {sorted(self.models)}")
        return self

    @property
    def invocations_model(self) -> str | None:
        """The model plain /invocations uses without ?model=: the configured default, or the
        only model served."""
        if self.default_model is not None:
            return self.default_model
        return next(iter(self.models)) if len(self.models) == 1 else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read TABREC_* variables (and MLFLOW_TRACKING_URI); keyword overrides win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for var, name in _SCALAR_ENV.items():
            if env.get(var, "").strip():
                values[name] = env[var].strip()
        if env.get("TABREC_MODELS", "").strip():
            values["models"] = parse_models_env(env["TABREC_MODELS"])
        if env.get("TABREC_CALENDARS", "").strip():
            values["calendars"] = parse_calendars_env(env["TABREC_CALENDARS"])
        keys = read_api_keys(env)
        if keys:
            values["api_keys"] = tuple(keys)
        admin = read_admin_token(env)
        if admin:
            values["admin_token"] = admin
        values.update({k: v for k, v in overrides.items() if v is not None})
        return build_settings(values)

    def to_env(self) -> dict[str, str]:
        """The non-secret values as environment variables, for worker processes."""
        out = {var: str(getattr(self, name)) for var, name in _SCALAR_ENV.items()
               if getattr(self, name) is not None}
        out["TABREC_MODELS"] = json.dumps(self.models)
        out["TABREC_CALENDARS"] = json.dumps(self.calendars)
        return out


def build_settings(values: Mapping[str, Any]) -> Settings:
    """Validate settings; errors become DataError naming the offending setting."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise DataError(f"invalid service settings: {problems}") from None


def parse_model_specs(specs: Iterable[str]) -> dict[str, str]:
    """Turn ["name=uri", ...] into an ordered mapping; DataError on a malformed or duplicate spec."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, uri = spec.strip().partition("=")
        name, uri = name.strip(), uri.strip()
        if not sep or not uri:
            raise DataError(f"--model {spec!r}: expected NAME=URI (e.g. rossmann=models:/rossmann@champion)")
        if not MODEL_NAME.match(name):
            raise DataError(f"--model {spec!r}: model name must match {MODEL_NAME.pattern}")
        if name in models:
            raise DataError(f"--model {spec!r}: model name {name!r} given twice")
        models[name] = uri
    return models


def parse_calendar_specs(specs: Iterable[str]) -> dict[str, str]:
    """Turn ["name=path", ...] (`tabrec serve --calendar`) into a mapping; DataError on a malformed
    or duplicate spec. Whether the file exists and fits the model is checked when the model loads."""
    calendars: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.strip().partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise DataError(f"--calendar {spec!r}: expected NAME=PATH (e.g. rossmann=/data/test.csv)")
        if name in calendars:
            raise DataError(f"--calendar {spec!r}: model name {name!r} given twice")
        calendars[name] = path
    return calendars


def _parse_named_env(value: str, var: str, what: str,
                     parse: Callable[[Iterable[str]], dict[str, str]]) -> dict[str, str]:
    """A NAME=VALUE environment setting: a JSON object, or comma/newline separated items, each
    item checked by `parse` (the command line's parser, so both read alike)."""
    value = value.strip()
    if value.startswith("{"):
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{var}: invalid JSON ({exc})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise DataError(f"{var}: JSON must be an object of {what} strings")
        return parse(f"{k}={v}" for k, v in obj.items())
    return parse(item for item in re.split(r"[,\n]", value) if item.strip())


def parse_calendars_env(value: str) -> dict[str, str]:
    """TABREC_CALENDARS: a JSON object, or comma/newline separated NAME=PATH items."""
    return _parse_named_env(value, "TABREC_CALENDARS", "model name -> file path", parse_calendar_specs)


def parse_models_env(value: str) -> dict[str, str]:
    """TABREC_MODELS: a JSON object, or comma/newline separated NAME=URI items."""
    return _parse_named_env(value, "TABREC_MODELS", "name -> URI", parse_model_specs)


def read_api_keys(env: Mapping[str, str]) -> list[SecretStr]:
    """Keys from TABREC_API_KEYS (comma separated) and TABREC_API_KEYS_FILE (one per line, # comments)."""
    keys = [k.strip() for k in env.get("TABREC_API_KEYS", "").split(",") if k.strip()]
    path = env.get("TABREC_API_KEYS_FILE", "").strip()
    if path:
        keys += [line.strip() for line in _read_secret_file(path, "TABREC_API_KEYS_FILE").splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    return [SecretStr(k) for k in dict.fromkeys(keys)]


def read_admin_token(env: Mapping[str, str]) -> SecretStr | None:
    """TABREC_ADMIN_TOKEN, or the first line of TABREC_ADMIN_TOKEN_FILE."""
    token = env.get("TABREC_ADMIN_TOKEN", "").strip()
    path = env.get("TABREC_ADMIN_TOKEN_FILE", "").strip()
    if not token and path:
        lines = _read_secret_file(path, "TABREC_ADMIN_TOKEN_FILE").strip().splitlines()
        token = lines[0].strip() if lines else ""
    return SecretStr(token) if token else None


def _read_secret_file(path: str, var: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise DataError(f"{var}={path}: cannot read ({exc.strerror})") from None
