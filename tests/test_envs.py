"""BatchedEnv contract tests: specs, validation, seeding, resets, physics parity, task maths, gym view."""
from __future__ import annotations

import math
import os
import warnings

import mujoco
import numpy as np
import pytest
import torch

from distillery.envs import TASKS, make_env
from distillery.envs.tasks.common import yaw_quat
from distillery.specs import TensorSpec


def _random_actions(num_envs: int, act_dim: int, steps: int, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(steps, num_envs, act_dim, generator=g) * 2 - 1


@pytest.mark.parametrize("task", TASKS)
def test_specs_shapes_and_dtypes(task: str) -> None:
    env = make_env(task, 3, seed=0)
    assert env.num_envs == 3 and env.task_name == task and env.device == torch.device("cpu")
    assert env.action_spec == TensorSpec((env.task.act_dim,), "float32", -1.0, 1.0)
    assert set(env.observation_spec) == {"state", "privileged"}
    assert env.control_dt == pytest.approx(env.decimation * env.backend.model.opt.timestep)
    obs = env.reset()
    action = torch.zeros(3, env.task.act_dim)
    obs2, reward, terminated, truncated, info = env.step(action)
    for o in (obs, obs2, info["final_obs"]):
        assert set(o) == set(env.observation_spec)
        for k, spec in env.observation_spec.items():
            assert o[k].shape == (3, *spec.shape) and o[k].dtype == torch.float32
            assert torch.isfinite(o[k]).all()
    assert reward.shape == (3,) and reward.dtype == torch.float32
    assert terminated.dtype == torch.bool and truncated.dtype == torch.bool and info["success"].dtype == torch.bool
    assert terminated.shape == truncated.shape == info["success"].shape == (3,)
    # Observations are fresh tensors, not aliases of the live simulator state.
    before = obs2["state"].clone()
    env.step(action)
    assert torch.equal(obs2["state"], before)


def test_action_validation_errors() -> None:
    env = make_env("push_cube", 2, seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(2, 2))
    env.reset()
    with pytest.raises(ValueError, match=r"shape must be \(num_envs, act_dim\) = \(2, 2\)"):
        env.step(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(2))
    with pytest.raises(TypeError, match="float32"):
        env.step(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        env.step(np.zeros((2, 2), dtype=np.float32))
    bad = torch.zeros(2, 2)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf entries in envs \[1\]"):
        env.step(bad)
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match="allow_nonfinite_actions"):
        env.step(bad)
    with pytest.raises(ValueError, match="mask"):
        env.reset(mask=torch.ones(3, dtype=torch.bool))


def test_nonfinite_actions_sanitised_when_allowed() -> None:
    a = make_env("push_cube", 2, seed=0, allow_nonfinite_actions=True)
    b = make_env("push_cube", 2, seed=0)
    a.reset(), b.reset()
    bad = torch.tensor([[float("nan"), float("inf")], [float("-inf"), 0.5]])
    obs_a = a.step(bad)[0]
    obs_b = b.step(torch.tensor([[0.0, 1.0], [-1.0, 0.5]]))[0]
    assert torch.equal(obs_a["privileged"], obs_b["privileged"])


def test_out_of_range_actions_are_clipped() -> None:
    a, b = make_env("push_cube", 2, seed=4), make_env("push_cube", 2, seed=4)
    a.reset(), b.reset()
    for _ in range(3):
        pusher = a.backend.state.qpos[0, 0:2].clone()
        obs_a = a.step(torch.tensor([[5.0, -3.0], [0.2, 1.5]]))[0]
        obs_b = b.step(torch.tensor([[1.0, -1.0], [0.2, 1.0]]))[0]
    assert torch.equal(obs_a["privileged"], obs_b["privileged"])
    # push_cube actions are targets relative to the pusher: +-1 is +-5 cm from where it was
    expected = pusher + torch.tensor([0.05, -0.05], dtype=torch.float64)
    assert torch.equal(a.backend.state.ctrl[0], expected)


def test_unknown_names_and_reserved_backends() -> None:
    with pytest.raises(ValueError, match="push_cube, lift_cube"):
        make_env("push_cubes", 1)
    with pytest.raises(ValueError, match="mujoco"):
        make_env("push_cube", 1, backend="bullet")
    with pytest.raises(NotImplementedError, match="mjwarp"):
        make_env("push_cube", 1, backend="mjwarp")
    with pytest.raises(TypeError, match="push_cube"):
        make_env("push_cube", 1, not_a_kwarg=3)
    with pytest.raises(ValueError, match="num_envs"):
        make_env("push_cube", 0)


@pytest.mark.parametrize("task", TASKS)
def test_seeded_determinism(task: str) -> None:
    n, steps = 4, 25
    envs = [make_env(task, n, seed=s) for s in (7, 7, 8)]
    obs = [e.reset() for e in envs]
    actions = _random_actions(n, envs[0].task.act_dim, steps)
    traj: list[list[torch.Tensor]] = [[o["privileged"]] for o in obs]
    for t in range(steps):
        for i, e in enumerate(envs):
            traj[i].append(e.step(actions[t])[0]["privileged"])
    same = torch.stack(traj[0]), torch.stack(traj[1])
    assert torch.equal(*same)  # bit-identical
    assert not torch.equal(torch.stack(traj[0][:1]), torch.stack(traj[2][:1]))  # seeds differ at reset
    # reset(seed=s) re-seeds: the initial state depends only on s.
    again = envs[2].reset(seed=7)
    assert torch.equal(again["privileged"], traj[0][0])


def test_masked_reset_touches_only_masked_envs() -> None:
    n = 5
    env, ref = make_env("push_cube", n, seed=3), make_env("push_cube", n, seed=3)
    env.reset(), ref.reset()
    actions = _random_actions(n, 2, 12)
    for t in range(6):
        env.step(actions[t]), ref.step(actions[t])
    mask = torch.tensor([True, False, True, False, False])
    qpos_before = env.backend.state.qpos.clone()
    obs = env.reset(mask=mask)
    qpos_after = env.backend.state.qpos
    assert torch.equal(qpos_after[~mask], qpos_before[~mask])
    assert not torch.equal(qpos_after[mask], qpos_before[mask])
    assert torch.equal(env.elapsed_steps, torch.tensor([0, 6, 0, 6, 6]))
    assert torch.all(qpos_after[mask, 6:8] == 0) and torch.all(env.backend.state.qvel[mask] == 0)
    assert torch.equal(obs["state"][~mask], ref.task.observe(ref.backend.state)["state"][~mask])
    # Untouched envs keep evolving exactly as in an env that never reset.
    for t in range(6, 12):
        o = env.step(actions[t])[0]
        r = ref.step(actions[t])[0]
    assert torch.equal(o["privileged"][~mask], r["privileged"][~mask])


@pytest.mark.parametrize("task", TASKS)
def test_truncation_auto_reset_and_final_obs(task: str) -> None:
    n, horizon = 3, 6
    short = make_env(task, n, seed=11, max_episode_steps=horizon)
    long = make_env(task, n, seed=11, max_episode_steps=1000)
    fresh = make_env(task, n, seed=11)
    short.reset(), long.reset(), fresh.reset()
    second_reset = fresh.reset()  # the generator's next draws are what the auto-reset must use
    actions = _random_actions(n, short.task.act_dim, horizon, seed=5) * 0.1  # gentle: no success in 6 steps
    for t in range(horizon):
        obs, _, term, trunc, info = short.step(actions[t])
        ref_obs = long.step(actions[t])[0]
        assert not term.any()
        if t < horizon - 1:
            assert not trunc.any()
            assert torch.equal(obs["privileged"], ref_obs["privileged"])
    assert trunc.all()
    for k in obs:
        assert torch.equal(info["final_obs"][k], ref_obs[k])  # last obs of the finished episode
        assert torch.equal(obs[k], second_reset[k])  # and a fresh reset obs is returned
    assert torch.equal(short.elapsed_steps, torch.zeros(n, dtype=torch.int64))


def test_auto_reset_only_finished_envs() -> None:
    env = make_env("push_cube", 2, seed=0, max_episode_steps=3)
    env.reset()
    env.step(torch.zeros(2, 2))
    env.reset(mask=torch.tensor([False, True]))  # env 1 restarts its clock
    env.step(torch.zeros(2, 2))
    obs, _, _, trunc, info = env.step(torch.zeros(2, 2))
    assert trunc.tolist() == [True, False]
    assert torch.equal(info["final_obs"]["state"][1], obs["state"][1])
    assert not torch.equal(info["final_obs"]["state"][0], obs["state"][0])
    assert env.elapsed_steps.tolist() == [0, 2]


@pytest.mark.parametrize("task", TASKS)
def test_parity_with_single_mjdata_loop(task: str) -> None:
    n, steps = 3, 15
    env = make_env(task, n, seed=2)
    env.reset()
    model = env.backend.model
    state = env.backend.state
    datas = []
    for i in range(n):
        d = mujoco.MjData(model)
        mujoco.mj_resetData(model, d)
        d.qpos[:], d.qvel[:], d.ctrl[:] = state.qpos[i].numpy(), state.qvel[i].numpy(), state.ctrl[i].numpy()
        datas.append(d)
    actions = _random_actions(n, env.task.act_dim, steps, seed=9)
    for t in range(steps):
        ctrl = env.task.action_to_ctrl(actions[t], state).numpy()  # from the state the action is applied in
        env.step(actions[t])
        for i, d in enumerate(datas):
            d.ctrl[:] = ctrl[i]
            for _ in range(env.decimation):
                mujoco.mj_step(model, d)
    for i, d in enumerate(datas):
        np.testing.assert_allclose(state.qpos[i].numpy(), d.qpos, rtol=0, atol=1e-12)
        np.testing.assert_allclose(state.qvel[i].numpy(), d.qvel, rtol=0, atol=1e-12)
        np.testing.assert_allclose(state.sensordata[i].numpy(), d.sensordata, rtol=0, atol=1e-12)


def _set_cube(env, cube_xy: torch.Tensor, cube_yaw: torch.Tensor) -> None:
    qpos = env.backend.state.qpos
    qpos[:, 2:4] = cube_xy
    qpos[:, 5:9] = yaw_quat(cube_yaw)


def test_push_cube_success_and_reward_analytic() -> None:
    env = make_env("push_cube", 6, seed=0)
    env.reset()
    goal = env.task.goal.clone()
    deg = math.pi / 180
    # Offsets from the goal: ok, 2.5 cm off, 20 deg off, 90 deg off (symmetric -> ok), 1.5 cm & 12 deg (ok),
    # 44 deg off.
    dxy = torch.tensor([[0, 0], [0.025, 0], [0, 0], [0, 0], [0.009, -0.012], [0, 0]], dtype=torch.float64)
    dyaw = torch.tensor([0, 0, 20, 90, -12, 44], dtype=torch.float64) * deg
    _set_cube(env, goal[:, 0:2] + dxy, goal[:, 2] + dyaw)
    env.backend.state.qpos[:, 0:2] = goal[:, 0:2] + torch.tensor([0.2, 0.0], dtype=torch.float64)
    obs, reward, success = env.task.compute(env.backend.state)
    assert success.tolist() == [True, False, False, True, True, False]
    # Reward terms by hand; the pusher-to-cube gap from the pusher's offset in the cube frame.
    def gap_ref(dx: float, yaw: float) -> float:
        lx, ly = abs(dx * math.cos(yaw)), abs(dx * math.sin(yaw))
        return math.hypot(max(lx - 0.025, 0.0), max(ly - 0.025, 0.0)) - 0.015

    gap = gap_ref(0.2, goal[0, 2].item())
    expected0 = -0.1 * math.tanh(10 * gap) + 10.0
    expected1 = (-0.1 * math.tanh(10 * gap_ref(0.175, goal[1, 2].item())) - 0.5 * math.tanh(5 * 0.025))
    assert reward[0].item() == pytest.approx(expected0, abs=1e-5)
    assert reward[1].item() == pytest.approx(expected1, abs=1e-5)
    # State encodes the cube yaw as (cos 4yaw, sin 4yaw): 90 deg away encodes the same.
    assert torch.allclose(obs["state"][0, 4:6], obs["state"][0, 8:10], atol=1e-5)  # cube yaw == goal yaw
    assert torch.allclose(obs["state"][3, 4:6], obs["state"][3, 8:10], atol=1e-5)  # ... + 90 deg
    assert not torch.allclose(obs["state"][2, 4:6], obs["state"][2, 8:10], atol=1e-2)  # ... + 20 deg
    assert obs["privileged"][0, 15].item() == pytest.approx(gap, abs=1e-6)


def test_lift_cube_hold_counter_analytic() -> None:
    env = make_env("lift_cube", 2, seed=0, hold_steps=3)
    env.reset()
    qpos = env.backend.state.qpos
    qpos[0, 8] = 0.02 + 0.11  # lifted
    qpos[1, 8] = 0.02 + 0.09  # not high enough
    results = [env.task.compute(env.backend.state) for _ in range(3)]
    assert [r[2].tolist() for r in results] == [[False, False], [False, False], [True, False]]
    rel = (qpos[0, 6:9] - qpos[0, 0:3]).tolist()
    reach = math.sqrt(rel[0] ** 2 + rel[1] ** 2 + (rel[2] - 0.012) ** 2)
    # Fully lifted: only the reach term and the bonus are left.
    assert results[2][1][0].item() == pytest.approx(10.0 - 0.3 * math.tanh(10 * reach), abs=1e-4)
    assert results[0][1][1].item() == pytest.approx(-0.3 * math.tanh(10 * math.sqrt(
        sum(v ** 2 for v in (qpos[1, 6:8] - qpos[1, 0:2]).tolist()) + (0.11 - 0.15 - 0.012) ** 2)) - 0.7 * 0.1,
        abs=1e-4)
    qpos[0, 8] = 0.05  # dropped: the counter restarts
    assert not env.task.compute(env.backend.state)[2][0]
    assert env.task.hold[0].item() == 0


@pytest.mark.parametrize("task", TASKS)
def test_gymnasium_view_passes_env_checker(task: str) -> None:
    from gymnasium.utils.env_checker import check_env

    from distillery.envs.gym_view import GymTaskEnv

    env = GymTaskEnv(task, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unbounded Box warnings are expected
        check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=3)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    with pytest.raises(ValueError, match="state, privileged"):
        GymTaskEnv(task, obs_group="pixels")


def test_gymnasium_view_reports_last_obs_at_episode_end() -> None:
    from distillery.envs.gym_view import GymTaskEnv

    env = GymTaskEnv("push_cube", seed=1, obs_group="privileged", max_episode_steps=2)
    ref = make_env("push_cube", 1, seed=1)
    env.reset(seed=1), ref.reset(seed=1)
    action = np.array([0.3, -0.2], dtype=np.float32)
    for t in range(2):
        last, _, term, trunc, _ = env.step(action)
        ref_obs = ref.step(torch.from_numpy(action)[None])[0]
        assert trunc == (t == 1) and not term
    # Not the auto-reset state of the wrapped env: the episode's final observation.
    np.testing.assert_array_equal(last, ref_obs["privileged"][0].numpy())


def test_render_shapes() -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    env = make_env("push_cube", 2, seed=0)
    env.reset()
    try:
        frames = env.render([0, 1], width=64, height=48)
    except Exception as exc:  # no GL backend on this machine
        pytest.skip(f"rendering unavailable: {exc}")
    assert frames.shape == (2, 48, 64, 3) and frames.dtype == np.uint8
    assert frames.std() > 1.0 and not np.array_equal(frames[0], frames[1])
    with pytest.raises(ValueError, match="out of range"):
        env.render([2])
