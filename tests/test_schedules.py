"""Schedules as pure functions: values at known steps, shape, restarts."""

import numpy as np
import pytest

from modeling.training.schedules import Schedule, constant, make_schedule, one_cycle, sgdr

LR = 1e-2


def test_one_cycle_endpoints_and_peak():
    total = 101  # progress = step / 100, so step 25 is exactly pct_start
    lr0, mom0 = one_cycle(0, total, LR)
    assert lr0 == pytest.approx(LR / 25.0)
    assert mom0 == pytest.approx(0.95)
    peak, mom_peak = one_cycle(25, total, LR)
    assert peak == pytest.approx(LR)
    assert mom_peak == pytest.approx(0.85)
    end, mom_end = one_cycle(total - 1, total, LR)
    assert end == pytest.approx(LR / 1e5)
    assert mom_end == pytest.approx(0.95)


def test_one_cycle_shape_and_inverse_momentum():
    total = 200
    lrs, moms = zip(*(one_cycle(s, total, LR, pct_start=0.3) for s in range(total)), strict=True)
    lrs, moms = np.array(lrs), np.array(moms)
    top = int(np.argmax(lrs))
    assert abs(top - 0.3 * (total - 1)) <= 1
    assert np.all(np.diff(lrs[: top + 1]) > 0)
    assert np.all(np.diff(lrs[top:]) < 0)
    # Momentum moves opposite to the lr on both sides of the peak and bottoms out there.
    assert int(np.argmin(moms)) == top
    assert np.all(np.diff(moms[: top + 1]) < 0)
    assert np.all(np.diff(moms[top:]) > 0)
    assert lrs.max() <= LR + 1e-15 and lrs.min() > 0


def test_one_cycle_cosine_midpoint_of_warmup():
    # Halfway through the warm-up the half-cosine is exactly halfway between its ends.
    lr, mom = one_cycle(50, 401, 1.0, pct_start=0.25, div=10.0)
    assert lr == pytest.approx((0.1 + 1.0) / 2)
    assert mom == pytest.approx((0.95 + 0.85) / 2)


def test_one_cycle_per_group_lrs_keep_their_ratio():
    lrs, _ = one_cycle(37, 100, [1e-4, 1e-3, 1e-2])
    assert isinstance(lrs, list) and len(lrs) == 3
    assert lrs[1] / lrs[0] == pytest.approx(10.0)
    assert lrs[2] / lrs[1] == pytest.approx(10.0)
    single, _ = one_cycle(37, 100, 1e-2)
    assert lrs[2] == pytest.approx(single)


def test_one_cycle_rejects_bad_args():
    with pytest.raises(ValueError):
        one_cycle(0, 0, LR)
    with pytest.raises(ValueError):
        one_cycle(0, 10, LR, pct_start=1.5)


def test_sgdr_restarts_at_cycle_boundaries_with_mult():
    spe = 10  # cycles of 1, 2, 4 epochs: restarts at steps 0, 10, 30, 70
    for restart in (0, 10, 30, 70):
        assert sgdr(restart, spe, LR) == pytest.approx(LR)
    for before in (9, 29, 69):
        assert sgdr(before, spe, LR) < 0.03 * LR
        assert sgdr(before + 1, spe, LR) == pytest.approx(LR)
    # Midpoints of each cycle sit halfway between lr_max and lr_min.
    for mid in (5, 20, 50):
        assert sgdr(mid, spe, LR, lr_min=1e-4) == pytest.approx((LR + 1e-4) / 2)


def test_sgdr_without_mult_has_equal_cycles():
    values = [sgdr(s, 4, 1.0, cycle_len=2, cycle_mult=1) for s in range(24)]
    assert values[:8] == pytest.approx(values[8:16])
    assert values[:8] == pytest.approx(values[16:24])
    assert np.all(np.diff(values[:8]) < 0)


def test_constant():
    assert constant(123, LR) == LR
    assert constant(5, [1.0, 2.0]) == [1.0, 2.0]


def test_make_schedule_binds_run():
    sched = make_schedule("one_cycle", lr_max=[1e-3, 1e-2], total_steps=101)
    assert isinstance(sched, Schedule)
    lrs, mom = sched(25)
    assert lrs == pytest.approx([1e-3, 1e-2])
    assert mom == pytest.approx(0.85)
    lrs, mom = make_schedule("sgdr", lr_max=LR, total_steps=100, steps_per_epoch=10)(10)
    assert lrs == pytest.approx([LR]) and mom is None
    lrs, mom = make_schedule("constant", lr_max=LR, total_steps=5)(3)
    assert lrs == [LR] and mom is None


def test_make_schedule_rejects_unknown():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", lr_max=LR, total_steps=10)
    with pytest.raises(TypeError):
        make_schedule("one_cycle", lr_max=LR, total_steps=10, warmup=3)
