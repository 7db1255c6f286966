"""Learned success rates with fixed seeds: the demo's claims, end to end (slow: ~40 min per task).

Run with `pytest -m slow tests/test_learning.py`.
"""
from __future__ import annotations

import json

import pytest

from distillery.pipeline import demo


@pytest.mark.slow
@pytest.mark.parametrize("task", ["push_cube"])
def test_demo_diffusion_beats_mlp_and_student_keeps_teacher_success(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = json.loads(demo([f"task={task}", "logger.wandb=false", f"run_dir={tmp_path / 'demo'}"]).read_text())
    rates = {(r["policy"], r["sampler"], r["runtime"]): r["success_rate"] for r in report["results"]}
    teacher = rates[("diffusion", "ddim:10", "torch")]
    assert report["episodes"] == 200
    assert teacher >= 0.90
    assert teacher >= rates[("mlp", "direct", "torch")] + 0.10
    # the one-step student keeps >= 95% of its teacher's success, in PyTorch and through the deploy runtime
    assert rates[("consistency", "consistency:1", "torch")] >= 0.95 * teacher
    assert rates[("consistency", "consistency:1", "onnx-runtime")] >= 0.95 * teacher - 0.1  # 50 episodes
