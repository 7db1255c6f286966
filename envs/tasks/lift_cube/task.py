"""lift_cube task functions (see the package docstring for the design)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from distillery.envs.core import SimState, Task
from distillery.envs.tasks.common import quat_yaw, uniform
from distillery.specs import ObservationSpec, TensorSpec

CUBE_HALF = 0.02
XY_HALF = 0.25  # action +-1 <-> +-0.25 m
Z_MAX = 0.25  # action -1 -> z = 0, +1 -> z = 0.25 m
YAW_HALF = math.pi / 2  # action +-1 <-> +-90 deg
WIDTH_MAX = 0.08  # action -1 -> closed, +1 -> 8 cm between the pads
CUBE_SPAWN_HALF = 0.12
GRASP_OFFSET_Z = 0.012  # cube centre sits this far above the gripper origin in a good grasp
LIFT_HEIGHT = 0.10
HOLD_STEPS = 10
SUCCESS_BONUS = 10.0
TOUCH_SCALE = 10.0  # newtons; touch readings are divided by this

STATE_DIM = 11
PRIVILEGED_DIM = 22


class LiftCubeTask(Task):
    """Grasp a cube and hold it >= 10 cm above its start for 10 control steps; see the package docstring.

    Args:
        num_envs: number of envs.
        device: torch device of the task state.
        lift_height: required lift above the initial cube height in metres.
        hold_steps: consecutive control steps the cube must stay lifted.
    """

    name = "lift_cube"
    xml_path = Path(__file__).with_name("lift_cube.xml")
    act_dim = 5
    default_decimation = 20  # 20 x 5 ms = 10 Hz control
    default_max_episode_steps = 150

    def __init__(self, num_envs: int, device: torch.device, lift_height: float = LIFT_HEIGHT,
                 hold_steps: int = HOLD_STEPS) -> None:
        super().__init__(num_envs, device)
        if not 0.0 < lift_height < Z_MAX - 0.05:
            raise ValueError(f"lift_height must be in (0, {Z_MAX - 0.05}) m, got {lift_height}")
        if hold_steps < 1:
            raise ValueError(f"hold_steps must be >= 1, got {hold_steps}")
        self.lift_height = float(lift_height)
        self.hold_steps = int(hold_steps)
        self.cube_z0 = torch.zeros(num_envs, dtype=torch.float32, device=device)
        self.hold = torch.zeros(num_envs, dtype=torch.int64, device=device)

    def observation_spec(self) -> ObservationSpec:
        return {
            "state": TensorSpec((STATE_DIM,), "float32", description=(
                "gripper xyz, gripper (cos yaw, sin yaw), finger width, cube xyz, cube (cos 4yaw, sin 4yaw)")),
            "privileged": TensorSpec((PRIVILEGED_DIM,), "float32", description=(
                "state, gripper (vx, vy, vz, yaw rate), cube (vx, vy, vz), pad touch left/right (/10 N), "
                "cube height above start, hold progress in [0, 1]")),
        }

    def action_to_ctrl(self, action: torch.Tensor, state: SimState) -> torch.Tensor:
        a = action.to(torch.float64)
        half_width = (a[:, 4:5] + 1.0) * (WIDTH_MAX / 4)
        return torch.cat([a[:, 0:2] * XY_HALF, (a[:, 2:3] + 1.0) * (Z_MAX / 2), a[:, 3:4] * YAW_HALF,
                          half_width, half_width], dim=1)

    def sample_reset(self, ids: torch.Tensor, generator: torch.Generator,
                     qpos0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = ids.numel()
        qpos = qpos0.to(torch.float64).expand(m, -1).clone()
        qpos[:, 0:2] = uniform(generator, (m, 2), -0.1, 0.1)  # gripper xy
        qpos[:, 2] = 0.15  # gripper z: pads 15 cm above the table
        qpos[:, 3] = 0.0
        qpos[:, 4:6] = WIDTH_MAX / 2  # fully open
        qpos[:, 6:8] = uniform(generator, (m, 2), -CUBE_SPAWN_HALF, CUBE_SPAWN_HALF)
        qpos[:, 8] = CUBE_HALF
        half = 0.5 * uniform(generator, (m,), -math.pi, math.pi)
        qpos[:, 9] = half.cos()
        qpos[:, 10:12] = 0.0
        qpos[:, 12] = half.sin()
        qvel = torch.zeros(m, 12, dtype=torch.float64)
        ids = ids.to(self.device)
        self.cube_z0[ids] = CUBE_HALF
        self.hold[ids] = 0
        return qpos.to(self.device), qvel.to(self.device)

    def initial_ctrl(self, qpos: torch.Tensor) -> torch.Tensor:
        return qpos[:, 0:6].clone()

    def observe(self, state: SimState) -> dict[str, torch.Tensor]:
        return self._features(state)[0]

    def evaluate(self, state: SimState) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compute(state)[1:]

    def compute(self, state: SimState) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        obs, lifted_by, reach = self._features(state, advance=True)
        success = self.hold >= self.hold_steps
        # Dense costs in [-1, 0]: bring the grasp point to the cube, then lift it; plus the success bonus.
        lift_progress = (lifted_by / self.lift_height).clamp(0.0, 1.0)
        reward = -0.3 * torch.tanh(10.0 * reach) - 0.7 * (1.0 - lift_progress) + SUCCESS_BONUS * success
        return obs, reward, success

    def _features(self, state: SimState, advance: bool = False
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        qpos, qvel = state.qpos.float(), state.qvel.float()
        grip_yaw = qpos[:, 3:4]
        four = 4.0 * quat_yaw(qpos[:, 9:13])[:, None]
        width = qpos[:, 4:5] + qpos[:, 5:6]
        state_obs = torch.cat([qpos[:, 0:3], grip_yaw.cos(), grip_yaw.sin(), width, qpos[:, 6:9], four.cos(),
                               four.sin()], dim=1)
        lifted_by = qpos[:, 8] - self.cube_z0
        if advance:
            # Hold counter: consecutive control steps with the cube >= lift_height above its start.
            self.hold = torch.where(lifted_by >= self.lift_height, self.hold + 1, 0)
        rel = qpos[:, 6:9] - qpos[:, 0:3]
        reach = torch.hypot(torch.hypot(rel[:, 0], rel[:, 1]), rel[:, 2] - GRASP_OFFSET_Z)
        progress = (self.hold.float() / self.hold_steps).clamp(max=1.0)
        priv = torch.cat([state_obs, qvel[:, 0:4], qvel[:, 6:9], state.sensordata.float() / TOUCH_SCALE,
                          lifted_by[:, None], progress[:, None]], dim=1)
        return {"state": state_obs, "privileged": priv}, lifted_by, reach
