"""Imitation agent: learning-rate schedule, exact resume, and the evaluation statistics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import ListLogger

from distillery.agents.bc import BCAgent, cosine_with_warmup
from distillery.data import EpisodeDataset, EpisodeWriter, SequenceDataset
from distillery.policies import make_policy
from distillery.rollout import summarize, wilson_interval
from distillery.specs import TensorSpec

AGENT_CFG = {"steps": 8, "batch_size": 16, "lr": 1e-3, "weight_decay": 1e-6, "betas": [0.95, 0.999],
             "warmup_steps": 2, "grad_clip": 1.0, "ema": True, "ema_power": 0.75, "ema_max_decay": 0.9999,
             "log_every": 1, "eval_every": 0, "eval_episodes": 1, "checkpoint_every": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("bc") / "toy.zarr"
    rng = np.random.default_rng(0)
    obs_spec = {"state": TensorSpec((3,))}
    with EpisodeWriter(path, {"task": "toy"}, obs_spec, TensorSpec((2,), low=-1, high=1)) as w:
        for _ in range(4):
            T = 12
            obs = rng.normal(size=(T, 3)).astype(np.float32)
            w.append({"state": obs}, np.tanh(obs[:, :2]).astype(np.float32), np.zeros(T, np.float32),
                     np.eye(1, T, T - 1, dtype=bool)[0], np.zeros(T, bool))
    return EpisodeDataset(path)


def make_agent(dataset, run_dir, steps=8):
    torch.manual_seed(0)
    policy = make_policy("diffusion", dataset.obs_spec, dataset.action_spec,
                         {"down_dims": [8, 16], "step_embed_dim": 8, "n_groups": 4, "pred_horizon": 8,
                          "action_horizon": 4, "encoder": {"type": "mlp", "hidden": [16], "out_dim": 8}})
    policy.set_normalizer(dataset.stats(["state", "action"]))
    data = SequenceDataset(dataset, ["state"], policy.obs_horizon, policy.pred_horizon)
    logger = ListLogger()
    return BCAgent({**AGENT_CFG, "steps": steps}, policy, data, run_dir, logger, seed=3), logger


def test_cosine_with_warmup_matches_closed_form():
    f = cosine_with_warmup(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_resume_continues_the_same_loss_curve(dataset, tmp_path):
    straight, log_a = make_agent(dataset, tmp_path / "a")
    straight.train()
    losses_a = [m["train/loss"] for _, m in log_a.rows]

    first, log_b = make_agent(dataset, tmp_path / "b", steps=8)
    first.total_steps = 4  # stop half way, as a killed run would after its step-4 checkpoint
    first.train()
    resumed, log_c = make_agent(dataset, tmp_path / "b", steps=8)
    resumed.load(tmp_path / "b" / "checkpoints" / "last")
    assert resumed.step == 4
    resumed.train()
    losses_b = [m["train/loss"] for _, m in log_b.rows] + [m["train/loss"] for _, m in log_c.rows]
    assert losses_b == losses_a  # bit-identical: weights, optimiser, scheduler, EMA and RNG all restored
    for p, q in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q)
    for k, v in straight.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k])


def test_checkpoint_round_trip_rebuilds_the_policy(dataset, tmp_path):
    from distillery.evaluate import load_policy

    agent, _ = make_agent(dataset, tmp_path / "r", steps=4)
    agent.train()
    policy, meta = load_policy(tmp_path / "r")
    assert meta["step"] == 4
    with agent.eval_weights():
        obs = {"state": torch.randn(5, 2, 3)}
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        torch.testing.assert_close(policy.predict_chunk(obs, "ddim:5", g1),
                                   agent.policy.predict_chunk(obs, "ddim:5", g2), rtol=0, atol=0)


def test_wilson_interval_known_values():
    # reference values from the closed form (e.g. Brown, Cai & DasGupta 2001): 0/10 -> [0, 0.2775]
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-4)
    lo, hi = wilson_interval(90, 100)
    assert (lo, hi) == (pytest.approx(0.82567, abs=1e-4), pytest.approx(0.94485, abs=1e-4))
    assert wilson_interval(5, 5)[1] == 1.0


def test_evaluation_counts_every_env_once_and_is_reproducible():
    """Waves play exactly the asked episodes, one per env, so short episodes are not over-counted."""
    from distillery.envs import make_env, make_expert
    from distillery.rollout import run_waves

    def play(seed):
        env = make_env("push_cube", 4, seed=0)
        expert = make_expert("push_cube", 4, seed=0)
        eps = [e for wave in run_waves(env, expert, 6, seed) for e in wave]
        env.close()
        return eps

    a, b = play(5), play(5)
    assert len(a) == 6
    assert [len(e) for e in a] == [len(e) for e in b]
    assert [e.ret for e in a] == [e.ret for e in b]
    s = summarize(a)
    assert s["episodes"] == 6 and s["success_rate"] == sum(e.success for e in a) / 6
    for e in a:  # flags only at the last step, as the dataset writer requires
        assert not e.terminated[:-1].any() and not e.truncated[:-1].any()
        assert e.terminated[-1] or e.truncated[-1]
