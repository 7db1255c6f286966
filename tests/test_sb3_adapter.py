"""SB3VecEnv: SB3's own env checker on the single-env view with the same spaces, step-for-step agreement with the raw
BatchedEnv (auto-reset, terminal observations, time-limit flags, success), and SB3 PPO/SAC running on it."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

from stable_baselines3 import PPO, SAC  # noqa: E402
from stable_baselines3.common.env_checker import check_env  # noqa: E402
from stable_baselines3.common.vec_env import VecMonitor  # noqa: E402

from distillery.envs import make_env, make_expert  # noqa: E402
from distillery.envs.gym_view import GymTaskEnv  # noqa: E402
from distillery.envs.sb3_vec_env import SB3VecEnv  # noqa: E402


@pytest.mark.parametrize("task", ["push_cube", "lift_cube"])
def test_check_env_on_the_single_env_view_with_the_adapters_spaces(task):
    view = GymTaskEnv(task, seed=0)
    check_env(view, warn=True)  # raises on any violation of the gymnasium/SB3 contract
    vec = SB3VecEnv(make_env(task, 3, seed=0))
    assert vec.observation_space == view.observation_space
    assert vec.action_space == view.action_space
    assert vec.num_envs == 3
    view.close()
    vec.close()


def test_steps_match_the_raw_batched_env():
    """Same seed, same actions (a scripted expert with noise, so episodes both succeed and time out)."""
    n, limit = 6, 40
    raw = make_env("push_cube", n, seed=0, max_episode_steps=limit)
    vec = SB3VecEnv(make_env("push_cube", n, seed=0, max_episode_steps=limit))
    expert = make_expert("push_cube", n, noise=0.3, seed=1)
    vec.seed(11)
    got = vec.reset()
    obs = raw.reset(seed=11)
    np.testing.assert_array_equal(got, obs["state"].numpy())
    assert got.dtype == np.float32 and got.shape == (n, 10)
    saw = {"success": 0, "timeout": 0}
    for _ in range(3 * limit):
        action = expert(obs)
        obs, reward, terminated, truncated, info = raw.step(action)
        v_obs, v_rew, v_done, v_infos = vec.step(action.numpy())
        np.testing.assert_array_equal(v_obs, obs["state"].numpy())
        np.testing.assert_array_equal(v_rew, reward.numpy())
        np.testing.assert_array_equal(v_done, (terminated | truncated).numpy())
        for i, inf in enumerate(v_infos):
            assert inf["is_success"] == bool(info["success"][i])
            if v_done[i]:
                np.testing.assert_array_equal(inf["terminal_observation"], info["final_obs"]["state"][i].numpy())
                assert inf["TimeLimit.truncated"] == bool(truncated[i])
                saw["timeout" if truncated[i] else "success"] += 1
            else:
                assert "terminal_observation" not in inf and "TimeLimit.truncated" not in inf
        done = terminated | truncated
        if bool(done.any()):
            expert.reset(done)
    assert saw["success"] > 0 and saw["timeout"] > 0, saw  # both kinds of episode end were exercised
    vec.close()
    raw.close()


def test_adapter_errors_and_attributes():
    env = make_env("push_cube", 2, seed=0)
    with pytest.raises(ValueError, match="obs_key 'image' is not an observation group"):
        SB3VecEnv(env, obs_key="image")
    vec = SB3VecEnv(env)
    assert vec.get_attr("max_episode_steps") == [200, 200]
    assert vec.get_attr("max_episode_steps", indices=[1]) == [200]
    assert vec.env_is_wrapped(object) == [False, False]
    with pytest.raises(RuntimeError, match="step_async"):
        vec.step_wait()
    vec.close()


@pytest.mark.parametrize("algo", [PPO, SAC])
def test_sb3_algorithms_train_on_the_adapter(algo):
    vec = VecMonitor(SB3VecEnv(make_env("push_cube", 4, seed=0, max_episode_steps=20)))
    kw = dict(n_steps=16, batch_size=32, n_epochs=1) if algo is PPO else dict(learning_starts=32, batch_size=32)
    model = algo("MlpPolicy", vec, seed=0, device="cpu", policy_kwargs={"net_arch": [32, 32]}, **kw)
    model.learn(160)
    assert model.num_timesteps >= 160
    # VecMonitor saw whole 20-step episodes through the adapter's done flags
    assert len(model.ep_info_buffer) > 0 and all(ep["l"] <= 20 for ep in model.ep_info_buffer)
    action, _ = model.predict(vec.reset(), deterministic=True)
    assert action.shape == (4, 2) and np.all(np.abs(action) <= 1.0)
    vec.close()
