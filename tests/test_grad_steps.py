"""The agents' direct gradient bookkeeping gives exactly what torch's generic wrappers give."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distillery.agents.grad_steps import MetricMeans, clear_grads, clip_grad_norm, load_fused_adam_state


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


def test_foreach_adam_state_resumes_fused_with_the_same_update():
    """A checkpoint written by a foreach Adam resumes on the fused kernel, and its next step equals foreach's."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    old = nn.Parameter(w0.clone())
    saved = torch.optim.Adam([old], lr=0.1, foreach=True)
    for _ in range(3):
        old.grad = torch.randn(4, 3)
        saved.step()
    state = copy.deepcopy(saved.state_dict())  # as read back from a checkpoint: no tensors shared with `saved`
    fused_param = nn.Parameter(old.detach().clone())
    fused = torch.optim.Adam([fused_param], lr=0.1, fused=True)
    load_fused_adam_state(fused, state)
    assert fused.param_groups[0]["fused"] and not fused.param_groups[0]["foreach"]
    grad = torch.randn(4, 3)
    old.grad, fused_param.grad = grad, grad.clone()
    saved.step()
    fused.step()
    torch.testing.assert_close(fused_param.detach(), old.detach(), rtol=1e-6, atol=1e-7)


def test_a_resumed_adam_keeps_the_moments_but_takes_the_rate_of_the_edited_config():
    """Resuming with a lowered learning rate in config.yaml: the saved moments continue, the step uses the new rate."""
    torch.manual_seed(0)
    old = nn.Parameter(torch.randn(4, 3))
    saved = torch.optim.Adam([old], lr=0.1, fused=True)
    for _ in range(3):
        old.grad = torch.randn(4, 3)
        saved.step()
    state = copy.deepcopy(saved.state_dict())
    resumed_param = nn.Parameter(old.detach().clone())
    resumed = torch.optim.Adam([resumed_param], lr=0.01, fused=True)  # built from the edited config
    load_fused_adam_state(resumed, state)
    assert resumed.param_groups[0]["lr"] == 0.01
    saved.param_groups[0]["lr"] = 0.01  # the reference: the saved optimizer, its rate lowered by hand
    grad = torch.randn(4, 3)
    old.grad, resumed_param.grad = grad, grad.clone()
    saved.step()
    resumed.step()
    torch.testing.assert_close(resumed_param.detach(), old.detach(), rtol=1e-6, atol=1e-7)


def test_metric_means_average_each_key_over_the_updates_that_reported_it_and_pop_starts_a_new_window():
    means = MetricMeans()
    means.add({"loss": 1.0, "kl": 0.5})
    means.add({"loss": 3.0})
    means.add({"loss": 5.0, "kl": 1.5})
    assert means.updates == 3
    assert means.pop("train/") == {"train/loss": 3.0, "train/kl": 1.0}
    assert means.updates == 0 and means.means() == {}
    means.add({"loss": 2.0})
    assert means.means() == {"loss": 2.0}
