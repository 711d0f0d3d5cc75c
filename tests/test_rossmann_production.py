"""Rossmann for production: refit on all rows, ensembles, defaults that follow the data size, and
validation metrics taken from weights that were not chosen on the validation rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from tracking_env import tracking_env

from modeling.bundle import load_bundle
from modeling.errors import DataError
from modeling.metrics import rmspe
from modeling.predictors import load_predictor
from modeling.training.background import split_threads
from modeling.training.ensemble import predict_mean, train_members
from pipelines.jobs.rossmann import (
    RossmannConfig,
    auto_batch_size,
    auto_cycle_epochs,
    auto_epochs,
    build_model,
    prepare,
    resolve_options,
    train_rossmann,
)

_PYTHONPATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
SMALL = {"layers": (32, 16), "lr": "3e-3", "quiet": True, "forest_rows": 3_000, "forest_trees": 5, "spread_trees": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pipelines.synth import write_rossmann

    return write_rossmann(tmp_path_factory.mktemp("ross") / "d", stores=10, days=200, seed=3)


@pytest.fixture(scope="module")
def runs(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The same small configuration trained four ways into one MLflow store (module scope: the
    runs are shared by the tests below)."""
    import mlflow

    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root / 'm.db'}"
    base = {"train": str(data["train.csv"]), "store": str(data["store.csv"]), "epochs": 3, **SMALL}
    with tracking_env(uri, root):
        mlflow.set_tracking_uri(uri)
        out = {
            "refit": train_rossmann(RossmannConfig(**base, ensemble=1)),
            "refit_after": train_rossmann(RossmannConfig(**base, ensemble=1, parallel_refit=False)),
            "no_refit": train_rossmann(RossmannConfig(**base, ensemble=1, refit=False)),
            "snapshot": train_rossmann(RossmannConfig(**base, ensemble=3, ensemble_kind="snapshot", cycle_epochs=1)),
            "seeds": train_rossmann(RossmannConfig(**base, ensemble=2, ensemble_kind="seeds", refit=False)),
        }
        for res in out.values():  # local bundle directories, read while the store is current
            res["bundle"] = str(load_bundle(res["model_uri"]).path)
    return {**out, "uri": uri, "base": base}


def _params(runs: dict, name: str) -> dict[str, str]:
    return MlflowClient(runs["uri"]).get_run(runs[name]["run_id"]).data.params


