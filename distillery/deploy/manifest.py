"""The deploy manifest: what a robot-side runtime needs to know about an exported policy, as plain JSON.

Standard library only: the exporter (torch side) writes it and the runtime (numpy + onnxruntime side) reads it,
so neither may pull the other's dependencies in through this module.

``manifest.json`` (``manifest_version`` 1)::

    {"manifest_version": 1,
     "format": "onnx" | "torchscript",        "file": "policy.onnx" | "policy.pt",
     "inputs": ["obs.state", "noise"],         "outputs": ["action"],
     "obs_keys": ["state"],                    # input order of the observation groups
     "obs": {"state": {"input": "obs.state", "shape": [10], "dtype": "float32", "low": null, "high": null}},
     "noise": {"input": "noise", "shape": [Tp, Da], "dtype": "float32", "distribution": "standard_normal"},
     "action": {"output": "action", "shape": [Da], "dtype": "float32", "low": -1.0, "high": 1.0},
     "hold_action": [0.0, 0.0],                # sent while no valid action exists yet (see runtime.py)
     "obs_horizon": To, "pred_horizon": Tp, "action_horizon": Ta,
     "control_dt": 0.1 | null,                 # seconds per control tick (one ``step``)
     "sampler": "ddim:10", "policy": {"name", "params", "cfg"},
     "task": {"name", "max_episode_steps", "decimation", "kwargs"} | null,
     "source_checkpoint": {"path", "file", "sha256", "step"} | null,
     "versions": {"torch", "onnx", "onnxruntime", "onnxscript", "opset", "python", "distillery"},
     "parity": {"backend", "batch_sizes", "max_abs_diff", "tol", "passed"},
     "created": ISO 8601 UTC time}

Graph contract: inputs ``obs.<group> (B, To, *shape)`` float32 in raw env units and ``noise (B, Tp, Da)`` float32
(the sampler's initial sample, standard normal); output ``action (B, Ta, Da)`` float32: the executed chunk in env
units, already clamped to the action bounds. ``B`` is dynamic.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
MODEL_FILES = {"onnx": "policy.onnx", "torchscript": "policy.pt"}
NOISE_INPUT = "noise"
ACTION_OUTPUT = "action"
# Every file an export dir may hold; the exporter only replaces a directory made of these (never a run dir).
EXPORT_DIR_FILES = frozenset({MANIFEST_FILE, *MODEL_FILES.values(), "config.yaml"})

_REQUIRED_KEYS = ("manifest_version", "format", "file", "inputs", "outputs", "obs_keys", "obs", "noise", "action",
                  "hold_action", "obs_horizon", "pred_horizon", "action_horizon")

__all__ = ["ACTION_OUTPUT", "EXPORT_DIR_FILES", "MANIFEST_FILE", "MANIFEST_VERSION", "MODEL_FILES", "NOISE_INPUT",
           "obs_input_name", "read_manifest"]


def obs_input_name(group: str) -> str:
    """Graph input name of an observation group."""
    return f"obs.{group}"


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(export_dir, manifest)`` from an export dir or its ``manifest.json``; ValueError on a malformed one."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE if path.is_dir() else path
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_FILE} at {manifest_path}; pass the directory written by "
                                f"`distillery export` (it holds {MANIFEST_FILE} and the model file)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path} is not valid JSON ({e}); re-export the policy") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} must hold a JSON object; re-export the policy")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{manifest_path} lacks keys {missing}; it was not written by `distillery export` "
                         f"(manifest_version {MANIFEST_VERSION})")
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path} has manifest_version {manifest['manifest_version']}; this distillery "
                         f"reads version {MANIFEST_VERSION}. Re-export with this version")
    return manifest_path.parent, manifest
