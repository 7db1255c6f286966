"""GaussianPolicy (densities against torch.distributions), GAE against a hand-computed example, the PPO clip loss,
RunningMeanStd against numpy, and a short PPO run that must beat its own initialisation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillery.agents.ppo import PPOAgent, RunningMeanStd, compute_gae, ppo_clip_loss
from distillery.envs import make_env
from distillery.evaluate import evaluate_policy, load_policy
from distillery.policies import GaussianPolicy, make_policy, policy_from_description
from distillery.runtime import load_checkpoint, step_dir_name
from distillery.specs import TensorSpec
from helpers import ListLogger

OBS_SPEC = {"state": TensorSpec((3,)), "privileged": TensorSpec((4,))}
ACT_SPEC = TensorSpec((2,), low=-1.0, high=1.0)


def _policy(**cfg) -> GaussianPolicy:
    torch.manual_seed(0)
    p = make_policy("gaussian", OBS_SPEC, ACT_SPEC, {"hidden": [16, 16], **cfg})
    p.set_obs_stats({"state": torch.tensor([1.0, -2.0, 0.5])}, {"state": torch.tensor([2.0, 1.0, 4.0])})
    return p  # type: ignore[return-value]


def _nobs(p: GaussianPolicy, b: int = 6) -> dict[str, torch.Tensor]:
    x = torch.randn(b, 1, 3, generator=torch.Generator().manual_seed(1))
    return p.normalizer.normalize_dict({"state": x})


# ------------------------------------------------------------------------------------------ GaussianPolicy
def test_gaussian_densities_match_torch_distributions():
    p = _policy()
    nobs = _nobs(p)
    mean, log_std = p.dist_params(nobs)
    assert mean.shape == log_std.shape == (6, 2)
    assert torch.allclose(log_std, torch.full_like(log_std, -0.5))  # state-independent, at init_log_std
    a, lp = p.sample_and_log_prob(nobs, torch.Generator().manual_seed(2))
    ref = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(lp, ref.log_prob(a).sum(-1))
    torch.testing.assert_close(p.log_prob(nobs, a), lp)
    torch.testing.assert_close(p.entropy(nobs), ref.entropy().sum(-1))
    both = p.log_prob_and_entropy(nobs, a)  # PPO's one-forward-pass version
    torch.testing.assert_close(both[0], lp)
    torch.testing.assert_close(both[1], ref.entropy().sum(-1))


def test_squashed_gaussian_log_prob_matches_tanh_transform():
    p = _policy(squash=True, state_std=True, activation="relu", layer_norm=True)
    nobs = _nobs(p)
    mean, log_std = p.dist_params(nobs)
    assert bool((log_std >= -5.0).all() and (log_std <= 2.0).all())
    a, lp = p.sample_and_log_prob(nobs, torch.Generator().manual_seed(3))
    assert bool((a.abs() < 1).all())
    ref = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                      [torch.distributions.TanhTransform()])
    torch.testing.assert_close(lp, ref.log_prob(a).sum(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p.log_prob(nobs, a), lp, atol=1e-3, rtol=1e-4)


def test_gaussian_samplers_normaliser_and_rebuild():
    p = _policy()
    obs = {"state": torch.randn(5, 3)}
    # the normaliser applies the running stats written by set_obs_stats: (x - mean) / std
    n = p.normalizer.normalize("state", obs["state"])
    torch.testing.assert_close(n, (obs["state"] - torch.tensor([1.0, -2.0, 0.5])) / torch.tensor([2.0, 1.0, 4.0]))
    # later calls (an RL agent's per-step refresh) write only the observation statistics; a near-zero std centres
    actions = {k: v.clone() for k, v in p.normalizer.state_dict().items() if k.startswith("action")}
    p.set_obs_stats({"state": torch.tensor([0.5, 3.0, -1.0], dtype=torch.float64)},
                    {"state": torch.tensor([0.25, 1e-6, 2.0], dtype=torch.float64)})
    torch.testing.assert_close(p.normalizer.normalize("state", obs["state"]),
                               (obs["state"] - torch.tensor([0.5, 3.0, -1.0])) / torch.tensor([0.25, 1.0, 2.0]))
    for k, v in actions.items():
        torch.testing.assert_close(p.normalizer.state_dict()[k], v)
    p.set_obs_stats({"state": torch.tensor([1.0, -2.0, 0.5])}, {"state": torch.tensor([2.0, 1.0, 4.0])})
    mean, _ = p.dist_params({"state": n[:, None]})
    torch.testing.assert_close(p.predict_chunk({"state": obs["state"][:, None]})[:, 0], mean.clamp(-1, 1))
    assert p.is_deterministic(None) and p.is_deterministic("mean") and not p.is_deterministic("sample")
    noise = torch.randn(5, 1, 2)
    got = p.predict_chunk({"state": obs["state"][:, None]}, sampler="sample", noise=noise)[:, 0]
    torch.testing.assert_close(got, (mean + math.exp(-0.5) * noise[:, 0]).clamp(-1, 1))
    with pytest.raises(ValueError, match="no sampler 'ddim:5'"):
        p.predict_chunk({"state": obs["state"][:, None]}, sampler="ddim:5")
    q = policy_from_description(p.describe())
    q.load_state_dict(p.state_dict())
    torch.testing.assert_close(q.predict_chunk({"state": obs["state"][:, None]}), p.predict_chunk(
        {"state": obs["state"][:, None]}))
    with pytest.raises(ValueError, match="one observation to one action"):
        make_policy("gaussian", OBS_SPEC, ACT_SPEC, {"obs_horizon": 2, "pred_horizon": 2})


def test_gaussian_bc_loss_is_nll_and_fits_a_linear_expert():
    p = _policy(hidden=[32])
    x = torch.randn(256, 1, 3, generator=torch.Generator().manual_seed(4))
    target = torch.tanh(x[:, :, :2] * torch.tensor([0.5, -0.3]))  # (B, 1, 2), inside [-1, 1]
    batch = {"obs": {"state": x}, "action": target}
    loss, _ = p.loss(batch)
    nobs = p.normalizer.normalize_dict({"state": x})
    torch.testing.assert_close(loss, -p.log_prob(nobs, target[:, 0]).mean())
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    for _ in range(300):
        loss, _ = p.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    err = (p.predict_chunk({"state": x}) - target).abs().mean()
    assert float(err) < 0.05, float(err)


def test_gaussian_yaml_holds_the_class_defaults():
    from omegaconf import OmegaConf

    from distillery import config as config_mod

    cfg = OmegaConf.to_container(config_mod.compose(["policy=gaussian"]).policy)
    assert {k: v for k, v in cfg.items() if k != "name"} == GaussianPolicy.DEFAULTS


# ------------------------------------------------------------------------------------------ GAE / loss / stats
def test_gae_matches_a_hand_computed_example():
    # env 0: terminated after step 1 (no bootstrap: next_value 9 must be ignored), truncated after step 2
    # (bootstrap from V(final obs) = 4 but the trace is cut), step 3 starts a new episode.
    # env 1: no episode end; reward only at the last step.
    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 1.0]])
    values = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.5, 0.0], [2.0, 0.0]])
    next_values = torch.tensor([[1.0, 0.0], [9.0, 0.0], [4.0, 0.0], [3.0, 0.0]])
    terminated = torch.zeros(4, 2, dtype=torch.bool)
    truncated = torch.zeros(4, 2, dtype=torch.bool)
    terminated[1, 0] = True
    truncated[2, 0] = True
    adv, ret = compute_gae(rewards, values, terminated, truncated, next_values, gamma=0.5, lam=0.5)
    # deltas env 0: 1 + .5*1 - .5 = 1 | 2 - 1 = 1 | 3 + .5*4 - 1.5 = 3.5 | 4 + .5*3 - 2 = 3.5 ; gamma*lam = .25
    expected = torch.tensor([[1.0 + 0.25 * 1.0, 0.25 ** 3], [1.0, 0.25 ** 2], [3.5, 0.25], [3.5, 1.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)
    with pytest.raises(ValueError, match="one shape"):
        compute_gae(rewards, values[:3], terminated, truncated, next_values, 0.5, 0.5)


def test_ppo_clip_loss_hand_example():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 0.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, m = ppo_clip_loss(new, old, adv, clip=0.2)
    # min(1.5, 1.2) = 1.2 ; min(-0.5, -0.8) = -0.8 ; min(2, 2) = 2  -> mean 0.8
    assert float(loss) == pytest.approx(-0.8)
    assert m["clipfrac"] == pytest.approx(2 / 3)
    assert m["approx_kl"] == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 3, rel=1e-5)


def test_running_mean_std_matches_numpy_on_concatenated_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (1, 7, 50, 3)]
    exact = RunningMeanStd((4,), epsilon=0.0)
    prior = RunningMeanStd((4,))  # default epsilon: a tiny prior count, so only close
    for b in batches:
        exact.update(torch.as_tensor(b))
        prior.update(torch.as_tensor(b))
    allx = np.concatenate(batches)
    np.testing.assert_allclose(exact.mean.numpy(), allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(exact.var.numpy(), allx.var(0), rtol=1e-12)
    np.testing.assert_allclose(prior.var.numpy(), allx.var(0), rtol=1e-4)
    assert float(exact.count) == len(allx)
    scalar = RunningMeanStd(())
    scalar.load_state_dict(exact.state_dict() | {"mean": torch.tensor(1.0), "var": torch.tensor(4.0)})
    assert float(scalar.std) == 2.0
    with pytest.raises(ValueError, match="expected \\(B, 4\\)"):
        exact.update(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------ PPOAgent
def _agent(tmp_path, **cfg) -> PPOAgent:
    env = make_env("push_cube", 4, seed=0, max_episode_steps=10)
    torch.manual_seed(0)
    policy = make_policy("gaussian", env.observation_spec, env.action_spec, {"hidden": [32, 32]})
    cfg = {"env_steps": 64, "num_steps": 8, "epochs": 2, "minibatch_size": 16, "value_hidden": [32], **cfg}
    return PPOAgent(cfg, policy, env, tmp_path / "run", ListLogger(), seed=0)  # type: ignore[arg-type]


def test_ratio_is_one_before_the_first_update(tmp_path):
    agent = _agent(tmp_path, num_steps=12)
    buf = agent.collect()
    assert buf["action"].shape == (12, 4, 2) and buf["log_prob"].shape == (12, 4)
    assert bool(buf["truncated"][9].all())  # the 10-step limit ends every first episode inside the rollout
    # a truncated step bootstraps from V(final obs), which differs from V(the auto-reset obs) stored next
    assert not torch.allclose(buf["next_value"][9], buf["value"][10])
    torch.testing.assert_close(buf["next_value"][:9], buf["value"][1:10])
    nobs = {k: v.flatten(0, 1) for k, v in buf["nobs"].items()}
    new = agent.policy.log_prob(nobs, buf["action"].flatten(0, 1))
    torch.testing.assert_close(new, buf["log_prob"].flatten(0, 1), atol=1e-5, rtol=0)
    _, m = ppo_clip_loss(new, buf["log_prob"].flatten(0, 1), buf["advantage"].flatten(0, 1), 0.2)
    assert m["clipfrac"] == 0.0 and abs(m["approx_kl"]) < 1e-6 and abs(m["ratio_max"] - 1.0) < 1e-5


def test_checkpoint_loads_for_eval_and_resumes_the_learner_state(tmp_path):
    agent = _agent(tmp_path, value_obs_keys=["privileged"], checkpoint_every=32)
    assert agent.value[0].in_features == 16  # asymmetric critic on the privileged group
    metrics = agent.train()
    assert metrics["env_steps"] == 64 and "train/approx_kl" in metrics and "train/steps_per_s" in metrics
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["last", step_dir_name(32), step_dir_name(64)], ckpts
    # distillery's evaluation loader rebuilds the policy, running obs stats included
    policy, meta = load_policy(tmp_path / "run")
    assert meta["step"] == 64 and meta["kind"] == "policy"
    obs = {"state": torch.randn(5, 1, 10)}
    torch.testing.assert_close(policy.predict_chunk(obs), agent.policy.predict_chunk(obs))
    rms = agent.obs_rms["state"]
    torch.testing.assert_close(policy.normalizer.normalize("state", obs["state"][:, 0]),
                               ((obs["state"][:, 0] - rms.mean) / rms.std).float(), atol=1e-4, rtol=1e-4)
    # a fresh agent restores critic, optimiser, running stats, RNG and counters
    fresh = _agent(tmp_path / "b", value_obs_keys=["privileged"])
    fresh.load(tmp_path / "run" / "checkpoints" / "last")
    for a, b in zip(agent.value.parameters(), fresh.value.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fresh.obs_rms["privileged"].var, agent.obs_rms["privileged"].var)
    assert float(fresh.ret_rms.count) == float(agent.ret_rms.count)
    assert (fresh.env_steps, fresh.updates) == (64, agent.updates)
    assert torch.equal(fresh.generator.get_state(), agent.generator.get_state())
    assert fresh.optimizer.state_dict()["state"][0]["step"] == agent.optimizer.state_dict()["state"][0]["step"]
    fresh.cfg["env_steps"] = 96
    assert fresh.train()["env_steps"] == 96  # and it continues
    _, meta = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last")
    assert meta["updates"] == agent.updates + 1


def test_linear_lr_schedule_reaches_the_optimiser_and_survives_resume(tmp_path):
    agent = _agent(tmp_path, env_steps=96, lr=3e-4, actor_lr=1e-4, lr_schedule="linear", checkpoint_every=32)
    agent.train()  # three rollouts of 32 env steps: progress 0, 1/3, 2/3 at their starts
    logged = [row["train/actor_lr"] for _, row in agent.logger.rows]
    assert logged == pytest.approx([1e-4, 1e-4 * 2 / 3, 1e-4 / 3])
    assert agent.optimizer.param_groups[1]["lr"] == pytest.approx(3e-4 / 3)  # the critic's falls alike
    # resumed from env step 32, the schedule continues from the env-step count, not from the saved optimiser
    fresh = _agent(tmp_path / "b", env_steps=96, lr=3e-4, actor_lr=1e-4, lr_schedule="linear")
    fresh.load(tmp_path / "run" / "checkpoints" / step_dir_name(32))
    fresh.train()
    assert [row["train/actor_lr"] for _, row in fresh.logger.rows] == pytest.approx(logged[1:])
    # at the end of the schedule the learning rate is 0 and an update leaves the actor as it was
    fresh.set_learning_rates(1.0)
    before = [p.detach().clone() for p in fresh.policy.parameters()]
    fresh.update(fresh.collect())
    for a, b in zip(before, fresh.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    constant = _agent(tmp_path / "c")
    constant.train()
    assert [row["train/actor_lr"] for _, row in constant.logger.rows] == [3e-4, 3e-4]


def test_ppo_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys \\['epoch'\\]"):
        _agent(tmp_path, epoch=3)
    with pytest.raises(ValueError, match="value_obs_keys \\['image'\\]"):
        _agent(tmp_path, value_obs_keys=["image"])
    with pytest.raises(ValueError, match="lr_schedule must be one of \\('constant', 'linear'\\), got 'cosine'"):
        _agent(tmp_path, lr_schedule="cosine")
    env = make_env("push_cube", 2, seed=0)
    squashed = make_policy("gaussian", env.observation_spec, env.action_spec, {"squash": True})
    with pytest.raises(ValueError, match="squash=False"):
        PPOAgent({}, squashed, env, tmp_path, ListLogger())  # type: ignore[arg-type]


def test_short_ppo_run_beats_its_initialisation(tmp_path):
    """lift_cube, 30-step episodes, 32k env steps (~30-40 s on one core): the deterministic policy's mean return on
    16 fixed-seed episodes went from -29.1 to -24.0 / -24.0 / -24.3 for seeds 0 / 1 / 2; require +2.5."""
    env = make_env("lift_cube", 16, seed=0, max_episode_steps=30)
    eval_env = make_env("lift_cube", 16, seed=1, max_episode_steps=30)
    torch.manual_seed(0)
    policy = make_policy("gaussian", env.observation_spec, env.action_spec, {"hidden": [64, 64]})
    agent = PPOAgent({"env_steps": 32768, "num_steps": 64, "epochs": 4, "minibatch_size": 512, "lr": 1e-3,
                      "gamma": 0.9}, policy, env, tmp_path, ListLogger(), seed=0)  # type: ignore[arg-type]
    before, _ = evaluate_policy(policy, eval_env, 16, seed=123, sampler="mean")
    agent.train()
    after, _ = evaluate_policy(policy, eval_env, 16, seed=123, sampler="mean")
    assert after["mean_return"] > before["mean_return"] + 2.5, (before, after)


# ------------------------------------------------------------------------------------------ PPO over the chain
def _diffusion_agent(tmp_path, max_episode_steps: int = 7, **cfg) -> PPOAgent:
    env = make_env("push_cube", 3, seed=0, max_episode_steps=max_episode_steps)
    torch.manual_seed(0)
    policy = make_policy("diffusion", env.observation_spec, env.action_spec,
                         {"down_dims": [8, 16], "step_embed_dim": 8, "n_groups": 4, "pred_horizon": 4,
                          "obs_horizon": 2, "action_horizon": 3, "encoder": {"type": "mlp", "hidden": [16],
                                                                             "out_dim": 8}})
    d = env.observation_spec["state"].shape[0]
    policy.set_normalizer({"state": {"min": -2 * np.ones(d), "max": 2 * np.ones(d), "mean": np.zeros(d),
                                     "std": np.ones(d)},
                           "action": {"min": -np.ones(2), "max": np.ones(2), "mean": np.zeros(2), "std": np.ones(2)}})
    cfg = {"env_steps": 27, "num_steps": 3, "epochs": 1, "minibatch_size": 9, "value_hidden": [16],
           "ddim_steps": 4, **cfg}
    return PPOAgent(cfg, policy, env, tmp_path / "run", ListLogger(), seed=0,  # type: ignore[arg-type]
                    meta={"config": {"task": {"name": "push_cube", "max_episode_steps": max_episode_steps,
                                              "decimation": None, "kwargs": {}}}})


def test_diffusion_rollout_records_chains_chunks_and_ratio_one(tmp_path):
    agent = _diffusion_agent(tmp_path)
    buf = agent.collect()
    # 3 decisions x 3 envs, each a 4-step chain over (Tp=4, Da=2), executing Ta=3 actions
    assert buf["action"].shape == (3, 3, 5, 4, 2) and buf["log_prob"].shape == (3, 3, 4)
    assert agent.env_steps == 27 and buf["nobs"]["state"].shape[:3] == (3, 3, 2)
    # the 7-step limit falls on the first action of decision 3, which bootstraps from V(final obs)
    assert bool(buf["truncated"][2].all()) and not bool(buf["truncated"][:2].any())
    torch.testing.assert_close(buf["next_value"][:2], buf["value"][1:3])
    # the reset env played the chunk's two remaining actions in its new episode: its history is the last 2 obs
    torch.testing.assert_close(agent._hist["state"][:, -1], agent._obs["state"].float())
    nobs = {k: v.flatten(0, 1) for k, v in buf["nobs"].items()}
    new, _ = agent.actor.log_prob(nobs, buf["action"].flatten(0, 1))
    torch.testing.assert_close(new, buf["log_prob"].flatten(0, 1), atol=1e-4, rtol=0)


def test_diffusion_critic_warmup_keeps_the_actor_and_a_run_checkpoints_an_evaluable_policy(tmp_path):
    agent = _diffusion_agent(tmp_path, critic_warmup=1, env_steps=54)
    before = [p.detach().clone() for p in agent.policy.parameters()]
    value_before = [p.detach().clone() for p in agent.value.parameters()]
    m = agent.update(agent.collect())
    assert m["actor_frozen"] == 1.0 and "policy_loss" not in m
    assert all(torch.equal(a, b) for a, b in zip(before, agent.policy.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(value_before, agent.value.parameters()))
    m = agent.update(agent.collect())  # the second update moves the actor, with ratio 1 at its first minibatch
    assert m["actor_frozen"] == 0.0 and "policy_loss" in m
    assert not all(torch.equal(a, b) for a, b in zip(before, agent.policy.parameters()))
    agent.save()
    policy, meta = load_policy(tmp_path / "run")
    assert meta["agent"] == "ppo" and policy.name == "diffusion"
    assert policy.cfg["sampler"] == "ddim:4:eta=1"  # evaluated with the stochastic chain it was fine-tuned over
    obs = {"state": torch.randn(2, 2, agent.env.observation_spec["state"].shape[0])}
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    torch.testing.assert_close(policy.predict_chunk(obs, generator=g[0]),
                               agent.policy.predict_chunk(obs, generator=g[1]))


def test_diffusion_summed_chunk_reward(tmp_path):
    """A decision's reward is the sum of its executed steps' rewards: replay the same actions in a twin env."""
    agent = _diffusion_agent(tmp_path, norm_reward=False, max_episode_steps=50)
    twin = make_env("push_cube", 3, seed=0, max_episode_steps=50)
    obs = twin.reset(seed=agent.seed)
    gen_state = agent.generator.get_state()
    buf = agent.collect()
    agent.generator.set_state(gen_state)
    nobs = agent.policy.normalizer.normalize_dict({"state": obs["state"].unsqueeze(1).repeat_interleave(2, 1)})
    _, _, actions = agent.actor.act(nobs, agent.generator)
    total = sum(twin.step(actions[:, j])[1] for j in range(3))
    torch.testing.assert_close(buf["reward"][0], total.float())


def test_consistency_head_is_distilled_during_ppo_and_saved_as_a_policy_run(tmp_path):
    agent = _diffusion_agent(tmp_path, consistency_head=True, head_steps=2, env_steps=27)
    before = [p.detach().clone() for p in agent.head.student.parameters()]
    metrics = agent.train()
    assert metrics["train/head_loss"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, agent.head.student.parameters()))
    head, meta = load_policy(tmp_path / "run" / "head")  # a normal policy run: eval and export load it
    assert head.name == "consistency" and meta["step"] == 27
    obs = {"state": torch.randn(2, 2, agent.env.observation_spec["state"].shape[0])}
    torch.testing.assert_close(head.predict_chunk(obs, generator=torch.Generator().manual_seed(0)),
                               agent.head.student.predict_chunk(obs, generator=torch.Generator().manual_seed(0)))
    # a resumed agent restores the head
    fresh = _diffusion_agent(tmp_path / "b", consistency_head=True, head_steps=2)
    fresh.load(tmp_path / "run" / "checkpoints" / "last")
    for a, b in zip(agent.head.student.parameters(), fresh.head.student.parameters()):
        torch.testing.assert_close(a, b)
