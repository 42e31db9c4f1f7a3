import math

import pytest

from msn.schedules import linear_at, lr_at, wd_at

TOTAL, WARMUP = 1000, 100


def test_lr_warmup_end_points():
    assert lr_at(0, TOTAL, WARMUP) == pytest.approx(2e-4)
    assert lr_at(WARMUP // 2, TOTAL, WARMUP) == pytest.approx(6e-4)
    assert lr_at(WARMUP, TOTAL, WARMUP) == pytest.approx(1e-3)


def test_lr_cosine_spans_scaled_horizon():
    t_max = int(1.25 * TOTAL) - WARMUP
    # half-way through the stretched cosine: the mid value
    assert lr_at(WARMUP + t_max // 2, TOTAL, WARMUP) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-3)
    # training stops before the cosine ends: the last real step is well above final_lr
    last = lr_at(TOTAL, TOTAL, WARMUP)
    expected = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (TOTAL - WARMUP) / t_max))
    assert last == pytest.approx(expected)
    assert last > 1e-5
    assert lr_at(WARMUP + t_max, TOTAL, WARMUP) == pytest.approx(1e-6)
    assert lr_at(10 * TOTAL, TOTAL, WARMUP) == pytest.approx(1e-6)  # clamped


def test_lr_monotone_after_warmup():
    values = [lr_at(s, TOTAL, WARMUP) for s in range(WARMUP, TOTAL)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wd_end_points():
    assert wd_at(0, TOTAL) == pytest.approx(0.04)
    assert wd_at(int(1.25 * TOTAL), TOTAL) == pytest.approx(0.4)
    assert wd_at(10 * TOTAL, TOTAL) == pytest.approx(0.4)
    assert 0.04 < wd_at(TOTAL, TOTAL) < 0.4


def test_momentum_end_points():
    assert linear_at(0, TOTAL, 0.996, 1.0) == pytest.approx(0.996)
    # ends near 0.9992 after the real number of steps (1.25 x stretch)
    assert linear_at(TOTAL, TOTAL, 0.996, 1.0) == pytest.approx(0.996 + 0.004 / 1.25)
    assert linear_at(int(1.25 * TOTAL), TOTAL, 0.996, 1.0) == pytest.approx(1.0)
    assert linear_at(5 * TOTAL, TOTAL, 0.996, 1.0) == pytest.approx(1.0)


def test_constant_sharpen_schedule():
    assert {linear_at(s, TOTAL, 0.25, 0.25) for s in (0, 500, 1000)} == {0.25}


def test_bad_arguments():
    with pytest.raises(ValueError, match="total"):
        lr_at(0, 0, 0)
    with pytest.raises(ValueError, match="step"):
        wd_at(-1, 10)
