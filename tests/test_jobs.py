"""The training skeleton's contracts: the config dataclasses are the single source of the CLI's
defaults and help, and the validation every job shares behaves the same in each."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from modeling.errors import DataError
from pipelines import cli
from pipelines.jobs.config import (
    MODEL_DEFAULTS,
    RatingsConfig,
    RossmannConfig,
    check_training_options,
    default_of,
    option_help,
)

COMMANDS = [(("train", "rossmann"), RossmannConfig), (("train", "ratings"), RatingsConfig),
            (("lr-find", "rossmann"), RossmannConfig), (("lr-find", "ratings"), RatingsConfig)]


def _command(path: tuple[str, ...]) -> Any:
    cmd = typer.main.get_command(cli.app)
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


def _config_options(path: tuple[str, ...], cls: type) -> list[Any]:
    """The command's options that set a field of `cls` (typer vendors click: compare by kind)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return [p for p in _command(path).params if p.param_type_name == "option" and p.name in names]


@pytest.mark.parametrize(("path", "cls"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_cli_default_equals_the_dataclass_default(path, cls):
    options = _config_options(path, cls)
    assert len(options) >= 8  # the command really exposes config fields
    for param in options:
        if param.required:  # required in both places
            with pytest.raises(KeyError, match="no default"):
                default_of(cls, param.name)
            continue
        want = default_of(cls, param.name)
        got = cli._parse_layers(param.default) if param.name == "layers" else param.default
        assert got == want, f"{' '.join(path)} --{param.name}: CLI default {got!r}, {cls.__name__} {want!r}"


@pytest.mark.parametrize(("path", "cls"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_cli_help_comes_from_the_dataclass(path, cls):
    for param in _config_options(path, cls):
        if option_help(cls, param.name):
            assert param.help == option_help(cls, param.name), param.name


def test_per_model_defaults_are_in_the_help_and_applied():
    help_text = option_help(RatingsConfig, "epochs")
    for model, defaults in MODEL_DEFAULTS.items():
        assert f"{model} {defaults['epochs']}" in help_text
        cfg = RatingsConfig(ratings="r", model=model)
        assert {k: getattr(cfg, k) for k in defaults} == defaults
    assert RatingsConfig(ratings="r", model="nn", epochs=3).epochs == 3


def test_train_help_shows_the_dataclass_defaults():
    res = CliRunner().invoke(cli.app, ["train", "rossmann", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert f"[default: {RossmannConfig.valid_days}]" in res.output
    assert "[default: {}]".format(",".join(map(str, RossmannConfig.layers))) in res.output


@pytest.mark.parametrize("cls", [RossmannConfig, RatingsConfig])
@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", "0", "--lr must be 'auto' or a positive number"),
    ("lr", "fast", "--lr must be 'auto' or a positive number"),
    ("epochs", 0, "--epochs must be >= 1"),
    ("batch_size", 0, "--batch-size must be >="),
])
def test_shared_validation_is_the_same_for_every_job(cls, field, value, message):
    required = {"train": "t", "store": "s"} if cls is RossmannConfig else {"ratings": "r"}
    cfg = cls(**required, **{field: value})
    with pytest.raises(DataError, match=message):
        cfg.validate()
    with pytest.raises(DataError, match=message):
        check_training_options(cfg)


def test_rossmann_batch_needs_two_rows_ratings_one():
    with pytest.raises(DataError, match="BatchNorm"):
        RossmannConfig(train="t", store="s", batch_size=1).validate()
    RatingsConfig(ratings="r", batch_size=1).validate()
    RossmannConfig(train="t", store="s", lr="3e-3").validate()
