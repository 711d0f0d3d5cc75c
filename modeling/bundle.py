"""Model bundles: the self-describing directory that batch scoring and the server load.

Layout: ``bundle.json`` (a typed spec: `TabularSpec` or `RatingsSpec`, with a format version),
``weights.safetensors`` (each network's ``state_dict`` under its own prefix, ``model.*`` for the
main one, plus the named extra arrays under ``extra.*``) and, for tabular bundles,
``features/`` (the fitted feature pipeline as JSON + Parquet tables). No pickle.

The training jobs build a spec and call `save_bundle`; predictors and batch jobs call
`load_bundle` and read the spec's fields. Nobody else reads `bundle.json` keys.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modeling.errors import DataError, TabrecError
from modeling.schema import InputSchema
from modeling.uri import ModelUri

FORMAT_VERSION = 2
BUNDLE_JSON = "bundle.json"
WEIGHTS = "weights.safetensors"
FEATURES_DIR = "features"
KINDS = ("tabular", "ratings")
MODEL_PREFIX = "model"
EXTRA_PREFIX = "extra"

# Named extra arrays a bundle may carry (spec.extras lists those present).
DRIFT_X_CAT = "drift_x_cat"  # seeded sample of processed training features (drift check)
DRIFT_X_CONT = "drift_x_cont"
FOREST_PREFIX = "forest_"  # spread forest as plain node arrays (modeling.forest_arrays)
SEEN_INDPTR = "seen_indptr"  # CSR of the items each user rated in training
SEEN_INDICES = "seen_indices"
COLD_START_RANK = "cold_start_rank"  # items ranked for unknown users
COLD_START_SCORES = "cold_start_scores"
BASELINE_USER_BIAS = "baseline_user_bias"  # bias baseline (mu: RatingsSpec.global_mean): ratings of
BASELINE_ITEM_BIAS = "baseline_item_bias"  # unknown users/items (modeling.baselines.cold_start_fill)


class BundleError(TabrecError):
    """A bundle is missing, unreadable, or of an unsupported format version."""


class BundleFormatError(BundleError, DataError):
    """The bundle was written in another format version: retrain (or use a matching tabrec)."""


def model_classes() -> dict[str, type[nn.Module]]:
    from modeling.collab import DotProductBias, EmbeddingNN
    from modeling.tabular import TabularModel

    return {c.__name__: c for c in (TabularModel, DotProductBias, EmbeddingNN)}


# ---------------------------------------------------------------------------- spec parts


@dataclass
class ModelSpec:
    """Which network class to rebuild, with its constructor config; weights under `prefix`."""

    class_name: str
    config: dict[str, Any]
    prefix: str = MODEL_PREFIX

    @classmethod
    def of(cls, model: nn.Module, prefix: str = MODEL_PREFIX) -> ModelSpec:
        return cls(type(model).__name__, model.config(), prefix)

    def to_doc(self) -> dict[str, Any]:
        return {"class": self.class_name, "config": self.config, "prefix": self.prefix}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], where: str) -> ModelSpec:
        return cls(str(_need(doc, "class", where)), dict(_need(doc, "config", where)),
                   str(doc.get("prefix", MODEL_PREFIX)))

    def build(self, tensors: Mapping[str, torch.Tensor], where: str) -> nn.Module:
        classes = model_classes()
        if self.class_name not in classes:
            raise BundleError(f"{where}: unknown model class {self.class_name!r}")
        model = classes[self.class_name].from_config(self.config)
        head = self.prefix + "."
        state = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise BundleError(f"{where}: weights under {self.prefix!r} do not fit {self.class_name} "
                              f"({str(exc).splitlines()[0]})") from None
        return model.eval()


@dataclass
class Target:
    """What a tabular model predicts and on which scale it was trained ("log" -> exp at predict)."""

    name: str = "prediction"
    transform: str = "identity"  # "identity" | "log"

    def __post_init__(self) -> None:
        if self.transform not in ("identity", "log"):
            raise BundleError(f"target transform must be 'identity' or 'log', got {self.transform!r}")


@dataclass
class ZeroRule:
    """Rows whose engineered `column` equals `equals` are answered 0 without the model
    (Rossmann: a closed store sells nothing)."""

    column: str
    equals: float


@dataclass
class RankingChoice:
    """How the served ranking head was chosen, on an inner split of the training pairs only
    (`modeling.ranking_select`): trained `epochs` of a `schedule_epochs` one-cycle schedule, and
    it scores head_weight * head + beta * log(1 + training popularity), folded into the stored
    network's weights (head_weight 0: popularity alone). `inner_*`: the figures it was chosen on."""

    epochs: int
    schedule_epochs: int
    head_weight: float
    beta: float
    inner_precision: float | None = None
    inner_pop_precision: float | None = None
    inner_t: float | None = None  # t statistic of the best head setting against popularity
    inner_users: int = 0
    inner_pairs: int = 0
    inner_folds: int = 1

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], where: str) -> RankingChoice:
        def num(key: str) -> float | None:
            return None if doc.get(key) is None else float(doc[key])

        try:
            return cls(epochs=int(doc["epochs"]), schedule_epochs=int(doc["schedule_epochs"]),
                       head_weight=float(doc["head_weight"]), beta=float(doc["beta"]),
                       inner_precision=num("inner_precision"),
                       inner_pop_precision=num("inner_pop_precision"), inner_t=num("inner_t"),
                       inner_users=int(doc.get("inner_users", 0)), inner_pairs=int(doc.get("inner_pairs", 0)),
                       inner_folds=int(doc.get("inner_folds", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: ranking_choice is malformed ({exc})") from None


# ---------------------------------------------------------------------------- specs


@dataclass(kw_only=True)
class BundleSpec:
    """What every bundle declares."""

    kind: ClassVar[str] = ""
    model: ModelSpec
    inputs: InputSchema
    y_range: list[float] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    data_fingerprint: str | None = None
    training: dict[str, Any] = field(default_factory=dict)  # the training config, for the record
    run_id: str | None = None
    extras: list[str] = field(default_factory=list)  # names of the extra arrays in the weights file

    def networks(self) -> list[ModelSpec]:
        """Every network the weights file holds (the main model first)."""
        return [self.model]

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            doc[f.name] = _plain(value)
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], where: str) -> BundleSpec:
        kind = doc.get("kind")
        if kind not in SPECS:
            raise BundleError(f"{where}: unknown bundle kind {kind!r}; expected one of {KINDS}")
        return SPECS[kind]._from_doc(doc, where)

    @classmethod
    def _common(cls, doc: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {
            "model": ModelSpec.from_doc(_need(doc, "model", where), f"{where} model"),
            "inputs": InputSchema.from_dict(_need(doc, "inputs", where)),
            "y_range": None if doc.get("y_range") is None else [float(v) for v in doc["y_range"]],
            "metrics": {str(k): float(v) for k, v in (doc.get("metrics") or {}).items()},
            "data_fingerprint": doc.get("data_fingerprint"),
            "training": dict(doc.get("training") or {}),
            "run_id": doc.get("run_id"),
            "extras": [str(e) for e in doc.get("extras") or []],
        }

    @classmethod
    def _from_doc(cls, doc: Mapping[str, Any], where: str) -> BundleSpec:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(kw_only=True)
class TabularSpec(BundleSpec):
    """A tabular network over engineered features: processor state, target, rules, keys.

    `members`: further networks of an ensemble, averaged with the main model on the model's
    scale (empty for a single model). `features`: whether ``features/`` holds a pipeline.
    `uncertainty`: the spread forest's description when the extras carry one. `level`: the recent-level
    correction's description (modeling.level) when the extras carry its offsets.
    """

    kind: ClassVar[str] = "tabular"
    processor: dict[str, Any]
    target: Target = field(default_factory=Target)
    zero_when: list[ZeroRule] = field(default_factory=list)
    key_columns: list[str] = field(default_factory=list)
    uncertainty: dict[str, Any] | None = None
    members: list[ModelSpec] = field(default_factory=list)
    features: bool = False
    level: dict[str, Any] | None = None  # modeling.level.RecentLevel.describe(); offsets in the extras

    def networks(self) -> list[ModelSpec]:
        return [self.model, *self.members]

    @classmethod
    def _from_doc(cls, doc: Mapping[str, Any], where: str) -> TabularSpec:
        target = doc.get("target") or {}
        return cls(
            **cls._common(doc, where),
            processor=dict(_need(doc, "processor", where)),
            target=Target(str(target.get("name", "prediction")), str(target.get("transform", "identity"))),
            zero_when=[ZeroRule(str(r["column"]), float(r["equals"])) for r in doc.get("zero_when") or []],
            key_columns=[str(c) for c in doc.get("key_columns") or []],
            uncertainty=doc.get("uncertainty"),
            members=[ModelSpec.from_doc(m, f"{where} members[{i}]") for i, m in enumerate(doc.get("members") or [])],
            features=bool(doc.get("features", False)),
            level=doc.get("level"),
        )


@dataclass(kw_only=True)
class RatingsSpec(BundleSpec):
    """A collaborative-filtering model: the id vocabularies (code i + 1 = position i; 0 is the
    unknown token), item titles, the rating scale, and an optional second network `ranking`
    that answers top-k recommendations and similar items in place of the rating model;
    `ranking_choice` records how that network was chosen (epochs, popularity prior).

    `global_mean`: the bias baseline's mu; with the extras BASELINE_USER_BIAS/BASELINE_ITEM_BIAS
    it answers the rating of an unknown user or item (mu + the known side's bias).
    `interactions_only`: trained on interactions without ratings (clicks): `model` is then a
    ranking network, there is no rating model, and rating predictions are refused."""

    kind: ClassVar[str] = "ratings"
    users: list[str]
    items: list[str]
    item_titles: list[str | None] | None = None
    rating_scale: list[float] | None = None
    ranking: ModelSpec | None = None
    ranking_choice: RankingChoice | None = None
    global_mean: float | None = None
    interactions_only: bool = False

    def networks(self) -> list[ModelSpec]:
        return [self.model, *([self.ranking] if self.ranking is not None else [])]

    @classmethod
    def _from_doc(cls, doc: Mapping[str, Any], where: str) -> RatingsSpec:
        ranking = doc.get("ranking")
        return cls(
            **cls._common(doc, where),
            users=[str(u) for u in _need(doc, "users", where)],
            items=[str(i) for i in _need(doc, "items", where)],
            item_titles=doc.get("item_titles"),
            rating_scale=None if doc.get("rating_scale") is None else [float(v) for v in doc["rating_scale"]],
            ranking=None if ranking is None else ModelSpec.from_doc(ranking, f"{where} ranking"),
            ranking_choice=None if doc.get("ranking_choice") is None
            else RankingChoice.from_doc(doc["ranking_choice"], f"{where} ranking_choice"),
            global_mean=None if doc.get("global_mean") is None else float(doc["global_mean"]),
            interactions_only=bool(doc.get("interactions_only", False)),
        )


SPECS: dict[str, type[BundleSpec]] = {"tabular": TabularSpec, "ratings": RatingsSpec}


def _need(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in doc or doc[key] is None:
        raise BundleError(f"{where}: {BUNDLE_JSON} lacks {key!r}; the bundle is damaged or incomplete")
    return doc[key]


def _plain(value: Any) -> Any:
    """Spec values -> JSON-able values (dataclasses, schemas, numpy scalars and arrays)."""
    if isinstance(value, InputSchema):
        return value.to_dict()
    if isinstance(value, ModelSpec):
        return value.to_doc()
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------- save / load


@dataclass
class Bundle:
    """A bundle read from disk: its spec, its networks (eval mode), extras and feature pipeline."""

    path: Path
    spec: BundleSpec
    networks: list[nn.Module]
    extras: dict[str, torch.Tensor]
    features: Any = None  # modeling.features.FeaturePipeline for tabular bundles that have one

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def model(self) -> nn.Module:
        return self.networks[0]

    def network(self, spec: ModelSpec) -> nn.Module:
        """The loaded network described by `spec` (one of `self.spec.networks()`)."""
        return self.networks[[s.prefix for s in self.spec.networks()].index(spec.prefix)]


def save_bundle(
    path: str | os.PathLike[str],
    spec: BundleSpec,
    networks: Sequence[nn.Module],
    *,
    extras: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    features: Any | None = None,
) -> Path:
    """Write a bundle atomically (built in a sibling temp dir, then renamed into place).

    `networks` are the modules of `spec.networks()`, in that order; `spec.extras` and
    `spec.features` are set from `extras` and `features`."""
    specs = spec.networks()
    if len(specs) != len(networks):
        raise ValueError(f"spec declares {len(specs)} network(s), got {len(networks)}")
    if len({s.prefix for s in specs}) != len(specs):
        raise ValueError(f"network prefixes must differ: {[s.prefix for s in specs]}")
    extras = dict(extras or {})
    spec.extras = sorted(extras)
    if isinstance(spec, TabularSpec):
        spec.features = features is not None
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (tmp / BUNDLE_JSON).write_text(json.dumps(spec.to_doc(), indent=1))
        tensors: dict[str, torch.Tensor] = {}
        for s, net in zip(specs, networks, strict=True):
            tensors.update({f"{s.prefix}.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
        for k, v in extras.items():
            t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
            tensors[f"{EXTRA_PREFIX}.{k}"] = t.detach().cpu().contiguous()
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


def read_spec(path: Path) -> BundleSpec:
    """The spec of the bundle in directory `path` (format version checked first)."""
    doc_path = path / BUNDLE_JSON
    if not doc_path.is_file():
        raise BundleError(f"{path}: not a tabrec bundle (no {BUNDLE_JSON})")
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{doc_path}: unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{doc_path}: not a JSON object")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        age = ("an older" if isinstance(version, int) and version < FORMAT_VERSION
               else "a newer" if isinstance(version, int) else "an unknown")
        raise BundleFormatError(
            f"{path}: bundle format version {version} was written by {age} tabrec; this tabrec reads "
            f"format version {FORMAT_VERSION}. Retrain the model with this tabrec (tabrec train ...)"
            + (" or upgrade tabrec" if age == "a newer" else ""))
    return BundleSpec.from_doc(doc, str(path))


def load_bundle_dir(path: Path) -> Bundle:
    spec = read_spec(path)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{path / WEIGHTS}: unreadable ({exc})") from None
    networks = [s.build(tensors, f"{path}") for s in spec.networks()]
    head = EXTRA_PREFIX + "."
    extras = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
    if sorted(extras) != sorted(spec.extras):
        raise BundleError(f"{path}: {BUNDLE_JSON} declares extra arrays {sorted(spec.extras)} but "
                          f"{WEIGHTS} holds {sorted(extras)}")
    features = None
    if isinstance(spec, TabularSpec) and spec.features:
        from modeling.features import FeaturePipeline

        features = FeaturePipeline.load(path / FEATURES_DIR)
    return Bundle(path, spec, networks, extras, features)


def resolve_bundle_dir(uri: str | ModelUri) -> Path:
    """The local bundle directory behind any accepted model URI (downloaded when remote)."""
    parsed = uri if isinstance(uri, ModelUri) else ModelUri.parse(uri)
    return find_bundle(parsed.download(), parsed.text)


def find_bundle(root: Path, uri: str) -> Path:
    """`root` itself, or the bundle inside a logged MLflow model directory."""
    if (root / BUNDLE_JSON).is_file():
        return root
    for candidate in (root / "artifacts" / "bundle", root / "bundle"):
        if (candidate / BUNDLE_JSON).is_file():
            return candidate
    found = sorted(root.rglob(BUNDLE_JSON))
    if not found:
        raise BundleError(f"model {uri}: no tabrec bundle found under {root}")
    return found[0].parent


def load_bundle(uri: str | ModelUri) -> Bundle:
    return load_bundle_dir(resolve_bundle_dir(uri))
