"""Export: ONNX / TorchScript graphs equal the PyTorch policy, refusals are clear, manifests are complete, exports
are all-or-nothing, and `distillery export` works end to end on a checkpoint."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from deploy_helpers import exported, push_cube_specs, random_state, small_policy, write_checkpoint

from distillery.cli import main
from distillery.deploy import export as export_mod
from distillery.deploy.export import export_policy
from distillery.deploy.manifest import read_manifest

PARITY_TOL = 1e-4


def pytorch_chunk(policy, sampler, state: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return policy.predict_chunk({"state": torch.from_numpy(state)}, sampler, noise=torch.from_numpy(noise)).numpy()


@pytest.mark.parametrize("name, sampler", [("diffusion", "ddim:3"), ("mlp", None)])
def test_onnx_graph_equals_pytorch_policy_at_batch_1_and_4(tmp_path_factory, name, sampler):
    policy, out = exported(tmp_path_factory, name, sampler)
    session = ort.InferenceSession(str(out / "policy.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["obs.state", "noise"]
    assert [o.name for o in session.get_outputs()] == ["action"]
    assert not [p for p in out.iterdir() if p.name not in ("policy.onnx", "manifest.json")]  # no external data
    rng = np.random.default_rng(1)
    for batch in (1, 4):
        state = random_state(rng, batch, policy.obs_horizon)
        noise = rng.standard_normal((batch, policy.pred_horizon, policy.action_dim)).astype(np.float32)
        (got,) = session.run(None, {"obs.state": state, "noise": noise})
        want = pytorch_chunk(policy, sampler, state, noise)
        assert got.shape == (batch, policy.action_horizon, policy.action_dim)
        assert np.abs(got - want).max() < PARITY_TOL
    parity = read_manifest(out)[1]["parity"]
    assert parity["passed"] and parity["max_abs_diff"] < PARITY_TOL and parity["tol"] == PARITY_TOL
    assert 1 in parity["batch_sizes"] and max(parity["batch_sizes"]) > 1


def test_noise_is_a_real_input_of_the_diffusion_graph(tmp_path_factory):
    """Different initial noise must give different actions, else the robot side would not own the randomness."""
    policy, out = exported(tmp_path_factory, "diffusion", "ddim:3")
    session = ort.InferenceSession(str(out / "policy.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    state = random_state(rng, 1, policy.obs_horizon)
    a, b = (session.run(None, {"obs.state": state, "noise": rng.standard_normal((1, 8, 2)).astype(np.float32)})[0]
            for _ in range(2))
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_equals_pytorch_policy(tmp_path_factory):
    policy, out = exported(tmp_path_factory, "diffusion", "ddim:3", fmt="torchscript")
    manifest = read_manifest(out)[1]
    assert manifest["format"] == "torchscript" and manifest["file"] == "policy.pt"
    assert manifest["parity"]["passed"] and manifest["parity"]["backend"].startswith("torch.jit")
    module = torch.jit.load(str(out / "policy.pt"))
    rng = np.random.default_rng(3)
    for batch in (1, 4):
        state = random_state(rng, batch, policy.obs_horizon)
        noise = rng.standard_normal((batch, policy.pred_horizon, policy.action_dim)).astype(np.float32)
        with torch.no_grad():
            got = module(torch.from_numpy(state), torch.from_numpy(noise)).numpy()
        assert np.abs(got - pytorch_chunk(policy, "ddim:3", state, noise)).max() < PARITY_TOL


def test_non_deterministic_sampler_is_refused_with_the_fix(tmp_path):
    policy = small_policy("diffusion")
    for sampler in ("ddpm", "ddim:3:eta=1.0", "rti:2"):
        with pytest.raises(ValueError) as err:
            export_policy(policy, tmp_path / "x", sampler=sampler)
        msg = str(err.value)
        assert repr(sampler) in msg and "ddim:K" in msg and "consistency:1" in msg, msg
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="format"):
        export_policy(policy, tmp_path / "x", sampler="ddim:3", fmt="tflite")


def test_manifest_describes_the_graph(tmp_path_factory):
    policy, out = exported(tmp_path_factory, "diffusion", "ddim:3")
    _, m = read_manifest(out)
    assert (m["format"], m["file"], m["manifest_version"]) == ("onnx", "policy.onnx", 1)
    assert m["inputs"] == ["obs.state", "noise"] and m["outputs"] == ["action"] and m["obs_keys"] == ["state"]
    assert m["obs"]["state"] == {"input": "obs.state", "shape": [10], "dtype": "float32", "low": None, "high": None}
    assert m["noise"] == {"input": "noise", "shape": [8, 2], "dtype": "float32", "distribution": "standard_normal"}
    assert m["action"] == {"output": "action", "shape": [2], "dtype": "float32", "low": -1.0, "high": 1.0}
    assert (m["obs_horizon"], m["pred_horizon"], m["action_horizon"]) == (2, 8, 3)
    assert m["hold_action"] == [0.0, 0.0] and m["control_dt"] == pytest.approx(push_cube_specs()[2])
    assert m["sampler"] == "ddim:3" and m["task"]["name"] == "push_cube"
    assert m["policy"]["name"] == "diffusion" and m["policy"]["params"] == policy.num_params()
    assert m["policy"]["cfg"]["down_dims"] == [16]
    assert m["source_checkpoint"] is None  # exported from memory, not from a checkpoint
    v = m["versions"]
    assert v["torch"] == torch.__version__ and v["onnxruntime"] == ort.__version__ and v["onnx"]
    assert isinstance(v["opset"], int) and v["opset"] >= 17
    # the MLP has no sampler: the manifest names what ran
    assert read_manifest(exported(tmp_path_factory, "mlp", None)[1])[1]["sampler"] == "direct"


def test_failed_parity_writes_nothing_and_keeps_the_previous_export(tmp_path, monkeypatch):
    policy = small_policy("mlp")
    out = export_policy(policy, tmp_path / "exp", fmt="torchscript")
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(export_mod, "_parity", lambda *a, **k: {"backend": "x", "batch_sizes": [1, 4],
                                                                "max_abs_diff": 0.5})
    with pytest.raises(export_mod.ExportParityError, match="0.5.*parity_tol"):
        export_policy(policy, out, fmt="torchscript")
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temp dirs left behind
    monkeypatch.undo()
    export_policy(policy, out, fmt="torchscript", hold_action=[0.25, -0.25])  # a passing export replaces it
    assert read_manifest(out)[1]["hold_action"] == [0.25, -0.25]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_export_never_replaces_a_directory_with_other_files(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds other files.*checkpoints"):
        export_policy(small_policy("mlp"), run_dir, fmt="torchscript")
    assert (run_dir / "checkpoints").is_dir()


def test_cli_export_writes_onnx_and_manifest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = write_checkpoint(small_policy("mlp"), tmp_path / "run" / "checkpoints" / "step_000000000")
    assert main(["export", "checkpoint=run", "export.out_dir=exp", "export.parity_batches=[1,3]"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "exp" and "parity max |diff|" in out[-2]
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["config.yaml", "manifest.json", "policy.onnx"]
    m = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["parity"]["batch_sizes"] == [1, 3]
    assert m["control_dt"] == pytest.approx(0.1) and m["task"]["name"] == "push_cube"
    src = m["source_checkpoint"]
    assert src["path"] == str(ckpt.resolve()) and src["step"] == 0
    assert src["sha256"] == hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()

    write_checkpoint(small_policy("diffusion"), tmp_path / "diff")
    assert main(["export", "checkpoint=diff", "sampler=ddpm", "export.out_dir=exp2"]) == 2
    err = capsys.readouterr().err
    assert "distillery export: error" in err and "ddim:K" in err and not (tmp_path / "exp2").exists()
    assert main(["export"]) == 2 and "checkpoint=" in capsys.readouterr().err
    assert main(["export", "checkpoint=diff", "export.format=tflite"]) == 2
    assert "export.format" in capsys.readouterr().err
