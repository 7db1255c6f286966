"""Batched environments: one object steps ``num_envs`` copies of a task on one device.

The split mirrors what changes independently:

* a :class:`Task` (one per task package) is the MJCF file plus torch functions written once against
  backend-neutral state views (:class:`SimState`): observation groups, reward, success and the reset
  distribution. It never calls a simulator.
* a :class:`PhysicsBackend` owns the physics (MuJoCo CPU ``mujoco.batch.Batch`` today; MuJoCo Warp or Isaac
  later) and exposes its state as live torch views, batch axis first.
* :class:`BatchedEnv` joins them: action validation, control decimation, time limits, auto-reset and seeding.

Timeline of one :meth:`BatchedEnv.step` (``N`` envs, ``Da`` action dims)::

    action (N, Da) -> validate/clip -> task.action_to_ctrl -> backend.step(decimation)
        -> task.observe -> task.evaluate (reward, success) -> terminated = success, truncated = time limit
        -> finished envs: info["final_obs"] keeps their last obs, then they are reset and re-observed.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.specs import ObservationSpec, TensorSpec

Obs = dict[str, torch.Tensor]


@dataclass
class SimState:
    """Backend-neutral, live views of the simulation state, batch axis first.

    Tensors alias the backend's memory: reading them is free and always current; tasks must treat them as
    read-only and build new tensors from them.

    Attributes:
        qpos: (N, nq) generalized positions (float64 on the MuJoCo CPU backend).
        qvel: (N, nv) generalized velocities.
        ctrl: (N, nu) actuator controls applied during the next step.
        sensordata: (N, nsensordata) sensor readings; as with ``mj_step``, they describe the state one
            physics substep before the current qpos/qvel.
    """

    qpos: torch.Tensor
    qvel: torch.Tensor
    ctrl: torch.Tensor
    sensordata: torch.Tensor


@dataclass(frozen=True)
class Marker:
    """A purely visual sphere/box drawn at render time (e.g. a goal pose that is task state, not physics)."""

    kind: str  # "box" | "sphere"
    size: tuple[float, float, float]
    pos: tuple[float, float, float]
    yaw: float
    rgba: tuple[float, float, float, float]


class Task(abc.ABC):
    """A task: MJCF model + torch functions of :class:`SimState`.

    A task instance holds the per-env task state (goal poses, counters) for ``num_envs`` envs as tensors on
    ``device``. Subclasses set the class attributes and implement the abstract methods.
    """

    name: str
    xml_path: Path
    act_dim: int
    default_decimation: int
    default_max_episode_steps: int

    def __init__(self, num_envs: int, device: torch.device) -> None:
        self.num_envs = num_envs
        self.device = device

    @abc.abstractmethod
    def observation_spec(self) -> ObservationSpec:
        """Per-env spec of every observation group (no batch axis)."""

    @abc.abstractmethod
    def action_to_ctrl(self, action: torch.Tensor, state: SimState) -> torch.Tensor:
        """Map clipped normalised actions (N, Da) in [-1, 1] to actuator controls (N, nu) float64.

        ``state`` is the state the action is applied in (for actions relative to the current pose)."""

    @abc.abstractmethod
    def sample_reset(self, ids: torch.Tensor, generator: torch.Generator,
                     qpos0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw initial states for envs ``ids`` (M,) and reset their task state.

        Args:
            ids: (M,) int64 env indices.
            generator: the env's seeded generator; every random draw must come from it.
            qpos0: (nq,) float64 model default configuration.

        Returns:
            qpos (M, nq) and qvel (M, nv), float64 (controls come from :meth:`initial_ctrl`).
        """

    @abc.abstractmethod
    def initial_ctrl(self, qpos: torch.Tensor) -> torch.Tensor:
        """Controls (M, nu) that hold the robot still at reset configurations qpos (M, nq)."""

    @abc.abstractmethod
    def observe(self, state: SimState) -> Obs:
        """Observation groups, each (N, *spec.shape) float32, as new tensors (never views of the state)."""

    @abc.abstractmethod
    def evaluate(self, state: SimState) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward (N,) float32 and success (N,) bool after a control step; may advance task counters."""

    def compute(self, state: SimState) -> tuple[Obs, torch.Tensor, torch.Tensor]:
        """Observations, reward and success after a control step (what ``step`` calls).

        Tasks override this to share intermediate results between observation and reward: per-call op count
        is what costs at small batch sizes.
        """
        return self.observe(state), *self.evaluate(state)

    def markers(self, env_id: int) -> list[Marker]:
        """Visual-only markers of env ``env_id`` to draw when rendering (default: none)."""
        return []


class PhysicsBackend(abc.ABC):
    """Owns the simulator for ``num_envs`` copies of one model; exposes state as live torch views.

    Backends for MuJoCo Warp or Isaac implement the same five operations on their own device.
    """

    num_envs: int
    state: SimState
    qpos0: torch.Tensor  # (nq,) default configuration
    timestep: float

    @abc.abstractmethod
    def step(self, nstep: int) -> None:
        """Advance every env by ``nstep`` physics steps with the current controls."""

    @abc.abstractmethod
    def reset(self, ids: torch.Tensor, qpos: torch.Tensor, qvel: torch.Tensor, ctrl: torch.Tensor) -> None:
        """Reset envs ``ids`` (M,) to default data, then set their qpos (M, nq), qvel (M, nv), ctrl (M, nu)."""

    @abc.abstractmethod
    def render(self, env_ids: list[int], width: int, height: int, markers: list[list[Marker]],
               camera: str | int | None) -> np.ndarray:
        """RGB frames (n, H, W, 3) uint8 of envs ``env_ids``."""

    def close(self) -> None:
        """Release simulator resources."""


class BatchedEnv:
    """``num_envs`` copies of a task stepped together; see the module docstring for the step timeline.

    Args:
        task: the task instance (holds per-env task state).
        backend: the physics backend for ``task.xml_path``.
        seed: seeds the env's torch.Generator; all reset randomness comes from it.
        decimation: physics steps per control step.
        max_episode_steps: control steps before ``truncated``.
        allow_nonfinite_actions: if True, NaN actions become 0 and +-inf are clipped instead of raising.
    """

    def __init__(self, task: Task, backend: PhysicsBackend, seed: int = 0, decimation: int | None = None,
                 max_episode_steps: int | None = None, allow_nonfinite_actions: bool = False) -> None:
        decimation = task.default_decimation if decimation is None else int(decimation)
        max_episode_steps = (task.default_max_episode_steps if max_episode_steps is None
                             else int(max_episode_steps))
        if decimation < 1:
            raise ValueError(f"decimation must be >= 1 physics step per control step, got {decimation}")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.task = task
        self.backend = backend
        self.num_envs = backend.num_envs
        self.device = task.device
        self.task_name = task.name
        self.decimation = decimation
        self.max_episode_steps = max_episode_steps
        self.control_dt = decimation * backend.timestep
        self.allow_nonfinite_actions = allow_nonfinite_actions
        self.observation_spec: ObservationSpec = task.observation_spec()
        self.action_spec = TensorSpec(shape=(task.act_dim,), dtype="float32", low=-1.0, high=1.0,
                                      description="absolute targets normalised to [-1, 1] over the workspace")
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed))
        self._elapsed = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        self._all_ids = torch.arange(self.num_envs, device=self.device)
        self._needs_reset = True
        self._closed = False

    # ------------------------------------------------------------------ public API
    def reset(self, seed: int | None = None, mask: torch.Tensor | None = None) -> Obs:
        """Reset all envs, or those where ``mask`` (N,) bool is True; returns obs of ALL envs.

        ``seed`` re-seeds the generator first, so ``reset(seed=s)`` always gives the same initial states.
        """
        self._check_open()
        if seed is not None:
            self._generator.manual_seed(int(seed))
        if mask is None:
            ids = self._all_ids
        else:
            mask = self._check_mask(mask)
            if self._needs_reset and not bool(mask.all()):
                raise RuntimeError("the first reset must reset every env: call reset() without mask first")
            ids = mask.nonzero().squeeze(1)
        self._reset_ids(ids)
        self._needs_reset = False
        return self.task.observe(self.backend.state)

    def step(self, action: torch.Tensor) -> tuple[Obs, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Advance one control step; finished envs are reset in the same call.

        Args:
            action: (N, Da) float32, normalised absolute targets; finite values outside [-1, 1] are clipped.

        Returns:
            obs (dict of (N, ...) float32), reward (N,) float32, terminated (N,) bool (success),
            truncated (N,) bool (time limit), info with ``final_obs`` (obs before auto-reset; equal to obs for
            envs that did not finish) and ``success`` (N,) bool.
        """
        self._check_open()
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        action = self._check_action(action)
        state = self.backend.state
        state.ctrl.copy_(self.task.action_to_ctrl(action, state))
        self.backend.step(self.decimation)
        self._elapsed += 1
        obs, reward, success = self.task.compute(state)
        terminated = success
        truncated = (self._elapsed >= self.max_episode_steps) & ~terminated
        done = terminated | truncated
        final_obs = obs
        if bool(done.any()):
            self._reset_ids(done.nonzero().squeeze(1))
            obs = self.task.observe(state)
        info = {"final_obs": final_obs, "success": success}
        return obs, reward, terminated, truncated, info

    @property
    def elapsed_steps(self) -> torch.Tensor:
        """(N,) int64 control steps since each env's last reset."""
        return self._elapsed.clone()

    def render(self, env_ids: list[int] | int | None = None, width: int = 256, height: int = 256,
               camera: str | int | None = None) -> np.ndarray:
        """RGB frames (n, H, W, 3) uint8 of ``env_ids`` (default: env 0). Set MUJOCO_GL=egl when headless."""
        self._check_open()
        if env_ids is None:
            env_ids = [0]
        elif isinstance(env_ids, int):
            env_ids = [env_ids]
        ids = [int(i) for i in env_ids]
        bad = [i for i in ids if not 0 <= i < self.num_envs]
        if bad:
            raise ValueError(f"env_ids {bad} out of range for num_envs={self.num_envs}")
        return self.backend.render(ids, int(width), int(height), [self.task.markers(i) for i in ids], camera)

    def close(self) -> None:
        if not self._closed:
            self.backend.close()
            self._closed = True

    def __enter__(self) -> "BatchedEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BatchedEnv(task={self.task_name!r}, num_envs={self.num_envs}, device={self.device}, "
                f"control_dt={self.control_dt:g}, max_episode_steps={self.max_episode_steps})")

    # ------------------------------------------------------------------ internals
    def _reset_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() == 0:
            return
        qpos, qvel = self.task.sample_reset(ids, self._generator, self.backend.qpos0)
        self.backend.reset(ids, qpos, qvel, self.task.initial_ctrl(qpos))
        self._elapsed[ids] = 0

    def _check_action(self, action: torch.Tensor) -> torch.Tensor:
        if not isinstance(action, torch.Tensor):
            raise TypeError(f"action must be a torch.Tensor of shape ({self.num_envs}, {self.task.act_dim}) "
                            f"float32, got {type(action).__name__}; wrap arrays with torch.as_tensor(a, "
                            f"dtype=torch.float32)")
        if action.dtype != torch.float32:
            raise TypeError(f"action dtype must be torch.float32, got {action.dtype}; convert with "
                            f"action.float()")
        if action.shape != (self.num_envs, self.task.act_dim):
            raise ValueError(f"action shape must be (num_envs, act_dim) = ({self.num_envs}, "
                             f"{self.task.act_dim}), got {tuple(action.shape)}")
        if action.device != self.device:
            raise ValueError(f"action is on {action.device} but the env runs on {self.device}; move it with "
                             f".to('{self.device}')")
        if self.allow_nonfinite_actions:
            return torch.nan_to_num(action, nan=0.0, posinf=1.0, neginf=-1.0).clamp_(-1.0, 1.0)
        if not bool(torch.isfinite(action).all()):
            bad = (~torch.isfinite(action)).any(dim=1).nonzero().squeeze(1).tolist()
            raise ValueError(f"action has NaN/inf entries in envs {bad[:10]}; fix the policy output or build "
                             f"the env with allow_nonfinite_actions=True to sanitise them")
        return action.clamp(-1.0, 1.0)

    def _check_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (self.num_envs,):
            got = (f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise ValueError(f"mask must be a bool tensor of shape ({self.num_envs},), got {got}")
        return mask.to(self.device)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this env is closed")
