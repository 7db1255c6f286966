"""Small untrained policies and their exports, shared by test_export.py and test_deploy.py.

An ONNX export of a diffusion policy takes the dynamo exporter ~15-25 s on these CPUs (the chain is unrolled), so
each (policy, sampler, format) is exported once per pytest session and reused read-only by every test.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from distillery.deploy.export import export_policy
from distillery.envs import make_env
from distillery.policies import Policy, make_policy
from distillery.runtime import save_checkpoint

SMALL_CFG = {
    # action_horizon 3 (not the default 2) so re-planning every Ta ticks is distinguishable from every other tick.
    # One U-Net level: two levels double the ONNX export time (~25 s); the export-time parity check covers the
    # down/up-sampling layers of real checkpoints.
    "diffusion": {"down_dims": [16], "step_embed_dim": 16, "pred_horizon": 8, "action_horizon": 3,
                  "encoder": {"type": "mlp", "hidden": [32], "out_dim": 16}},
    "mlp": {"hidden": [32], "pred_horizon": 8, "action_horizon": 3,
            "encoder": {"type": "mlp", "hidden": [32], "out_dim": 16}},
}
TASK_CFG = {"name": "push_cube", "max_episode_steps": None, "decimation": None, "kwargs": {}}
STATE_LOW, STATE_HIGH = -0.3, 0.3  # the normaliser's data range for every state dim


@functools.lru_cache(maxsize=None)
def push_cube_specs():
    env = make_env("push_cube", num_envs=1)
    specs = (env.observation_spec, env.action_spec, env.control_dt)
    env.close()
    return specs


def small_policy(name: str, seed: int = 0) -> Policy:
    obs_spec, action_spec, _ = push_cube_specs()
    torch.manual_seed(seed)
    policy = make_policy(name, obs_spec, action_spec, SMALL_CFG[name])
    dim = obs_spec["state"].shape[0]
    policy.set_normalizer({"state": {"min": np.full(dim, STATE_LOW), "max": np.full(dim, STATE_HIGH)},
                           "action": {"min": np.full(2, -1.0), "max": np.full(2, 1.0)}})
    return policy.eval()


def random_state(rng: np.random.Generator, *lead: int) -> np.ndarray:
    """Raw push_cube ``state`` observations inside the normaliser's range, float32 ``(*lead, 10)``."""
    dim = push_cube_specs()[0]["state"].shape[0]
    return rng.uniform(STATE_LOW, STATE_HIGH, size=(*lead, dim)).astype(np.float32)


_EXPORTS: dict[tuple[str, str | None, str], tuple[Policy, Path]] = {}


def exported(tmp_path_factory, name: str, sampler: str | None, fmt: str = "onnx") -> tuple[Policy, Path]:
    """``(policy, export_dir)`` of ``small_policy(name)``, exported once per session. Treat both as read-only."""
    key = (name, sampler, fmt)
    if key not in _EXPORTS:
        policy = small_policy(name)
        out = tmp_path_factory.mktemp("export") / f"{name}_{fmt}"
        export_policy(policy, out, sampler=sampler, fmt=fmt, control_dt=push_cube_specs()[2],
                      meta={"config": {"task": TASK_CFG}})
        _EXPORTS[key] = (policy, out)
    return _EXPORTS[key]


def write_checkpoint(policy: Policy, path: Path) -> Path:
    """A checkpoint dir as `distillery train` writes it (weights under ``model.``, describe() and config in meta)."""
    tensors = {f"model.{k}": v for k, v in policy.state_dict().items()}
    return save_checkpoint(path, tensors, {"kind": "policy", "step": 0, "task": "push_cube",
                                           "policy": policy.describe(), "config": {"task": TASK_CFG}})
