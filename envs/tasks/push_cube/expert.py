"""Scripted push-to-pose expert for push_cube, vectorised over envs in torch.

Idea (re-planned every control step from ``obs["privileged"]``):

1. Pick one of the goal's four face normals ``a`` as the *approach axis* (the one closest to the cube-to-goal
   direction; kept until the cube overshoots or drifts far off the line).
2. The cube's *heading* is the normal of the face being pushed: a cube pushed through a face travels along
   that normal, and an off-centre contact turns it. So the cube is steered like a car: the desired heading
   points at a carrot ``L`` ahead of the cube's projection on the approach line, and the lateral contact
   offset follows a PD law on the heading error. Arriving along ``a`` with zero heading error means arriving
   with the goal yaw (mod 90 deg). The pushed face is kept (tracked through the cube's rotation) until the
   heading error exceeds 70 deg, so the choice does not chatter at 45 deg.
3. If the pusher sits at the contact point behind that face, push: the target leads the pusher by a few cm,
   less near the goal so the cube does not slide past it. Otherwise go to a pre-contact point; when the
   straight path would hit the cube, orbit it. If the pusher must reach the far side (> 135 deg around), the
   direction of the orbit is the episode's random ``side`` (+1 counter-clockwise, -1 clockwise), drawn from
   the expert's seeded generator at reset: demonstrations are multimodal.

Mistake mode (``mistakes`` > 0): that share of episodes brings the cube to the goal position in the wrong
orientation, ``_YAW_MISS`` (30-45 deg, beyond the 15 deg tolerance) off the goal yaw with a random sign, and
times out there: a demonstrator whose failures are systematic, not noise a learner averages away, and near
success, so that RL has a local correction to learn.

All geometry is in metres in the world frame; the action is the target's offset from the pusher divided by
``MAX_DELTA`` (the env's relative action scale).
"""
from __future__ import annotations

import math

import torch

from distillery.envs.tasks.common import ScriptedExpert, wrap_angle, wrap_quarter_turn
from distillery.envs.tasks.push_cube.task import CUBE_HALF, MAX_DELTA, PUSHER_RADIUS, WORKSPACE_HALF

_LOOKAHEAD = 0.10  # carrot distance on the approach line
_FACE_SWITCH = math.radians(70.0)  # re-choose the pushed face beyond this heading error
_YAW_GAIN = 0.04  # lateral contact offset (m) per radian of heading error
_YAW_DAMP = 0.004  # ... per rad/s of yaw rate
_MAX_OFFSET = 0.012
_CLEAR = CUBE_HALF * math.sqrt(2) + PUSHER_RADIUS + 0.008  # pusher centre never closer than this when circling
_ORBIT = _CLEAR + 0.015
_MAX_STEP = 0.035  # max target displacement per control step away from the pusher (speed limit)
_FAR_SIDE = math.radians(135.0)  # beyond this angle to go around, the episode's random side decides
_YAW_MISS = (math.radians(30.0), math.radians(45.0))  # |goal yaw error| of a mistaken episode (tolerance 15 deg)


