"""The one piece of mutable state: which predictor serves each model name.

Readers take a snapshot (an immutable mapping) and keep using the predictor they got, so an
in-flight request finishes on the old version. A refresh loads changed versions off to the
side and then swaps the whole mapping with a single reference assignment.

A model name may have an event calendar file (settings `calendars`, `tabrec serve --calendar
NAME=PATH`): its known future events are laid over the bundle's calendar
(`TabularPredictor.with_calendar_file`) when the model loads, and a refresh re-reads the file
when it changed (its path, size and mtime are part of the model's identity). A calendar that
does not fit the model fails the load like a broken bundle: the old predictor keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from modeling.bundle import BUNDLE_JSON, WEIGHTS, resolve_bundle_dir
from modeling.errors import DataError, TabrecError
from modeling.predictors import Predictor, TabularPredictor, load_predictor
from modeling.uri import ModelUri
from service.metrics import LOGGER, ServiceMetrics

log = logging.getLogger(LOGGER)


class UnknownModel(KeyError):
    """No model of that name is configured (HTTP 404)."""


class ModelNotReady(LookupError):
    """The model is configured but has not loaded (HTTP 503)."""


@dataclass(frozen=True)
class LoadedModel:
    """A predictor serving one model name, with where it came from."""

    name: str
    uri: str
    predictor: Predictor
    identity: str
    loaded_at: float

    @property
    def kind(self) -> str:
        return self.predictor.kind

    @property
    def version(self) -> str | None:
        """Registry version when known, else the training run id from the bundle."""
        return self.predictor.version


@dataclass
class RefreshEntry:
    name: str
    uri: str
    status: str  # "loaded" | "unchanged" | "failed"
    version: str | None = None
    previous_version: str | None = None
    error: str | None = None


@dataclass
class RefreshReport:
    entries: list[RefreshEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(e.status != "failed" for e in self.entries)


def source_identity(uri: str) -> tuple[str, str]:
    """(what identifies the current content of `uri`, the URI to load for exactly that content).

    Aliases are resolved to a version (and that version is loaded, so a concurrent alias move
    cannot make us load one version and report another); local bundle directories are
    identified by file mtimes; other URIs (runs:/, models:/name/version) are immutable.
    """
    parsed = ModelUri.parse(uri)
    if parsed.is_alias:
        pinned = str(parsed.pinned())
        return pinned, pinned
    if not parsed.is_local:  # runs:/, models:/name/version, other artifact URIs: loaded as given
        return uri, uri
    bundle = resolve_bundle_dir(uri)
    stamps = [(bundle / f).stat().st_mtime_ns for f in (BUNDLE_JSON, WEIGHTS) if (bundle / f).exists()]
    return f"{Path(bundle).resolve()}@{stamps}", uri


def calendar_identity(path: str) -> str:
    """What identifies a calendar file's content: resolved path, size and mtime (DataError when
    the file is gone, which fails the load and keeps the old predictor)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise DataError(f"calendar {path}: cannot read ({exc.strerror})") from None
    return f"{p.resolve()}@{st.st_size}:{st.st_mtime_ns}"


def with_calendar(predictor: Predictor, name: str, path: str) -> Predictor:
    """The predictor with the calendar file's events laid over its bundle's calendar."""
    if not isinstance(predictor, TabularPredictor) or not predictor.calendar_columns:
        raise DataError(f"calendar {path}: model {name} ({predictor.kind}) reads no event calendar")
    out = predictor.with_calendar_file(path)
    log.info("model %s: event calendar %s laid over the bundle's (%s)", name, path, out.calendar_info())
    return out


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed load (no traceback)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, TabrecError) else f"{type(exc).__name__}: {text}"


