"""SAC with automatic temperature and the WSRL warm start (agents/sac.py), on real MuJoCo envs."""
from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
import yaml

from distillery.agents.critics import TwinQ
from distillery.agents.sac import SACAgent
from distillery.envs import make_env
from distillery.evaluate import evaluate_policy, load_policy
from distillery.policies import GaussianPolicy
from distillery.runtime import save_checkpoint
from tests.helpers import ListLogger

SMALL = {"env_steps": 20, "learning_starts": 20, "batch_size": 32, "critic_hidden": [32, 32], "buffer_size": 2000,
         "log_every": 10_000, "checkpoint_every": 10_000, "utd_ratio": 0}


def make_policy(env, **cfg) -> GaussianPolicy:
    return GaussianPolicy(env.observation_spec, env.action_spec,
                          {"squash": True, "state_std": True, "hidden": [32, 32], "activation": "relu", **cfg})


def make_agent(tmp_path, task="push_cube", num_envs=4, seed=0, env_kwargs=None, **cfg) -> SACAgent:
    torch.manual_seed(seed)
    env = make_env(task, num_envs=num_envs, seed=seed, **(env_kwargs or {}))
    return SACAgent({**SMALL, **cfg}, make_policy(env), env, tmp_path, ListLogger(), seed=seed)


def params(*modules) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


def all_equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------- WSRL warm start
def offline_checkpoint(path, env, target_action: float):
    """A squashed Gaussian policy whose action is ~``target_action`` everywhere (std e^-5), plus a twin critic."""
    torch.manual_seed(123)
    policy = make_policy(env)
    obs = env.reset(seed=5)
    policy.set_obs_stats({"state": obs["state"].mean(0)}, {"state": torch.ones(obs["state"].shape[1])})
    with torch.no_grad():
        last = policy.net[-1]
        last.weight.zero_()
        da = policy.action_dim
        last.bias[:da] = math.atanh(target_action)  # mean head
        last.bias[da:] = -20.0                      # log-std head -> its lower bound
    obs_dim = env.observation_spec["state"].shape[0]
    critic = TwinQ(obs_dim, policy.action_dim, [32, 32], layer_norm=True)
    tensors = {f"model.{k}": v for k, v in policy.state_dict().items()}
    tensors.update({f"critic.{k}": v for k, v in critic.state_dict().items()})
    save_checkpoint(path, tensors, {"policy": policy.describe()})
    return policy, critic


def test_wsrl_warmup_collects_k_steps_with_frozen_policy_and_no_update(tmp_path):
    env = make_env("push_cube", num_envs=4, seed=0)
    offline_policy, offline_critic = offline_checkpoint(tmp_path / "offline", env, target_action=0.6)
    K = 6 * env.num_envs  # transitions: 6 batched steps
    torch.manual_seed(99)  # the agent's own policy starts from other weights: the checkpoint must replace them
    agent = SACAgent({**SMALL, "env_steps": K, "utd_ratio": 1, "warm_start": {"checkpoint": str(tmp_path / "offline"),
                                                                             "warmup_steps": K}},
                     make_policy(env), env, tmp_path / "run", ListLogger(), seed=0)
    initial = params(offline_policy, offline_critic)
    assert all_equal(params(agent.policy, agent.critic), initial)
    agent.train()
    # exactly K transitions went into the empty buffer, and nothing was updated
    assert agent.buffer.size == K and agent.updates == 0
    assert all_equal(params(agent.policy, agent.critic), initial)
    assert all_equal(params(agent.critic_target), params(offline_critic))
    assert agent.log_alpha.item() == pytest.approx(math.log(SACAgent.DEFAULTS["init_temperature"]))
    assert all(len(opt.state) == 0 for opt in (agent.actor_opt, agent.critic_opt, agent.alpha_opt))
    # the frozen offline policy acted (its actions sit at 0.6 +- a few std of e^-5), not uniform random actions
    acts = agent.buffer.action[:agent.buffer.size]
    assert (acts - 0.6).abs().max() < 0.05
    # online SAC starts right after the warm-up: the next batched step does utd_ratio = 1 update
    agent.cfg["env_steps"] = K + 1  # rounds up to the next whole batched step
    agent.train()
    assert agent.updates == 1 and agent.buffer.size == K + env.num_envs == agent.env_step
    assert not all_equal(params(agent.policy, agent.critic), initial)