def _valid_rows(runs: dict) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """All raw rows of train.csv (the events of the whole file, as in training) with a mask of the
    validation rows training scored (open, Sales > 0, the last 42 days) and their Sales."""
    train = pd.read_csv(runs["base"]["train"], dtype={"StateHoliday": str})
    dates = pd.to_datetime(train["Date"])
    valid = ((dates > dates.max() - pd.Timedelta(days=42)) & (train["Open"] == 1) & (train["Sales"] > 0)).to_numpy()
    return train.drop(columns=["Sales", "Customers"]), valid, train["Sales"].to_numpy(np.float64)


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def test_refit_logs_refit_weights_and_keeps_the_validation_metrics(runs):
    refit, plain = runs["refit"], runs["no_refit"]
    # the validation run is the same with or without the refit: same metrics (to float rounding:
    # beside a refit worker it trains with half of the torch threads, which sums in another order)
    assert refit["metrics"]["valid_rmspe"] == pytest.approx(plain["metrics"]["valid_rmspe"], rel=1e-5)
    params, plain_params = _params(runs, "refit"), _params(runs, "no_refit")
    assert params["logged_weights"] == "refit" and "logged_weights" not in plain_params
    assert int(params["refit_rows"]) == int(params["n_train"]) + int(params["n_valid"])
    assert refit["metrics"]["refit_seconds"] > 0 and "refit_seconds" not in plain["metrics"]
    client = MlflowClient(runs["uri"])  # the refit's history sits apart from the validation run's
    assert len(client.get_metric_history(refit["run_id"], "refit/epoch/train_loss")) == \
        len(client.get_metric_history(refit["run_id"], "epoch/train_loss")) > 0
    assert not client.get_metric_history(plain["run_id"], "refit/epoch/train_loss")
    assert load_bundle(refit["bundle"]).spec.training["logged_weights"] == "refit"
    # the logged weights differ from the validation weights ...
    a, b = load_bundle(refit["bundle"]).model, load_bundle(plain["bundle"]).model
    assert any(not torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    # ... and are exactly a fit on train + valid with the same seed, schedule, epochs and lr
    cfg = resolve_options(RossmannConfig(**runs["base"]), 0)
    d = prepare(cfg)
    cfg = resolve_options(cfg, len(d.train))
    both = type(d.train)(tuple(torch.cat([x, v]) for x, v in zip(d.train.xs, d.valid.xs, strict=True)),
                         torch.cat([d.train.y, d.valid.y]))

    def again() -> dict[str, torch.Tensor]:
        members = train_members(lambda: build_model(cfg, d), both, None, members=1, kind="snapshot",
                                epochs=cfg.epochs, cycle_epochs=1, seed=cfg.seed,
                                trainer_kwargs={"lr": 3e-3, "wd": cfg.wd, "batch_size": cfg.batch_size, "quiet": True,
                                                "mixed_precision": cfg.precision == "bf16"})
        return _state(members.networks[0])

    # the refit trained in a worker beside the validation run, with the worker's share of the threads
    threads = torch.get_num_threads()
    split = split_threads(threads)
    assert split is not None, "this test needs two torch threads (the default on a 2-core machine)"
    assert params["refit_mode"] == f"beside the validation run ({split[1]} + {split[0]} torch threads)"
    torch.set_num_threads(split[1])
    try:
        in_worker = again()
    finally:
        torch.set_num_threads(threads)
    for k, v in in_worker.items():
        torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # --no-parallel-refit: the refit after the validation run, in this process, with all the threads;
    # the validation run is then bit for bit the --no-refit one
    after = runs["refit_after"]
    assert after["metrics"]["valid_rmspe"] == pytest.approx(plain["metrics"]["valid_rmspe"], rel=1e-9)
    assert _params(runs, "refit_after")["refit_mode"] == "after the validation run"
    assert refit["metrics"]["refit_worker_peak_rss_mb"] > 0 and "refit_worker_peak_rss_mb" not in after["metrics"]
    c = load_bundle(after["bundle"]).model
    for k, v in again().items():
        torch.testing.assert_close(c.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_reported_valid_metric_is_the_final_weights_not_a_pick(runs):
    """--no-refit logs the validation weights: scoring the validation rows with the logged bundle
    gives the reported valid_rmspe, and it is the last epoch's figure, not the best epoch's."""
    res = runs["no_refit"]
    raw, valid, sales = _valid_rows(runs)
    pred = load_predictor(res["bundle"]).predict(raw)
    assert rmspe(sales[valid], pred[valid]) == pytest.approx(res["metrics"]["valid_rmspe"], rel=1e-4)
    history = [m.value for m in sorted(MlflowClient(runs["uri"]).get_metric_history(res["run_id"], "epoch/valid_rmspe"),
                                       key=lambda m: m.step)]
    assert len(history) == 3
    # the per-epoch figures are the networks' alone; the reported one adds the recent-level correction
    assert res["metrics"]["valid_rmspe_networks_only"] == pytest.approx(history[-1], rel=1e-5)
    assert res["metrics"]["valid_rmspe_best_epoch_selected_on_valid"] == pytest.approx(min(history), rel=1e-6)


def test_snapshot_ensemble_is_one_bundle_averaged_in_log_space(runs, data):
    res = runs["snapshot"]
    bundle = load_bundle(res["bundle"])
    assert len(bundle.spec.members) == 2 and len(bundle.networks) == 3
    pred = load_predictor(res["bundle"])
    test = pd.read_csv(data["test.csv"], dtype={"StateHoliday": str})
    out = pred.predict(test)
    feats = pred.engineer(test)
    x_cat, x_cont = pred.processor.transform(feats)
    xs = (torch.from_numpy(x_cat), torch.from_numpy(x_cont))
    with torch.no_grad():
        logs = torch.stack([net(*xs) for net in bundle.networks])
    want = np.exp(logs.mean(0).numpy().astype(np.float64) + pred.level(x_cat[:, pred.processor.cat_names_out.index("Store")]))
    want[pred.fixed_rows(feats)] = 0.0
    np.testing.assert_allclose(out, want, rtol=1e-5)
    assert not np.allclose(np.exp(logs[0].numpy()), np.exp(logs[1].numpy()), rtol=1e-3)  # members differ
    m = res["metrics"]
    assert m["ensemble_members"] == 3
    assert {f"valid_rmspe_member_{i}" for i in range(3)} <= set(m)
    # the means of the first k members: k = 1 is member 0, k = N the ensemble's own figure; the
    # seconds behind them grow (snapshot: the run up to the k-th cycle's end)
    assert m["valid_rmspe_first_1"] == pytest.approx(m["valid_rmspe_member_0"], rel=1e-6)
    assert m["valid_rmspe_first_3"] == pytest.approx(m["valid_rmspe"], rel=1e-4)
    assert m["train_seconds_first_1"] < m["train_seconds_first_2"] < m["train_seconds_first_3"]
    assert m["train_seconds_first_3"] == pytest.approx(m["train_seconds_member_2"])
    # run history: 3 epochs of the first cycle + two 1-epoch cycles
    steps = MlflowClient(runs["uri"]).get_metric_history(res["run_id"], "epoch/valid_rmspe")
    assert len(steps) == 5
    assert _params(runs, "snapshot")["logged_weights"] == "refit"


def test_seed_ensemble_first_member_is_the_single_model(runs):
    single = load_bundle(runs["no_refit"]["bundle"]).model
    ens = load_bundle(runs["seeds"]["bundle"])
    assert len(ens.networks) == 2
    for k, v in single.state_dict().items():
        assert torch.equal(ens.networks[0].state_dict()[k], v), k
    assert runs["seeds"]["metrics"]["valid_rmspe_member_0"] == pytest.approx(
        runs["no_refit"]["metrics"]["valid_rmspe"], rel=1e-5)
    m = runs["seeds"]["metrics"]  # seeds: the first k members' seconds add up
    assert m["train_seconds_first_2"] == pytest.approx(m["train_seconds_member_0"] + m["train_seconds_member_1"])
    assert m["valid_rmspe_first_2"] == pytest.approx(m["valid_rmspe"], rel=1e-4)
    # the ensemble's figure is the mean of its members in log space, not a pick
    raw, valid, sales = _valid_rows(runs)
    assert rmspe(sales[valid], load_predictor(runs["seeds"]["bundle"]).predict(raw)[valid]) == pytest.approx(
        runs["seeds"]["metrics"]["valid_rmspe"], rel=1e-4)


@pytest.fixture(scope="module")
def shifted(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The `data` set with stores 1-5 selling 30% more over the last 100 days (a refurbishment, say),
    trained with refit: a level the networks, which see each store's whole history, cannot know."""
    root = tmp_path_factory.mktemp("shifted")
    train = pd.read_csv(data["train.csv"], dtype={"StateHoliday": str})
    dates = pd.to_datetime(train["Date"])
    moved = (train["Store"] <= 5) & (dates > dates.max() - pd.Timedelta(days=100))
    train.loc[moved, "Sales"] = np.rint(train.loc[moved, "Sales"] * 1.3).astype(int)
    train.to_csv(root / "train.csv", index=False)
    cfg = RossmannConfig(train=str(root / "train.csv"), store=str(data["store.csv"]), epochs=3, ensemble=1, **SMALL)
    uri = f"sqlite:///{root / 'm.db'}"
    with tracking_env(uri, root):
        res = train_rossmann(cfg)
        res["bundle"] = str(load_bundle(res["model_uri"]).path)
    return {"res": res, "cfg": cfg, "uri": uri}


def test_recent_level_follows_stores_that_moved(shifted):
    """Stores whose sales rose lately get positive offsets, the others about none; the validation
    figure improves on the networks alone; the bundle's offsets are the refit networks' residuals
    over the last `level_days` days of ALL rows (train + valid), not the validation run's."""
    from modeling.level import LEVEL_OFFSETS, level_of

    res, cfg = shifted["res"], shifted["cfg"]
    bundle = load_bundle(res["bundle"])
    spec = bundle.spec.level
    assert spec is not None and spec["days"] == 42 and spec["applied"] and spec["persistence_t"] >= 2
    d = prepare(cfg)
    col = d.processor.cat_names_out.index("Store")
    n_codes = len(d.processor.vocab["Store"]) + 1
    train = (d.train.xs, d.train.y, d.train_rows["Date"].to_numpy())
    want = level_of(bundle.networks, [train, (d.valid.xs, d.valid.y, d.valid_rows["Date"].to_numpy())], 42, "Store",
                    col, n_codes)
    offsets = bundle.extras[LEVEL_OFFSETS].numpy()
    np.testing.assert_allclose(offsets, want.offsets, atol=1e-6)
    # the same networks on the training rows only give other offsets (the refit's saw the valid weeks)
    early = level_of(bundle.networks, [train], 42, "Store", col, n_codes)
    assert not np.allclose(early.offsets, offsets, atol=1e-4)
    vocab = [str(v) for v in d.processor.vocab["Store"]]
    code = {k: vocab.index(str(k)) + 1 for k in range(1, 11)}
    moved, still = offsets[[code[k] for k in range(1, 6)]], offsets[[code[k] for k in range(6, 11)]]
    assert moved.mean() > still.mean() + 0.05  # a small network's own errors blur the single stores
    m = res["metrics"]
    assert m["valid_rmspe"] < 0.9 * m["valid_rmspe_networks_only"]
    assert m["level_sigma"] > 0 and m["level_tau"] > 0.03 and m["level_applied"] == 1.0
    # the analyst reads what it did in the run's description
    note = MlflowClient(shifted["uri"]).get_run(res["run_id"]).data.tags["mlflow.note.content"]
    assert f"{m['valid_rmspe_networks_only']:.4f} from the networks alone, {m['valid_rmspe']:.4f} with it" in note


def test_level_days_0_keeps_the_networks_alone(data, tmp_path, monkeypatch):
    res, db = _cli(data, tmp_path, "--steps", "60", "--min-epochs", "1", "--layers", "16", "--ensemble", "1",
                   "--no-refit", "--lr", "3e-3", "--level-days", "0")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "valid_rmspe_networks_only" not in out["metrics"]
    client = MlflowClient(f"sqlite:///{db}")
    last = client.get_metric_history(out["run_id"], "epoch/valid_rmspe")[-1].value
    assert out["metrics"]["valid_rmspe"] == pytest.approx(last, rel=1e-5)
    import mlflow

    monkeypatch.chdir(tmp_path)  # the CLI's run stored its artifacts under its working directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    try:
        bundle = load_bundle(out["model_uri"])
    finally:
        mlflow.set_tracking_uri(previous)
    assert bundle.spec.level is None and not any(k.startswith("level/") for k in bundle.extras)
    assert load_predictor(str(bundle.path)).level is None


def test_auto_epochs_and_batch_size_follow_the_data_size():
    # small synthetic data: small batches and many epochs; the real 804k rows: batch 512, 4 epochs
    assert auto_batch_size(6_000) == 64 and auto_batch_size(100_000) == 64
    assert auto_batch_size(804_056) == 512 and auto_batch_size(50_000_000) == 1024
    assert auto_epochs(6_000, 64, 3000, 4) == math.ceil(3000 / math.ceil(6000 / 64))
    assert auto_epochs(804_056, 512, 3000, 4) == 4
    for n in (6_000, 40_000, 804_056):
        cfg = resolve_options(RossmannConfig(train="t", store="s"), n)
        steps = cfg.epochs * math.ceil(n / cfg.batch_size)
        assert steps >= cfg.steps and cfg.epochs >= cfg.min_epochs
        assert isinstance(cfg.cycle_epochs, int) and cfg.cycle_epochs >= 1
    fixed = resolve_options(RossmannConfig(train="t", store="s", epochs="7", batch_size=256), 6_000)
    assert (fixed.epochs, fixed.batch_size) == (7, 256)


def test_auto_lr_is_the_finder_suggestion_within_bounds():
    """--lr auto keeps the finder's suggestion inside auto_lr_bounds (small sets that got 1.7e-4 or
    1.1e-3 lost to their forest, docs/benchmarks.md); inside them it is the suggestion itself."""
    from pipelines.jobs.rossmann import RossmannJob

    job = RossmannJob(RossmannConfig(train="t", store="s"))
    assert job.cfg.auto_lr_bounds == (3e-3, 1e-2)
    assert job.settle_lr(1.7e-4) == 3e-3 and job.settle_lr(3.4e-3) == 3.4e-3 and job.settle_lr(0.3) == 1e-2
    with pytest.raises(DataError, match="auto_lr_bounds"):
        RossmannConfig(train="t", store="s", auto_lr_bounds=(1e-2, 1e-3)).validate()


def test_auto_cycle_epochs_are_half_the_first_cycle():
    """Later snapshot cycles are half the first cycle: 4 + 2 + 2 epochs at the real data's size (the
    1-epoch cycles of the previous rule averaged worse, docs/benchmarks.md), half the step budget
    on small data, where the first cycle is the budget."""
    small = resolve_options(RossmannConfig(train="t", store="s"), 6_000)
    assert small.cycle_epochs == round(small.epochs / 2) >= 10
    for n in (763_000, 804_056, 844_338, 2_000_000):  # the real data cut anywhere, and larger
        cfg = resolve_options(RossmannConfig(train="t", store="s"), n)
        assert (cfg.epochs, cfg.cycle_epochs) == (4, 2), n
    assert auto_cycle_epochs(4) == 2 and auto_cycle_epochs(1) == 1 and auto_cycle_epochs(9) == 4
    # a given --epochs keeps half of it, and an explicit --cycle-epochs wins
    assert resolve_options(RossmannConfig(train="t", store="s", epochs=8), 804_056).cycle_epochs == 4
    assert resolve_options(RossmannConfig(train="t", store="s", cycle_epochs=3), 804_056).cycle_epochs == 3


@pytest.fixture(scope="module")
def bigger(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic data ~7x the size of `data` (the step budget must give it fewer epochs)."""
    from pipelines.synth import write_rossmann

    return write_rossmann(tmp_path_factory.mktemp("ross_big") / "d", stores=40, days=300, seed=4)


@pytest.mark.parametrize("which", ["data", "bigger"])
def test_auto_epochs_in_a_run_follow_the_step_budget(request, tmp_path, which):
    """The same step budget on two data sizes: each run trains ceil(steps / steps-per-epoch) epochs
    at the batch size 'auto' picks for its rows, so both see about the same optimizer steps."""
    files = request.getfixturevalue(which)
    res, db = _cli(files, tmp_path, "--steps", "100", "--min-epochs", "1", "--layers", "16", "--ensemble", "1",
                   "--no-refit", "--lr", "3e-3")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    client = MlflowClient(f"sqlite:///{db}")
    params = client.get_run(out["run_id"]).data.params
    n_train = int(params["n_train"])
    bs = out["config"]["batch_size"]
    assert bs == auto_batch_size(n_train)
    per_epoch = math.ceil(n_train / bs)
    epochs = out["config"]["epochs"]
    assert epochs == math.ceil(100 / per_epoch)
    assert 100 <= epochs * per_epoch < 100 + per_epoch  # the budget, overshot by less than one epoch
    assert params["epochs_requested"] == "auto" and params["batch_size_requested"] == "auto"
    assert len(client.get_metric_history(out["run_id"], "epoch/valid_rmspe")) == epochs
    # the small set needs several epochs for the budget, the larger one fewer
    assert (epochs > 3) if which == "data" else (epochs <= 3 and n_train > 5 * 1_000)


def _cli(data: dict, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    db = tmp_path / "m.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PATH": str(Path(sys.executable).parent), **_PYTHONPATH}
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "rossmann", "--train", str(data["train.csv"]), "--store",
         str(data["store.csv"]), "--json", "--quiet", *extra],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )
    return res, db


@pytest.mark.parametrize(("args", "option"), [
    (["--ensemble", "0"], "--ensemble"),
    (["--ensemble", "-2"], "--ensemble"),
    (["--steps", "-100"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--epochs", "many"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"),
    (["--ensemble-kind", "bagging"], "--ensemble-kind"),
    (["--cycle-epochs", "0"], "--cycle-epochs"),
    (["--precision", "fp16"], "--precision"),
    (["--level-days", "-1"], "--level-days"),
])
def test_bad_options_exit_2_naming_the_option_and_leave_no_run(data, tmp_path, args, option):
    res, db = _cli(data, tmp_path, *args)
    assert res.returncode == 2, res.stderr
    assert option in res.stderr
    assert not db.exists() or not MlflowClient(f"sqlite:///{db}").search_experiments(
        filter_string="name = 'rossmann'")


def test_layers_other_than_two_get_matching_dropouts(data, tmp_path, monkeypatch):
    """`--layers 8` used to exit 1 ("ps has 2 dropout values but there are 1 hidden layers")."""
    import mlflow

    for layers, want in (("8", [0.01]), ("16,8,4", [0.001, 0.001, 0.01])):
        work = tmp_path / layers.replace(",", "_")
        work.mkdir()
        res, db = _cli(data, work, "--layers", layers, "--epochs", "1", "--ensemble", "1", "--no-refit",
                       "--lr", "3e-3")
        assert res.returncode == 0, res.stderr
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        mlflow.set_tracking_uri(f"sqlite:///{db}")
        monkeypatch.chdir(work)
        model = load_bundle(json.loads(res.stdout.strip().splitlines()[-1])["model_uri"]).model
        assert model.layer_sizes == [int(x) for x in layers.split(",")]
        assert model.ps == pytest.approx(want)


def test_predict_mean_averages_outputs():
    nets = [torch.nn.Linear(3, 1) for _ in range(3)]
    x = torch.randn(10, 3)

    class Squeeze(torch.nn.Module):
        def __init__(self, lin: torch.nn.Linear) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).squeeze(-1)

    models = [Squeeze(n) for n in nets]
    with torch.no_grad():
        want = torch.stack([m(x) for m in models]).mean(0)
    torch.testing.assert_close(predict_mean(models, (x,), batch_size=4), want)


def test_members_spread_beside_the_prediction(runs, data):
    from modeling.errors import DataError

    pred = load_predictor(runs["snapshot"]["bundle"])
    test = pd.read_csv(data["test.csv"], dtype={"StateHoliday": str})
    mean, spread = pred.predict_with_member_spread(test)
    np.testing.assert_allclose(mean, pred.predict(test), rtol=1e-5)
    closed = pred.fixed_rows(pred.engineer(test))
    assert (spread[closed] == 0).all() and (spread[~closed] > 0).all() and np.isfinite(spread).all()
    with pytest.raises(DataError, match="ensemble"):
        load_predictor(runs["no_refit"]["bundle"]).predict_with_member_spread(test)


def test_recent_level_is_on_every_scoring_path(shifted):
    """Small requests (records), the frame path and the networks plus offsets agree."""
    pred = load_predictor(shifted["res"]["bundle"])
    assert pred.level is not None and pred.level.applied
    raw = pd.read_csv(shifted["cfg"].train, dtype={"StateHoliday": str}).tail(40).drop(columns=["Sales", "Customers"])
    frame = pred.predict(raw)
    records = pred.predict_records(raw.to_dict("records"))
    assert records is not None
    np.testing.assert_allclose(records, frame, rtol=1e-9)
    feats = pred.engineer(raw)
    x_cat, x_cont = pred.processor.transform(feats)
    with torch.no_grad():
        alone = pred.networks[0](torch.from_numpy(x_cat), torch.from_numpy(x_cont)).numpy().astype(np.float64)
    want = np.exp(alone + pred.level(x_cat[:, pred.processor.cat_names_out.index("Store")]))
    want[pred.fixed_rows(feats)] = 0.0
    np.testing.assert_allclose(frame, want, rtol=1e-5)
    assert not np.allclose(frame[want > 0], np.exp(alone)[want > 0], rtol=1e-3)  # the offsets moved them
