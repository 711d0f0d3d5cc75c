"""Shared fixtures: a temporary working directory with its own MLflow sqlite store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tracking_env import tracking_env


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real sqlite-backed MLflow store in a temp dir, set as the tracking URI."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run() is not None:
        mlflow.end_run()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both demo models trained once per session on small synthetic data, registered with
    alias `champion` in a real sqlite MLflow store. Returns paths, URIs and training results."""
    import mlflow

    from pipelines.jobs.ratings import RatingsConfig, train_ratings
    from pipelines.jobs.rossmann import RossmannConfig, train_rossmann
    from pipelines.synth import write_ratings, write_rossmann

    root = tmp_path_factory.mktemp("model_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_env(uri, root):
        mlflow.set_tracking_uri(uri)
        ross = write_rossmann(root / "rossmann", stores=12, days=300, seed=0)
        rat = write_ratings(root / "ratings", users=200, items=300, ratings=10_000, seed=0)
        r1 = train_rossmann(RossmannConfig(train=str(ross["train.csv"]), store=str(ross["store.csv"]),
                                           epochs=2, ensemble=1, lr="3e-3", register="rossmann", quiet=True,
                                           forest_rows=5_000, forest_trees=10))
        r2 = train_ratings(RatingsConfig(ratings=str(rat["u.data"]), items=str(rat["movies.csv"]),
                                         epochs=3, lr="1e-2", batch_size=256, register="ratings", quiet=True))
    return {"tracking_uri": uri, "root": root, "rossmann_data": ross, "ratings_data": rat,
            "rossmann": r1, "ratings": r2}


@pytest.fixture
def use_model_store(model_store: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Point MLflow (env and client) at the session's model store for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", model_store["tracking_uri"])
    mlflow.set_tracking_uri(model_store["tracking_uri"])
    return model_store


@pytest.fixture(scope="module")
def bundles(model_store: dict) -> dict[str, str]:
    """Local directories of both registered bundles, so most tests skip the registry round trip."""
    import mlflow

    from modeling.bundle import resolve_bundle_dir

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = model_store["tracking_uri"]
    mlflow.set_tracking_uri(model_store["tracking_uri"])
    try:
        return {"rossmann": str(resolve_bundle_dir("models:/rossmann@champion")),
                "ratings": str(resolve_bundle_dir("models:/ratings@champion"))}
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def module_store(model_store: dict) -> Iterator[dict]:
    """The session's model store as the MLflow tracking URI (env and client) for a whole module."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", model_store["tracking_uri"])
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(model_store["tracking_uri"])
        yield model_store
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def fresh_module_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new sqlite MLflow store of a module's own, as its working directory and tracking URI."""
    import mlflow

    root = tmp_path_factory.mktemp("module_store")
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        yield root
    mlflow.set_tracking_uri(previous)
