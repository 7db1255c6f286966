"""The CLI end to end on a tiny budget, and config validation errors (before any work starts)."""
from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from distillery import config as config_mod
from distillery.cli import main


@pytest.mark.parametrize("overrides, expected", [
    (["task=foo"], ["task/foo", "lift_cube", "push_cube"]),
    (["agent.stepz=3"], ["unknown key 'agent.stepz'", "steps", "batch_size"]),
    (["policy.down_dimz=[8]"], ["unknown key 'policy.down_dimz'", "down_dims"]),
    (["bogus=1"], ["unknown key 'bogus'", "episodes"]),
    # a task's stage list absent from config.yaml: the map takes it, but only with Hydra's ++ prefix
    (["pipeline.task_overrides.lift_cube.offline=[]"],
     ["unknown key 'pipeline.task_overrides.lift_cube.offline'", "'++pipeline.task_overrides.lift_cube.offline=...'"]),
    (["agent.steps=abc"], ["agent.steps", "abc"]),
    (["episodes=0"], ["episodes must be >= 1"]),
    (["sampler=ddim:x"], ["ddim:x", "Valid forms"]),
    (["policy.action_horizon=20"], ["exceeds", "pred_horizon"]),
    (["policy=mlp", "policy.obs_keys=[camera]"], ["camera"]),
    (["agent=distill", "agent.objective=magic"], ["agent.objective", "output", "consistency"]),
    (["agent=distill", "agent.steps=abc"], ["agent.steps", "abc"]),
    (["policy=streaming", "policy.stream_steps=20"], ["stream_steps"]),
])
def test_config_errors_name_the_problem(overrides, expected):
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.compose(overrides)
    for text in expected:
        assert text in str(err.value)


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["train", "agent.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'agent.stepz'" in err and "steps" in err


def test_experiments_compose_to_their_task_and_policy():
    for task in ("push_cube", "lift_cube"):
        for policy in ("diffusion", "mlp"):
            cfg = config_mod.compose([f"experiment={task}_{policy}"])
            assert (cfg.task.name, cfg.policy.name) == (task, policy)


def test_policy_yaml_lists_every_policy_key():
    """The YAML files are the documented defaults: each lists exactly the keys its policy class accepts."""
    from distillery.policies import POLICIES

    for name in ("diffusion", "mlp", "diffusion_dp_paper", "streaming"):
        cfg = config_mod.compose([f"policy={name}"])
        assert set(cfg.policy.keys()) - {"name"} == set(POLICIES[cfg.policy.name].DEFAULTS)
    for name in ("diffusion", "mlp"):  # and the default files hold the class defaults: one set of defaults
        cfg = OmegaConf.to_container(config_mod.compose([f"policy={name}"]).policy)
        assert {k: v for k, v in cfg.items() if k != "name"} == POLICIES[name].DEFAULTS


def test_collect_train_eval_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.zarr"
    assert main(["collect", "task=push_cube", "episodes=4", "collect.num_envs=2", f"dataset={data}"]) == 0
    assert main(["train", "experiment=push_cube_diffusion", f"dataset={data}", "agent.steps=4",
                 "agent.checkpoint_every=2", "agent.log_every=2", "agent.warmup_steps=1", "agent.batch_size=8",
                 "logger.wandb=false", "run_dir=tr"]) == 0
    assert (tmp_path / "tr" / "checkpoints" / "last" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["train", "experiment=push_cube_diffusion", f"dataset={data}", "run_dir=tr"]) == 2
    assert "--resume tr" in capsys.readouterr().err  # never silently restarts over a run
    # a run written before a config key (pipeline.distill_rollouts) or a section (export) existed resumes with
    # their defaults
    stored = OmegaConf.load(tmp_path / "tr" / "config.yaml")
    del stored.pipeline["distill_rollouts"], stored["export"]
    OmegaConf.save(stored, tmp_path / "tr" / "config.yaml")
    assert main(["train", "--resume", "tr"]) == 0
    assert "at step 4" in capsys.readouterr().out  # a finished run resumes at its last step: nothing left to do
    assert main(["train", "--resume", "nowhere"]) == 2
    lines = [json.loads(x) for x in (tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [2, 4]
    capsys.readouterr()
    assert main(["eval", "checkpoint=tr/checkpoints/last", "episodes=3", "eval.num_envs=2", "sampler=ddim:2",
                 "eval.latency_calls=2", "eval.video_episodes=1", "run_dir=ev"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.endswith("report.json")
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["task"] == "push_cube" and report["episodes"] == 3 and report["seed"] == 0
    (row,) = report["results"]
    assert row["policy"] == "diffusion" and row["sampler"] == "ddim:2" and row["episodes"] == 3
    assert 0.0 <= row["success_ci95"][0] <= row["success_rate"] <= row["success_ci95"][1] <= 1.0
    assert row["latency_ms_p50"] > 0 and math.isfinite(row["mean_return"])
    from PIL import Image  # the first episode's video: one frame per control step

    (gif,) = (tmp_path / "ev").glob("video_diffusion_ddim-2_0.gif")
    assert 1 < Image.open(gif).n_frames <= 200  # push_cube episodes last at most 200 control steps

    # distill the trained policy into a one-step student; eval and a second distill read its checkpoint
    distill = ["distill", "teacher=tr", "agent.steps=2", "agent.batch_size=8", "agent.teacher_sampler=ddim:2",
               "agent.log_every=1", "logger.wandb=false"]
    assert main([*distill, "run_dir=ds", "agent.episode_sampling=episode"]) == 0
    assert (tmp_path / "ds" / "checkpoints" / "last" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main([*distill, "run_dir=ds_bad", "agent.episode_sampling=uniform"]) == 2
    assert "use 'step'" in capsys.readouterr().err and not (tmp_path / "ds_bad").exists()  # refused before any work
    assert main(["eval", "checkpoint=ds", "episodes=2", "eval.num_envs=2", "eval.latency_calls=1",
                 "run_dir=ev2"]) == 0
    rows = json.loads((tmp_path / "ev2" / "report.json").read_text())["results"]
    assert [(r["policy"], r["sampler"]) for r in rows] == [("consistency", "consistency:1"),
                                                           ("consistency", "consistency:3")]
    capsys.readouterr()
    assert main([*distill, "teacher=ds", "run_dir=ds2"]) == 2  # a student is no teacher
    assert "needs a diffusion policy" in capsys.readouterr().err
    assert main(["distill", "logger.wandb=false", "run_dir=ds3"]) == 2
    assert "teacher=" in capsys.readouterr().err


def test_eval_without_checkpoint_is_a_clear_error(capsys):
    assert main(["eval"]) == 2
    assert "checkpoint=" in capsys.readouterr().err


def test_train_on_missing_dataset_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "dataset=nope.zarr", "logger.wandb=false", "run_dir=x"]) == 2
    assert "nope.zarr" in capsys.readouterr().err