def _rot90(v: torch.Tensor) -> torch.Tensor:
    return torch.stack([-v[:, 1], v[:, 0]], dim=1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


class PushCubeExpert(ScriptedExpert):
    """Push-to-pose feedback controller; see the module docstring.

    Args:
        num_envs: batch size N.
        noise: 0 = clean. > 0 adds gaussian action noise of this std and occasional random perturbations
            (a random target held for a few steps), for mixed-quality data.
        seed: seeds the expert's generator (side choices, noise, mistakes).
        mistakes: share of episodes that aim ``_YAW_MISS`` off the goal yaw (see the module docstring).
    """

    act_dim = 2
    has_mistakes = True

    def __init__(self, num_envs: int, noise: float = 0.0, seed: int = 0, mistakes: float = 0.0) -> None:
        super().__init__(num_envs, noise, seed, mistakes)
        self.yaw_offset = torch.zeros(num_envs, dtype=torch.float64)
        self.side = torch.ones(num_envs)
        self.axis = torch.full((num_envs,), -1, dtype=torch.int64)  # goal face index k, -1 = choose anew
        self.face = torch.full((num_envs,), torch.nan, dtype=torch.float64)  # world angle of the pushed face
        self.reset()

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Re-draw per-episode choices for envs where ``mask`` (N,) is True (all if None)."""
        mask = torch.ones(self.num_envs, dtype=torch.bool) if mask is None else mask.cpu()
        draws = torch.randint(0, 2, (self.num_envs,), generator=self.generator).float() * 2 - 1
        self.side = torch.where(mask, draws, self.side)
        self.axis = torch.where(mask, -1, self.axis)
        self.face = torch.where(mask, torch.nan, self.face)
        self.reset_perturbations(mask)
        if self.mistakes > 0:  # drawn only then, so the clean and noisy experts' streams are unchanged
            miss = torch.rand(self.num_envs, generator=self.generator, dtype=torch.float64) < self.mistakes
            low, high = _YAW_MISS
            size = torch.rand(self.num_envs, generator=self.generator, dtype=torch.float64) * (high - low) + low
            sign = torch.randint(0, 2, (self.num_envs,), generator=self.generator).double() * 2 - 1
            self.yaw_offset = torch.where(mask, sign * size * miss, self.yaw_offset)

    def command(self, priv: torch.Tensor) -> torch.Tensor:
        target = self._target(priv)
        if self.noise > 0:
            target = self.hold_random(target, 0.09).clamp(-WORKSPACE_HALF, WORKSPACE_HALF)
        return (target - priv[:, 0:2]) / MAX_DELTA

    # ------------------------------------------------------------------ controller
    def _target(self, priv: torch.Tensor) -> torch.Tensor:
        q, p, g = priv[:, 0:2], priv[:, 2:4], priv[:, 6:8]
        yaw = torch.atan2(priv[:, 5], priv[:, 4]) / 4  # cube yaw mod 90 deg
        goal_yaw = torch.atan2(priv[:, 9], priv[:, 8]) / 4 + self.yaw_offset
        yaw_err = wrap_quarter_turn(goal_yaw - yaw)
        e = g - p
        dist = e.norm(dim=1)

        # 1. approach axis: the goal face normal closest to the cube->goal direction, with hysteresis.
        ks = torch.arange(4, dtype=priv.dtype)
        ang = goal_yaw[:, None] + ks[None, :] * (math.pi / 2)
        axes = torch.stack([ang.cos(), ang.sin()], dim=2)  # (N, 4, 2)
        scores = (axes * e[:, None, :]).sum(dim=2)  # (N, 4)
        best = scores.argmax(dim=1)
        cur = self.axis.clamp(min=0)
        cur_axis = axes[torch.arange(len(cur)), cur]
        along_cur = _dot(e, cur_axis)
        off_line = (e - cur_axis * along_cur[:, None]).norm(dim=1)
        switch = (self.axis < 0) | (along_cur < -0.01) | ((off_line > 1.2 * along_cur) & (dist > 0.03))
        self.axis = torch.where(switch, best, self.axis)
        a = axes[torch.arange(len(cur)), self.axis]
        along = _dot(e, a)

        # 2. heading: the cube should travel towards a carrot on the approach line. A cube pushed through
        # a face moves along that face's normal, so steer the face normal (the cube's "heading") with the
        # lateral contact offset, like steering a car; a PD law on the heading error sets the offset.
        # The carrot stays _LOOKAHEAD beyond the cube's projection even past the goal, so the heading tends
        # to the approach axis on arrival, which is the goal yaw (mod 90).
        carrot = g - a * (along - _LOOKAHEAD)[:, None]
        heading = torch.atan2(carrot[:, 1] - p[:, 1], carrot[:, 0] - p[:, 0])
        # Keep pushing the same face (followed through the cube's rotation) unless it points too far off the
        # heading: re-choosing at 45 deg would chatter between two faces.
        quarter = math.pi / 2
        nearest = yaw + torch.round(wrap_angle(heading - yaw) / quarter) * quarter
        kept = yaw + torch.round(wrap_angle(self.face - yaw) / quarter) * quarter
        keep = ~torch.isnan(self.face) & (wrap_angle(heading - kept).abs() < _FACE_SWITCH)
        face = torch.where(keep, kept, nearest)
        self.face = face
        heading_err = wrap_angle(heading - face)
        u = torch.stack([face.cos(), face.sin()], dim=1)  # push direction = normal of the face pushed on
        u_perp = _rot90(u)
        yaw_rate = priv[:, 14]
        b_des = -(_YAW_GAIN * heading_err - _YAW_DAMP * yaw_rate).clamp(-_MAX_OFFSET, _MAX_OFFSET)
        touch = torch.full_like(dist, -(CUBE_HALF + PUSHER_RADIUS))  # pusher coordinate along u in contact

        rel = q - p
        a_c, b_c = _dot(rel, u), _dot(rel, u_perp)
        aligned = (a_c < touch + 0.012) & (a_c > touch - 0.05) & ((b_c - b_des).abs() < 0.012)

        # 3a. push: the target leads the pusher by `lead`, which sets the speed; slow down near the goal.
        lead = (0.5 * dist + 0.003).clamp(0.005, 0.03)
        push_target = p + u * (a_c + lead)[:, None] + u_perp * b_des[:, None]
        done = (dist < 0.006) & (yaw_err.abs() < math.radians(6.0))
        push_target = torch.where(done[:, None], q, push_target)

        # 3b. reposition: straight to the pre-contact point if the path is clear, else orbit the cube.
        pre = p + u * (touch - 0.025)[:, None] + u_perp * b_des[:, None]
        seg = pre - q
        t = (_dot(p - q, seg) / _dot(seg, seg).clamp(min=1e-12)).clamp(0.0, 1.0)
        clearance = (q + seg * t[:, None] - p).norm(dim=1)
        phi_q = torch.atan2(rel[:, 1], rel[:, 0])
        d_phi = wrap_angle(torch.atan2(pre[:, 1] - p[:, 1], pre[:, 0] - p[:, 0]) - phi_q)
        direction = torch.where(d_phi.abs() > _FAR_SIDE, self.side.double(), d_phi.sign())
        radius = rel.norm(dim=1)
        step = torch.where(radius < _CLEAR, math.radians(15.0), math.radians(50.0))
        phi_w = phi_q + direction * torch.minimum(d_phi.abs(), step)
        orbit = p + _ORBIT * torch.stack([phi_w.cos(), phi_w.sin()], dim=1)
        waypoint = torch.where((clearance > _CLEAR)[:, None], pre, orbit)
        move = waypoint - q
        move_len = move.norm(dim=1, keepdim=True)
        reposition = q + move * (_MAX_STEP / move_len.clamp(min=_MAX_STEP))

        return torch.where(aligned[:, None], push_target, reposition)
