"""Stable-Baselines3 ``VecEnv`` over a :class:`BatchedEnv`, so SB3's algorithms (PPO, SAC, ...) train on our tasks
unchanged and can be compared with ours at the same env-step budget and the same ``num_envs``.

Mapping of the contracts (N envs, D obs dims, Da action dims)::

    BatchedEnv                                   SB3 VecEnv
    reset(seed) -> {group: (N, D)} torch         reset() -> (N, D) float32 numpy of ``obs_key``
    step(torch (N, Da)) -> obs, reward,          step(numpy (N, Da)) -> obs, reward (N,) float32, done (N,) bool,
        terminated, truncated, info                  infos[i] = {"is_success", and for finished envs
    auto-reset; info["final_obs"]                     "terminal_observation" (D,), "TimeLimit.truncated"}

The batched env has one seeded generator for all its envs, so ``seed(s)`` seeds the next ``reset`` as a whole with
``s`` (SB3 hands env i the seed ``s + i``; only the first one is used). This module imports stable_baselines3 at
import time; ``distillery.envs`` itself does not import it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distillery.envs.core import BatchedEnv

try:
    import gymnasium as gym
    from stable_baselines3.common.vec_env import VecEnv
except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("distillery.envs.sb3_vec_env needs stable-baselines3: pip install 'stable-baselines3>=2.3' "
                      "(or the project's dev extra: pip install -e '.[dev]')") from exc

__all__ = ["SB3VecEnv"]


class SB3VecEnv(VecEnv):
    """``env``'s observation group ``obs_key`` as an SB3 ``VecEnv`` with a Box(-1, 1, (Da,)) action space.

    Args:
        env: the batched env (its ``num_envs`` becomes the VecEnv's).
        obs_key: the observation group SB3 sees (a 1-D group: SB3's MLP policies take flat vectors).
    """

    render_mode = None  # read by VecEnv.__init__ through get_attr; frames come from get_images()

    def __init__(self, env: BatchedEnv, obs_key: str = "state") -> None:
        if obs_key not in env.observation_spec:
            raise ValueError(f"obs_key {obs_key!r} is not an observation group of {env.task_name}; groups: "
                             f"{sorted(env.observation_spec)}")
        spec = env.observation_spec[obs_key]
        if len(spec.shape) != 1:
            raise ValueError(f"obs_key {obs_key!r} has shape {spec.shape}; SB3VecEnv serves 1-D groups (flat vectors "
                             f"for SB3's MlpPolicy)")
        self.env, self.obs_key = env, obs_key
        low = -np.inf if spec.low is None else spec.low
        high = np.inf if spec.high is None else spec.high
        obs_space = gym.spaces.Box(low=low, high=high, shape=spec.shape, dtype=np.float32)
        act = env.action_spec
        act_space = gym.spaces.Box(low=act.low, high=act.high, shape=act.shape, dtype=np.float32)
        super().__init__(env.num_envs, obs_space, act_space)
        self._actions: torch.Tensor | None = None

    def _np(self, obs: dict[str, torch.Tensor]) -> np.ndarray:
        return obs[self.obs_key].detach().cpu().numpy().astype(np.float32, copy=True)

    # ------------------------------------------------------------------------------------------ VecEnv API
    def reset(self) -> np.ndarray:
        """Reset every env (seeded by the first of the seeds given to ``seed()``, if any) -> obs (N, D)."""
        obs = self.env.reset(seed=self._seeds[0])
        self._reset_seeds()
        self._reset_options()
        return self._np(obs)

    def step_async(self, actions: np.ndarray) -> None:
        a = torch.as_tensor(np.asarray(actions, dtype=np.float32), device=self.env.device)
        self._actions = a.reshape(self.num_envs, -1)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async(actions); call step(actions)")
        obs, reward, terminated, truncated, info = self.env.step(self._actions)
        self._actions = None
        done = (terminated | truncated).cpu().numpy()
        success = info["success"].cpu().numpy()
        infos: list[dict[str, Any]] = [{"is_success": bool(s)} for s in success]
        if done.any():  # SB3 wants a dict per env; only finished envs carry the extra keys
            final = self._np(info["final_obs"])
            trunc = truncated.cpu().numpy()
            for i in np.flatnonzero(done):
                infos[i]["terminal_observation"] = final[i]
                infos[i]["TimeLimit.truncated"] = bool(trunc[i])  # BatchedEnv: truncated excludes terminated
        return self._np(obs), reward.cpu().numpy().astype(np.float32), done, infos

    def close(self) -> None:
        self.env.close()

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        """The attribute of the batched env (or of this adapter), once per requested index."""
        owner = self.env if hasattr(self.env, attr_name) else self
        return [getattr(owner, attr_name)] * len(list(self._get_indices(indices)))

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        """Sets the attribute on the batched env (shared by all its envs, whatever ``indices`` says)."""
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        """Calls the batched env's method once (it acts on all envs) and returns its result per requested index."""
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result] * len(list(self._get_indices(indices)))

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * len(list(self._get_indices(indices)))

    def get_images(self) -> Sequence[np.ndarray | None]:
        """RGB frames (H, W, 3) of every env (set MUJOCO_GL=egl when headless)."""
        return list(self.env.render(list(range(self.num_envs))))
