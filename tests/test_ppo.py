"""GaussianPolicy (densities against torch.distributions), GAE against a hand-computed example, the PPO clip loss,
RunningMeanStd against numpy, and a short PPO run that must beat its own initialisation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillery.envs import make_env
from distillery.policies import GaussianPolicy, make_policy, policy_from_description
from distillery.specs import TensorSpec

OBS_SPEC = {"state": TensorSpec((3,)), "privileged": TensorSpec((4,))}
ACT_SPEC = TensorSpec((2,), low=-1.0, high=1.0)


def _policy(**cfg) -> GaussianPolicy:
    torch.manual_seed(0)
    p = make_policy("gaussian", OBS_SPEC, ACT_SPEC, {"hidden": [16, 16], **cfg})
    p.set_obs_stats({"state": torch.tensor([1.0, -2.0, 0.5])}, {"state": torch.tensor([2.0, 1.0, 4.0])})
    return p  # type: ignore[return-value]


def _nobs(p: GaussianPolicy, b: int = 6) -> dict[str, torch.Tensor]:
    x = torch.randn(b, 1, 3, generator=torch.Generator().manual_seed(1))
    return p.normalizer.normalize_dict({"state": x})


# ------------------------------------------------------------------------------------------ GaussianPolicy
def test_gaussian_densities_match_torch_distributions():
    p = _policy()
    nobs = _nobs(p)
    mean, log_std = p.dist_params(nobs)
    assert mean.shape == log_std.shape == (6, 2)
    assert torch.allclose(log_std, torch.full_like(log_std, -0.5))  # state-independent, at init_log_std
    a, lp = p.sample_and_log_prob(nobs, torch.Generator().manual_seed(2))
    ref = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(lp, ref.log_prob(a).sum(-1))
    torch.testing.assert_close(p.log_prob(nobs, a), lp)
    torch.testing.assert_close(p.entropy(nobs), ref.entropy().sum(-1))


def test_squashed_gaussian_log_prob_matches_tanh_transform():
    p = _policy(squash=True, state_std=True, activation="relu", layer_norm=True)
    nobs = _nobs(p)
    mean, log_std = p.dist_params(nobs)
    assert bool((log_std >= -5.0).all() and (log_std <= 2.0).all())
    a, lp = p.sample_and_log_prob(nobs, torch.Generator().manual_seed(3))
    assert bool((a.abs() < 1).all())
    ref = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                      [torch.distributions.TanhTransform()])
    torch.testing.assert_close(lp, ref.log_prob(a).sum(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p.log_prob(nobs, a), lp, atol=1e-3, rtol=1e-4)


def test_gaussian_samplers_normaliser_and_rebuild():
    p = _policy()
    obs = {"state": torch.randn(5, 3)}
    # the normaliser applies the running stats written by set_obs_stats: (x - mean) / std
    n = p.normalizer.normalize("state", obs["state"])
    torch.testing.assert_close(n, (obs["state"] - torch.tensor([1.0, -2.0, 0.5])) / torch.tensor([2.0, 1.0, 4.0]))
    mean, _ = p.dist_params({"state": n[:, None]})
    torch.testing.assert_close(p.predict_chunk({"state": obs["state"][:, None]})[:, 0], mean.clamp(-1, 1))
    assert p.is_deterministic(None) and p.is_deterministic("mean") and not p.is_deterministic("sample")
    noise = torch.randn(5, 1, 2)
    got = p.predict_chunk({"state": obs["state"][:, None]}, sampler="sample", noise=noise)[:, 0]
    torch.testing.assert_close(got, (mean + math.exp(-0.5) * noise[:, 0]).clamp(-1, 1))
    with pytest.raises(ValueError, match="no sampler 'ddim:5'"):
        p.predict_chunk({"state": obs["state"][:, None]}, sampler="ddim:5")
    q = policy_from_description(p.describe())
    q.load_state_dict(p.state_dict())
    torch.testing.assert_close(q.predict_chunk({"state": obs["state"][:, None]}), p.predict_chunk(
        {"state": obs["state"][:, None]}))
    with pytest.raises(ValueError, match="one observation to one action"):
        make_policy("gaussian", OBS_SPEC, ACT_SPEC, {"obs_horizon": 2, "pred_horizon": 2})


def test_gaussian_bc_loss_is_nll_and_fits_a_linear_expert():
    p = _policy(hidden=[32])
    x = torch.randn(256, 1, 3, generator=torch.Generator().manual_seed(4))
    target = torch.tanh(x[:, :, :2] * torch.tensor([0.5, -0.3]))  # (B, 1, 2), inside [-1, 1]
    batch = {"obs": {"state": x}, "action": target}
    loss, _ = p.loss(batch)
    nobs = p.normalizer.normalize_dict({"state": x})
    torch.testing.assert_close(loss, -p.log_prob(nobs, target[:, 0]).mean())
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    for _ in range(300):
        loss, _ = p.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    err = (p.predict_chunk({"state": x}) - target).abs().mean()
    assert float(err) < 0.05, float(err)


def test_gaussian_yaml_holds_the_class_defaults():
    from omegaconf import OmegaConf

    from distillery import config as config_mod

    cfg = OmegaConf.to_container(config_mod.compose(["policy=gaussian"]).policy)
    assert {k: v for k, v in cfg.items() if k != "name"} == GaussianPolicy.DEFAULTS
