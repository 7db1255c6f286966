"""Chunk-level transitions and episode returns for critics (IQL, FQE) trained on an :class:`EpisodeDataset`.

Dataset semantics (see :mod:`distillery.data.episodes` and ``pipeline.collect``): row ``t`` of an episode of
``T`` steps holds ``obs[t]``, the observation *before* ``action[t]`` was executed, and ``reward[t]``,
``terminated[t]``, ``truncated[t]``, the outcome *of* ``action[t]``. Only the last row may be terminated
(success) or truncated (time limit). The observation after the last action is not stored.

A critic over action chunks of ``chunk`` steps sees the semi-MDP whose step starts at ``t`` and executes
``action[t : t + chunk]``::

    obs       = obs[t]
    action    = action[t], ..., action[t + chunk - 1]        (flattened; rows past T repeat action[T-1])
    reward    = sum_{k < n} gamma^k reward[t + k]            n = min(chunk, T - t) env steps that exist
    next_obs  = obs[t + chunk]           if t + chunk < T
              = obs[T - 1]               otherwise (the last *stored* obs: the true final obs is not kept)
    done      = terminated[T - 1]        if the chunk contains the last step, else 0
    discount  = gamma^n

So a target ``reward + discount * (1 - done) * V(next_obs)`` is exact for every chunk that ends inside the
episode and for successful endings (``done`` = 1, the bootstrap is cut). A time-limit ending is not a
terminal state, so it bootstraps, from ``V(obs[T-1])``: the state one action before the real final state,
a small approximation confined to the last chunk of truncated episodes.
"""
from __future__ import annotations

import numpy as np
import torch

from distillery.data.episodes import EpisodeDataset


def _episode_index(dataset: EpisodeDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the dataset: its episode (N,) and its step within that episode (N,), both int64."""
    lengths = dataset.episode_lengths
    episode = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    step = np.arange(dataset.num_steps, dtype=np.int64) - dataset.episode_starts[episode]
    return episode, step


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return gamma


def chunk_transitions(dataset: EpisodeDataset, obs_key: str = "privileged", chunk: int = 2, gamma: float = 0.99,
                      stride: int = 1) -> dict[str, torch.Tensor]:
    """Chunk-level transitions, one row per chunk start ``t = 0, stride, 2 * stride, ...`` of every episode.

    Args:
        dataset: the episodes.
        obs_key: observation group the critic reads (``"privileged"``: critics may see privileged state).
        chunk: env steps per transition (the policy's executed action horizon).
        gamma: per-env-step discount; the chunk's own discount is ``gamma ** (env steps in the chunk)``.
        stride: distance between consecutive chunk starts within an episode.

    Returns:
        ``{"obs": (N, D), "action": (N, chunk * Da), "reward": (N,), "next_obs": (N, D), "done": (N,),
        "discount": (N,)}`` float32 and ``{"episode": (N,), "t": (N,)}`` int64, with the meaning given in
        the module docstring. Rows are ordered by episode, then ``t``.
    """
    if obs_key not in dataset.obs:
        raise KeyError(f"obs_key {obs_key!r} is not an observation group of {dataset.path}; "
                       f"choose from {sorted(dataset.obs)}")
    if int(chunk) < 1 or int(stride) < 1:
        raise ValueError(f"chunk and stride must be >= 1, got chunk={chunk}, stride={stride}")
    chunk, stride, gamma = int(chunk), int(stride), _check_gamma(gamma)
    if dataset.num_steps == 0:
        raise ValueError(f"dataset {dataset.path} has no steps; collect episodes before building transitions")
    obs = dataset.obs[obs_key]
    if obs.ndim != 2:
        raise ValueError(f"obs group {obs_key!r} has rows of shape {obs.shape[1:]}; critics need flat vectors")

    episode, step = _episode_index(dataset)
    starts = dataset.episode_starts[episode]
    last = starts + dataset.episode_lengths[episode] - 1  # global row of each row's episode's last step
    rows = np.flatnonzero(step % stride == 0)  # global rows where a chunk starts
    first, last = rows, last[rows]

    offsets = np.arange(chunk, dtype=np.int64)
    steps_idx = first[:, None] + offsets[None, :]  # (N, chunk) global rows of the chunk's steps
    exists = steps_idx <= last[:, None]
    clipped = np.minimum(steps_idx, last[:, None])  # repeat the last action past the end
    action = dataset.action[clipped].reshape(len(rows), -1)
    powers = gamma ** offsets.astype(np.float64)
    reward = (dataset.reward[clipped].astype(np.float64) * powers * exists).sum(axis=1)
    n_steps = exists.sum(axis=1)
    ends_inside = first + chunk > last  # the chunk contains the episode's last step
    done = ends_inside & dataset.terminated[last]
    next_row = np.minimum(first + chunk, last)

    f32 = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32))  # noqa: E731
    return {"obs": f32(obs[first]), "action": f32(action), "reward": f32(reward), "next_obs": f32(obs[next_row]),
            "done": f32(done), "discount": f32(gamma ** n_steps.astype(np.float64)),
            "episode": torch.as_tensor(episode[rows]), "t": torch.as_tensor(step[rows])}


def episode_returns(dataset: EpisodeDataset, gamma: float = 1.0) -> np.ndarray:
    """Discounted return of each episode from its first step, ``sum_t gamma^t reward[t]``: float64 (E,)."""
    gamma = _check_gamma(gamma)
    if dataset.num_episodes == 0:
        return np.zeros(0, np.float64)
    episode, step = _episode_index(dataset)
    discounted = dataset.reward.astype(np.float64) * gamma ** step.astype(np.float64)
    return np.bincount(episode, weights=discounted, minlength=dataset.num_episodes)


__all__ = ["chunk_transitions", "episode_returns"]
