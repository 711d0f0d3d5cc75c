"""modeling.bundle: typed specs, format version, named extras, atomic save and load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from modeling.bundle import (
    FORMAT_VERSION,
    BundleError,
    BundleFormatError,
    BundleSpec,
    ModelSpec,
    RatingsSpec,
    TabularSpec,
    Target,
    ZeroRule,
    load_bundle,
    read_spec,
    save_bundle,
)
from modeling.collab import DotProductBias
from modeling.errors import DataError
from modeling.schema import InputField, InputSchema
from modeling.tabular import TabularModel


def _ratings_spec(model: torch.nn.Module, ranking: torch.nn.Module | None = None) -> RatingsSpec:
    return RatingsSpec(model=ModelSpec.of(model), ranking=None if ranking is None else ModelSpec.of(ranking, "ranking"),
                       inputs=InputSchema([InputField("user", "id"), InputField("item", "id")]),
                       users=["u1", "u2"], items=["a", "b", "c"], rating_scale=[1.0, 5.0], y_range=[0.0, 5.5],
                       metrics={"valid_rmse": np.float32(0.9)}, run_id="r1")


def test_ratings_spec_round_trip_with_a_second_head(tmp_path):
    torch.manual_seed(0)
    model, ranking = DotProductBias(3, 4, n_factors=5), DotProductBias(3, 4, n_factors=7)
    spec = _ratings_spec(model, ranking)
    extras = {"seen_indptr": np.array([0, 0, 1, 2]), "seen_indices": np.array([1, 2], dtype=np.int32)}
    path = save_bundle(tmp_path / "b", spec, [model, ranking], extras=extras)
    doc = json.loads((path / "bundle.json").read_text())
    assert doc["format_version"] == FORMAT_VERSION and doc["kind"] == "ratings"
    assert doc["extras"] == ["seen_indices", "seen_indptr"] and doc["metrics"]["valid_rmse"] == pytest.approx(0.9)
    bundle = load_bundle(str(path))
    assert isinstance(bundle.spec, RatingsSpec) and bundle.spec == spec
    assert [type(n).__name__ for n in bundle.networks] == ["DotProductBias", "DotProductBias"]
    assert bundle.network(spec.ranking).n_factors == 7 and not bundle.model.training
    for a, b in zip(bundle.networks, [model, ranking], strict=True):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
    np.testing.assert_array_equal(bundle.extras["seen_indices"].numpy(), [1, 2])


def test_tabular_spec_round_trip_with_ensemble_members(tmp_path):
    nets = [TabularModel([(3, 2)], 1, layers=[4], y_range=(0.0, 1.0)) for _ in range(3)]
    spec = TabularSpec(model=ModelSpec.of(nets[0]), members=[ModelSpec.of(n, f"member{i}") for i, n in
                                                             enumerate(nets[1:], 1)],
                       inputs=InputSchema([InputField("x", "float")]), processor={"format": "p"},
                       target=Target("Sales", "log"), zero_when=[ZeroRule("Open", 0)], key_columns=["Id"])
    path = save_bundle(tmp_path / "b", spec, nets)
    back = read_spec(path)
    assert back == spec and isinstance(back, TabularSpec)
    assert back.zero_when[0].column == "Open" and back.target.transform == "log"
    assert len(load_bundle(str(path)).networks) == 3


def _saved(tmp_path) -> tuple[object, object]:
    model = DotProductBias(3, 4, n_factors=2)
    return save_bundle(tmp_path / "b", _ratings_spec(model), [model]), model


@pytest.mark.parametrize(("version", "words"), [(1, "older"), (FORMAT_VERSION + 1, "newer"), (None, "unknown")])
def test_other_format_versions_are_clear_errors_naming_both(tmp_path, version, words):
    path, _ = _saved(tmp_path)
    doc = json.loads((path / "bundle.json").read_text())
    doc["format_version"] = version
    (path / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleFormatError) as err:
        load_bundle(str(path))
    msg = str(err.value)
    assert f"format version {version}" in msg and f"format version {FORMAT_VERSION}" in msg
    assert words in msg and "Retrain" in msg
    assert isinstance(err.value, DataError)  # the CLI exits 2 on it


def test_missing_keys_and_extras_are_bundle_errors_not_key_errors(tmp_path):
    path, _ = _saved(tmp_path)
    doc = json.loads((path / "bundle.json").read_text())
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "bundle.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "users"}))
    with pytest.raises(BundleError, match="lacks 'users'"):
        load_bundle(str(broken))
    (broken / "bundle.json").write_text(json.dumps({**doc, "extras": ["drift_x_cat"]}))
    with pytest.raises(BundleError, match="declares extra arrays"):
        load_bundle(str(broken))
    (broken / "bundle.json").write_text(json.dumps({**doc, "kind": "vision"}))
    with pytest.raises(BundleError, match="unknown bundle kind 'vision'"):
        load_bundle(str(broken))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no tabrec bundle found"):
        load_bundle(str(tmp_path / "empty"))


def test_save_is_atomic_and_checks_the_networks(tmp_path):
    path, model = _saved(tmp_path)
    before = (path / "bundle.json").read_text()
    with pytest.raises(ValueError, match="declares 1 network"):
        save_bundle(path, _ratings_spec(model), [model, model])
    assert (path / "bundle.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp dir left behind


def test_spec_class_is_picked_by_kind():
    with pytest.raises(BundleError, match="unknown bundle kind"):
        BundleSpec.from_doc({"kind": None}, "x")
