"""The agents' direct gradient bookkeeping gives exactly what torch's generic wrappers give."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distillery.agents.grad_steps import clear_grads, clip_grad_norm


def _net_with_grads(scale: float) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    (scale * net(torch.randn(7, 5)).pow(2).sum()).backward()
    params = list(net.parameters())
    params[-1].grad = None  # an unused parameter: both functions skip it
    return params


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # below and above the clipping threshold
def test_clip_grad_norm_is_bit_identical_to_torch(scale):
    ours, ref = _net_with_grads(scale), _net_with_grads(scale)
    norm = clip_grad_norm(ours, 0.5)
    ref_norm = nn.utils.clip_grad_norm_(ref, 0.5)
    assert torch.equal(norm, ref_norm)
    for p, q in zip(ours, ref, strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_clear_grads_sets_every_grad_to_none():
    params = _net_with_grads(1.0)
    clear_grads(params)
    assert all(p.grad is None for p in params)
