"""Single-env gymnasium view over a :class:`BatchedEnv` with ``num_envs=1``.

For tools that speak the gymnasium API (env checkers, SB3, video wrappers). Nothing is registered globally;
build it directly: ``GymTaskEnv("push_cube", seed=0)``. Unlike the batched env it does not auto-reset: when an
episode ends, ``step`` returns the episode's last observation and the caller resets.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from distillery.envs import make_env


class GymTaskEnv(gym.Env):
    """One env of ``task`` as a ``gymnasium.Env`` with float32 Box spaces built from the specs.

    Args:
        task: task name (see ``distillery.envs.TASKS``).
        seed: seed of the underlying env (used until ``reset(seed=...)`` re-seeds it).
        obs_group: which observation group becomes the gymnasium observation.
        render_mode: None or "rgb_array".
        **kw: forwarded to :func:`distillery.envs.make_env` (task and env kwargs).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task: str, seed: int = 0, obs_group: str = "state", render_mode: str | None = None,
                 **kw: Any) -> None:
        self.env = make_env(task, 1, seed=seed, **kw)
        if obs_group not in self.env.observation_spec:
            raise ValueError(f"unknown obs_group {obs_group!r} for task {task!r}; valid groups: "
                             f"{', '.join(self.env.observation_spec)}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.obs_group = obs_group
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self.env.control_dt)}
        spec = self.env.observation_spec[obs_group]
        low = -np.inf if spec.low is None else spec.low
        high = np.inf if spec.high is None else spec.high
        self.observation_space = gym.spaces.Box(low=low, high=high, shape=spec.shape, dtype=np.float32)
        act = self.env.action_spec
        self.action_space = gym.spaces.Box(low=act.low, high=act.high, shape=act.shape, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        obs = self.env.reset(seed=seed)
        return self._np(obs), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = torch.as_tensor(np.asarray(action, dtype=np.float32).reshape(1, -1))
        obs, reward, terminated, truncated, info = self.env.step(a)
        term, trunc = bool(terminated[0]), bool(truncated[0])
        # The batched env already reset a finished env; report the episode's last observation instead.
        out = info["final_obs"] if (term or trunc) else obs
        return self._np(out), float(reward[0]), term, trunc, {"success": bool(info["success"][0])}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self.env.render([0])[0]

    def close(self) -> None:
        self.env.close()

    def _np(self, obs: dict[str, torch.Tensor]) -> np.ndarray:
        return obs[self.obs_group][0].numpy().copy()
