"""Noise schedule, DDPM/DDIM step math, sampler strings, epsilon loss wiring and EMA, against closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillery.policies import EMA, DiffusionPolicy, NoiseSchedule, SamplerSpec, parse_sampler
from distillery.specs import TensorSpec

T = 100


def cos_alpha_bar(s: float) -> float:
    """iDDPM's continuous alpha_bar on s in [0, 1]."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


@pytest.fixture()
def sched() -> NoiseSchedule:
    return NoiseSchedule(T, clip_sample=False)


def posterior_closed_form(sched: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int):
    """q(x_{t-1} | x_t, x0) of Ho et al. (Eqs. 6-7), computed in float64 from the betas alone."""
    betas = sched.betas.double()
    ab = torch.cumprod(1 - betas, 0)
    ab_t, ab_prev, beta_t = ab[t], (ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)), betas[t]
    x_t, eps = x_t.double(), eps.double()
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    mean = beta_t * ab_prev.sqrt() / (1 - ab_t) * x0 + (1 - ab_prev) * (1 - beta_t).sqrt() / (1 - ab_t) * x_t
    var = beta_t * (1 - ab_prev) / (1 - ab_t)
    return mean, var.sqrt()


# --------------------------------------------------------------------------------------------- schedule

def test_alpha_bar_matches_cosine_closed_form(sched: NoiseSchedule) -> None:
    # betas are uncapped except the last, so the cumulative product telescopes to f((t+1)/T) / f(0)
    for t in [0, 1, 10, 50, 90, 97]:
        want = cos_alpha_bar((t + 1) / T) / cos_alpha_bar(0.0)
        assert sched.alphas_cumprod[t].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    betas = sched.betas
    assert betas.shape == (T,)
    assert betas[-1].item() == pytest.approx(0.999, abs=1e-6)  # 1 - f(1)/f(0.99) = 1 is capped
    assert float(betas.max()) <= 0.999 + 1e-7 and float(betas.min()) > 0
    assert torch.all(betas[1:] >= betas[:-1])  # cosine schedule betas increase monotonically
    assert betas[0].item() == pytest.approx(1 - cos_alpha_bar(1 / T) / cos_alpha_bar(0.0), rel=1e-5)


def test_q_sample_moments(sched: NoiseSchedule) -> None:
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, 40
    x0 = torch.full((n, 1), 0.7)
    xt = sched.q_sample(x0, torch.full((n,), t), torch.randn(n, 1, generator=g))
    ab = sched.alphas_cumprod[t].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - ab, rel=2e-2)


# --------------------------------------------------------------------------------------------- steps

@pytest.mark.parametrize("t", [99, 50, 1, 0])
def test_ddpm_and_ddim_eta1_match_posterior_closed_form(sched: NoiseSchedule, t: int) -> None:
    g = torch.Generator().manual_seed(t)
    x_t, eps = torch.randn(4, 16, 2, generator=g), torch.randn(4, 16, 2, generator=g)
    mean_ref, std_ref = posterior_closed_form(sched, x_t, eps, t)
    _, mean, std = sched.ddpm_step(x_t, eps, t)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-4, atol=1e-4)
    assert std.reshape(-1)[0].item() == pytest.approx(std_ref.item(), rel=1e-4, abs=1e-7)
    _, mean_d, std_d = sched.ddim_step(x_t, eps, t, t - 1, eta=1.0)
    torch.testing.assert_close(mean_d.double(), mean_ref, rtol=1e-4, atol=1e-4)
    assert std_d.reshape(-1)[0].item() == pytest.approx(std_ref.item(), rel=1e-4, abs=1e-7)


def test_ddim_eta1_equals_ddpm_step_with_clipping() -> None:
    sched = NoiseSchedule(T, clip_sample=True)
    g = torch.Generator().manual_seed(1)
    x_t, eps, noise = (torch.randn(64, 8, 3, generator=g) * 3 for _ in range(3))  # *3: clipping is active
    for t in [99, 60, 5]:
        x0_raw = (x_t - (1 - sched.alphas_cumprod[t]).sqrt() * eps) / sched.alphas_cumprod[t].sqrt()
        assert x0_raw.abs().max() > 1.0
        a = sched.ddpm_step(x_t, eps, t, noise)
        b = sched.ddim_step(x_t, eps, t, t - 1, 1.0, noise)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v.expand_as(u) if u.shape != v.shape else v, rtol=1e-4, atol=1e-5)


