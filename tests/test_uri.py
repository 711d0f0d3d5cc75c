"""modeling.uri: the one parser for model URIs."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeling.errors import DataError
from modeling.uri import ModelUri


@pytest.mark.parametrize(
    ("text", "scheme", "attrs"),
    [
        ("bundles/rossmann", "local", {"path": Path("bundles/rossmann")}),
        ("runs:/0123abcd/model", "runs", {"run_id": "0123abcd", "artifact_path": "model"}),
        ("runs:/0123abcd", "runs", {"run_id": "0123abcd", "artifact_path": None}),
        ("models:/rossmann/3", "models", {"name": "rossmann", "version": "3", "alias": None}),
        ("models:/rossmann@champion", "models", {"name": "rossmann", "alias": "champion", "version": None}),
        ("models:/team/ratings/12", "models", {"name": "team/ratings", "version": "12"}),
        ("s3://bucket/path/model", "artifact", {}),
    ],
)
def test_parse(text, scheme, attrs):
    uri = ModelUri.parse(text)
    assert uri.scheme == scheme and str(uri) == text
    for key, value in attrs.items():
        assert getattr(uri, key) == value, key


def test_properties():
    assert ModelUri.parse("models:/m@champion").is_alias
    assert not ModelUri.parse("models:/m@champion").immutable
    assert ModelUri.parse("models:/m/1").immutable and ModelUri.parse("runs:/abc/model").immutable
    assert ModelUri.parse("runs:/abc/model").needs_tracking and ModelUri.parse("models:/m/1").needs_tracking
    assert not ModelUri.parse("some/dir").needs_tracking and ModelUri.parse("some/dir").is_local


@pytest.mark.parametrize("bad", ["", "   ", "models:/", "models:/name", "models:/@alias", "models:/m@",
                                 "runs:/", "runs:/bad id/model"])
def test_malformed_uris_are_data_errors(bad):
    with pytest.raises(DataError):
        ModelUri.parse(bad)


def test_missing_local_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        ModelUri.parse(str(tmp_path / "nope")).check_exists()
    assert ModelUri.parse(str(tmp_path)).download() == tmp_path


def test_alias_pinned_to_its_version(use_model_store):
    pinned = ModelUri.parse("models:/rossmann@champion").pinned()
    assert pinned.alias is None and pinned.version == "1" and str(pinned) == "models:/rossmann/1"
    desc = ModelUri.parse("models:/rossmann@champion").describe()
    assert desc["name"] == "rossmann" and desc["version"] == "1" and desc["run_id"]
