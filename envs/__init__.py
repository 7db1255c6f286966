"""Batched simulation environments: ``make_env(task, num_envs, ...)`` -> :class:`BatchedEnv`.

Tasks are registered in :data:`TASKS`; backends in :data:`BACKENDS`. Only the MuJoCo CPU backend
(``mujoco.batch.Batch``) is implemented; the others are reserved names that fail with a clear message.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from distillery.envs.core import BatchedEnv, Marker, PhysicsBackend, SimState, Task

TASKS: tuple[str, ...] = ("push_cube", "lift_cube")
BACKENDS: tuple[str, ...] = ("mujoco", "mjwarp", "isaac", "gymnasium")


def _task_class(task: str) -> type[Task]:
    if task == "push_cube":
        from distillery.envs.tasks.push_cube import PushCubeTask
        return PushCubeTask
    if task == "lift_cube":
        from distillery.envs.tasks.lift_cube import LiftCubeTask
        return LiftCubeTask
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def make_env(task: str, num_envs: int, seed: int = 0, backend: str = "mujoco", device: str = "cpu",
             **task_kwargs: Any) -> BatchedEnv:
    """Build ``num_envs`` copies of ``task`` on ``backend``.

    Env kwargs (popped from ``task_kwargs``): ``decimation`` (physics steps per control step),
    ``max_episode_steps``, ``allow_nonfinite_actions``, ``nthread`` (Batch threads), ``timestep`` (s).
    Remaining kwargs go to the task class (e.g. ``min_goal_distance`` for push_cube).
    """
    task_cls = _task_class(task)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend != "mujoco":
        raise NotImplementedError(f"backend {backend!r} is not implemented yet; use backend='mujoco' "
                                  f"(MuJoCo CPU batch)")
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
    dev = torch.device(device)
    if dev.type != "cpu":
        raise ValueError(f"the mujoco backend keeps its state in CPU memory; use device='cpu', got {device!r}")
    env_kwargs = {k: task_kwargs.pop(k) for k in ("decimation", "max_episode_steps", "allow_nonfinite_actions")
                  if k in task_kwargs}
    backend_kwargs = {k: task_kwargs.pop(k) for k in ("nthread", "timestep") if k in task_kwargs}
    try:
        task_obj = task_cls(num_envs, dev, **task_kwargs)
    except TypeError as exc:
        raise TypeError(f"bad keyword arguments for task {task!r}: {exc}") from exc
    from distillery.envs.mujoco_backend import MujocoBackend
    physics = MujocoBackend(task_cls.xml_path, num_envs, **backend_kwargs)
    return BatchedEnv(task_obj, physics, seed=seed, **env_kwargs)


def make_expert(task: str, num_envs: int, noise: float = 0.0, seed: int = 0,
                mistakes: float = 0.0) -> Callable[..., torch.Tensor]:
    """Scripted expert for ``task``: ``expert(obs) -> action (N, Da)``; call ``expert.reset(mask)`` after resets.
    ``noise``: action noise std; ``mistakes``: share of episodes played with the expert's systematic mistake
    (push_cube only)."""
    if task == "push_cube":
        from distillery.envs.tasks.push_cube import PushCubeExpert
        return PushCubeExpert(num_envs, noise=noise, seed=seed, mistakes=mistakes)
    if task == "lift_cube":
        from distillery.envs.tasks.lift_cube import LiftCubeExpert
        return LiftCubeExpert(num_envs, noise=noise, seed=seed, mistakes=mistakes)
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


__all__ = ["BACKENDS", "TASKS", "BatchedEnv", "Marker", "PhysicsBackend", "SimState", "Task", "make_env",
           "make_expert"]