def test_warm_start_refuses_an_unsquashed_policy_checkpoint(tmp_path):
    env = make_env("push_cube", num_envs=2, seed=0)
    plain = GaussianPolicy(env.observation_spec, env.action_spec, {"hidden": [32, 32]})
    save_checkpoint(tmp_path / "ppo", {f"model.{k}": v for k, v in plain.state_dict().items()},
                    {"policy": plain.describe()})
    with pytest.raises(ValueError, match="squash"):
        SACAgent({**SMALL, "warm_start": {"checkpoint": str(tmp_path / "ppo")}}, make_policy(env), env, tmp_path,
                 ListLogger())


# ---------------------------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("target_entropy, alpha_moves", [(None, "down"), (10.0, "up")])
def test_temperature_gradient_matches_closed_form_and_moves_alpha(tmp_path, target_entropy, alpha_moves):
    agent = make_agent(tmp_path, target_entropy=target_entropy, init_temperature=0.5)
    agent.train()  # 5 random-action steps: fills the buffer and fits the normaliser, no update (utd 0)
    batch = agent.buffer.sample(64, agent.generator)
    nobs, _ = agent.features(batch["obs"])
    _, logp = agent.policy.sample_and_log_prob(nobs, agent.generator)
    target = -2.0 if target_entropy is None else target_entropy  # default: -Da, push_cube has Da = 2
    entropy = -logp.mean().item()
    assert (entropy > target) == (alpha_moves == "down")
    agent.temperature_loss(logp).backward()
    # L = -alpha mean(log pi + H) with alpha = exp(log_alpha)  =>  dL/dlog_alpha = -alpha mean(log pi + H)
    expected = -0.5 * (logp.detach().double().mean().item() + target)
    assert agent.log_alpha.grad.item() == pytest.approx(expected, rel=1e-5)
    agent.alpha_opt.step()
    moved = agent.alpha.item() - 0.5
    assert (moved < 0) if alpha_moves == "down" else (moved > 0)
    # a whole SAC update moves it the same way
    before = agent.alpha.item()
    agent.update()
    assert (agent.alpha.item() < before) if alpha_moves == "down" else (agent.alpha.item() > before)


# ---------------------------------------------------------------------------------------------- critic target
@pytest.mark.parametrize("backup_entropy", [True, False])
def test_twin_q_target_matches_hand_computation(tmp_path, backup_entropy):
    agent = make_agent(tmp_path, gamma=0.97, backup_entropy=backup_entropy)
    agent.train()
    with torch.no_grad():  # make the target critic differ from the online one and alpha non-trivial
        for p in agent.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
        agent.log_alpha.fill_(math.log(0.3))
    b = agent.buffer.sample(4, agent.generator)
    b["reward"] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    b["terminated"] = torch.tensor([False, True, False, True])
    noise = torch.randn(4, 2, dtype=torch.float32)
    got = agent.td_target(b, noise=noise)

    # by hand, in float64: a' = tanh(mu + sigma eps), log pi = log N(u; mu, sigma) - sum log(1 - tanh(u)^2)
    pol = agent.policy
    x = pol.normalizer.normalize("state", b["next_obs"]["state"])
    with torch.no_grad():
        mu, log_std = pol.dist_params({"state": x.unsqueeze(1)})
    mu, std = mu.double(), log_std.double().exp()
    u = mu + std * noise.double()
    a = torch.tanh(u)
    logp = torch.distributions.Normal(mu, std).log_prob(u).sum(-1) - torch.log(1.0 - torch.tanh(u) ** 2).sum(-1)
    with torch.no_grad():
        inp = torch.cat([x, a.float()], 1)
        q_min = torch.minimum(agent.critic_target.q1(inp), agent.critic_target.q2(inp)).squeeze(1).double()
    soft_v = q_min - 0.3 * logp if backup_entropy else q_min
    expected = b["reward"].double() + 0.97 * (1.0 - b["terminated"].double()) * soft_v
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # terminal rows do not bootstrap at all
    torch.testing.assert_close(got[[1, 3]], b["reward"][[1, 3]])


