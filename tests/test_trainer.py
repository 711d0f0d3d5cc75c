"""Training engine: learning, determinism, callbacks, early stopping, clipping, optimizer groups."""

import math

import pytest
import torch
from torch import nn

from modeling.metrics import mae, rmse
from modeling.training import (
    Callback,
    EarlyStopping,
    History,
    TensorData,
    Trainer,
    batches,
    fit,
    freeze,
    make_optimizer,
    spread_lrs,
    unfreeze,
)

N_CAT, N_CONT = 30, 8


class EmbLinear(nn.Module):
    """Embedding + small MLP with BatchNorm and dropout; three param groups like the real models."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(N_CAT, 4)
        self.body = nn.Sequential(nn.Linear(4 + N_CONT, 32), nn.ReLU(), nn.BatchNorm1d(32))
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(32, 1)
        self.seen_autocast: list[tuple[bool, bool]] = []  # (training, autocast) per forward

    def forward(self, cat: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        self.seen_autocast.append((self.training, torch.is_autocast_enabled("cpu")))
        h = self.body(torch.cat([self.emb(cat), cont], dim=1))
        return self.head(self.drop(h)).squeeze(-1)

    def param_groups(self) -> list[list[nn.Parameter]]:
        return [
            list(self.emb.parameters()),
            list(self.body.parameters()),
            list(self.head.parameters()),
        ]


class Linear(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(-1)

    def param_groups(self) -> list[list[nn.Parameter]]:
        return [list(self.parameters())]


def make_data(n: int = 3000, seed: int = 0, noise: float = 0.1) -> tuple[TensorData, TensorData]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.randint(0, N_CAT, (n,), generator=g)
    cont = torch.randn(n, N_CONT, generator=g)
    w = torch.randn(N_CONT, generator=g)
    effect = 2 * torch.randn(N_CAT, generator=g)
    y = (cont @ w + effect[cat] + noise * torch.randn(n, generator=g)).float()
    cut = int(0.8 * n)
    return (
        TensorData((cat[:cut], cont[:cut]), y[:cut]),
        TensorData((cat[cut:], cont[cut:]), y[cut:]),
    )


def new_model(seed: int = 0, p: float = 0.0) -> EmbLinear:
    torch.manual_seed(seed)
    return EmbLinear(p)


# ----------------------------------------------------------------------------- data


def test_tensordata_checks_rows_and_subsets():
    with pytest.raises(ValueError, match=r"xs\[1\] has 3 rows"):
        TensorData((torch.zeros(4), torch.zeros(3)), torch.zeros(4))
    d = TensorData((torch.arange(10), torch.arange(10).float() * 2), torch.arange(10).float())
    sub = d.subset(torch.tensor([7, 2]))
    assert len(sub) == 2
    assert sub.xs[0].tolist() == [7, 2] and sub.y.tolist() == [7.0, 2.0]
    assert d.to("cpu") is d


def test_batches_cover_every_row_once_and_are_seeded():
    def run(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return [b.tolist() for b in batches(103, 10, gen, shuffle=True)]

    first = run(0)
    assert sorted(i for b in first for i in b) == list(range(103))
    assert [len(b) for b in first] == [10] * 10 + [3]
    assert first == run(0)
    assert first != run(1)
    ordered = list(batches(25, 10, None, shuffle=False, drop_last=True))
    assert [b.tolist() for b in ordered] == [list(range(10)), list(range(10, 20))]


# ----------------------------------------------------------------------------- optimizer


def test_spread_lrs_is_geometric():
    assert spread_lrs(1e-4, 1e-2, 3) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert spread_lrs(1e-4, 1e-2, 1) == pytest.approx([1e-2])
    with pytest.raises(ValueError):
        spread_lrs(0.0, 1.0, 3)


def test_make_optimizer_discriminative_lrs_and_no_decay_for_bias_and_bn():
    model = new_model()
    opt = make_optimizer(model, (1e-4, 1e-2), wd=0.1)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    expected_lr = {0: 1e-4, 1: 1e-3, 2: 1e-2}
    for gi, params in enumerate(model.param_groups()):
        for p in params:
            assert by_param[id(p)]["lr"] == pytest.approx(expected_lr[gi])
    bn = model.body[2]
    for p in (bn.weight, bn.bias, model.head.bias, model.body[0].bias):
        assert by_param[id(p)]["weight_decay"] == 0.0
    for p in (model.emb.weight, model.body[0].weight, model.head.weight):
        assert by_param[id(p)]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"]  # all float params on cpu -> the fused kernel
    with pytest.raises(ValueError, match="2 lrs"):
        make_optimizer(model, [1e-3, 1e-2])


def test_make_optimizer_merges_groups_that_share_lr_and_wd():
    model = new_model()
    opt = make_optimizer(model, 1e-3, wd=0.1, fused=False)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    assert not opt.defaults["fused"]
    # Same optimizer either way: one fused step equals one unfused step.
    twin = new_model()
    for m, fused in ((model, False), (twin, True)):
        o = make_optimizer(m, 1e-2, wd=0.1, fused=fused)
        m(torch.zeros(4, dtype=torch.long), torch.ones(4, N_CONT)).sum().backward()
        o.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, twin.state_dict()[k])


def test_freeze_stops_grads_and_unfreeze_restores():
    model = new_model()
    train, _ = make_data(400)
    freeze(model)  # all but the last group
    model(*train.xs).pow(2).mean().backward()
    assert model.emb.weight.grad is None and model.body[0].weight.grad is None
    assert model.head.weight.grad is not None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, lr=1e-2, quiet=True, batch_size=128).fit(train, epochs=1)
    assert torch.equal(model.emb.weight, before["emb.weight"])
    assert torch.equal(model.body[0].weight, before["body.0.weight"])
    assert not torch.equal(model.head.weight, before["head.weight"])
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- trainer


def test_trainer_learns_embedding_regression():
    train, valid = make_data()
    baseline = rmse(valid.y, torch.full_like(valid.y, float(train.y.mean())))
    trainer, history = fit(
        new_model(),
        train,
        valid,
        epochs=8,
        lr=1e-2,
        batch_size=128,
        quiet=True,
        metrics={"rmse": rmse, "mae": mae},
    )
    last = history[-1]
    assert last["rmse"] < 0.15 * baseline
    assert last["valid_loss"] == pytest.approx(last["rmse"] ** 2, rel=1e-4)
    assert history[0]["train_loss"] > last["train_loss"]
    pred = trainer.predict(valid.xs)
    assert pred.device.type == "cpu" and pred.shape == valid.y.shape
    assert rmse(valid.y, pred) == pytest.approx(last["rmse"], rel=1e-5)
    assert trainer.evaluate(valid)["rmse"] == pytest.approx(last["rmse"], rel=1e-5)


def test_same_seed_same_weights_and_history():
    train, valid = make_data(1500)

    def run(seed: int) -> tuple[dict, list]:
        model = new_model(p=0.2)
        _, hist = fit(model, train, valid, epochs=3, lr=1e-2, batch_size=100, seed=seed, quiet=True)
        logs = [{k: v for k, v in e.items() if k != "seconds"} for e in hist]
        return model.state_dict(), logs

    w1, h1 = run(0)
    w2, h2 = run(0)
    w3, h3 = run(1)
    assert h1 == h2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # The seed really drives shuffling and dropout.
    assert h1 != h3
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_predict_is_eval_mode_and_batched():
    train, valid = make_data(600)
    trainer = Trainer(new_model(p=0.5), quiet=True, batch_size=64)
    trainer.fit(train, epochs=1)
    a = trainer.predict(valid.xs, batch_size=7)
    b = trainer.predict(valid.xs)
    torch.testing.assert_close(a, b)  # dropout off, batch size irrelevant


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.logs: list[dict] = []
        self.batch_losses: list[float] = []

    def on_fit_begin(self, trainer):
        self.events.append("fit_begin")

    def on_epoch_begin(self, trainer, epoch):
        self.events.append(f"epoch_begin{epoch}")

    def on_batch_end(self, trainer, step, loss):
        self.batch_losses.append(loss)

    def on_epoch_end(self, trainer, epoch, logs):
        self.events.append(f"epoch_end{epoch}")
        self.logs.append(logs)

    def on_fit_end(self, trainer):
        self.events.append("fit_end")


def test_callbacks_receive_epoch_logs():
    train, valid = make_data(1000)
    rec = Recorder()
    trainer = Trainer(
        new_model(), metrics={"rmse": rmse}, callbacks=[rec], quiet=True, batch_size=100
    )
    history = trainer.fit(train, valid, epochs=2)
    assert rec.events == ["fit_begin", "epoch_begin0", "epoch_end0", "epoch_begin1", "epoch_end1",
                          "fit_end"]  # fmt: skip
    assert set(rec.logs[0]) == {"epoch", "train_loss", "valid_loss", "rmse", "lr", "seconds"}
    assert rec.logs[1]["epoch"] == 1 and rec.logs[1]["seconds"] > 0
    assert len(rec.batch_losses) == 2 * 8  # 800 rows / 100 per batch, two epochs
    assert all(isinstance(v, float) and math.isfinite(v) for v in rec.batch_losses)
    # The epoch train_loss is the row-weighted mean of that epoch's batch losses.
    assert rec.logs[0]["train_loss"] == pytest.approx(sum(rec.batch_losses[:8]) / 8, rel=1e-5)
    assert isinstance(history, History) and history.series("rmse") == [e["rmse"] for e in rec.logs]


def test_callback_can_stop_training():
    class StopAfterFirst(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            trainer.stop_training = True

    train, _ = make_data(500)
    history = Trainer(new_model(), callbacks=[StopAfterFirst()], quiet=True).fit(train, epochs=5)
    assert len(history) == 1


def test_discriminative_lrs_follow_schedule_per_group():
    seen = []

    class LrSpy(Callback):
        def on_batch_end(self, trainer, step, loss):
            seen.append({g["model_group"]: g["lr"] for g in trainer.opt.param_groups})

    train, _ = make_data(800)
    history = Trainer(
        new_model(), lr=(1e-4, 1e-2), callbacks=[LrSpy()], quiet=True, batch_size=100
    ).fit(train, epochs=2)
    for lrs in seen:
        assert lrs[1] / lrs[0] == pytest.approx(10.0) and lrs[2] / lrs[1] == pytest.approx(10.0)
    peak = max(s[2] for s in seen)
    assert peak == pytest.approx(1e-2, rel=0.05)
    assert history[-1]["lr"] == pytest.approx(1e-2 / 1e5)


class SnapshotEachEpoch(Callback):
    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_epoch_end(self, trainer, epoch, logs):
        self.states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})


def test_early_stopping_restores_best_weights():
    # Train targets are 2*x.w, valid targets x.w: starting from 0 the model passes the valid
    # optimum midway, after which valid loss rises and early stopping must roll back.
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(2000, 5, generator=g), torch.randn(500, 5, generator=g)
    w = torch.randn(5, generator=g)
    train, valid = TensorData((x,), 2 * (x @ w)), TensorData((xv,), xv @ w)
    torch.manual_seed(0)
    model = Linear(5)
    with torch.no_grad():
        model.lin.weight.zero_()
        model.lin.bias.zero_()
    snaps, stopper = SnapshotEachEpoch(), EarlyStopping(patience=2)
    trainer = Trainer(
        model,
        lr=2e-2,
        schedule="constant",
        batch_size=100,
        callbacks=[snaps, stopper],
        quiet=True,
    )
    history = trainer.fit(train, valid, epochs=40)
    losses = history.series("valid_loss")
    best = min(range(len(losses)), key=losses.__getitem__)
    assert 0 < best < len(losses) - 1, losses  # valid loss fell, then rose
    assert len(losses) == best + 3  # patience 2, stopped early
    assert stopper.best_epoch == best
    for k, v in model.state_dict().items():
        assert torch.equal(v, snaps.states[best][k])
        assert not torch.equal(v, snaps.states[-1][k])
    assert trainer.evaluate(valid)["valid_loss"] == pytest.approx(losses[best], rel=1e-5)


def test_early_stopping_without_monitor_key_is_clear():
    train, _ = make_data(300)
    trainer = Trainer(new_model(), callbacks=[EarlyStopping()], quiet=True)
    with pytest.raises(KeyError, match="valid_loss"):
        trainer.fit(train, epochs=1)


def test_grad_clipping_bounds_grad_norm():
    norms: list[float] = []

    class GradNorm(Callback):
        def on_batch_end(self, trainer, step, loss):
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    train, _ = make_data(600)
    scaled = TensorData(train.xs, train.y * 100)  # big targets -> big gradients
    Trainer(new_model(), callbacks=[GradNorm()], quiet=True, batch_size=100).fit(scaled, epochs=1)
    assert max(norms) > 10.0
    norms.clear()
    Trainer(new_model(), grad_clip=0.5, callbacks=[GradNorm()], quiet=True, batch_size=100).fit(
        scaled, epochs=1
    )
    assert max(norms) <= 0.5 + 1e-4


def test_mixed_precision_runs_on_cpu():
    train, valid = make_data(1500)
    model = new_model()
    _, history = fit(
        model, train, valid, epochs=4, lr=1e-2, batch_size=100, mixed_precision=True,
        device="cpu", quiet=True,
    )  # fmt: skip
    # training steps run in bf16 autocast; evaluation in float32, as the logged model serves
    assert all(auto for training, auto in model.seen_autocast if training)
    assert not any(auto for training, auto in model.seen_autocast if not training)
    assert any(not training for training, _ in model.seen_autocast)
    losses = history.series("valid_loss")
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_sgdr_schedule_and_mismatched_output_shape():
    train, _ = make_data(400)
    trainer = Trainer(
        new_model(), schedule="sgdr", schedule_kwargs={"cycle_len": 1, "cycle_mult": 1},
        lr=1e-2, quiet=True, batch_size=100,
    )  # fmt: skip
    history = trainer.fit(train, epochs=2)
    # 4 steps per one-epoch cycle: each epoch ends 3/4 of the way down the same cosine.
    assert history[0]["lr"] == pytest.approx(history[1]["lr"])
    assert history[1]["lr"] == pytest.approx(1e-2 * (1 + math.cos(math.pi * 3 / 4)) / 2)

    class Wrong(Linear):
        def forward(self, x):
            return self.lin(x)  # [n, 1] instead of [n]

    with pytest.raises(ValueError, match="1-D"):
        Trainer(Wrong(N_CONT), quiet=True).fit(TensorData((train.xs[1],), train.y), epochs=1)
