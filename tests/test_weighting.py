"""Return/advantage-weighted trajectory sampling (Hong et al., ICLR 2023): weights against hand-computed values
and the authors' per-transition softmax, empirical draw frequencies against the probabilities, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillery.data.weighting import (WeightedSampler, linear_advantages, trajectory_weights,
                                       transition_sampling_probs)


def per_transition_softmax(scores: np.ndarray, lengths: np.ndarray, temperature: float) -> np.ndarray:
    """The authors' construction: repeat each trajectory's min-max normalised score over its transitions,
    softmax over all transitions, then sum back per trajectory."""
    x = np.repeat((scores - scores.min()) / (scores.max() - scores.min()), lengths) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    return np.bincount(np.repeat(np.arange(len(lengths)), lengths), weights=p)


def test_hand_computed_weights():
    returns, lengths = np.array([0.0, 5.0, 10.0]), np.array([2, 1, 3])
    e = math.e
    # normalised returns 0, 0.5, 1 at alpha 0.5 -> exp(0), exp(1), exp(2) per transition
    rw = np.array([2, e, 3 * e**2]) / (2 + e + 3 * e**2)
    assert np.allclose(trajectory_weights(returns, lengths, "return", temperature=0.5), rw)
    assert np.allclose(trajectory_weights(returns, lengths, "uniform"), [2 / 6, 1 / 6, 3 / 6])
    # advantages 1, -1, 0 normalise to 1, 0, 0.5
    aw = np.array([2 * e**2, 1, 3 * e]) / (2 * e**2 + 1 + 3 * e)
    got = trajectory_weights(returns, lengths, "advantage", temperature=0.5, advantages=[1.0, -1.0, 0.0])
    assert np.allclose(got, aw)


def test_matches_the_per_transition_softmax_and_limits():
    rng = np.random.default_rng(0)
    returns, lengths = rng.normal(size=20) * 30, rng.integers(1, 200, size=20)
    for alpha in (0.1, 1.0):
        assert np.allclose(trajectory_weights(returns, lengths, "return", alpha),
                           per_transition_softmax(returns, lengths, alpha), rtol=1e-10, atol=0)
    # a huge temperature is uniform over transitions; a tiny one puts all mass on the best trajectory
    assert np.allclose(trajectory_weights(returns, lengths, "return", 1e9), lengths / lengths.sum())
    tiny = trajectory_weights(returns, lengths, "return", 1e-4)  # exp(1e4) would overflow without log-sum-exp
    assert np.isfinite(tiny).all() and tiny[np.argmax(returns)] == pytest.approx(1.0)
    # equal returns: the normalisation is 0/0 and every trajectory counts the same
    assert np.allclose(trajectory_weights(np.ones(20), lengths, "return"), lengths / lengths.sum())


def test_linear_advantages_are_the_regression_residuals():
    s0 = np.array([[0.0], [1.0], [2.0], [3.0]])
    resid = np.array([1.0, -1.0, -1.0, 1.0])  # orthogonal to the intercept and to s0
    returns = 2.0 * s0[:, 0] + 1.0 + resid
    assert np.allclose(linear_advantages(returns, s0), resid)
    aw = trajectory_weights(returns, [1, 1, 1, 1], "advantage", 0.1, advantages=linear_advantages(returns, s0))
    assert np.allclose(aw[0], aw[3]) and np.allclose(aw[1], aw[2]) and aw[0] > aw[1]
    # the return-weighted sampler instead prefers the lucky late starts
    rw = trajectory_weights(returns, [1, 1, 1, 1], "return", 0.1)
    assert rw.argmax() == 3 and rw[2] > rw[0]


def test_transition_probs_are_uniform_within_a_trajectory():
    episode = np.array([0, 0, 1, 2, 2, 2])
    returns = np.array([0.0, 5.0, 10.0])
    p = transition_sampling_probs(episode, returns, "return", temperature=0.5)
    traj = trajectory_weights(returns, [2, 1, 3], "return", temperature=0.5)
    assert np.allclose(p, traj[episode] / np.array([2, 2, 1, 3, 3, 3]))
    assert p.sum() == pytest.approx(1.0)
    assert np.allclose(transition_sampling_probs(torch.as_tensor(episode), returns, "uniform"), 1 / 6)
    # a trajectory without rows gets no mass and the others keep their relative weights
    q = transition_sampling_probs(np.array([0, 0, 2]), returns, "return", temperature=0.5)
    assert q.sum() == pytest.approx(1.0)
    assert q[2] / q[0] == pytest.approx(math.exp(2) / 1)


def test_empirical_frequencies_match_the_probabilities():
    rng = np.random.default_rng(1)
    episode = np.repeat(np.arange(6), [3, 10, 1, 7, 2, 5])
    returns = rng.normal(size=6)
    p = transition_sampling_probs(episode, returns, "return", temperature=0.3)
    n = 200_000
    draws = WeightedSampler(p, torch.Generator().manual_seed(0)).sample(n)
    assert draws.dtype == torch.int64 and draws.shape == (n,)
    freq = np.bincount(draws.numpy(), minlength=len(p)) / n
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n))
    chi2 = n * ((freq - p) ** 2 / p).sum()
    df = len(p) - 1
    assert chi2 < df + 5 * math.sqrt(2 * df)
    # trajectory masses too
    assert np.allclose(np.bincount(episode[draws.numpy()], minlength=6) / n,
                       trajectory_weights(returns, np.bincount(episode), "return", 0.3), atol=0.005)


def test_sampler_never_draws_zero_probability_rows_and_is_reproducible():
    s = WeightedSampler(torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0]), torch.Generator().manual_seed(0))
    draws = s.sample(50_000)
    assert set(draws.unique().tolist()) == {1, 3}
    assert (draws == 3).float().mean().item() == pytest.approx(0.75, abs=0.01)
    a = WeightedSampler([0.2, 0.8], torch.Generator().manual_seed(5)).sample(100)
    b = WeightedSampler([0.2, 0.8], torch.Generator().manual_seed(5)).sample(100)
    assert torch.equal(a, b)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="returns must be a non-empty 1-D array"):
        trajectory_weights([], [], "return")
    with pytest.raises(ValueError, match="returns contains NaN or inf \\(entry 1\\)"):
        trajectory_weights([0.0, float("nan")], [1, 1], "return")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        trajectory_weights([0.0, 1.0], [1, 1], "return", temperature=-0.1)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        trajectory_weights([0.0, 1.0], [1, 1], "return", temperature=0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        trajectory_weights([0.0, 1.0], [1, 1], "best")
    with pytest.raises(ValueError, match="needs advantages"):
        trajectory_weights([0.0, 1.0], [1, 1], "advantage")
    with pytest.raises(ValueError, match="lengths has 3 entries but returns has 2"):
        trajectory_weights([0.0, 1.0], [1, 1, 1], "return")
    with pytest.raises(ValueError, match="lengths must be non-negative integers"):
        trajectory_weights([0.0, 1.0], [1, -1], "return")
    with pytest.raises(ValueError, match="episode indices must lie in \\[0, 2\\)"):
        transition_sampling_probs([0, 2], [0.0, 1.0])
    with pytest.raises(ValueError, match="initial_states must be \\(E, D\\) with E = 2"):
        linear_advantages([0.0, 1.0], np.zeros((3, 1)))
    with pytest.raises(ValueError, match="probs must be finite, non-negative"):
        WeightedSampler([0.5, -0.1])
    with pytest.raises(ValueError, match="probs must be a non-empty 1-D array"):
        WeightedSampler([])