def test_buffer_stores_pre_reset_final_obs_and_bootstraps_truncation(tmp_path):
    n, limit = 2, 3
    agent = make_agent(tmp_path, num_envs=n, env_steps=2 * limit * n, learning_starts=2 * limit * n,
                       env_kwargs={"max_episode_steps": limit})
    agent.train()
    buf = agent.buffer
    obs = buf.obs["state"][:buf.size].view(2 * limit, n, -1)  # rows are (step, env)
    nxt = buf.next_obs["state"][:buf.size].view(2 * limit, n, -1)
    for t in range(2 * limit - 1):
        if (t + 1) % limit:  # inside an episode: s' of step t is s of step t + 1
            assert torch.equal(nxt[t], obs[t + 1])
        else:  # time limit: s' is the last obs of the old episode, not the reset obs of the new one
            assert not torch.equal(nxt[t], obs[t + 1])
            assert (nxt[t, :, :2] - obs[t, :, :2]).abs().max() < 0.06  # the pusher moves <= 5 cm a step
    assert not buf.terminated[:buf.size].any()  # truncation is not termination: these rows bootstrap


# ---------------------------------------------------------------------------------------------- checkpoints
def test_save_load_resumes_updates_bit_exactly(tmp_path):
    a = make_agent(tmp_path / "a", env_steps=24, learning_starts=12, utd_ratio=1, batch_size=16)
    a.train()  # 4 envs: updates after batched steps 4, 5 and 6, then saves checkpoints/step_000000024
    assert a.updates == 3
    for _ in range(3):
        a.update()
    b = make_agent(tmp_path / "b", seed=1, env_steps=24, learning_starts=12, utd_ratio=1, batch_size=16)
    b.load(tmp_path / "a" / "checkpoints" / "last")
    assert (tmp_path / "a" / "checkpoints" / "step_000000024").is_dir()
    assert (b.env_step, b.updates, b.buffer.size, b.buffer.ptr) == (24, 3, 24, 24)
    # the checkpoint's model.* is a plain policy checkpoint: `distillery eval` / `export` load it
    deployed, meta = load_policy(tmp_path / "a")
    assert meta["agent"] == "sac" and all_equal(params(deployed), params(b.policy))
    for _ in range(3):
        b.update()
    assert all_equal(params(a.policy, a.critic, a.critic_target), params(b.policy, b.critic, b.critic_target))
    assert torch.equal(a.log_alpha, b.log_alpha)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(a.act_generator.get_state(), b.act_generator.get_state())


def test_overlapped_updates_match_alternating_ones_when_actions_ignore_the_learner(tmp_path):
    """Every action uniform random (the random phase never ends), so the data cannot depend on the learner: running
    each batched step's updates on the worker thread during the next env step must then give the same updates on
    the same replay rows as strict alternation, bit for bit, and the overlapped run must really use the worker."""
    agents, threads = [], []
    for overlap in (False, True):
        agent = make_agent(tmp_path / str(overlap), env_steps=40, learning_starts=12, utd_ratio=2, batch_size=16,
                           overlap_updates=overlap)
        dim = agent.env.observation_spec["state"].shape[0]
        agent.policy.set_obs_stats({"state": torch.zeros(dim)}, {"state": torch.ones(dim)})
        agent.random_until = 10 ** 9
        update = agent.update
        agent.update = lambda update=update: threads.append(threading.current_thread().name) or update()
        agent.train()
        agents.append(agent)
    a, b = agents
    assert a.updates == b.updates == 14  # batched steps 4..10 (env_step 16..40 > 12), 2 updates each
    assert all_equal(params(a.policy, a.critic, a.critic_target), params(b.policy, b.critic, b.critic_target))
    assert torch.equal(a.log_alpha, b.log_alpha) and torch.equal(a.buffer.action, b.buffer.action)
    # alternating: all on the main thread; overlapped: all but the last step's 2 on the worker
    main = threading.main_thread().name
    assert threads[:14] == [main] * 14
    assert all(t.startswith("sac-updates") for t in threads[14:26]) and threads[26:] == [main] * 2


