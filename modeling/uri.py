"""Model URIs, parsed in one place: a local bundle directory, ``runs:/<id>/<path>``,
``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (and any other artifact URI with a
scheme, e.g. ``s3://``, handed to MLflow as is).

Bundle loading, predictors, the service registry and server and the batch jobs all read URIs
through `ModelUri.parse`; nothing else splits URI strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modeling.errors import DataError

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ModelUri:
    """One parsed model URI. `scheme` is "local", "runs", "models" or "artifact"."""

    text: str
    scheme: str
    path: Path | None = None  # local
    run_id: str | None = None  # runs
    artifact_path: str | None = None  # runs
    name: str | None = None  # models
    version: str | None = None  # models:/name/version
    alias: str | None = None  # models:/name@alias

    @classmethod
    def parse(cls, text: str | Path) -> ModelUri:
        """Parse a URI; DataError naming it when it is malformed (not when it does not exist)."""
        raw = str(text).strip()
        if not raw:
            raise DataError("model URI is empty")
        if raw.startswith("runs:/"):
            rest = raw[len("runs:/"):].strip("/")
            run_id, _, artifact = rest.partition("/")
            if not run_id or not _RUN_ID.match(run_id):
                raise DataError(f"model {raw}: expected runs:/<run_id>/<artifact path>")
            return cls(raw, "runs", run_id=run_id, artifact_path=artifact or None)
        if raw.startswith("models:/"):
            ref = raw[len("models:/"):].strip("/")
            if "@" in ref:
                name, _, alias = ref.partition("@")
                if not name or not alias or "/" in alias:
                    raise DataError(f"model {raw}: expected models:/<name>@<alias>")
                return cls(raw, "models", name=name, alias=alias)
            name, _, version = ref.rpartition("/")
            if not name or not version:
                raise DataError(f"model {raw}: expected models:/<name>/<version> or models:/<name>@<alias>")
            return cls(raw, "models", name=name, version=version)
        if "://" in raw:
            return cls(raw, "artifact")
        return cls(raw, "local", path=Path(raw))

    def __str__(self) -> str:
        return self.text

    @property
    def is_local(self) -> bool:
        return self.scheme == "local"

    @property
    def is_alias(self) -> bool:
        return self.alias is not None

    @property
    def needs_tracking(self) -> bool:
        """Whether resolving it talks to the MLflow tracking server (registry or run artifacts)."""
        return self.scheme in ("runs", "models")

    @property
    def immutable(self) -> bool:
        """The content behind it never changes (a run's artifacts, a numbered registry version)."""
        return self.scheme == "runs" or (self.scheme == "models" and self.version is not None)

    def check_exists(self) -> None:
        """DataError for a local path that does not exist (remote URIs are checked on load)."""
        if self.is_local and self.path is not None and not self.path.exists():
            raise DataError(f"model {self.text}: no such file or directory")

    def registry_version(self, client: Any = None) -> Any:
        """The MLflow ModelVersion behind a models:/ URI (alias resolved now)."""
        if self.scheme != "models":
            raise ValueError(f"{self.text} is not a models:/ URI")
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient()
        if self.alias is not None:
            return client.get_model_version_by_alias(self.name, self.alias)
        return client.get_model_version(self.name, self.version)

    def pinned(self, client: Any = None) -> ModelUri:
        """An alias resolved to its current version (``models:/name/N``); other URIs unchanged."""
        if not self.is_alias:
            return self
        version = str(self.registry_version(client).version)
        return replace(self, text=f"models:/{self.name}/{version}", version=version, alias=None)

    def describe(self) -> dict[str, str | None]:
        """{"name", "version", "run_id"} known from the URI (registry looked up for models:/)."""
        if self.scheme == "models":
            mv = self.registry_version()
            return {"name": self.name, "version": str(mv.version), "run_id": mv.run_id}
        if self.scheme == "runs":
            return {"name": None, "version": None, "run_id": self.run_id}
        return {"name": None, "version": None, "run_id": None}

    def download(self) -> Path:
        """A local directory holding the URI's files (the path itself for local URIs)."""
        if self.is_local:
            self.check_exists()
            assert self.path is not None
            return self.path
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=self.text))
        except Exception as exc:  # MLflow raises several types for a missing run/model/alias
            raise DataError(f"model {self.text}: cannot resolve ({type(exc).__name__}: {exc})") from exc
