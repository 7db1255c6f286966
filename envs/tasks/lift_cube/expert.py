"""Scripted grasp-and-lift expert for lift_cube, vectorised over envs in torch.

A per-env phase machine, re-planned every control step from ``obs["privileged"]``:

    0 approach: hover 7 cm above the cube, yaw aligned with the cube's faces (cube yaw mod 90), fingers open
    1 descend:  lower to grasp height while tracking the cube's xy; back to 0 if it drifts away
    2 close:    close the fingers for a few steps at grasp height
    3 lift:     raise to 20 cm; back to 0 if the cube is no longer between the pads

Moves are rate-limited (a few cm per control step) so demonstrations are smooth.
"""
from __future__ import annotations

import math

import torch

from distillery.envs.tasks.common import ScriptedExpert, wrap_angle, wrap_quarter_turn
from distillery.envs.tasks.lift_cube.task import GRASP_OFFSET_Z, WIDTH_MAX, XY_HALF, YAW_HALF, Z_MAX

_HOVER_Z = 0.07
_GRASP_Z = 0.007
_LIFT_Z = 0.20
_CLOSE_STEPS = 3
_MAX_XY_STEP = 0.03
_MAX_Z_STEP = 0.03
APPROACH, DESCEND, CLOSE, LIFT = 0, 1, 2, 3


class LiftCubeExpert(ScriptedExpert):
    """Grasp-and-lift controller; see the module docstring.

    Args:
        num_envs: batch size N.
        noise: 0 = clean. > 0 adds gaussian action noise of this std and occasional random perturbations.
        seed: seeds the expert's generator (noise).
    """

    act_dim = 5

    def __init__(self, num_envs: int, noise: float = 0.0, seed: int = 0, mistakes: float = 0.0) -> None:
        super().__init__(num_envs, noise, seed, mistakes)
        self.phase = torch.zeros(num_envs, dtype=torch.int64)
        self.timer = torch.zeros(num_envs, dtype=torch.int64)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Restart the phase machine of envs where ``mask`` (N,) is True (all if None)."""
        mask = torch.ones(self.num_envs, dtype=torch.bool) if mask is None else mask.cpu()
        self.phase = torch.where(mask, APPROACH, self.phase)
        self.timer = torch.where(mask, 0, self.timer)
        self.reset_perturbations(mask)

    def command(self, priv: torch.Tensor) -> torch.Tensor:
        action = self._action(priv).float()
        return self.hold_random(action, 0.3) if self.noise > 0 else action

    def _action(self, priv: torch.Tensor) -> torch.Tensor:
        grip, grip_yaw = priv[:, 0:3], torch.atan2(priv[:, 4], priv[:, 3])
        cube = priv[:, 6:9]
        cube_yaw = torch.atan2(priv[:, 10], priv[:, 9]) / 4  # mod 90 deg, in (-45, 45]
        # The gripper is symmetric under 180 deg and the cube under 90 deg: aim for the closest equivalent yaw
        # within the actuator's +-90 deg.
        yaw_target = grip_yaw + wrap_quarter_turn(cube_yaw - grip_yaw)
        yaw_target = torch.where(yaw_target.abs() > YAW_HALF, wrap_angle(yaw_target + math.pi), yaw_target)
        xy_err = torch.hypot(cube[:, 0] - grip[:, 0], cube[:, 1] - grip[:, 1])
        yaw_err = wrap_quarter_turn(cube_yaw - grip_yaw).abs()
        rel_z = cube[:, 2] - grip[:, 2]
        held = (rel_z > GRASP_OFFSET_Z - 0.02) & (rel_z < GRASP_OFFSET_Z + 0.02) & (xy_err < 0.02)

        # Phase transitions (one per step at most, from the current phase).
        phase, timer = self.phase, self.timer
        to_descend = (phase == APPROACH) & (xy_err < 0.008) & (yaw_err < math.radians(6.0)) \
            & ((grip[:, 2] - _HOVER_Z).abs() < 0.02)
        to_close = (phase == DESCEND) & (grip[:, 2] < _GRASP_Z + 0.006) & (xy_err < 0.012)
        abort_descend = (phase == DESCEND) & (xy_err > 0.02)
        to_lift = (phase == CLOSE) & (timer >= _CLOSE_STEPS)
        dropped = (phase == LIFT) & ~held
        phase = torch.where(to_descend, DESCEND, phase)
        phase = torch.where(to_close, CLOSE, phase)
        phase = torch.where(to_lift, LIFT, phase)
        phase = torch.where(abort_descend | dropped, APPROACH, phase)
        self.timer = torch.where(phase == CLOSE, timer + 1, 0)
        self.phase = phase

        tx = torch.where(phase == LIFT, grip[:, 0], cube[:, 0])
        ty = torch.where(phase == LIFT, grip[:, 1], cube[:, 1])
        tz = torch.full_like(tx, _HOVER_Z)
        tz = torch.where(phase == DESCEND, torch.full_like(tz, _GRASP_Z), tz)
        tz = torch.where(phase == CLOSE, torch.full_like(tz, _GRASP_Z), tz)
        tz = torch.where(phase == LIFT, torch.full_like(tz, _LIFT_Z), tz)
        # Rise before moving sideways so open pads never sweep the cube.
        tz = torch.where((phase == APPROACH) & (xy_err > 0.02), torch.maximum(tz, grip[:, 2]), tz)
        width = torch.where((phase == CLOSE) | (phase == LIFT), 0.0, WIDTH_MAX)
        yaw = torch.where(phase == LIFT, grip_yaw, yaw_target)

        dxy = torch.stack([tx - grip[:, 0], ty - grip[:, 1]], dim=1)
        scale = (_MAX_XY_STEP / torch.hypot(dxy[:, 0], dxy[:, 1]).clamp(min=_MAX_XY_STEP))[:, None]
        xy = grip[:, 0:2] + dxy * scale
        z = grip[:, 2] + (tz - grip[:, 2]).clamp(-_MAX_Z_STEP, _MAX_Z_STEP)
        return torch.stack([xy[:, 0] / XY_HALF, xy[:, 1] / XY_HALF, z * (2 / Z_MAX) - 1.0, yaw / YAW_HALF,
                            width * (2 / WIDTH_MAX) - 1.0], dim=1)
