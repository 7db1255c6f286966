"""Return- and advantage-weighted trajectory sampling for mixed-quality offline data.

Hong, Agrawal, Tachet des Combes, Laroche, "Harnessing Mixed Offline Reinforcement Learning Datasets via
Trajectory Weighting" (ICLR 2023). Only the distribution that minibatches are drawn from changes; the
offline RL loss does not.

* Return-weighted (RW): per trajectory ``i`` with return ``G_i``, ``G^_i = (G_i - min G) / (max G - min G)``
  and every transition of ``i`` gets weight ``exp(G^_i / alpha)``; probabilities are the softmax over all
  transitions, so trajectory ``i`` carries mass ``T_i exp(G^_i / alpha) / sum_j T_j exp(G^_j / alpha)``.
* Advantage-weighted (AW): the same with ``A_i = G_i - V^(s0_i)`` in place of ``G_i``, where ``V^`` is a
  linear least-squares fit (with intercept) of the returns on the initial states (:func:`linear_advantages`).
  Meant for stochastic initial states, where a high return may only reflect a lucky start.
* Uniform: mass ``T_i / sum_j T_j``, i.e. uniform over transitions (the usual offline RL sampling).

The authors use ``alpha = 0.1`` for both. When every trajectory has the same (advantage or) return the
normalisation is 0/0; all trajectories then count as equal, which gives the uniform distribution.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Mode = Literal["return", "advantage", "uniform"]
MODES = ("return", "advantage", "uniform")


def _numpy(x) -> np.ndarray:
    """Numpy view of an array-like or a (CPU or GPU) torch tensor."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _vector(x, name: str) -> np.ndarray:
    a = _numpy(x).astype(np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (one entry per trajectory), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf (entry {int(np.flatnonzero(~np.isfinite(a))[0])}); "
                         f"fix or drop those trajectories first")
    return a


