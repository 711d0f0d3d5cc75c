"""Ensembles in the training engine: the restarts schedule, snapshots at cycle ends, members
from seeds, and the log-space mean the predictor uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling.training import Snapshots, TensorData, Trainer
from modeling.training.ensemble import predict_mean, snapshot_cycles, train_members
from modeling.training.schedules import cycle_ends, make_schedule, one_cycle, restarts

N_CAT, N_CONT = 30, 8


class EmbLinear(torch.nn.Module):
    """Embedding + small MLP with BatchNorm and dropout (randomness in training, like the real model)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(N_CAT, 4)
        self.body = torch.nn.Sequential(torch.nn.Linear(4 + N_CONT, 32), torch.nn.ReLU(), torch.nn.BatchNorm1d(32))
        self.drop = torch.nn.Dropout(p)
        self.head = torch.nn.Linear(32, 1)

    def forward(self, cat: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(torch.cat([self.emb(cat), cont], dim=1)))).squeeze(-1)


def make_data(n: int, noise: float = 0.1) -> tuple[TensorData, TensorData]:
    g = torch.Generator().manual_seed(0)
    cat = torch.randint(0, N_CAT, (n,), generator=g)
    cont = torch.randn(n, N_CONT, generator=g)
    y = (cont @ torch.randn(N_CONT, generator=g) + 2 * torch.randn(N_CAT, generator=g)[cat]
         + noise * torch.randn(n, generator=g)).float()
    cut = int(0.8 * n)
    return TensorData((cat[:cut], cont[:cut]), y[:cut]), TensorData((cat[cut:], cont[cut:]), y[cut:])

LR = 1e-2
KW = {"lr": LR, "wd": 0.01, "batch_size": 100, "quiet": True}


def _build(p: float = 0.1):
    return lambda: EmbLinear(p)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_restarts_first_cycle_is_one_cycle_and_each_cycle_ends_annealed():
    spe, cycles = 10, [3, 1, 2]
    total = 30
    for step in range(total):
        assert restarts(step, spe, LR, cycles) == pytest.approx(one_cycle(step, total, LR))
    ends = [e * spe - 1 for e in cycle_ends(cycles)]  # last step of each cycle
    for end in ends:
        lr, mom = restarts(end, spe, LR, cycles)
        assert lr == pytest.approx(LR / 1e5) and mom == pytest.approx(0.95)
    for start in (30, 40):  # restarts warm up again from lr_max / div
        assert restarts(start, spe, LR, cycles)[0] == pytest.approx(LR / 25)
    # the 1-epoch cycle peaks at lr_max a quarter of the way in
    assert max(restarts(s, spe, LR, cycles)[0] for s in range(30, 40)) == pytest.approx(LR, rel=0.05)
    # past the last cycle the lr stays at its final value
    assert restarts(60 + 7, spe, LR, cycles)[0] == pytest.approx(LR / 1e5)
    assert make_schedule("restarts", lr_max=LR, total_steps=60, steps_per_epoch=spe, cycles=cycles)(35)[0] == \
        pytest.approx([restarts(35, spe, LR, cycles)[0]])
    with pytest.raises(ValueError, match="cycles"):
        restarts(0, spe, LR, [2, 0])


def test_snapshots_keep_weights_at_the_listed_epochs():
    train, valid = make_data(1000)
    torch.manual_seed(0)
    model = EmbLinear()
    snaps = Snapshots([2, 3])
    trainer = Trainer(model, schedule="restarts", schedule_kwargs={"cycles": [2, 1]}, callbacks=[snaps], **KW)
    trainer.fit(train, valid, epochs=3)
    assert snaps.epochs == [2, 3] and len(snaps.states) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snaps.states[1].items())
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in snaps.states[0].items())


def test_first_snapshot_is_the_single_model_and_later_cycles_add_members():
    train, valid = make_data(1500)
    torch.manual_seed(5)
    single = EmbLinear(0.1)
    Trainer(single, seed=5, **KW).fit(train, valid, epochs=3)
    ens = train_members(_build(), train, valid, members=3, kind="snapshot", epochs=3, cycle_epochs=1, seed=5,
                        trainer_kwargs=KW)
    assert len(ens.networks) == 3 and ens.member_epochs == [3, 4, 5]
    assert len(ens.history) == 5 and ens.epochs_trained == 5
    assert _same(ens.networks[0], single)
    assert not _same(ens.networks[1], ens.networks[2])
    assert ens.member_seconds == sorted(ens.member_seconds)  # cumulative: snapshot k costs the run up to it
    assert snapshot_cycles(3, 3, 1) == [3, 1, 1]


def test_seed_members_are_single_runs_from_consecutive_seeds():
    train, valid = make_data(1200)
    ens = train_members(_build(), train, valid, members=2, kind="seeds", epochs=2, cycle_epochs=1, seed=7,
                        trainer_kwargs=KW)
    for i, net in enumerate(ens.networks):
        torch.manual_seed(7 + i)
        single = EmbLinear(0.1)
        Trainer(single, seed=7 + i, **KW).fit(train, valid, epochs=2)
        assert _same(net, single)
    assert len(ens.histories) == 2 and ens.epochs_trained == 4


def test_ensemble_mean_beats_its_average_member_and_is_a_plain_mean():
    train, valid = make_data(2000, noise=0.5)
    ens = train_members(_build(0.2), train, valid, members=3, kind="seeds", epochs=3, cycle_epochs=1, seed=0,
                        trainer_kwargs=KW)
    outs = torch.stack([predict_mean([n], valid.xs) for n in ens.networks])
    mean = predict_mean(ens.networks, valid.xs)
    torch.testing.assert_close(mean, outs.mean(0))
    mse = lambda p: float(((p - valid.y) ** 2).mean())  # noqa: E731
    assert mse(mean) <= np.mean([mse(o) for o in outs])  # convexity of the squared error


def test_train_members_rejects_bad_arguments():
    train, _ = make_data(300)
    with pytest.raises(ValueError, match="members"):
        train_members(_build(), train, None, members=0, kind="seeds", epochs=1, cycle_epochs=1, seed=0,
                      trainer_kwargs=KW)
    with pytest.raises(ValueError, match="kind"):
        train_members(_build(), train, None, members=2, kind="bagging", epochs=1, cycle_epochs=1, seed=0,
                      trainer_kwargs=KW)


def test_tensordata_concatenation_for_a_refit_keeps_rows_aligned():
    a = TensorData((torch.arange(4), torch.ones(4, 2)), torch.arange(4).float())
    b = TensorData((torch.arange(4, 6), torch.zeros(2, 2)), torch.arange(4, 6).float())
    both = TensorData(tuple(torch.cat([x, y]) for x, y in zip(a.xs, b.xs, strict=True)), torch.cat([a.y, b.y]))
    assert len(both) == 6 and torch.equal(both.xs[0].float(), both.y)
