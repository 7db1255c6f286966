"""push_cube task functions (see the package docstring for the design)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from distillery.envs.core import Marker, SimState, Task
from distillery.envs.tasks.common import quat_yaw, uniform, wrap_quarter_turn
from distillery.specs import ObservationSpec, TensorSpec

CUBE_HALF = 0.025
PUSHER_RADIUS = 0.015
WORKSPACE_HALF = 0.3  # pusher targets stay within +-0.3 m (the actuators' ctrlrange)
# Action +-1 <-> a target +-5 cm from the pusher's current position. Relative targets because pushing to a
# pose is steered by centimetre leads and millimetre contact offsets: as absolute targets over the 60 cm
# workspace those are a few percent of the action range, below what imitation reproduces (policies trained
# on absolute targets lagged the expert by ~1 cm and rarely moved the cube); relative, they span it.
MAX_DELTA = 0.05
SPAWN_HALF = 0.18  # cube and goal centres lie in [-0.18, 0.18]^2: a full cube width from the action limit
POS_TOL = 0.02
YAW_TOL = math.radians(15.0)
SUCCESS_BONUS = 10.0

STATE_DIM = 10
PRIVILEGED_DIM = 16


class PushCubeTask(Task):
    """Push a free cube to a goal pose with a planar pusher; see :mod:`distillery.envs.tasks.push_cube`.

    Args:
        num_envs: number of envs.
        device: torch device of the task state.
        min_goal_distance: minimum initial cube-to-goal distance in metres.
    """

    name = "push_cube"
    xml_path = Path(__file__).with_name("push_cube.xml")
    act_dim = 2
    default_decimation = 20  # 20 x 5 ms = 10 Hz control
    default_max_episode_steps = 200

    def __init__(self, num_envs: int, device: torch.device, min_goal_distance: float = 0.1) -> None:
        super().__init__(num_envs, device)
        if not 0.0 <= min_goal_distance < 2 * SPAWN_HALF:
            raise ValueError(f"min_goal_distance must be in [0, {2 * SPAWN_HALF}) m, got {min_goal_distance}")
        self.min_goal_distance = float(min_goal_distance)
        # Goal pose (x, y, yaw) per env: task state, never simulated.
        self.goal = torch.zeros(num_envs, 3, dtype=torch.float64, device=device)
        # float32 copies for the per-step maths (positions need ~1e-6 m, far below the 2 cm tolerance).
        self._goal_xy32 = torch.zeros(num_envs, 2, dtype=torch.float32, device=device)
        self._goal_yaw32 = torch.zeros(num_envs, dtype=torch.float32, device=device)
        self._goal_enc = torch.zeros(num_envs, 4, dtype=torch.float32, device=device)

    def observation_spec(self) -> ObservationSpec:
        return {
            "state": TensorSpec((STATE_DIM,), "float32", description=(
                "pusher xy, cube xy, cube (cos 4yaw, sin 4yaw), goal xy, goal (cos 4yaw, sin 4yaw); metres")),
            "privileged": TensorSpec((PRIVILEGED_DIM,), "float32", description=(
                "state, pusher vxy, cube vxy, cube yaw rate, pusher-to-cube surface gap (m, 0 = contact)")),
        }

    def action_to_ctrl(self, action: torch.Tensor, state: SimState) -> torch.Tensor:
        # Relative target: the pusher is sent up to MAX_DELTA from where it is now, within the workspace.
        target = state.qpos[:, 0:2] + action.to(torch.float64) * MAX_DELTA
        return target.clamp(-WORKSPACE_HALF, WORKSPACE_HALF)

    def sample_reset(self, ids: torch.Tensor, generator: torch.Generator,
                     qpos0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = ids.numel()
        cube_xy = uniform(generator, (m, 2), -SPAWN_HALF, SPAWN_HALF)
        # Goal at least min_goal_distance away: draw a direction and a distance, reflect back into the spawn
        # square if needed (reflection keeps the distance >= the minimum only approximately, so re-check).
        goal_xy = uniform(generator, (m, 2), -SPAWN_HALF, SPAWN_HALF)
        for _ in range(8):  # vectorised rejection sampling; 8 rounds leave ~1e-6 of draws unresolved
            bad = (goal_xy - cube_xy).norm(dim=1) < self.min_goal_distance
            if not bool(bad.any()):
                break
            fresh = uniform(generator, (m, 2), -SPAWN_HALF, SPAWN_HALF)
            goal_xy = torch.where(bad[:, None], fresh, goal_xy)
        bad = (goal_xy - cube_xy).norm(dim=1) < self.min_goal_distance
        goal_xy = torch.where(bad[:, None], -cube_xy.sign() * SPAWN_HALF, goal_xy)  # far corner fallback
        cube_yaw = uniform(generator, (m,), -math.pi, math.pi)
        goal_yaw = uniform(generator, (m,), -math.pi / 4, math.pi / 4)
        # Pusher starts 8-15 cm from the cube centre in a random direction (never touching it).
        phi = uniform(generator, (m,), -math.pi, math.pi)
        rad = uniform(generator, (m,), 0.08, 0.15)
        pusher_xy = cube_xy + rad[:, None] * torch.stack([phi.cos(), phi.sin()], dim=1)
        pusher_xy = pusher_xy.clamp(-WORKSPACE_HALF + 0.03, WORKSPACE_HALF - 0.03)

        qpos = qpos0.to(torch.float64).expand(m, -1).clone()
        qpos[:, 0:2] = pusher_xy
        qpos[:, 2:4] = cube_xy
        qpos[:, 4] = CUBE_HALF
        half = 0.5 * cube_yaw
        qpos[:, 5] = half.cos()
        qpos[:, 6:8] = 0.0
        qpos[:, 8] = half.sin()
        qvel = torch.zeros(m, 8, dtype=torch.float64)

        ids = ids.to(self.device)
        goal = torch.cat([goal_xy, goal_yaw[:, None]], dim=1).to(self.device)
        self.goal[ids] = goal
        self._goal_xy32[ids] = goal[:, 0:2].float()
        self._goal_yaw32[ids] = goal[:, 2].float()
        self._goal_enc[ids] = torch.cat([goal_xy, torch.cos(4 * goal_yaw)[:, None],
                                         torch.sin(4 * goal_yaw)[:, None]], dim=1).to(self.device, torch.float32)
        return qpos.to(self.device), qvel.to(self.device)

    def initial_ctrl(self, qpos: torch.Tensor) -> torch.Tensor:
        return qpos[:, 0:2].clone()

    def observe(self, state: SimState) -> dict[str, torch.Tensor]:
        return self.compute(state)[0]

    def evaluate(self, state: SimState) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compute(state)[1:]

    def compute(self, state: SimState) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        # One contiguous float32 copy of each state array, then only elementwise ops: strided views of the
        # Batch rows and dim-reductions (which may start a thread pool) cost more than the maths here.
        qpos, qvel = state.qpos.float(), state.qvel.float()
        yaw = quat_yaw(qpos[:, 5:9])
        four = 4.0 * yaw
        pusher, cube = qpos[:, 0:2], qpos[:, 2:4]
        state_obs = torch.cat([qpos[:, 0:4], four.cos()[:, None], four.sin()[:, None], self._goal_enc], dim=1)
        gap = _surface_gap(pusher - cube, yaw)
        priv = torch.cat([state_obs, qvel[:, 0:4], qvel[:, 7:8], gap[:, None]], dim=1)

        err = self._goal_xy32 - cube
        pos_err = torch.hypot(err[:, 0], err[:, 1])
        yaw_err = wrap_quarter_turn(self._goal_yaw32 - yaw).abs()
        success = (pos_err < POS_TOL) & (yaw_err < YAW_TOL)
        # Dense costs in [-0.8, 0]: reach the cube, bring it to the goal, align it; plus the success bonus.
        reward = (-0.1 * torch.tanh(10.0 * gap.clamp(min=0.0)) - 0.5 * torch.tanh(5.0 * pos_err)
                  - (0.2 / (math.pi / 4)) * yaw_err + SUCCESS_BONUS * success)
        return {"state": state_obs, "privileged": priv}, reward, success

    def errors(self, state: SimState) -> tuple[torch.Tensor, torch.Tensor]:
        """Cube-to-goal position error (N,) in metres and absolute yaw error (N,) in radians (mod 90 deg)."""
        yaw = quat_yaw(state.qpos[:, 5:9])
        err = self.goal[:, 0:2] - state.qpos[:, 2:4]
        return torch.hypot(err[:, 0], err[:, 1]), wrap_quarter_turn(self.goal[:, 2] - yaw).abs()

    def markers(self, env_id: int) -> list[Marker]:
        x, y, yaw = (float(v) for v in self.goal[env_id])
        return [Marker("box", (CUBE_HALF, CUBE_HALF, 0.001), (x, y, 0.001), yaw, (0.1, 0.8, 0.2, 0.6))]


def _surface_gap(rel: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Distance (N,) from the pusher's surface to the cube's side faces; rel = pusher - cube (N, 2), world xy."""
    c, s = yaw.cos(), yaw.sin()
    local = torch.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]], dim=1).abs()
    excess = local - CUBE_HALF
    outside = torch.hypot(excess[:, 0].clamp(min=0.0), excess[:, 1].clamp(min=0.0))
    inside = torch.maximum(excess[:, 0], excess[:, 1]).clamp(max=0.0)  # < 0 if the axis is inside the box
    return outside + inside - PUSHER_RADIUS
