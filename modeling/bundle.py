"""Model bundles: the self-describing directory that batch scoring and the server load.

Layout: ``bundle.json`` (kind, format version, model class + config, processor state, input
schema, target transform, metrics, fingerprint, ...), ``weights.safetensors`` (model
``state_dict`` under ``model.*`` plus extra arrays under ``extra.*``: the drift check's training
sample, a tabular model's spread forest as plain node arrays, ratings' seen-items CSR) and, for tabular
bundles, ``features/`` (the fitted feature pipeline as JSON + Parquet tables). No pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modeling.errors import DataError, TabrecError

FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
WEIGHTS = "weights.safetensors"
FEATURES_DIR = "features"
KINDS = ("tabular", "ratings")


class BundleError(TabrecError):
    """A bundle is missing, unreadable, or of an unsupported format version."""


def model_classes() -> dict[str, type[nn.Module]]:
    from modeling.collab import DotProductBias, EmbeddingNN
    from modeling.tabular import TabularModel

    return {c.__name__: c for c in (TabularModel, DotProductBias, EmbeddingNN)}


def save_bundle(
    path: str | os.PathLike[str],
    *,
    kind: str,
    model: nn.Module,
    meta: Mapping[str, Any],
    extra_tensors: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    features: Any | None = None,
) -> Path:
    """Write a bundle atomically: built in a sibling temp dir, then renamed into place."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        doc = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "model": {"class": type(model).__name__, "config": model.config()},
            **meta,
        }
        (tmp / BUNDLE_JSON).write_text(json.dumps(doc, indent=1, default=_json_default))
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        for k, v in (extra_tensors or {}).items():
            t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
            tensors[f"extra.{k}"] = t.detach().cpu().contiguous()
        save_file(tensors, str(tmp / WEIGHTS))
        if features is not None:
            features.save(tmp / FEATURES_DIR)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "isoformat"):
        return o.isoformat()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


class RawBundle:
    """A bundle read from disk: its document, model, extra tensors and feature pipeline."""

    def __init__(self, path: Path) -> None:
        self.path = path
        doc_path = path / BUNDLE_JSON
        if not doc_path.is_file():
            raise BundleError(f"{path}: not a tabrec bundle (no {BUNDLE_JSON})")
        self.doc: dict[str, Any] = json.loads(doc_path.read_text())
        version = self.doc.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{path}: bundle format {version} not supported (need {FORMAT_VERSION})")
        if self.doc.get("kind") not in KINDS:
            raise BundleError(f"{path}: unknown bundle kind {self.doc.get('kind')!r}")
        tensors = load_file(str(path / WEIGHTS))
        spec = self.doc["model"]
        classes = model_classes()
        if spec["class"] not in classes:
            raise BundleError(f"{path}: unknown model class {spec['class']!r}")
        self.model = classes[spec["class"]].from_config(spec["config"])
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(state)
        self.model.eval()
        self.extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        self.features = None
        if (path / FEATURES_DIR).is_dir():
            from modeling.features import FeaturePipeline

            self.features = FeaturePipeline.load(path / FEATURES_DIR)

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])


def resolve_bundle_dir(uri: str) -> Path:
    """Find the bundle behind a local path, ``runs:/``, ``models:/name/version`` or ``models:/name@alias``."""
    local = Path(uri)
    if "://" not in uri and not uri.startswith(("runs:/", "models:/")):
        if not local.exists():
            raise DataError(f"model {uri}: no such file or directory")
        return _find_bundle(local, uri)
    import mlflow

    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # MLflow raises several types for a missing run/model/alias
        raise DataError(f"model {uri}: cannot resolve ({type(exc).__name__}: {exc})") from exc
    return _find_bundle(downloaded, uri)


def _find_bundle(root: Path, uri: str) -> Path:
    if (root / BUNDLE_JSON).is_file():
        return root
    for candidate in (root / "artifacts" / "bundle", root / "bundle"):
        if (candidate / BUNDLE_JSON).is_file():
            return candidate
    found = sorted(root.rglob(BUNDLE_JSON))
    if not found:
        raise BundleError(f"model {uri}: no tabrec bundle found under {root}")
    return found[0].parent


def read_bundle(uri: str) -> RawBundle:
    return RawBundle(resolve_bundle_dir(uri))
