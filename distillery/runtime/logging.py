"""Metric logging for training runs: JSONL file (source of truth), concise console lines, wandb.

wandb runs offline unless the user configured it (``WANDB_API_KEY`` or ``WANDB_MODE`` set; after
``wandb login``, ``WANDB_MODE=online``), so training never blocks on network access,
and any wandb failure only produces a warning: logging must never crash training.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from distillery.runtime.checkpoint import atomic_write_text


def _wandb_configured() -> bool:
    """True if the user chose how wandb runs (``WANDB_API_KEY`` or ``WANDB_MODE``, e.g. ``online`` after
    ``wandb login``). Distillery reads no file outside the run to decide this: without either it logs offline."""
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def _to_plain(x: Any) -> Any:
    """Scalars from tensors / numpy to Python numbers for JSON and console."""
    if hasattr(x, "item") and getattr(x, "ndim", 0) == 0:
        return x.item()
    if isinstance(x, Mapping):
        return {str(k): _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"


class Logger:
    """Logs metrics of one run to ``run_dir/metrics.jsonl``, the console and wandb.

    Args:
        run_dir: the run's directory (created if missing); wandb files go to ``run_dir/wandb``.
        config: the run config (a dict or OmegaConf config), sent to wandb.
        wandb: enable wandb logging.
        project / name: wandb project and run name (default: the run dir's name).
        console_interval: minimum seconds between console lines (the JSONL gets every call).
    """

    def __init__(self, run_dir: str | os.PathLike, config: Mapping[str, Any] | Any, wandb: bool = True,
                 project: str = "distillery", name: str | None = None, console_interval: float = 5.0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = self._plain_config(config)
        self.console_interval = console_interval
        self._last_console = -math.inf
        self._t0 = time.time()
        # Append mode: a resumed run keeps its earlier lines. Line-buffered writes + flush per call mean a
        # crash loses at most the line being written.
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._wandb_run: Any = None
        self._wandb_failed = False
        if wandb:
            self._init_wandb(project, name or self.run_dir.name)

    @staticmethod
    def _plain_config(config: Any) -> dict[str, Any]:
        if config is None:
            return {}
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(config, DictConfig):
                return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
        except ImportError:
            pass
        if not isinstance(config, Mapping):
            raise TypeError(f"Logger config must be a dict or OmegaConf DictConfig, got {type(config).__name__}")
        return dict(config)

    def _init_wandb(self, project: str, name: str) -> None:
        try:
            import wandb

            (self.run_dir / "wandb").mkdir(exist_ok=True)
            mode = None if _wandb_configured() else "offline"
            self._wandb_run = wandb.init(project=project, name=name, config=self.config, dir=str(self.run_dir),
                                         mode=mode, reinit="create_new")
        except Exception as e:  # any failure (no network, bad key, broken install) must not stop training
            warnings.warn(f"wandb init failed ({type(e).__name__}: {e}); continuing with JSONL/console logging "
                          f"only. Set WANDB_MODE=offline or disable wandb in the config to silence this.",
                          RuntimeWarning, stacklevel=3)
            self._wandb_run = None

    @property
    def wandb_run(self) -> Any:
        """The wandb Run, or None if wandb is disabled or failed."""
        return self._wandb_run

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record ``metrics`` (scalars: float/int/bool/str, 0-d tensors or numpy scalars) at ``step``."""
        plain = {str(k): _to_plain(v) for k, v in metrics.items()}
        now = time.time()
        record = {"step": int(step), "time": round(now - self._t0, 3), **plain}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if now - self._last_console >= self.console_interval:
            self._last_console = now
            parts = [f"step {int(step)}"] + [f"{k} {_fmt(v)}" for k, v in plain.items()
                                             if isinstance(v, (int, float, str))]
            tqdm.write(" | ".join(parts), file=sys.stdout)
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(plain, step=int(step))
            except Exception as e:
                self._disable_wandb(e)

    def _disable_wandb(self, e: Exception) -> None:
        warnings.warn(f"wandb logging failed ({type(e).__name__}: {e}); disabling wandb for this run, metrics "
                      f"still go to {self.run_dir / 'metrics.jsonl'}", RuntimeWarning, stacklevel=3)
        self._wandb_run = None

    def progress(self, total: int | None, desc: str = "", **kwargs: Any) -> tqdm:
        """A tqdm bar; refreshes at most every 0.5 s on a terminal and every 30 s in log files."""
        interactive = sys.stderr.isatty()
        kwargs.setdefault("mininterval", 0.5 if interactive else 30.0)
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(total=total, desc=desc, **kwargs)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Write ``run_dir/summary.json`` atomically (replacing any previous one) and update wandb's summary."""
        plain = {str(k): _to_plain(v) for k, v in values.items()}
        atomic_write_text(self.run_dir / "summary.json", json.dumps(plain, indent=1))
        if self._wandb_run is not None:
            try:
                self._wandb_run.summary.update(plain)
            except Exception as e:
                self._disable_wandb(e)

    def close(self) -> None:
        """Close the JSONL file and finish the wandb run (idempotent)."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            try:
                run.finish()
            except Exception as e:
                warnings.warn(f"wandb finish failed ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
