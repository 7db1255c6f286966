"""lift_cube: grasp a free 4 cm cube with a floating parallel-jaw gripper and hold it 10 cm up.

Model (lift_cube.xml): table plane; a gravity-compensated gripper on slide joints x, y, z and a yaw hinge,
with two slide fingers (box pads, friction 1.5, condim 4 so the held cube cannot spin); PD position actuators
on all six joints (the two fingers share the width command); a free 50 g cube (friction 1.0). Elliptic friction
cones with impratio 10 keep the grasp from creeping. Timestep 5 ms, ``decimation`` 20 -> 10 Hz control
(kwarg); ``max_episode_steps`` 150 (kwarg). Touch sensors on both pads.

Action (5,), normalised to [-1, 1]: gripper target x, y (+-0.25 m), z (0 .. 0.25 m above the table),
yaw (+-90 deg), finger width (0 .. 8 cm; a width below the cube's squeezes it).

Reset distribution: cube centre uniform in [-0.12, 0.12]^2 m, yaw uniform; gripper open at 15 cm height,
xy uniform in [-0.1, 0.1]^2, yaw 0.

Observation groups (float32):
  state (11,)       gripper xyz | cos, sin of gripper yaw | finger width | cube xyz | cos, sin of 4 * cube yaw
  privileged (22,)  state | gripper vx, vy, vz, yaw rate | cube vx, vy, vz | pad touch left, right (N / 10) |
                    cube height above its start | hold progress (held steps / hold_steps)

Reward: -0.3 tanh(10 |grasp point - cube|) - 0.7 (1 - clip(lift / 0.1 m, 0, 1))  (in [-1, 0]) + 10 on success.
Success (-> terminated): cube >= ``lift_height`` (0.1 m) above its initial height for ``hold_steps`` (10)
consecutive control steps.

Expert: :class:`LiftCubeExpert` (expert.py): approach, align yaw (mod 90), descend, close, lift.
"""
from distillery.envs.tasks.lift_cube.expert import LiftCubeExpert
from distillery.envs.tasks.lift_cube.task import LiftCubeTask

__all__ = ["LiftCubeExpert", "LiftCubeTask"]
