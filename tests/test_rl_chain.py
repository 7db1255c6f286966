"""The diffusion policy's denoising chain as an MDP (DPPO / RL-100): recorded log-probs, ratio 1 before an update,
the frozen early steps, and which parameters a chain log-prob reaches."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.test_fast_sampling import build, history


def test_chain_log_probs_equal_a_direct_gaussian_density_over_the_executed_positions():
    p = build("diffusion")
    nobs = p.normalizer.normalize_dict(history(3))
    mdp = p.denoising_mdp(ddim_steps=5, eta=1.0, std_min_sample=0.05, std_min_logprob=0.02)
    chain, logp = p.sample_chain(nobs, mdp, torch.Generator().manual_seed(0))
    assert chain.shape == (3, 6, 8, 2) and logp.shape == (3, 5)
    cond = p.encode_obs(nobs)
    start = p.obs_horizon - 1
    with torch.no_grad():
        for k, (t, t_prev) in enumerate(mdp.steps):
            _, mean, std = p.schedule.ddim_step(chain[:, k], p.eps(chain[:, k], torch.full((3,), t), cond), t, t_prev,
                                                1.0)
            dist = torch.distributions.Normal(mean, std.clamp(min=0.02).expand_as(mean))
            want = dist.log_prob(chain[:, k + 1])[:, start:start + p.action_horizon].sum((1, 2))
            torch.testing.assert_close(logp[:, k], want)
    # re-scoring the recorded chain with unchanged weights gives ratio exactly 1 (batched over the K steps)
    torch.testing.assert_close(p.chain_log_prob(nobs, chain, mdp), logp)


def test_sampling_noise_is_floored_and_clipped():
    p = build("diffusion")
    nobs = p.normalizer.normalize_dict(history(64))
    # the last DDIM step (t = 0 -> x0) has std 0: with a floor of 0.5 and a clip of 0.1 the draw is within 0.05
    mdp = p.denoising_mdp(ddim_steps=2, ft_steps=1, std_min_sample=0.5, std_min_logprob=0.5, noise_clip=0.1)
    chain, _ = p.sample_chain(nobs, mdp, torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = p.encode_obs(nobs)
        _, mean, _ = p.schedule.ddim_step(chain[:, 0], p.eps(chain[:, 0], torch.zeros(64, dtype=torch.long), cond),
                                          0, -50, 1.0)
    dev = (chain[:, 1] - mean).abs()
    assert float(dev.max()) <= 0.05 + 1e-6 and float(dev.mean()) > 0.01


def test_only_the_last_ft_steps_are_trained_and_early_steps_use_the_frozen_network():
    p = build("diffusion")
    frozen = copy.deepcopy(p).requires_grad_(False)
    with torch.no_grad():  # the policy has moved away from its initialisation
        for w in p.unet.parameters():
            w.add_(0.05 * torch.randn_like(w))
    nobs = p.normalizer.normalize_dict(history(2))
    mdp = p.denoising_mdp(ddim_steps=5, ft_steps=2)
    chain, _ = p.sample_chain(nobs, mdp, torch.Generator().manual_seed(3), frozen=frozen)
    # by hand: x_T, then three DDIM(eta=1) steps of the frozen net draw from the same generator
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 2, generator=g)
    with torch.no_grad():
        c = frozen.encode_obs(nobs)
        x = frozen.schedule.run_chain(lambda xx, t: frozen.eps(xx, t, c), x, list(mdp.steps[:3]), False, 1.0, g)
    torch.testing.assert_close(chain[:, 0], x)
    assert chain.shape[1] == 3
    logp = p.chain_log_prob(nobs, chain, mdp)
    logp.sum().backward()
    assert all(w.grad is not None and float(w.grad.abs().sum()) > 0 for w in p.unet.parameters() if w.requires_grad)
    assert all(w.grad is None for w in frozen.parameters())


def test_bad_mdp_settings_are_refused():
    p = build("diffusion")
    with pytest.raises(ValueError, match="eta > 0"):
        p.denoising_mdp(eta=0.0)
    with pytest.raises(ValueError, match="ft_steps"):
        p.denoising_mdp(ddim_steps=5, ft_steps=6)
    with pytest.raises(ValueError, match="std_min_logprob"):
        p.denoising_mdp(std_min_logprob=0.0)


def test_chain_ppo_loss_before_an_update_is_minus_the_mean_advantage_with_ratio_one():
    from distillery.agents.offline import chain_ppo_loss
    p = build("diffusion")
    nobs = p.normalizer.normalize_dict(history(4))
    mdp = p.denoising_mdp(ddim_steps=4)
    chain, old = p.sample_chain(nobs, mdp, torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, m = chain_ppo_loss(p, nobs, chain, old, adv, mdp, clip=0.2)
    torch.testing.assert_close(loss, -adv.mean())
    assert m["clipfrac"] == 0.0 and abs(m["approx_kl"]) < 1e-6


def test_consistency_head_learns_the_live_policy_output():
    from distillery.agents import ConsistencyHead
    p = build("diffusion")
    head = ConsistencyHead(p, lr=1e-3, multistep_prob=0.0, teacher_sampler="ddim:4")
    nobs = p.normalizer.normalize_dict(history(32))
    first = head.update(nobs)
    losses = [head.update(nobs) for _ in range(80)]
    assert sum(losses[-10:]) / 10 < 0.5 * first
    assert all(w.grad is None for w in p.parameters())  # the teacher is not trained by the head