def linear_advantages(returns, initial_states) -> np.ndarray:
    """``A_i = G_i - V^(s0_i)`` with ``V^`` the least-squares linear fit (plus intercept) of ``G`` on ``s0``.

    Args:
        returns: (E,) trajectory returns. initial_states: (E, D) first observation of each trajectory.
    Returns: float64 (E,) residuals.
    """
    g = _vector(returns, "returns")
    s0 = _numpy(initial_states).astype(np.float64)
    if s0.ndim != 2 or len(s0) != len(g):
        raise ValueError(f"initial_states must be (E, D) with E = {len(g)} trajectories, got shape {s0.shape}")
    if not np.isfinite(s0).all():
        raise ValueError("initial_states contains NaN or inf; fix or drop those trajectories first")
    design = np.concatenate([s0, np.ones((len(g), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, g, rcond=None)  # minimum-norm solution when s0 is rank deficient
    return g - design @ coef


def trajectory_weights(returns, lengths, mode: Mode = "return", temperature: float = 0.1,
                       advantages=None) -> np.ndarray:
    """Probability of drawing a transition of each trajectory (the trajectory's mass).

    Args:
        returns: (E,) trajectory returns (used by ``mode="return"``; validated in every mode).
        lengths: (E,) number of transitions of each trajectory (rows that may be drawn; 0 allowed).
        mode: ``"return"`` (RW), ``"advantage"`` (AW) or ``"uniform"``.
        temperature: alpha > 0; smaller concentrates the mass on the best trajectories.
        advantages: (E,) per-trajectory advantages for ``mode="advantage"`` (see :func:`linear_advantages`).
    Returns:
        float64 (E,) summing to 1: ``T_i exp(x^_i / alpha) / sum_j T_j exp(x^_j / alpha)`` with ``x^`` the
        min-max normalised returns or advantages (``x^ = 0`` in uniform mode).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    g = _vector(returns, "returns")
    n = _vector(lengths, "lengths")
    if len(n) != len(g):
        raise ValueError(f"lengths has {len(n)} entries but returns has {len(g)}; give one per trajectory")
    if (n < 0).any() or (n != np.round(n)).any() or n.sum() <= 0:
        raise ValueError("lengths must be non-negative integers with a positive total (transitions per trajectory)")
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 (the paper uses 0.1), got {temperature}")
    if mode == "uniform":
        score = np.zeros_like(g)
    else:
        if mode == "advantage":
            if advantages is None:
                raise ValueError("mode='advantage' needs advantages=(E,); compute them with "
                                 "linear_advantages(returns, initial_states)")
            x = _vector(advantages, "advantages")
            if len(x) != len(g):
                raise ValueError(f"advantages has {len(x)} entries but returns has {len(g)}")
        else:
            x = g
        span = x.max() - x.min()
        score = (x - x.min()) / span if span > 0 else np.zeros_like(x)
    # log-sum-exp form: exp(1 / alpha) overflows float64 for alpha < ~0.0014
    with np.errstate(divide="ignore"):
        logits = np.log(n) + score / temperature
    mass = np.exp(logits - logits.max())
    return mass / mass.sum()


def transition_sampling_probs(episode, returns, mode: Mode = "return", temperature: float = 0.1,
                              advantages=None) -> np.ndarray:
    """Per-row probabilities for rows that each belong to a trajectory, uniform within a trajectory.

    Args:
        episode: (N,) int trajectory index of each row (e.g. ``chunk_transitions(...)["episode"]``).
        returns, mode, temperature, advantages: as in :func:`trajectory_weights`, one entry per trajectory
            ``0..E-1``. A trajectory's length is its number of rows here, so strided or chunked rows keep
            the paper's "softmax over all transitions".
    Returns:
        float64 (N,) summing to 1.
    """
    ep = _numpy(episode)
    if ep.ndim != 1 or ep.size == 0 or not np.issubdtype(ep.dtype, np.integer):
        raise ValueError(f"episode must be a non-empty 1-D integer array, got shape {ep.shape}, dtype {ep.dtype}")
    num = len(_vector(returns, "returns"))
    if ep.min() < 0 or ep.max() >= num:
        raise ValueError(f"episode indices must lie in [0, {num}) (one return per trajectory), "
                         f"got range [{ep.min()}, {ep.max()}]")
    counts = np.bincount(ep, minlength=num)
    traj = trajectory_weights(returns, counts, mode, temperature, advantages)
    return traj[ep] / counts[ep]


class WeightedSampler:
    """Draws row indices with replacement from fixed probabilities (inverse CDF, any number of rows).

    Args:
        probs: (N,) non-negative weights; normalised here, so they need not sum to 1.
        generator: torch generator for reproducible draws (the global RNG if None).
    """

    def __init__(self, probs, generator: torch.Generator | None = None) -> None:
        p = torch.as_tensor(_numpy(probs).astype(np.float64))
        if p.ndim != 1 or p.numel() == 0:
            raise ValueError(f"probs must be a non-empty 1-D array, got shape {tuple(p.shape)}")
        if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise ValueError("probs must be finite, non-negative and not all zero")
        self.probs = p / p.sum()
        self.cdf = torch.cumsum(self.probs, 0)
        self.generator = generator

    def __len__(self) -> int:
        return self.probs.numel()

    def sample(self, batch_size: int) -> torch.Tensor:
        """LongTensor (batch_size,) of row indices; row ``i`` has probability ``probs[i]`` per draw."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        u = torch.rand(int(batch_size), generator=self.generator, dtype=torch.float64) * self.cdf[-1]
        # first row whose cdf exceeds u: zero-probability rows (cdf equal to their predecessor's) never win
        return torch.searchsorted(self.cdf, u, right=True).clamp_(max=len(self) - 1)


__all__ = ["MODES", "WeightedSampler", "linear_advantages", "trajectory_weights", "transition_sampling_probs"]