def test_ddim_eta0_is_deterministic_closed_form(sched: NoiseSchedule) -> None:
    g = torch.Generator().manual_seed(2)
    x_t, eps = torch.randn(5, 16, 2, generator=g), torch.randn(5, 16, 2, generator=g)
    t, t_prev = 70, 60
    out, mean, std = sched.ddim_step(x_t, eps, t, t_prev, eta=0.0, noise=torch.randn(5, 16, 2, generator=g))
    assert float(std.max()) == 0.0
    torch.testing.assert_close(out, mean)
    ab_t, ab_p = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    torch.testing.assert_close(out, ab_p.sqrt() * x0 + (1 - ab_p).sqrt() * eps, rtol=1e-5, atol=1e-5)


def test_final_step_returns_clipped_x0() -> None:
    sched = NoiseSchedule(T, clip_sample=True)
    x_t, eps = torch.randn(3, 4, 2) * 4, torch.randn(3, 4, 2)
    x0_ref = ((x_t - (1 - sched.alphas_cumprod[9]).sqrt() * eps) / sched.alphas_cumprod[9].sqrt()).clamp(-1, 1)
    for eta in (0.0, 1.0):
        out, _, std = sched.ddim_step(x_t, eps, 9, -1, eta, noise=torch.randn(3, 4, 2))
        torch.testing.assert_close(out, x0_ref, rtol=1e-5, atol=1e-5)
        assert float(std.max()) == 0.0


def test_per_sample_timesteps_match_scalar_steps(sched: NoiseSchedule) -> None:
    # RL code steps a batch whose rows sit at different t: a (B,) t must equal row-wise scalar calls
    x_t, eps = torch.randn(3, 8, 2), torch.randn(3, 8, 2)
    t, t_prev = torch.tensor([90, 40, 9]), torch.tensor([80, 30, -1])
    _, mean, std = sched.ddim_step(x_t, eps, t, t_prev, eta=0.5)
    for i in range(3):
        _, m_i, s_i = sched.ddim_step(x_t[i:i + 1], eps[i:i + 1], int(t[i]), int(t_prev[i]), eta=0.5)
        torch.testing.assert_close(mean[i:i + 1], m_i)
        torch.testing.assert_close(std[i].reshape(()), s_i.reshape(()))


# --------------------------------------------------------------------------------------------- samplers

def _toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * (t.float() / T).view(-1, 1, 1) + 0.1


def test_ddim100_eta1_equals_ddpm_sampler() -> None:
    sched = NoiseSchedule(T, clip_sample=True)
    shape = (6, 16, 2)
    out = {}
    for s in ("ddpm", "ddim:100:eta=1.0"):
        out[s] = sched.sample(_toy_eps, shape, parse_sampler(s, T), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out["ddpm"], out["ddim:100:eta=1.0"], rtol=1e-4, atol=1e-4)
    eta0 = sched.sample(_toy_eps, shape, parse_sampler("ddim:100", T), generator=torch.Generator().manual_seed(7))
    assert (eta0 - out["ddpm"]).abs().max() > 1e-2  # eta=0 is a different (deterministic) chain


@pytest.mark.parametrize("sampler", ["ddpm", "ddim:10", "ddim:3", "ddim:10:eta=0.5"])
def test_oracle_denoiser_recovers_point_mass(sampler: str) -> None:
    # data = a single point c: the exact eps is (x_t - sqrt(ab) c) / sqrt(1 - ab); every sampler must return c
    sched = NoiseSchedule(T, clip_sample=True)
    c = torch.linspace(-0.9, 0.9, 16 * 2).view(1, 16, 2)

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = sched.alphas_cumprod[t].view(-1, 1, 1)
        return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    x0 = sched.sample(oracle, (4, 16, 2), parse_sampler(sampler, T), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, c.expand(4, 16, 2), rtol=1e-4, atol=1e-4)


def test_ddim_timesteps_leading_spacing(sched: NoiseSchedule) -> None:
    assert sched.timesteps(parse_sampler("ddim:10", T)) == [(t, t - 10) for t in range(90, -1, -10)]
    assert sched.timesteps(parse_sampler("ddim:3", T)) == [(66, 33), (33, 0), (0, -33)]
    assert sched.timesteps(parse_sampler("ddpm", T))[0] == (99, 98)
    assert len(sched.timesteps(parse_sampler("ddpm", T))) == T


def test_parse_sampler_forms_and_errors() -> None:
    assert parse_sampler("ddpm", T).steps == T
    s = parse_sampler("ddim:10", T)
    assert (s.kind, s.steps, s.eta) == ("ddim", 10, None)
    assert parse_sampler("ddim:5:eta=0.25", T).eta == 0.25
    for bad in ["ddim", "ddim:0", "ddim:101", "ddim:x", "ddpm:10", "euler:5", "ddim:10:eta=-1", ""]:
        with pytest.raises(ValueError, match="Valid forms"):
            parse_sampler(bad, T)
    with pytest.raises(TypeError):
        parse_sampler(10, T)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- loss wiring

