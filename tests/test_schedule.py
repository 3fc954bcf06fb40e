"""Ratio-preserving lr schedules: the multiplier, and lr_B / lr_A under a real torch LambdaLR."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.optim.schedule import lr_lambda, multiplier

NAMES = ("constant", "linear", "cosine")


@pytest.mark.parametrize("name", NAMES)
def test_warmup(name):
    w, total = 8, 40
    ms = [multiplier(name, s, w, total) for s in range(w)]
    assert ms[0] == pytest.approx(1 / w)
    assert ms[w - 1] == 1.0
    assert ms == pytest.approx([(s + 1) / w for s in range(w)])
    assert all(a < b for a, b in zip(ms, ms[1:]))
    assert multiplier(name, w, w, total) == 1.0  # first step after warmup is the full lr


def test_no_warmup_starts_at_one():
    for name in NAMES:
        assert multiplier(name, 0, 0, 10) == 1.0


def test_constant():
    assert all(multiplier("constant", s, 0, 20, 0.3) == 1.0 for s in range(40))
    assert all(multiplier("constant", s, 5, 20, 0.3) == 1.0 for s in range(5, 40))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("warmup, min_ratio", [(0, 0.0), (4, 0.0), (0, 0.1), (5, 0.25)])
def test_decay(name, warmup, min_ratio):
    total = 30
    ms = [multiplier(name, s, warmup, total, min_ratio) for s in range(warmup, total + 1)]
    assert ms[0] == 1.0
    assert all(a > b for a, b in zip(ms, ms[1:])), "decay must be strictly monotone after warmup"
    assert ms[-1] == pytest.approx(min_ratio, abs=1e-12)  # reaches the floor at max_steps
    last = multiplier(name, total - 1, warmup, total, min_ratio)
    assert last > min_ratio + 1e-6  # the last real update still moves the weights
    assert multiplier(name, total + 10, warmup, total, min_ratio) == pytest.approx(min_ratio)  # clamped


def test_linear_values():
    assert multiplier("linear", 5, 0, 10) == pytest.approx(0.5)
    assert multiplier("linear", 5, 0, 10, 0.2) == pytest.approx(0.6)


@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("warmup", [0, 6])
def test_cosine_midpoint(min_ratio, warmup):
    total = warmup + 20
    assert multiplier("cosine", warmup + 10, warmup, total, min_ratio) == pytest.approx((1 + min_ratio) / 2)
    q = multiplier("cosine", warmup + 5, warmup, total, min_ratio)
    assert q == pytest.approx(min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="step"):
        multiplier("step", 3, 0, 10)
    with pytest.raises(ValueError, match="step"):
        lr_lambda("step", 0, 10)


def test_lr_lambda_validates_name_even_with_warmup():
    with pytest.raises(ValueError):
        lr_lambda("step", 5, 50)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_ratio_preserved_by_lambdalr(name, min_ratio):
    lr, ratio, steps = 2e-4, 16.0, 50
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": lr}, {"params": [b], "lr": lr * ratio}], foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(name, 5, steps, min_ratio))
    lrs = [(opt.param_groups[0]["lr"], opt.param_groups[1]["lr"])]
    for step in range(steps):
        opt.step()
        sched.step()
        lr_a, lr_b = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
        lrs.append((lr_a, lr_b))
        assert lr_b == pytest.approx(ratio * lr_a, rel=1e-12, abs=0.0), step
        if lr_a > 0:
            assert lr_b / lr_a == pytest.approx(ratio, rel=1e-12, abs=0.0), step
        m = multiplier(name, step + 1, 5, steps, min_ratio)
        assert lr_a == pytest.approx(lr * m, rel=1e-12)
    assert lrs[0] == pytest.approx((lr / 5, lr * ratio / 5))  # the first update runs at warmup 1/5
    if name != "constant":
        assert lrs[-1] == pytest.approx((lr * min_ratio, lr * ratio * min_ratio), abs=1e-18)
