import copy

import pytest
import torch
from torch import nn

from msn.ema import ema_update_


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_ema_matches_formula_and_leaves_buffers():
    source = _net()
    target = copy.deepcopy(source)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    source[1].running_mean.fill_(3.0)
    before = [p.detach().clone().double() for p in target.parameters()]
    ema_update_(target, source, 0.9)
    for b, t, s in zip(before, target.parameters(), source.parameters()):
        torch.testing.assert_close(t.double(), 0.9 * b + 0.1 * s.detach().double(), rtol=1e-6, atol=1e-7)
    assert torch.equal(target[1].running_mean, torch.zeros(8))  # buffers are not averaged


def test_momentum_one_freezes_and_zero_copies():
    source, target = _net(), _net()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    ema_update_(target, source, 1.0)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in target.parameters())
    ema_update_(target, source, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(target.parameters(), source.parameters()))


def test_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(_net(), _net(), 1.5)
