"""Data-parallel training: sharding, the Trainer on 2 gloo ranks, and `tabrec train ... --nproc 2`.

Quality tolerances. The global batch is split across ranks (`--batch-size` stays the global
batch), so for a model without BatchNorm or dropout one DDP step is the single-process step up
to float summation order: the Linear model here and DotProductBias in the ratings CLI test must
match the single-process run to 1e-4 / 1% relative. With BatchNorm (per-rank batch statistics on
CPU) and dropout (per-rank random streams) DDP is a different draw of the same SGD, like another
seed, so those checks allow the measured seed-to-seed spread instead (see each test).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from modeling.training import Callback, EarlyStopping, TensorData, Trainer, batches, distributed
from modeling.training.distributed import shard, sharded_batches, sharded_steps

# ----------------------------------------------------------------------------- sharding


def test_shard_gives_equal_disjoint_contiguous_parts():
    rows = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    parts = [shard(rows, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert torch.equal(torch.cat(parts), rows[:9])  # disjoint, in order, 11 % 3 rows left over
    with pytest.raises(ValueError, match="rank"):
        shard(rows, 3, 3)


@pytest.mark.parametrize(("n", "bs", "world"), [(1000, 64, 2), (1001, 64, 2), (1025, 64, 2), (130, 64, 2),
                                                (997, 100, 3), (50, 7, 4), (9, 4, 2), (7, 64, 2)])
def test_sharded_batches_split_each_global_batch_equally(n, bs, world):
    steps = sharded_steps(n, bs, world)
    per_rank = [list(sharded_batches(n, bs, r, world, torch.Generator().manual_seed(0)))
                for r in range(world)]
    # the same number of steps on every rank, or DDP deadlocks
    assert [len(p) for p in per_rank] == [steps] * world and steps >= 1
    global_bs = (bs // world) * world
    single = list(batches(n, global_bs, torch.Generator().manual_seed(0), shuffle=True))
    for k in range(steps):
        parts = [p[k] for p in per_rank]
        sizes = {len(x) for x in parts}
        assert len(sizes) == 1 and sizes.pop() >= min(2, bs // world)  # equal; BatchNorm-safe tail
        # rank r holds the r-th slice of the single-process batch k: same data per step
        assert torch.equal(torch.cat(parts), single[k][: len(parts[0]) * world])
    seen = torch.cat([torch.cat(p) for p in per_rank]).tolist()
    assert len(seen) == len(set(seen))  # disjoint
    assert n - len(seen) < 2 * world  # covers the permutation but for a short tail


def test_sharded_batches_on_one_rank_are_the_single_process_batches():
    got = [b.tolist() for b in sharded_batches(103, 10, 0, 1, torch.Generator().manual_seed(5))]
    want = [b.tolist() for b in batches(103, 10, torch.Generator().manual_seed(5))]
    assert got == want


def test_sharding_refuses_too_small_inputs():
    assert sharded_steps(3, 4, 2) == 0  # 1 row per rank: not trainable with BatchNorm
    with pytest.raises(ValueError, match="smaller than"):
        sharded_steps(100, 1, 2)


def test_worker_without_process_group_refuses_to_guess(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.in_torchrun_worker()
    with pytest.raises(RuntimeError, match="no process group"):
        distributed.current()
    monkeypatch.delenv("RANK")
    assert distributed.current() == distributed.DistInfo()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_cli_relaunches_the_same_command_without_nproc(monkeypatch):
    from typer.testing import CliRunner

    import pipelines.cli as cli

    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(cli, "_launch_workers", lambda argv, n, as_json: calls.append((argv, n, as_json)))
    res = CliRunner().invoke(cli.app, ["train", "ratings", "--ratings", "x.data", "--epochs", "3",
                                       "--nproc", "2", "--force", "--json", "--valid-frac", "0.25"])
    assert res.exit_code == 0, res.output
    [(argv, n, as_json)] = calls
    assert n == 2 and as_json
    assert argv[:2] == ["train", "ratings"] and "--nproc" not in argv
    pairs = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert pairs["--ratings"] == "x.data" and pairs["--epochs"] == "3" and pairs["--valid-frac"] == "0.25"
    assert "--force" in argv and "--json" in argv and "--quiet" not in argv


# ----------------------------------------------------------------------------- Trainer, 2 ranks

N_CAT, N_CONT = 30, 8


class EmbBN(nn.Module):
    """Embedding + MLP with BatchNorm and dropout (what TabularModel has)."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.emb = nn.Embedding(N_CAT, 4)
        self.body = nn.Sequential(nn.Linear(4 + N_CONT, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Dropout(p))
        self.head = nn.Linear(32, 1)

    def forward(self, cat: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.cat([self.emb(cat), cont], dim=1))).squeeze(-1)


class EmbLinear(nn.Module):
    """No BatchNorm, no dropout: DDP must reproduce the single-process trajectory."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(N_CAT, 1)
        self.lin = nn.Linear(N_CONT, 1)

    def forward(self, cat: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        return (self.emb(cat) + self.lin(cont)).squeeze(-1)


class StopOnRank0(Callback):
    """Requests a stop after epoch `at`, on rank 0 only: every rank must stop with it."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == self.at and distributed.current().is_main:
            trainer.stop_training = True


