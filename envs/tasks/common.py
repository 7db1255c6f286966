"""Small torch helpers shared by the task modules (pose algebra on batched tensors)."""
from __future__ import annotations

import math

import torch

HALF_PI = math.pi / 2


def quat_yaw(quat: torch.Tensor) -> torch.Tensor:
    """Yaw (rotation about world z) of wxyz quaternions (..., 4) -> (...)."""
    w, x, y, z = quat.unbind(-1)
    return torch.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def wrap_quarter_turn(angle: torch.Tensor) -> torch.Tensor:
    """Wrap angles to [-pi/4, pi/4): the yaw of a cube is only defined modulo 90 degrees."""
    return torch.remainder(angle + math.pi / 4, HALF_PI) - math.pi / 4


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """Wrap angles to [-pi, pi)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def yaw_quat(yaw: torch.Tensor) -> torch.Tensor:
    """wxyz quaternions (..., 4) of pure rotations by ``yaw`` (...) about z."""
    half = 0.5 * yaw
    zero = torch.zeros_like(yaw)
    return torch.stack([torch.cos(half), zero, zero, torch.sin(half)], dim=-1)


def uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform draws in [low, high) from ``generator`` (CPU) so seeded resets are reproducible."""
    return torch.rand(shape, generator=generator, dtype=dtype) * (high - low) + low


class ScriptedExpert:
    """Base of the tasks' scripted experts: batch size, seeded generator and the ``noise`` knob.

    ``noise`` > 0 makes mixed-quality demonstrations: :meth:`hold_random` occasionally replaces the
    command by a random one held for a few steps, and subclasses add Gaussian action noise of that std.
    ``mistakes`` is the share of episodes (drawn at each reset) that a subclass with a mistake mode
    (``has_mistakes``) plays with a systematic error of its own, e.g. aiming off the goal.
    """

    act_dim: int
    has_mistakes = False

    def __init__(self, num_envs: int, noise: float = 0.0, seed: int = 0, mistakes: float = 0.0) -> None:
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if not 0.0 <= mistakes <= 1.0:
            raise ValueError(f"mistakes must be a share of episodes in [0, 1], got {mistakes}")
        if mistakes > 0 and not self.has_mistakes:
            raise ValueError(f"{type(self).__name__} has no mistake mode; use noise for mixed-quality data")
        self.num_envs = num_envs
        self.noise = float(noise)
        self.mistakes = float(mistakes)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.perturb_left = torch.zeros(num_envs, dtype=torch.int64)
        self.perturb_value: torch.Tensor | None = None

    def command(self, priv: torch.Tensor) -> torch.Tensor:
        """The action before Gaussian noise (N, Da) from privileged observations (N, Dp) float64 on the CPU."""
        raise NotImplementedError

    def __call__(self, obs: dict[str, torch.Tensor], active: torch.Tensor | None = None) -> torch.Tensor:
        """Actions (N, Da) in [-1, 1] from ``obs["privileged"]``; ``active`` is accepted for the rollout
        protocol (the controller is cheap, so every env is computed)."""
        priv = obs["privileged"]
        action = self.command(priv.detach().cpu().double()).float()
        if self.noise > 0:
            action = action + self.noise * torch.randn(action.shape, generator=self.generator)
        return action.clamp(-1.0, 1.0).to(priv.device)

    def reset_perturbations(self, mask: torch.Tensor) -> None:
        self.perturb_left = torch.where(mask, 0, self.perturb_left)

    def hold_random(self, value: torch.Tensor, spread: float) -> torch.Tensor:
        """With probability min(0.05, noise / 4) per step, replace ``value`` (N, D) by ``value`` plus a
        uniform offset in [-spread, spread] and hold that for 2-6 steps."""
        n = self.num_envs
        start = (self.perturb_left == 0) & (torch.rand(n, generator=self.generator) < min(0.05, 0.25 * self.noise))
        length = torch.randint(2, 7, (n,), generator=self.generator)
        offset = (torch.rand(value.shape, generator=self.generator, dtype=value.dtype) * 2 - 1) * spread
        held = self.perturb_value if self.perturb_value is not None else value
        self.perturb_value = torch.where(start[:, None], value + offset, held)
        self.perturb_left = torch.where(start, length, self.perturb_left)
        active = self.perturb_left > 0
        self.perturb_left = (self.perturb_left - 1).clamp(min=0)
        return torch.where(active[:, None], self.perturb_value, value)