def _policy() -> DiffusionPolicy:
    torch.manual_seed(0)
    p = DiffusionPolicy({"state": TensorSpec((3,))}, TensorSpec((2,), low=-1, high=1),
                        {"down_dims": [16, 32], "step_embed_dim": 16, "encoder": {"type": "identity"}})
    p.set_normalizer({"state": {"min": np.full(3, -2.0), "max": np.full(3, 2.0)},
                      "action": {"min": np.array([-1.0, -0.5]), "max": np.array([1.0, 0.5])}})
    return p


def test_epsilon_loss_is_zero_for_oracle_and_not_for_zero_predictor() -> None:
    p = _policy()
    action = torch.rand(64, 16, 2) * torch.tensor([2.0, 1.0]) - torch.tensor([1.0, 0.5])
    batch = {"obs": {"state": torch.randn(64, 2, 3)}, "action": action}
    a0 = p.normalizer.normalize("action", action)

    def oracle(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        ab = p.schedule.alphas_cumprod[t].view(-1, 1, 1)
        return (x_t - ab.sqrt() * a0) / (1 - ab).sqrt()

    p.eps = oracle  # type: ignore[method-assign]
    loss, metrics = p.loss(batch)
    assert loss.item() < 1e-8 and metrics["loss"] == pytest.approx(loss.item())
    p.eps = lambda x_t, t, cond: torch.zeros_like(x_t)  # type: ignore[method-assign]
    assert p.loss(batch)[0].item() == pytest.approx(1.0, abs=0.15)  # E||eps||^2 = 1 (2048 draws)


# --------------------------------------------------------------------------------------------- EMA

def test_ema_copies_buffers_instead_of_averaging() -> None:
    # normaliser statistics set after the EMA was created must take effect at the next update, not drift in
    p = _policy()
    ema = EMA(p)
    p.set_normalizer({"state": {"min": np.full(3, -5.0), "max": np.full(3, 5.0)},
                      "action": {"min": np.array([-2.0, -0.5]), "max": np.array([2.0, 0.5])}})
    ema.update(p, step=10**6)  # decay 0.9999
    for k, v in p.normalizer.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[f"normalizer.{k}"], v)


def test_ema_decay_schedule_and_update() -> None:
    lin = torch.nn.Linear(3, 2)
    ema = EMA(lin)
    assert ema.decay(0) == 0.0
    assert ema.decay(1) == pytest.approx(1 - 2**-0.75)
    assert ema.decay(10**9) == 0.9999
    shadow0 = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin, step=3)
    d = 1 - 4**-0.75
    torch.testing.assert_close(ema.state_dict()["weight"], d * shadow0["weight"] + (1 - d) * lin.weight)
    target = torch.nn.Linear(3, 2)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, ema.state_dict()["weight"])
    before = lin.weight.clone()
    with ema.applied_to(lin):
        torch.testing.assert_close(lin.weight, ema.state_dict()["weight"])
    torch.testing.assert_close(lin.weight, before)


def test_ddim_chain_log_probs_match_a_direct_gaussian_density():
    """The denoising chain as a sequence of Gaussian policies: recorded log-probs equal torch's Normal density of
    each step, and re-evaluating the chain with the same network gives ratio 1 (PPO before its first update)."""
    torch.manual_seed(0)
    sched = NoiseSchedule(100)
    w = torch.randn(2)

    def eps_fn(x, t):
        return torch.tanh(x * w + t[:, None, None] / 100.0)

    steps = sched.timesteps(SamplerSpec("ddim", 5))
    x_T = torch.randn(3, 8, 2)
    chain, logp = sched.sample_chain(eps_fn, x_T, steps, eta=1.0, std_min=0.01,
                                     generator=torch.Generator().manual_seed(1))
    assert chain.shape == (3, 6, 8, 2) and logp.shape == (3, 5)
    for k, (t, t_prev) in enumerate(steps):
        x = chain[:, k]
        _, mean, std = sched.ddim_step(x, eps_fn(x, torch.full((3,), t)), t, t_prev, 1.0)
        want = torch.distributions.Normal(mean, std.clamp(min=0.01).expand_as(mean)).log_prob(chain[:, k + 1])
        torch.testing.assert_close(logp[:, k], want.sum((1, 2)))
    torch.testing.assert_close(sched.chain_log_prob(eps_fn, chain, steps, 1.0, 0.01), logp)
