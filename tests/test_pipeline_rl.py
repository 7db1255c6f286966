"""`distillery pipeline` end to end on a tiny budget: every stage writes its run directory, the report has one row
per stage, a rerun skips finished stages, an interrupted stage resumes; and the RL agents through `train`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distillery import config as config_mod
from distillery.cli import main

TINY_POLICY = ["policy=diffusion", "policy.down_dims=[8,16]", "policy.step_embed_dim=8", "policy.n_groups=4",
               "policy.pred_horizon=4", "policy.action_horizon=2", "policy.encoder.hidden=[16]",
               "policy.encoder.out_dim=8"]
TINY = [
    "task=push_cube", "task.max_episode_steps=12", "logger.wandb=false", "pipeline.root=pipe", "pipeline.episodes=4",
    "pipeline.eval_episodes=4", "pipeline.distill_rollouts=2", "pipeline.dart_noise.push_cube=0.3", "eval.num_envs=4", "eval.deploy_episodes=1", "collect.num_envs=4",
    "pipeline.bc=[" + ",".join(f'"{o}"' for o in [*TINY_POLICY, "agent.steps=3", "agent.batch_size=8",
                                                   "agent.warmup_steps=1", "agent.log_every=1"]) + "]",
    # two rounds with rollouts of the accepted policy appended in between (RL-100's iterative offline RL)
    'pipeline.offline=["agent=offline","agent.rounds=2","agent.collect_episodes=2","agent.critic_steps=3",'
    '"agent.critic_hidden=[16]","agent.ppo_steps=2","agent.batch_size=8","agent.ope=q","agent.ope_every=1","agent.ope_states=8",'
    '"agent.ddim_steps=2","agent.log_every=1"]',
    'pipeline.online=["agent=ppo","agent.num_envs=2","agent.env_steps=16","agent.num_steps=4","agent.epochs=1",'
    '"agent.minibatch_size=4","agent.ddim_steps=2","agent.value_hidden=[16]"]',
    # the task's own stage overrides come after the shared ones (ppo_steps 2 -> 3)
    '++pipeline.task_overrides.push_cube.offline=["agent.ppo_steps=3"]', "pipeline.task_overrides.push_cube.online=[]",
    'pipeline.distill=["agent=distill","agent.steps=2","agent.batch_size=8","agent.teacher_sampler=ddim:2",'
    '"agent.log_every=1"]',
]


def test_pipeline_runs_every_stage_reports_and_skips_finished_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", *TINY]) == 0
    report = json.loads((tmp_path / "pipe" / "report.json").read_text())
    assert [r["stage"] for r in report["rows"]] == ["expert", "bc", "offline", "online", "one_step"]
    for r in report["rows"]:
        assert r["task"] == "push_cube" and r["episodes"] == 4 and 0.0 <= r["success_rate"] <= 1.0
        assert r["wall_s"] > 0
    assert report["rows"][-1]["sampler"] == "consistency:1" and report["rows"][-1]["onnx_latency_ms_p50"] > 0
    for stage in ("bc", "offline", "online", "distill"):
        assert (tmp_path / "pipe" / stage / "checkpoints" / "last" / "meta.json").is_file()
    # each RL stage started from the previous one
    online = json.loads((tmp_path / "pipe" / "online" / "checkpoints" / "last" / "meta.json").read_text())
    assert online["agent"] == "ppo" and online["init"]["checkpoint"].startswith(str(tmp_path / "pipe" / "offline"))
    offline = json.loads((tmp_path / "pipe" / "offline" / "checkpoints" / "last" / "meta.json").read_text())
    assert offline["config"]["agent"]["ppo_steps"] == 3 and offline["config"]["agent"]["rounds"] == 2
    assert [h["episodes"] for h in offline["offline_history"]] == [4, 6]  # round 2 saw the 2 appended rollouts
    # into the stage's own copy of the demonstrations, which stay as they were
    assert Path(offline["dataset"]).resolve() == tmp_path / "pipe" / "offline" / "data.zarr"
    from distillery.data import EpisodeDataset
    assert EpisodeDataset(offline["dataset"]).num_episodes == 6
    assert EpisodeDataset(tmp_path / "pipe" / "data.zarr").num_episodes == 4
    # the demonstrations were played with the executed-only (DART) noise; the student was distilled on
    # rollouts of the online policy (its own sampler), not on the demonstrations
    assert EpisodeDataset(tmp_path / "pipe" / "data.zarr").meta["action_noise"] == 0.3
    distilled = json.loads((tmp_path / "pipe" / "distill" / "checkpoints" / "last" / "meta.json").read_text())
    rollouts = EpisodeDataset(distilled["dataset"])
    assert Path(distilled["dataset"]).resolve() == tmp_path / "pipe" / "rollouts" / "data.zarr"
    assert rollouts.num_episodes == 2
    assert Path(rollouts.meta["source"]).resolve().is_relative_to(tmp_path / "pipe" / "online")
    assert rollouts.meta["sampler"] == "ddim:2:eta=1"
    # push_cube's DAgger round: a second student distilled on the teacher's rollouts plus 2 of the first student's
    # (the same episodes first, then the student's), and the report's one-step row is that second student
    dagger = json.loads((tmp_path / "pipe" / "distill_dagger1" / "checkpoints" / "last" / "meta.json").read_text())
    assert Path(dagger["dataset"]).resolve() == tmp_path / "pipe" / "dagger1_rollouts" / "data.zarr"
    merged = EpisodeDataset(dagger["dataset"])
    assert merged.num_episodes == 4
    for i in range(2):
        assert (merged.episode(i)["action"] == rollouts.episode(i)["action"]).all()
    assert merged.meta["source"] == rollouts.meta["source"]
    assert Path(report["rows"][-1]["checkpoint"]).resolve() == tmp_path / "pipe" / "distill_dagger1"
    assert set(report["stage_wall_s"]) >= {"dagger1_rollouts", "one_step"}
    capsys.readouterr()

    # a rerun skips every finished stage and reports the same rows
    assert main(["pipeline", *TINY]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 9
    again = json.loads((tmp_path / "pipe" / "report.json").read_text())
    assert [r["success_rate"] for r in again["rows"]] == [r["success_rate"] for r in report["rows"]]

    # a stage interrupted after its checkpoints were written resumes from them instead of starting over
    (tmp_path / "pipe" / "distill" / "stage.json").unlink()
    shutil.rmtree(tmp_path / "pipe" / "eval")
    assert main(["pipeline", *TINY]) == 0
    assert "resumed from" in capsys.readouterr().out

    # without the DAgger round the one-step row is the first student: re-evaluated and re-exported, not the
    # cached evaluation and export of the DAgger student
    assert main(["pipeline", *TINY, "pipeline.distill_dagger_rounds.push_cube=0"]) == 0
    fewer = json.loads((tmp_path / "pipe" / "report.json").read_text())
    assert Path(fewer["rows"][-1]["checkpoint"]).resolve() == tmp_path / "pipe" / "distill"
    def key(rows):
        return [(r["stage"], r["checkpoint"], r["success_rate"]) for r in rows]
    assert key(fewer["rows"][:-1]) == key(report["rows"][:-1])
    manifest = json.loads((tmp_path / "pipe" / "export" / "manifest.json").read_text())
    assert Path(manifest["source_checkpoint"]["path"]).is_relative_to(tmp_path / "pipe" / "distill")


def test_rl_agent_configs_are_checked_before_any_work():
    with pytest.raises(config_mod.ConfigError, match=r"agent.epoch.*valid keys of agent.*epochs, eta"):
        config_mod.compose(["agent=ppo", "agent.epoch=3"])
    with pytest.raises(config_mod.ConfigError, match="agent.num_envs must be >= 1"):
        config_mod.compose(["agent=sac", "agent.num_envs=0"])
    assert config_mod.compose(["agent=offline"]).agent.rounds >= 1


def test_offline_rl_needs_a_policy_to_start_from(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "agent=offline", "logger.wandb=false", "run_dir=off"]) == 2
    assert "init=" in capsys.readouterr().err


def test_agent_yamls_hold_the_class_defaults():
    import yaml

    from distillery.agents.offline import OfflineRLAgent
    from distillery.agents.ppo import PPOAgent

    for name, cls, extra in (("ppo", PPOAgent, {"num_envs"}), ("offline", OfflineRLAgent, set())):
        cfg = yaml.safe_load((config_mod.CONFIG_DIR / "agent" / f"{name}.yaml").read_text())
        assert cfg.pop("name") == name
        for key in extra:
            cfg.pop(key)
        assert cfg == cls.DEFAULTS


def test_an_rl_run_resumes_through_the_cli_with_its_own_agent(tmp_path, monkeypatch, capsys):
    """`train --resume` reads the agent from the run's stored config (here sac), not from the defaults (bc)."""
    monkeypatch.chdir(tmp_path)
    sac = ["train", "agent=sac", "policy=gaussian", "policy.squash=true", "policy.state_std=true",
           "policy.hidden=[16]", "agent.critic_hidden=[16]", "agent.num_envs=4", "agent.env_steps=16",
           "agent.learning_starts=8", "agent.batch_size=8", "logger.wandb=false", "run_dir=sac"]
    assert main(sac) == 0
    assert (tmp_path / "sac" / "checkpoints" / "step_000000016").is_dir()  # steps count transitions
    capsys.readouterr()
    assert main(["train", "--resume", "sac"]) == 0
    assert "at step 16" in capsys.readouterr().out