class ModelRegistry:
    """Configured model names -> loaded predictors, refreshed atomically."""

    def __init__(
        self,
        specs: Mapping[str, str],
        metrics: ServiceMetrics | None = None,
        loader: Callable[[str], Predictor] = load_predictor,
        calendars: Mapping[str, str] | None = None,
    ) -> None:
        self.specs: Mapping[str, str] = MappingProxyType(dict(specs))
        self.calendars: Mapping[str, str] = MappingProxyType(dict(calendars or {}))
        self.metrics = metrics
        self._loader = loader
        self._models: Mapping[str, LoadedModel] = MappingProxyType({})
        self._errors: Mapping[str, str] = MappingProxyType({})
        self._lock = threading.Lock()
        self._attempted = threading.Event()

    @property
    def models(self) -> Mapping[str, LoadedModel]:
        """The current snapshot (immutable; later swaps do not change it)."""
        return self._models

    @property
    def errors(self) -> Mapping[str, str]:
        return self._errors

    @property
    def ready(self) -> bool:
        return bool(self.specs) and all(name in self._models for name in self.specs)

    def get(self, name: str) -> LoadedModel:
        """The predictor serving `name` right now."""
        model = self._models.get(name)
        if model is not None:
            return model
        if name not in self.specs:
            raise UnknownModel(name)
        raise ModelNotReady(name)

    def status(self) -> dict[str, dict[str, Any]]:
        snapshot, errors = self._models, self._errors
        out: dict[str, dict[str, Any]] = {}
        for name, uri in self.specs.items():
            m = snapshot.get(name)
            out[name] = {"uri": uri, "loaded": m is not None, "version": m.version if m else None,
                         "error": errors.get(name)}
        return out

    def wait_attempted(self, timeout: float | None = None) -> bool:
        """Block until the first load attempt has finished (tests and start-up scripts)."""
        return self._attempted.wait(timeout)

    def refresh(self, force: bool = False) -> RefreshReport:
        """Re-resolve every URI; load what changed off to the side; swap once. Never raises."""
        with self._lock:
            current = self._models
            new = dict(current)
            errors = dict(self._errors)
            report = RefreshReport()
            for name, uri in self.specs.items():
                entry = self._refresh_one(name, uri, current.get(name), new, force)
                if entry.error is not None:
                    errors[name] = entry.error
                elif entry.status == "loaded":
                    errors.pop(name, None)
                report.entries.append(entry)
            self._models = MappingProxyType(new)
            self._errors = MappingProxyType(errors)
            self._record_metrics(report, current, new)
        self._attempted.set()
        return report

    def _record_metrics(
        self, report: RefreshReport, old: Mapping[str, LoadedModel], new: Mapping[str, LoadedModel]
    ) -> None:
        if self.metrics is None:
            return
        for e in report.entries:
            if e.status == "loaded":
                before = old.get(e.name)
                self.metrics.model_swapped(e.name, (str(before.version), before.kind) if before else None,
                                           (str(new[e.name].version), new[e.name].kind))
            elif e.status == "failed":
                self.metrics.load_failed(e.name, serving=e.name in new)

    def _refresh_one(
        self, name: str, uri: str, old: LoadedModel | None, new: dict[str, LoadedModel], force: bool
    ) -> RefreshEntry:
        entry = RefreshEntry(name, uri, "unchanged", previous_version=old.version if old else None)
        try:
            identity, pinned = source_identity(uri)
            calendar = self.calendars.get(name)
            if calendar is not None:
                identity = f"{identity}|calendar {calendar_identity(calendar)}"
            if old is not None and old.identity == identity and not force:
                entry.version = old.version
                return entry
            t0 = time.perf_counter()
            predictor = self._loader(pinned)
            if pinned != uri:
                predictor.source.uri = uri
            if calendar is not None:
                predictor = with_calendar(predictor, name, calendar)
            predictor.warm_up()  # off to the side, before it serves: no slow first request
            loaded = LoadedModel(name, uri, predictor, identity, time.time())
        except Exception as exc:  # any failure keeps the old predictor serving
            entry.status, entry.error = "failed", describe_error(exc)
            entry.version = old.version if old else None
            log.error("model %s (%s) failed to load: %s; %s", name, uri, entry.error,
                      f"still serving version {old.version}" if old else "not serving",
                      exc_info=not isinstance(exc, TabrecError))
            return entry
        new[name] = loaded
        entry.status, entry.version = "loaded", loaded.version
        log.info("model %s loaded version %s from %s in %.2fs (previous %s)", name, loaded.version, uri,
                 time.perf_counter() - t0, entry.previous_version)
        return entry
