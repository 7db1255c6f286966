"""Run logger: JSONL metrics, console rate limit, offline wandb, atomic summary, failure tolerance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from distillery.runtime import logging as dlog
from distillery.runtime.logging import Logger


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records_and_console_rate_limit(tmp_path, capsys):
    with Logger(tmp_path / "run", {"lr": 1e-3}, wandb=False, console_interval=3600) as log:
        log.log({"loss": torch.tensor(0.25), "acc": np.float32(0.5), "n": np.int64(3), "tag": "a"}, step=10)
        log.log({"loss": 0.125, "bad": float("nan")}, step=20)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["loss"] == 0.25 and rows[0]["acc"] == 0.5 and rows[0]["n"] == 3 and rows[0]["tag"] == "a"
    assert rows[1]["loss"] == 0.125 and np.isnan(rows[1]["bad"])
    assert rows[0]["time"] <= rows[1]["time"]
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["step 10 | loss 0.25 | acc 0.5 | n 3 | tag a"]  # second call rate limited

    with Logger(tmp_path / "run", {}, wandb=False) as log:  # resumed run appends
        log.log({"loss": 0.0625}, step=30)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [10, 20, 30]


def test_jsonl_survives_hard_kill(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal
        from distillery.runtime.logging import Logger
        log = Logger({str(tmp_path / 'run')!r}, {{}}, wandb=False)
        for step in range(3):
            log.log({{"loss": step / 4}}, step=step)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -9
    assert [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0.0, 0.25, 0.5]


def test_offline_wandb_run_in_run_dir(tmp_path, clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    log = Logger(run_dir, {"policy": {"name": "diffusion"}}, project="distillery-test", name="t")
    assert log.wandb_run is not None
    assert log.wandb_run.config["policy"] == {"name": "diffusion"}
    log.log({"loss": 1.5}, step=1)
    log.summary({"success_rate": 0.75})
    log.close()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the offline event log (synced later with `wandb sync`)
    assert json.loads((run_dir / "summary.json").read_text()) == {"success_rate": 0.75}
    log.close()  # idempotent


def test_wandb_mode_defaults_to_offline_unless_configured(tmp_path, clean_wandb_env, monkeypatch):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or None)
    Logger(tmp_path / "a", {}).close()
    assert calls[-1]["mode"] == "offline" and calls[-1]["dir"] == str(tmp_path / "a")

    monkeypatch.setenv("WANDB_MODE", "online")
    Logger(tmp_path / "b", {}).close()
    assert calls[-1]["mode"] is None  # the user chose: let wandb read WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    Logger(tmp_path / "c", {}).close()
    assert calls[-1]["mode"] is None


def test_wandb_failures_only_warn(tmp_path, clean_wandb_env, monkeypatch):
    import wandb

    def broken_init(**kw):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="wandb init failed.*no network"):
        log = Logger(tmp_path / "run", {})
    assert log.wandb_run is None
    log.log({"loss": 1.0}, step=0)

    class FlakyRun:
        def log(self, *a, **k):
            raise ConnectionError("dropped")

    log._wandb_run = FlakyRun()
    with pytest.warns(RuntimeWarning, match="wandb logging failed"):
        log.log({"loss": 2.0}, step=1)
    log.log({"loss": 3.0}, step=2)  # wandb disabled, logging carries on
    log.close()
    assert [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1.0, 2.0, 3.0]


def test_summary_is_atomic(tmp_path, monkeypatch):
    log = Logger(tmp_path / "run", {}, wandb=False)
    log.summary({"a": 1})
    log.summary({"a": 2, "b": torch.tensor(0.5)})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"a": 2, "b": 0.5}

    def crash(*a, **k):
        raise OSError("killed mid-replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        log.summary({"a": 3})
    monkeypatch.undo()
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"a": 2, "b": 0.5}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "summary.json"]
    log.close()


def test_progress_bar_and_bad_config(tmp_path):
    with Logger(tmp_path / "run", {}, wandb=False) as log:
        bar = log.progress(total=5, desc="train")
        bar.update(5)
        assert bar.n == 5 and bar.total == 5
        bar.close()
    from omegaconf import OmegaConf

    with Logger(tmp_path / "run3", OmegaConf.create({"a": "${b}", "b": 1}), wandb=False) as log:
        assert log.config == {"a": 1, "b": 1}  # resolved plain dict, as wandb needs
    with pytest.raises(TypeError, match="dict or OmegaConf"):
        Logger(tmp_path / "run2", [1, 2], wandb=False)
    assert dlog._fmt(3e-4) == "3.000e-04" and dlog._fmt(0.123456) == "0.1235"
