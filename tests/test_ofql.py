"""OFQL: the MeanFlow flow-BC loss, the Q-learning target, mode selection by Q, checkpoints and the env actor."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from distillery.agents.ofql import FlowActor, OFQLActor, OFQLAgent, meanflow_loss, sample_flow_times
from helpers import ListLogger

SMALL = {"actor_hidden": [64, 64], "critic_hidden": [64, 64], "batch_size": 128, "log_every": 50,
         "actor_ema_start": 0, "actor_ema_every": 1, "checkpoint_every": 10_000}


def _agent(tmp_path, transitions, obs_dim, act_dim, seed=0, **cfg):
    return OFQLAgent({**SMALL, **cfg}, obs_dim, act_dim, transitions, tmp_path, ListLogger(), seed=seed)


def two_mode_transitions(n=2048, seed=0):
    """One-step episodes: obs ~ U[-1, 1]^2, the behaviour picks a = +0.7 (reward 1) or a = -0.7 (reward 0) at
    random (plus 0.05 jitter): the data hold a good and a bad mode in equal shares."""
    g = np.random.default_rng(seed)
    obs = g.uniform(-1, 1, (n, 2)).astype(np.float32)
    good = g.random(n) < 0.5
    action = (np.where(good, 0.7, -0.7) + 0.05 * g.standard_normal(n)).astype(np.float32)[:, None]
    return {"obs": obs, "action": action, "reward": good.astype(np.float32), "next_obs": obs,
            "done": np.ones(n, np.float32), "discount": np.full(n, 0.99, np.float32)}


# ------------------------------------------------------------------------------------------ flow-BC loss
class Linear1D(nn.Module):
    """u(z, r, t) = w z + b t + c r: du/dt along the path is w v + b, so the MeanFlow target is hand-computable."""

    def __init__(self, w, b, c):
        super().__init__()
        self.w, self.b, self.c = (nn.Parameter(torch.tensor(float(x))) for x in (w, b, c))

    def forward(self, z, r, t):
        return self.w * z + self.b * t + self.c * r


def test_meanflow_loss_matches_hand_computation():
    # a = 0.5, eps = -1, t = 0.6, r = 0.2, u = 2 z + 0.5 t - r
    # z = 0.4 * 0.5 + 0.6 * (-1) = -0.4; v = eps - a = -1.5; u = -0.8 + 0.3 - 0.2 = -0.7
    # du/dt = w v + b = -3 + 0.5 = -2.5; target = v - (t - r) du/dt = -1.5 + 0.4 * 2.5 = -0.5; loss = 0.2^2
    u = Linear1D(2.0, 0.5, -1.0)
    a, eps, t, r = (torch.tensor([[x]]) for x in (0.5, -1.0, 0.6, 0.2))
    loss = meanflow_loss(u, a, eps, t, r)
    assert float(loss) == pytest.approx(0.04, abs=1e-6)
    # the target is stop-gradient: d loss / d w = 2 (u - target) dz/dw... = 2 * (-0.2) * z = 0.16
    loss.backward()
    assert float(u.w.grad) == pytest.approx(2 * (-0.2) * (-0.4), abs=1e-6)
    # r = t: plain flow matching, target = v: (u - v)^2 with u = 2 * (-0.4) + 0.5 * 0.6 - 0.6 = -1.1
    assert float(meanflow_loss(u, a, eps, t, t)) == pytest.approx((-1.1 + 1.5) ** 2, abs=1e-6)


def test_meanflow_loss_of_network_matches_finite_difference_target():
    torch.manual_seed(0)
    net = FlowActor(3, 4, [32, 32])
    obs, a, eps = torch.randn(8, 3), torch.rand(8, 4) * 2 - 1, torch.randn(8, 4)
    t, r = sample_flow_times(8, flow_ratio=0.0, generator=torch.Generator().manual_seed(1))
    fn = lambda z, r_, t_: net(obs, z, r_, t_)  # noqa: E731
    z, v, h = (1 - t) * a + t * eps, eps - a, 1e-3
    with torch.no_grad():  # central difference of u along (dz, dr, dt) = (v, 0, 1), in float64
        net64 = net.double()
        f64 = lambda s: net64(obs.double(), z.double() + s * v.double(), r.double(), t.double() + s)  # noqa: E731
        dudt = (f64(h) - f64(-h)) / (2 * h)
        target = v.double() - (t - r).double() * dudt
        expected = ((f64(0.0) - target) ** 2).mean()
        net.float()
    assert float(meanflow_loss(fn, a, eps, t, r)) == pytest.approx(float(expected), rel=1e-4)


def test_flow_times_are_ordered_logit_normal_with_flow_ratio():
    t, r = sample_flow_times(20000, flow_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert t.shape == r.shape == (20000, 1) and bool((t >= r).all()) and bool(((t > 0) & (t < 1)).all())
    assert float((t == r).float().mean()) == pytest.approx(0.5, abs=0.02)
    # t = max of two logit-normal(-0.4, 1) draws: P(logit t <= x) = Phi(x + 0.4)^2 -> median at Phi^-1(sqrt .5) - .4
    median = float(torch.logit(t).median())
    assert median == pytest.approx(0.5449 - 0.4, abs=0.03)


def test_one_step_map_sends_every_noise_to_a_single_data_point(tmp_path):
    # data = one action for every state: the exact average velocity is u(z, r, t) = (z - a*) / t, so the one-step
    # map eps - u(eps, 0, 1) = a* for every eps; flow BC alone (eta = 0) must learn it
    n, target = 512, torch.tensor([0.3, -0.5])
    obs = torch.rand(n, 2)
    data = {"obs": obs, "action": target.expand(n, 2), "reward": torch.zeros(n), "next_obs": obs,
            "done": torch.ones(n), "discount": torch.full((n,), 0.99)}
    agent = _agent(tmp_path, data, 2, 2, eta=0.0, steps=600, lr=3e-3)
    probe, g = torch.rand(1000, 2) * 2 - 1, torch.Generator().manual_seed(3)
    before = (agent.act(probe, generator=g) - target).abs()
    agent.train()
    err = (agent.act(probe, generator=g) - target).abs()
    # measured (3 seeds, 500 steps): mean 0.09-0.12, 90% of samples within 0.19-0.27 in every dim; untrained ~0.6
    assert float(before.mean()) > 0.4
    assert float(err.mean()) < 0.15 and float(err.max(1).values.quantile(0.9)) < 0.35, err.mean()


# ------------------------------------------------------------------------------------------ critic target
def test_q_target_hand_computed(tmp_path):
    obs = torch.zeros(2, 2)
    data = {"obs": obs, "action": torch.zeros(2, 2), "reward": torch.zeros(2), "next_obs": obs,
            "done": torch.zeros(2), "discount": torch.ones(2)}
    agent = _agent(tmp_path, data, 2, 2)
    # make the target critic constant: every weight zero, output biases Q1' = 2, Q2' = -1 -> min = -1
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.zero_()
        heads = [m for m in agent.critic_target.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
        assert len(heads) == 2, "TwinQ should end in two scalar heads"
        heads[0].bias.fill_(2.0)
        heads[1].bias.fill_(-1.0)
    reward, discount, done = torch.tensor([1.0, 0.5]), torch.tensor([0.99, 0.9801]), torch.tensor([0.0, 1.0])
    y = agent.q_target(torch.randn(2, 2), reward, discount, done, torch.randn(2, 2))
    assert y.tolist() == pytest.approx([1.0 - 0.99, 0.5])  # 1 + 0.99 * (-1); terminal: reward only


def test_q_target_uses_target_actor_one_step_action(tmp_path):
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(16, 3, generator=g)
    data = {"obs": obs, "action": torch.rand(16, 2, generator=g) - 0.5, "reward": torch.rand(16, generator=g),
            "next_obs": obs.flip(0), "done": (torch.rand(16, generator=g) < 0.3).float(),
            "discount": torch.full((16,), 0.97)}
    agent = _agent(tmp_path, data, 3, 2)
    with torch.no_grad():
        for p in agent.actor_target.parameters():  # the target actor differs from the online one
            p.add_(0.1)
    noise = torch.randn(16, 2, generator=g)
    s2 = agent.actor.normalize(data["next_obs"])
    with torch.no_grad():
        a2 = (noise - agent.actor_target(s2, noise, torch.zeros(16, 1), torch.ones(16, 1))).clamp(-1, 1)
        q1, q2 = agent.critic_target(s2, a2)
        expected = data["reward"] + 0.97 * (1 - data["done"]) * torch.minimum(q1, q2).reshape(-1)
    assert torch.allclose(agent.q_target(s2, data["reward"], data["discount"], data["done"], noise), expected)


# ------------------------------------------------------------------------------------------ learning
def test_ofql_picks_the_good_mode_where_flow_bc_keeps_both(tmp_path):
    data = two_mode_transitions()
    probe = torch.rand(512, 2, generator=torch.Generator().manual_seed(5)) * 2 - 1
    shares = {}
    for eta in (0.0, 1.0):
        # the Q term settles fast; the one-step flow needs longer to split its noise between two modes
        agent = _agent(tmp_path / f"eta{eta}", data, 2, 1, eta=eta, steps=800 if eta == 0 else 200, lr=3e-3)
        agent.train()
        a = agent.act(probe, generator=torch.Generator().manual_seed(7)).squeeze(1)
        shares[eta] = (float((a > 0).float().mean()), float((a.abs() > 0.4).float().mean()))
    bc_good, bc_in_modes = shares[0.0]
    ofql_good, _ = shares[1.0]
    # measured (seeds 0-2): flow BC 0.47-0.52 good, 0.79-0.85 within the modes; OFQL 1.00 good
    assert 0.3 < bc_good < 0.7 and bc_in_modes > 0.7, shares  # flow BC: both modes, not their mean
    assert ofql_good > 0.95, shares


# ------------------------------------------------------------------------------------------ checkpoints
def test_resume_continues_exactly(tmp_path):
    data = two_mode_transitions(256)
    full = _agent(tmp_path / "full", data, 2, 1, steps=12, batch_size=32)
    full.train()
    half = _agent(tmp_path / "half", data, 2, 1, steps=6, batch_size=32)
    half.train()  # writes checkpoints/step_000000006
    resumed = _agent(tmp_path / "resumed", data, 2, 1, seed=123, steps=12, batch_size=32)
    resumed.load(tmp_path / "half")
    assert resumed.step == 6
    resumed.train()
    for name in ("actor", "actor_target", "critic", "critic_target"):
        for (k, x), y in zip(getattr(full, name).state_dict().items(), getattr(resumed, name).state_dict().values()):
            assert torch.equal(x, y), f"{name}.{k}"
    # inference from a checkpoint alone (no dataset): same actions as the trained agent
    agent = OFQLAgent.from_checkpoint(tmp_path / "full")
    obs = torch.randn(5, 2)
    assert torch.equal(agent.act(obs, torch.Generator().manual_seed(0)),
                       full.act(obs, torch.Generator().manual_seed(0)))
    assert not list(Path(tmp_path / "full" / "checkpoints").rglob("*.pt"))  # safetensors + JSON only


def test_config_file_matches_defaults_and_bad_input_is_explained(tmp_path):
    yaml_path = Path(__file__).resolve().parents[1] / "configs" / "agent" / "ofql.yaml"
    assert yaml.safe_load(yaml_path.read_text()) == OFQLAgent.DEFAULTS
    data = two_mode_transitions(64)
    with pytest.raises(ValueError, match="unknown config keys"):
        _agent(tmp_path, data, 2, 1, alpha=1.0)
    with pytest.raises(ValueError, match="flow_ratio"):
        _agent(tmp_path, data, 2, 1, flow_ratio=1.5)
    with pytest.raises(ValueError, match="lack keys"):
        _agent(tmp_path, {k: v for k, v in data.items() if k != "discount"}, 2, 1)
    with pytest.raises(ValueError, match="chunk"):
        _agent(tmp_path, data, 2, 2)  # actions are (N, 1), not (N, 2)


# ------------------------------------------------------------------------------------------ env actor
def test_actor_plans_a_chunk_and_executes_it(tmp_path):
    from distillery.envs import make_env
    from distillery.rollout import run_waves

    env = make_env("push_cube", num_envs=3, seed=0)
    obs_dim, da, chunk = env.observation_spec["privileged"].shape[0], env.action_spec.shape[0], 3
    agent = OFQLAgent({**SMALL, "chunk": chunk}, obs_dim, chunk * da, None, tmp_path, ListLogger())
    actor = OFQLActor(agent, chunk, da, seed=4)
    obs = env.reset(seed=1)
    g = torch.Generator().manual_seed(4)  # the same noise stream the actor draws from
    plan = agent.act(obs["privileged"], g).view(3, chunk, da)
    for k in range(chunk):  # one plan, executed step by step, whatever the later observations
        out = actor(obs)
        assert torch.equal(out, plan[:, k])
        obs, *_ = env.step(out)
    mask = torch.tensor([False, True, False])
    actor.reset(mask)
    plan2 = agent.act(obs["privileged"], g).view(3, chunk, da)  # all three re-plan at the chunk boundary
    assert torch.equal(actor(obs), plan2[:, 0])
    actor.reset(mask)  # only env 1 re-plans; the others continue their plan
    plan3 = agent.act(obs["privileged"][1:2], g).view(1, chunk, da)
    out = actor(obs)
    assert torch.equal(out[[0, 2]], plan2[[0, 2], 1]) and torch.equal(out[1], plan3[0, 0])
    with pytest.raises(ValueError, match="chunk"):
        OFQLActor(agent, 2, da)
    # closed loop in the batched env through the rollout loop: every counted episode is played
    episodes = [e for wave in run_waves(env, OFQLActor(agent, chunk, da), 3, seed=0) for e in wave]
    assert len(episodes) == 3 and all(len(e) > 0 for e in episodes)


# ------------------------------------------------------------------------------------------ through the CLI
def test_ofql_trains_evaluates_and_resumes_through_the_cli(tmp_path, monkeypatch, capsys):
    """`distillery train agent=ofql` on a collected dataset, `distillery eval` of the run (its one-step sampler), a
    resume, and clear errors for what OFQL cannot take."""
    import json

    from distillery.cli import main
    from distillery.envs import make_env
    from distillery.rollout import run_waves, summarize

    monkeypatch.chdir(tmp_path)
    task = ["task=push_cube", "task.max_episode_steps=10", "logger.wandb=false"]
    assert main(["collect", *task, "episodes=4", "collect.num_envs=4", "dataset=d.zarr"]) == 0
    small = ["agent=ofql", "agent.steps=4", "agent.actor_hidden=[16]", "agent.critic_hidden=[16]",
             "agent.batch_size=8", "agent.checkpoint_every=2", "agent.log_every=2", "agent.chunk=3",
             "agent.obs_key=state"]
    assert main(["train", *task, *small, "dataset=d.zarr", "run_dir=of"]) == 0
    assert (tmp_path / "of" / "checkpoints" / "step_000000002").is_dir()
    capsys.readouterr()
    assert main(["train", "--resume", "of"]) == 0
    assert "at step 4" in capsys.readouterr().out  # the stored config (agent=ofql) is the one resumed

    assert main(["eval", "checkpoint=of", "episodes=5", "seed=3", "eval.num_envs=4", "run_dir=ev"]) == 0
    row, = json.loads((tmp_path / "ev" / "report.json").read_text())["results"]
    assert row["sampler"] == "one_step" and row["episodes"] == 5 and row["latency_ms_p50"] > 0
    # the reference: the checkpoint's agent played by hand in the task it was trained on, same seeds
    agent = OFQLAgent.from_checkpoint(tmp_path / "of")
    assert agent.meta["task"] == "push_cube" and agent.meta["dataset"] == "d.zarr"
    env = make_env("push_cube", num_envs=4, seed=3, max_episode_steps=10)
    played = [e for wave in run_waves(env, OFQLActor(agent, 3, 2, obs_key="state", seed=3), 5, seed=3) for e in wave]
    ref = summarize(played)
    assert row["mean_return"] == pytest.approx(ref["mean_return"], abs=1e-6)
    assert row["success_rate"] == ref["success_rate"]

    capsys.readouterr()
    assert main(["train", *task, *small, "dataset=d.zarr", "init=of", "run_dir=x"]) == 2
    assert "drop init" in capsys.readouterr().err
    assert main(["train", *task, *small, "dataset=d.zarr", "agent.obs_key=pixels", "run_dir=y"]) == 2
    assert "agent.obs_key='pixels'" in capsys.readouterr().err
    assert main(["export", "checkpoint=of"]) == 2
    assert "OFQL" in capsys.readouterr().err
