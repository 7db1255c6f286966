"""Deploy runtime: runs without torch, validates every observation (holding the last safe action on bad input),
clamps to the manifest's bounds, and replays exactly what `Policy.act` would do with the same noise."""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_helpers import exported, random_state

from distillery.deploy import Runtime

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter where any attempt to import torch fails: the robot computer has no torch.
TORCH_FREE_SCRIPT = r'''
import importlib.abc, json, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: the deploy runtime must run without torch")

sys.meta_path.insert(0, BlockTorch())
import numpy as np
from distillery.deploy import Runtime

runtime = Runtime(sys.argv[1], seed=3)
states = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
actions = [runtime.step({"state": s}).tolist() for s in states]
try:
    import torch  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"actions": actions, "plans": runtime.counters["plans"], "blocked": blocked,
                  "torch_modules": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                  "onnxruntime": "onnxruntime" in sys.modules}))
'''


class CountingSession:
    """Wraps an onnxruntime session to count graph calls (= plans)."""

    def __init__(self, session):
        self.session, self.calls = session, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.session.run(*args, **kwargs)


def test_runtime_runs_in_a_process_where_torch_cannot_be_imported(tmp_path_factory):
    _, out = exported(tmp_path_factory, "diffusion", "ddim:3")
    states = random_state(np.random.default_rng(0), 5)
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(out), json.dumps(states.tolist())],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["blocked"] and result["torch_modules"] == [] and result["onnxruntime"]
    assert result["plans"] == 2  # ticks 0 and 3 with Ta = 3
    here = Runtime(out, seed=3)  # the same export, seed and inputs give the same actions in this process
    want = [here.step({"state": s}) for s in states]
    np.testing.assert_allclose(np.asarray(result["actions"]), np.asarray(want), atol=1e-6)


def test_runtime_replans_every_Ta_ticks_and_matches_policy_act(tmp_path_factory):
    policy, out = exported(tmp_path_factory, "diffusion", "ddim:3")
    runtime = Runtime(out, seed=5)
    runtime.session = counter = CountingSession(runtime.session)

    # the PyTorch reference is Policy.act itself; only its noise comes from the runtime's numpy stream
    reference = copy.deepcopy(policy)
    noise_rng = np.random.default_rng(5)
    plan_in_torch = reference.predict_chunk

    def predict_chunk_with_runtime_noise(obs_history, sampler=None, generator=None, noise=None, carry=None):
        noise = noise_rng.standard_normal((1, policy.pred_horizon, policy.action_dim), dtype=np.float32)
        return plan_in_torch(obs_history, sampler, noise=torch.from_numpy(noise))

    reference.predict_chunk = predict_chunk_with_runtime_noise
    rng = np.random.default_rng(1)
    plans_after_tick = []
    for tick in range(10):
        if tick == 7:  # a new episode mid-queue: both forget the queue and refill the history
            runtime.reset()
            reference.reset()
        state = random_state(rng)
        got = runtime.step({"state": state})
        want = reference.act({"state": torch.from_numpy(state)[None]}, sampler="ddim:3")[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        plans_after_tick.append(counter.calls)
    assert plans_after_tick == [1, 1, 1, 2, 2, 2, 3, 4, 4, 4]  # Ta = 3; the reset at tick 7 re-plans at once
    assert runtime.counters == {"ticks": 10, "plans": 4, "rejected": 0, "clamped": 0}


GOOD = random_state(np.random.default_rng(2))


@pytest.mark.parametrize("bad, expected", [
    ({}, ["['state'] missing"]),
    ({"state": GOOD, "image": GOOD}, ["unexpected observation group(s) ['image']"]),
    ({"state": GOOD[:9]}, ["obs['state'] has shape (9,), expected (10,)"]),
    ({"state": GOOD[None]}, ["shape (1, 10)", "no batch or time axis"]),
    ({"state": GOOD.astype(np.int64)}, ["obs['state'] has dtype int64", "expects float32"]),
    ({"state": GOOD > 0}, ["dtype bool"]),
    ({"state": ["a"] * 10}, ["dtype <U1"]),
    ({"state": np.where(np.arange(10) == 3, np.nan, GOOD)}, ["NaN/inf", "indices [3]"]),
    ({"state": np.full(10, 1e39)}, ["10 NaN/inf", "float32"]),  # finite float64, inf once cast
])
def test_bad_observation_holds_the_last_action_and_says_why(tmp_path_factory, bad, expected):
    _, out = exported(tmp_path_factory, "mlp", None)
    runtime = Runtime(out)
    sent = runtime.step({"state": GOOD})
    held = runtime.step(bad)
    assert np.array_equal(held, sent), "a bad tick must repeat the last action sent"
    assert all(text in runtime.last_error for text in expected), runtime.last_error
    assert runtime.counters["rejected"] == 1 and runtime.counters["plans"] == 1
    runtime.step({"state": GOOD})  # the queued plan predates the bad tick: the next good tick re-plans
    assert runtime.counters["plans"] == 2 and runtime.last_error is None

    strict = Runtime(out, strict=True)
    strict.step({"state": GOOD})
    with pytest.raises(ValueError, match=re.escape(expected[0])):
        strict.step(bad)


def test_hold_action_before_any_good_observation(tmp_path_factory):
    _, out = exported(tmp_path_factory, "mlp", None)
    assert Runtime(out).step({"state": GOOD[:3]}).tolist() == [0.0, 0.0]  # the manifest's hold_action
    custom = Runtime(out, hold_action=[0.5, -0.25])  # e.g. the robot's home pose
    assert custom.step({}).tolist() == [0.5, -0.25]
    custom.step({"state": GOOD})
    custom.reset()
    assert custom.step({}).tolist() == [0.5, -0.25]  # a new episode starts from the initial hold again
    with pytest.raises(ValueError, match="hold_action must be 2 finite numbers"):
        Runtime(out, hold_action=[0.0])


def test_actions_are_clamped_to_the_manifest_bounds(tmp_path_factory, tmp_path):
    _, out = exported(tmp_path_factory, "mlp", None)
    tight = shutil.copytree(out, tmp_path / "tight")
    manifest = json.loads((tight / "manifest.json").read_text())
    manifest["action"]["low"], manifest["action"]["high"] = -0.01, 0.01  # a safety envelope inside [-1, 1]
    manifest["hold_action"] = [0.5, 0.5]
    (tight / "manifest.json").write_text(json.dumps(manifest))
    free, clamped = Runtime(out), Runtime(tight)
    np.testing.assert_array_equal(clamped.step({}), np.float32([0.01, 0.01]))  # the hold action is bounded too
    rng = np.random.default_rng(3)
    for _ in range(6):
        state = random_state(rng)
        raw, safe = free.step({"state": state}), clamped.step({"state": state})
        np.testing.assert_array_equal(safe, np.clip(raw, -0.01, 0.01))
    assert np.abs(raw).max() > 0.01  # the untrained policy does leave the envelope, so clamping was exercised
    assert clamped.counters["clamped"] >= 1 and free.counters["clamped"] == 0


def test_runtime_refuses_what_it_cannot_run(tmp_path_factory, tmp_path):
    _, ts = exported(tmp_path_factory, "mlp", None, fmt="torchscript")
    with pytest.raises(ValueError, match="runs ONNX exports"):
        Runtime(ts)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        Runtime(tmp_path)
