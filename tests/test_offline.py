"""RL-100's offline agent: the OPE gate decides which weights are kept, and the sampler/critic plumbing runs on a
real (tiny) dataset of the expert."""
from __future__ import annotations

import pytest
import torch

from distillery.agents.critics import IQL
from distillery.agents.offline import OfflineRLAgent
from distillery.cli import main
from distillery.evaluate import load_policy
from distillery.runtime import load_checkpoint
from helpers import ListLogger
from test_pipeline_rl import TINY_POLICY


@pytest.fixture(scope="module")
def bc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    data = root / "d.zarr"
    assert main(["collect", "task=push_cube", "task.max_episode_steps=12", "episodes=6", "collect.num_envs=3",
                 "expert_noise=0.5", f"dataset={data}"]) == 0
    assert main(["train", "task=push_cube", "task.max_episode_steps=12", *TINY_POLICY, f"dataset={data}",
                 "agent.steps=3", "agent.batch_size=8", "agent.warmup_steps=1", "logger.wandb=false",
                 f"run_dir={root / 'bc'}"]) == 0
    return root, data


def _agent(root, data, name: str, **cfg) -> OfflineRLAgent:
    policy, _ = load_policy(root / "bc")
    cfg = {"rounds": 1, "critic_steps": 3, "critic_hidden": [16], "ppo_steps": 4, "batch_size": 8, "lr": 1e-3,
           "ope": "q", "ope_every": 2, "ope_states": 8, "ddim_steps": 2, "log_every": 1, **cfg}
    return OfflineRLAgent(cfg, policy, data, root / name, ListLogger(), seed=0)


@pytest.mark.parametrize("sampler", ["uniform", "advantage"])
def test_the_ope_gate_keeps_the_behaviour_policy_unless_a_candidate_passes(bc_run, sampler):
    root, data = bc_run
    bc = {k: v.clone() for k, v in load_policy(root / "bc")[0].state_dict().items()}
    never = _agent(root, data, f"never_{sampler}", ope_margin=1e9, sampler=sampler)
    never.train()
    assert never.history[-1]["accepted_at"] == 0
    for k, v in never.accepted.state_dict().items():
        torch.testing.assert_close(v, bc[k])  # every candidate rejected: the BC weights are what is saved
    assert not all(torch.equal(v, bc[k]) for k, v in never.policy.state_dict().items())  # yet PPO did move
    always = _agent(root, data, f"always_{sampler}", ope_margin=-1e9, sampler=sampler)
    always.train()
    assert always.history[-1]["accepted_at"] == 4  # the last OPE check accepted the last candidate
    for k, v in always.accepted.state_dict().items():
        torch.testing.assert_close(v, always.policy.state_dict()[k])
    saved, meta = load_policy(root / f"always_{sampler}")  # the accepted policy is what eval/export load
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, always.accepted.state_dict()[k])
    assert saved.cfg["sampler"] == "ddim:2:eta=1"
    _, meta = load_checkpoint(root / f"always_{sampler}" / "checkpoints" / "last")
    assert meta["offline_history"][0]["accepted_at"] == 4


def test_the_imitation_term_draws_its_windows_with_the_return_weighting(bc_run):
    """bc_coef > 0 adds the policy's imitation loss on windows drawn by the trajectory sampler: at a tiny return
    temperature every window comes from the highest-return episode; bc_coef = 0 builds no windows at all."""
    import numpy as np

    from distillery.data.episodes import EpisodeDataset
    from distillery.data.transitions import episode_returns

    root, data = bc_run
    plain = _agent(root, data, "plain", ope_margin=1e9)
    plain._load_data()
    assert plain.windows is None
    agent = _agent(root, data, "anchored", ope_margin=1e9, bc_coef=1.0, sampler="return", sampler_temperature=1e-3)
    agent._load_data()
    agent.critic = IQL(agent.transitions["obs"].shape[1], agent.transitions["action"].shape[1], (16,), 0.7, 0.99)
    drawn = []
    real = agent.windows.sample_batch
    agent.windows.sample_batch = lambda rows: drawn.append(torch.as_tensor(rows).clone()) or real(rows)
    metrics = agent.ppo_step(agent.accepted)
    ds = EpisodeDataset(data)
    best = int(np.argmax(episode_returns(ds, 0.99)))
    rows = torch.cat(drawn)
    episode = np.searchsorted(ds.episode_ends, rows.numpy(), side="right")
    assert len(rows) == 8 and (episode == best).all()
    # the reported imitation loss is the policy's own loss on such windows (a denoising MSE of order 1)
    assert 0.0 < metrics["bc_loss"] < 10.0
    with pytest.raises(ValueError, match="bc_coef"):
        _agent(root, data, "bad", bc_coef=-1.0)


def test_a_collection_cut_off_between_rounds_is_completed_on_resume(bc_run, tmp_path):
    """Rounds after the first start by appending rollouts of the accepted policy; a crash part-way through the
    collection keeps the episodes already committed, and the resumed run collects only the rest."""
    import shutil

    from distillery import config as config_mod
    from distillery.data import EpisodeDataset
    from distillery.pipeline import _append_rollouts

    root, data = bc_run
    path = tmp_path / "d.zarr"
    shutil.copytree(data, path)
    cfg = config_mod.compose(["task=push_cube", "task.max_episode_steps=12", "collect.num_envs=2"])
    asked: list[int] = []

    def crash_after_one(policy, episodes, round_):
        asked.append(episodes)
        _append_rollouts(cfg, policy, path, 1, seed=round_)
        raise KeyboardInterrupt("killed while collecting")

    def collect(policy, episodes, round_):
        asked.append(episodes)
        _append_rollouts(cfg, policy, path, episodes, seed=round_)

    def agent(fn):
        policy, _ = load_policy(root / "bc")
        cfg = {"rounds": 2, "collect_episodes": 3, "critic_steps": 3, "critic_hidden": [16], "ppo_steps": 2,
               "batch_size": 8, "ope": "q", "ope_every": 1, "ope_states": 8, "ddim_steps": 2}
        return OfflineRLAgent(cfg, policy, path, tmp_path / "run", ListLogger(), seed=0, collect=fn)

    with pytest.raises(KeyboardInterrupt):
        agent(crash_after_one).train()
    assert EpisodeDataset(path).num_episodes == 7  # round 0 saved, then one of the three rollouts committed
    resumed = agent(collect)
    resumed.load(tmp_path / "run" / "checkpoints" / "last")
    resumed.train()
    assert asked == [3, 2]
    assert [h["episodes"] for h in resumed.history] == [6, 9]
    assert EpisodeDataset(path).num_episodes == 9