def test_resume_without_saved_buffer_refills_before_updating(tmp_path):
    a = make_agent(tmp_path / "a", env_steps=16, learning_starts=8, utd_ratio=1, save_buffer=False)
    a.train()
    b = make_agent(tmp_path / "b", env_steps=16, learning_starts=8, utd_ratio=1, save_buffer=False)
    b.load(tmp_path / "a")
    assert b.buffer.size == 0 and b.collect_until == 16 + 8
    b.cfg["env_steps"] = 28
    b.train()  # batched steps 5, 6 refill with the current policy, step 7 updates
    assert b.updates == a.updates + 1 and b.buffer.size == 3 * 4


# ---------------------------------------------------------------------------------------------- config errors
def test_bad_config_and_policy_are_clear_errors(tmp_path):
    env = make_env("push_cube", num_envs=2, seed=0)
    with pytest.raises(ValueError, match="valid keys"):
        SACAgent({"utd": 2}, make_policy(env), env, tmp_path, ListLogger())
    with pytest.raises(ValueError, match="squash=true"):
        SACAgent({}, GaussianPolicy(env.observation_spec, env.action_spec, {"hidden": [8]}), env, tmp_path,
                 ListLogger())
    with pytest.raises(ValueError, match="gamma"):
        SACAgent({"gamma": 1.5}, make_policy(env), env, tmp_path, ListLogger())
    with pytest.raises(ValueError, match="learning_starts >= 1"):
        SACAgent({"learning_starts": 0}, make_policy(env), env, tmp_path, ListLogger())


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_short_sac_run_improves_deterministic_return_on_lift_cube(tmp_path):
    """300 batched steps of 16 envs (4,800 transitions), 2 updates a batched step: the deterministic (mean) policy moves
    the gripper towards the cube. Seeds 0, 1, 2 improved the mean return by 16, 13 and 12 over the initial
    policy (about -145.4); the bar is 5."""
    torch.manual_seed(0)
    env = make_env("lift_cube", num_envs=16, seed=0)
    eval_env = make_env("lift_cube", num_envs=16, seed=123)
    policy = make_policy(env, hidden=[128, 128])
    before, _ = evaluate_policy(policy, eval_env, 16, seed=7, sampler="mean")
    agent = SACAgent({"env_steps": 4800, "learning_starts": 320, "utd_ratio": 2, "batch_size": 128,
                      "critic_hidden": [128, 128], "buffer_size": 100_000, "gamma": 0.9, "lr": 1e-3, "tau": 0.01,
                      "init_temperature": 0.01, "log_every": 1600, "checkpoint_every": 160_000},
                     policy, env, tmp_path, ListLogger(), seed=0)
    agent.train()
    after, _ = evaluate_policy(policy, eval_env, 16, seed=7, sampler="mean")
    assert after["mean_return"] > before["mean_return"] + 5.0, (before["mean_return"], after["mean_return"])


def test_agent_yaml_lists_the_defaults():
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "agent" / "sac.yaml").read_text())
    assert cfg.pop("name") == "sac" and cfg.pop("num_envs") >= 1 and cfg == SACAgent.DEFAULTS