def _data(n: int = 3000, seed: int = 0) -> tuple[TensorData, TensorData]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.randint(0, N_CAT, (n,), generator=g)
    cont = torch.randn(n, N_CONT, generator=g)
    y = cont @ torch.randn(N_CONT, generator=g) + 2 * torch.randn(N_CAT, generator=g)[cat]
    y = y + 0.1 * torch.randn(n, generator=g)
    cut = int(0.8 * n)
    return TensorData((cat[:cut], cont[:cut]), y[:cut]), TensorData((cat[cut:], cont[cut:]), y[cut:])


def _fit_cases() -> dict[str, dict]:
    """The same fits, run single-process or on each rank (the trainer sees the process group)."""
    train, valid = _data()
    out = {}
    for name in ("linear", "bn_dropout"):
        torch.manual_seed(0)
        model = EmbLinear() if name == "linear" else EmbBN()
        cbs = [] if name == "linear" else [EarlyStopping(patience=3), StopOnRank0(at=2)]
        trainer = Trainer(model, lr=5e-2 if name == "linear" else 1e-2, batch_size=64, seed=0, quiet=True,
                          callbacks=cbs)
        hist = trainer.fit(train, valid, epochs=4)
        out[name] = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                     "history": [{k: v for k, v in e.items() if k != "seconds"} for e in hist]}
    return out


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with distributed.process_group() as info:
        assert info.initialized and info.world_size == world and info.rank == rank
        torch.save(_fit_cases(), Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each rank; 2 threads on a busy 2-core box only slow things down
    try:
        single = _fit_cases()
    finally:
        torch.set_num_threads(threads)
    return ranks, single


def test_ddp_ranks_end_with_identical_models_and_logs(ddp_and_single):
    (r0, r1), _ = ddp_and_single
    for name in r0:
        assert r0[name]["state"].keys() == r1[name]["state"].keys()
        for key in r0[name]["state"]:  # incl. BatchNorm running stats (rank 0's are kept)
            assert torch.equal(r0[name]["state"][key], r1[name]["state"][key]), (name, key)
        assert r0[name]["history"] == r1[name]["history"], name  # rank 0's validation, all-reduced loss


def test_ddp_without_noise_layers_reproduces_single_process(ddp_and_single):
    (r0, _), single = ddp_and_single
    for key, value in single["linear"]["state"].items():
        torch.testing.assert_close(r0["linear"]["state"][key], value, rtol=1e-4, atol=1e-5)
    ddp_loss = [e["valid_loss"] for e in r0["linear"]["history"]]
    one_loss = [e["valid_loss"] for e in single["linear"]["history"]]
    assert ddp_loss == pytest.approx(one_loss, rel=1e-4)
    train_ddp = [e["train_loss"] for e in r0["linear"]["history"]]  # all-reduced over both shards
    assert train_ddp == pytest.approx([e["train_loss"] for e in single["linear"]["history"]], rel=1e-4)


def test_ddp_with_batchnorm_and_dropout_learns_as_well(ddp_and_single):
    (r0, _), single = ddp_and_single
    ddp = min(e["valid_loss"] for e in r0["bn_dropout"]["history"])
    one = min(e["valid_loss"] for e in single["bn_dropout"]["history"])
    # The target variance is ~9.7 and both explain > 95% of it. Per-rank BatchNorm statistics
    # and dropout streams make DDP another random draw of the same SGD: single-process runs of
    # this case with seeds 0-4 (4 epochs) reach 0.11-0.52, a factor ~5, so that is the tolerance
    # (measured: DDP 0.18 vs 0.14). The exact-equivalence check is the linear case above.
    assert one < 0.5 and ddp < 0.5 and ddp < 5 * one


def test_a_stop_on_rank_0_stops_every_rank(ddp_and_single):
    (r0, r1), single = ddp_and_single
    assert len(r0["bn_dropout"]["history"]) == len(r1["bn_dropout"]["history"]) == 3
    assert len(single["bn_dropout"]["history"]) == 3


# ----------------------------------------------------------------------------- the CLI, end to end

INJECT = textwrap.dedent("""
    # Test-only: makes one torchrun rank fail (TABREC_TEST_FAIL_RANK) after its first epoch.
    import os
    if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("TABREC_TEST_FAIL_RANK"):
        import modeling.training.trainer as _t
        _orig = _t.Trainer._train_epoch
        def _failing(self, *a, **k):
            if self.step > 0:
                raise RuntimeError("injected failure on rank " + os.environ["RANK"])
            return _orig(self, *a, **k)
        _t.Trainer._train_epoch = _failing
""")


@pytest.fixture(scope="module")
def ratings_data(tmp_path_factory) -> dict[str, Path]:
    from pipelines.synth import write_ratings

    return write_ratings(tmp_path_factory.mktemp("ddp_ratings"), users=200, items=300, ratings=10_000, seed=0)


def _tabrec(args: list[str], db: Path, cwd: Path, timeout: int = 400, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "GIT_PYTHON_REFRESH": "quiet", **env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def _client(db: Path):  # mlflow/pandas imported lazily: the spawned ranks import this module
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _runs(db: Path) -> list:
    client = _client(db)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps) if exps else []


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert sum('"run_id"' in ln for ln in lines) == 1, proc.stdout  # only rank 0 prints the result
    return json.loads(lines[-1])


@pytest.mark.slow
def test_cli_ratings_two_processes_match_one(ratings_data, tmp_path, monkeypatch):
    args = ["train", "ratings", "--ratings", str(ratings_data["u.data"]), "--items", str(ratings_data["movies.csv"]),
            "--epochs", "3", "--lr", "1e-2", "--batch-size", "256", "--json", "--quiet"]
    one = _result(_tabrec(args, tmp_path / "one.db", tmp_path))
    two = _result(_tabrec([*args, "--nproc", "2", "--register", "ddp"], tmp_path / "two.db", tmp_path))

    # DotProductBias has no BatchNorm or dropout: DDP's step is the single-process step (see top)
    assert two["metrics"]["valid_rmse"] == pytest.approx(one["metrics"]["valid_rmse"], rel=0.01)
    assert two["metrics"]["valid_rmse"] < two["metrics"]["baseline_rmse"] + 0.02
    assert two["registered"]["version"] == "1" and two["registered"]["alias"] == "champion"

    [run] = _runs(tmp_path / "two.db")  # ranks other than 0 create no run
    assert run.info.status == "FINISHED" and run.info.run_id == two["run_id"]
    assert run.data.params["world_size"] == "2"
    client = _client(tmp_path / "two.db")
    assert len(client.search_model_versions("name = 'ddp'")) == 1
    assert len(client.get_metric_history(run.info.run_id, "epoch/valid_loss")) == 3

    import mlflow
    import pandas as pd

    from modeling.predictors import load_predictor

    frame = pd.read_csv(ratings_data["u.data"], sep="\t", names=["user", "item", "rating", "ts"]).head(20)
    frame = frame[["user", "item"]]
    preds = {}
    for name, res in (("one", one), ("two", two)):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / (name + '.db')}")
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / (name + '.db')}")
        preds[name] = np.asarray(load_predictor(res["model_uri"]).predict(frame))
    assert np.isfinite(preds["two"]).all()
    np.testing.assert_allclose(preds["two"], preds["one"], atol=0.02)


