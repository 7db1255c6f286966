"""push_cube: push a free 5 cm cube to a goal pose (position + yaw mod 90 deg) with a planar pusher.

Model (push_cube.xml): table plane; a capsule pusher (radius 1.5 cm, 1 kg) on two slide joints x, y, hovering
5 mm above the table so its only contact is the cube; PD position actuators (kp 200, kv 25, |force| <= 15 N)
track xy targets; a free 0.1 kg cube (friction 0.5 on the table, 0.3 against the pusher). Timestep
5 ms, ``decimation`` 20 physics steps per control step -> 10 Hz control (kwarg); ``max_episode_steps`` 200
(20 s, kwarg). Contacts: at most cube-table (4) + cube-pusher (1).

Action (2,): pusher target relative to the pusher's current position, normalised:
target = pusher xy + 0.05 m * action (clipped to the +-0.3 m workspace), action in [-1, 1].

Reset distribution (from the env's seeded generator): cube and goal centres uniform in [-0.18, 0.18]^2 m with
cube-goal distance >= ``min_goal_distance`` (0.1 m); cube yaw uniform in [-pi, pi), goal yaw in [-pi/4, pi/4)
(the cube is symmetric mod 90 deg); pusher 8-15 cm from the cube in a uniform direction.

Observation groups (float32):
  state (10,)       pusher xy | cube xy | cos 4yaw, sin 4yaw of the cube | goal xy | cos 4yaw, sin 4yaw of goal.
                    4*yaw makes the encoding continuous and unique under the cube's 90 deg symmetry.
  privileged (16,)  state | pusher vxy | cube vxy | cube yaw rate | pusher-surface-to-cube-side gap (m; ~0 in
                    contact, computed geometrically so it is exact at the current state).

Reward: -0.1 tanh(10 gap) - 0.5 tanh(5 |pos err|) - 0.2 |yaw err|/(pi/4)  (dense, in [-0.8, 0]) + 10 on success.
Success (-> terminated): cube centre within 2 cm of the goal and yaw error (mod 90 deg) < 15 deg.

Expert: :class:`PushCubeExpert` (expert.py): approach-axis pushing with random-side circling (multimodal).
"""
from distillery.envs.tasks.push_cube.expert import PushCubeExpert
from distillery.envs.tasks.push_cube.task import PushCubeTask

__all__ = ["PushCubeExpert", "PushCubeTask"]
