"""Batched closed-loop rollouts shared by data collection and evaluation.

Episodes run in *waves*: every env of a wave plays exactly one episode from a reset drawn with the
wave's seed, so results do not favour short episodes (as "first N episodes to finish" would) and
are reproducible from ``(seed, num_envs)``. Per-step data is written into preallocated
``(num_envs, T, ...)`` buffers with one indexed write per step, not per-env Python loops.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from distillery.envs import BatchedEnv


class Actor(Protocol):
    """Anything that maps a batch of observations to actions and can forget per-env state."""

    def __call__(self, obs: dict[str, torch.Tensor], active: torch.Tensor | None = None) -> torch.Tensor:
        """Actions (N, Da) for all envs; rows where ``active`` (N,) is False may be anything (not counted)."""

    def reset(self, mask: torch.Tensor | None = None) -> None: ...


@dataclass
class Episode:
    """One finished episode: ``obs[k]`` (T, ...), ``action`` (T, Da), ``reward``/``terminated``/``truncated`` (T,)."""

    obs: dict[str, np.ndarray]
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    frames: list[np.ndarray] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return bool(self.terminated[-1])

    @property
    def ret(self) -> float:
        return float(self.reward.sum())

    def __len__(self) -> int:
        return len(self.action)


def wave_seed(seed: int, wave: int) -> int:
    """Reset seed of wave ``wave`` of a run seeded ``seed`` (distinct, reproducible streams)."""
    return int(np.random.SeedSequence([int(seed), int(wave)]).generate_state(1)[0])


def run_waves(env: BatchedEnv, actor: Actor, episodes: int, seed: int, record: bool = False,
              render_episodes: int = 0, render_size: int = 160,
              action_noise: float = 0.0) -> Iterator[list[Episode]]:
    """Yield the episodes of each wave (env order) until ``episodes`` have been played.

    Args:
        record: keep observations and actions (collection); otherwise only rewards and flags.
        render_episodes: render RGB frames of this many episodes of the first wave (videos).
        action_noise: std of Gaussian noise added to the *executed* action while the actor's own action is
            what gets recorded (DART, Laskey et al. 2017): demonstrations then visit the states a learner's
            small errors lead to, labelled with the expert's correction.
    """
    noise_gen = torch.Generator().manual_seed(wave_seed(seed, 1 << 30))  # a stream apart from the reset seeds
    n = env.num_envs
    T = env.max_episode_steps
    done_total = 0
    wave = 0
    while done_total < episodes:
        k = min(n, episodes - done_total)  # envs counted in this wave
        obs = env.reset(seed=wave_seed(seed, wave))
        actor.reset()
        rew = torch.zeros(n, T)
        term = torch.zeros(n, T, dtype=torch.bool)
        trunc = torch.zeros(n, T, dtype=torch.bool)
        length = torch.zeros(n, dtype=torch.long)
        if record:
            obs_buf = {g: torch.zeros((n, T) + tuple(v.shape[1:])) for g, v in obs.items()}
            act_buf = torch.zeros(n, T, env.action_spec.shape[0])
        frames: list[list[np.ndarray]] = [[] for _ in range(min(render_episodes, k) if wave == 0 else 0)]
        active = torch.zeros(n, dtype=torch.bool)
        active[:k] = True
        while bool(active.any()):
            ids = active.nonzero().squeeze(1)  # envs still in their counted episode
            t = length[ids]
            if frames:
                for i, img in enumerate(env.render(list(range(len(frames))), render_size, render_size)):
                    if bool(active[i]):
                        frames[i].append(img)
            action = actor(obs, active)
            if record:
                for g, v in obs.items():
                    obs_buf[g][ids, t] = v[ids].float()
                act_buf[ids, t] = action[ids].float()
            if action_noise > 0:
                action = action + action_noise * torch.randn(action.shape, generator=noise_gen)
            obs, reward, terminated, truncated, _ = env.step(action)
            rew[ids, t] = reward[ids].float()
            term[ids, t] = terminated[ids]
            trunc[ids, t] = truncated[ids]
            length[ids] += 1
            finished = active & (terminated | truncated)
            active &= ~finished
            if bool(finished.any()):
                actor.reset(finished)  # the env auto-reset these; their next episode is not counted
        out = []
        for i in range(k):
            L = int(length[i])
            out.append(Episode(
                obs={g: b[i, :L].numpy() for g, b in obs_buf.items()} if record else {},
                action=act_buf[i, :L].numpy() if record else np.zeros((L, 0), np.float32),
                reward=rew[i, :L].numpy(), terminated=term[i, :L].numpy(), truncated=trunc[i, :L].numpy(),
                frames=frames[i] if i < len(frames) else []))
        done_total += k
        wave += 1
        yield out


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (well-behaved at 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def summarize(episodes: list[Episode]) -> dict[str, Any]:
    """Success rate with its 95% CI, mean return and mean episode length."""
    n = len(episodes)
    s = sum(e.success for e in episodes)
    return {"episodes": n, "success_rate": s / n if n else 0.0, "success_ci95": list(wilson_interval(s, n)),
            "mean_return": float(np.mean([e.ret for e in episodes])) if n else 0.0,
            "mean_length": float(np.mean([len(e) for e in episodes])) if n else 0.0}