# Measured on this data and config (docs/distributed.md): single-process seeds 0-2 give valid
# RMSPE 0.117-0.145 (a 24% spread); DDP with the same seed differed by +0.5%, +3.2%, -4.6%.
# 15% is well inside the seed spread and three times the largest paired difference seen.
ROSSMANN_TOL = 0.15


@pytest.mark.slow
def test_cli_rossmann_two_processes_match_one(tmp_path):
    from pipelines.synth import write_rossmann

    data = write_rossmann(tmp_path / "data", stores=30, days=400, seed=0)
    args = ["train", "rossmann", "--train", str(data["train.csv"]), "--store", str(data["store.csv"]),
            "--epochs", "6", "--batch-size", "256", "--lr", "3e-3", "--json", "--quiet"]
    one = _result(_tabrec(args, tmp_path / "one.db", tmp_path, timeout=500))
    two = _result(_tabrec([*args, "--nproc", "2"], tmp_path / "two.db", tmp_path, timeout=500))
    # TabularModel has BatchNorm and dropout, so DDP is another random draw (see top and ROSSMANN_TOL)
    assert two["metrics"]["valid_rmspe"] == pytest.approx(one["metrics"]["valid_rmspe"], rel=ROSSMANN_TOL)
    assert two["metrics"]["valid_rmspe"] < 1.5 * two["metrics"]["rf_valid_rmspe"] + 0.05
    [run] = _runs(tmp_path / "two.db")
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"


@pytest.mark.slow
def test_cli_failure_on_one_rank_fails_the_job_and_the_run(ratings_data, tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(INJECT)
    args = ["train", "ratings", "--ratings", str(ratings_data["u.data"]), "--epochs", "3", "--lr", "1e-2",
            "--batch-size", "256", "--nproc", "2", "--register", "never", "--json", "--quiet"]
    proc = _tabrec(args, tmp_path / "m.db", tmp_path, PYTHONPATH=str(tmp_path / "inject"),
                   TABREC_TEST_FAIL_RANK="1")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "injected failure on rank 1" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["exit_code"] == 1
    [run] = _runs(tmp_path / "m.db")  # rank 0's run did not stay RUNNING
    assert run.info.status == "FAILED" and run.data.tags.get("error")
    assert _client(tmp_path / "m.db").search_registered_models() == []


@pytest.mark.slow
def test_cli_bad_input_exits_2_from_the_workers(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,rating\n1,2,4\n3,4,oops\n")
    proc = _tabrec(["train", "ratings", "--ratings", str(bad), "--nproc", "2", "--json"], tmp_path / "m.db", tmp_path)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "bad.csv" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["exit_code"] == 2
    assert _runs(tmp_path / "m.db") == []
