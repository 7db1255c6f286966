"""Learned success rates with fixed seeds: the demo's claims, end to end (slow: ~20 min per task).

Run with `pytest -m slow tests/test_learning.py`.
"""
from __future__ import annotations

import json

import pytest

from distillery.pipeline import demo


@pytest.mark.slow
@pytest.mark.parametrize("task", ["push_cube"])
def test_demo_diffusion_beats_mlp(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = json.loads(demo([f"task={task}", "logger.wandb=false", f"run_dir={tmp_path / 'demo'}"]).read_text())
    rates = {(r["policy"], r["sampler"]): r["success_rate"] for r in report["results"]}
    assert report["episodes"] == 200
    assert rates[("diffusion", "ddim:10")] >= 0.90
    assert rates[("diffusion", "ddim:10")] >= rates[("mlp", "direct")] + 0.10
