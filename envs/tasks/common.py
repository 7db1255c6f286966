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
