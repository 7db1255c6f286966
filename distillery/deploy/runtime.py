"""Torch-free deploy runtime: run an exported ONNX policy one control tick at a time on a robot.

Imports only numpy, onnxruntime and the standard library (plus the stdlib-only manifest module), so the robot
computer needs neither torch nor the training stack. Per tick::

    action = runtime.step({"state": np.array([...])})    # one robot: each group has its spec shape, no batch axis

What it does, mirroring ``Policy.act`` so a deployed policy behaves as it did in evaluation:
  * keeps the last ``To`` observations; after ``reset()`` the first observation fills the whole history;
  * re-plans every ``Ta`` ticks: one graph call with fresh ``N(0, I)`` noise from ``np.random.default_rng(seed)``
    returns ``Ta`` actions, executed one per tick;
  * clamps every action to the manifest's bounds (the graph clamps too; a tighter manifest bound acts as a safety
    envelope) and counts clamped ticks.

Bad input never raises in the control loop (unless ``strict=True``). A missing or extra group, a wrong shape, a
non-numeric or wrong-kind dtype, or NaN/inf, makes ``step`` return the **hold action** and record why in
``last_error``:
  * the hold action is the last action this runtime sent: for absolute position targets (the tasks here) that
    keeps the robot where it was commanded, the conservative choice; before any action was sent it is the
    manifest's ``hold_action`` (the middle of the action bounds unless the export set it; override with
    ``Runtime(hold_action=...)``, e.g. the robot's home pose);
  * the bad observation is not added to the history and the queued actions are dropped, so the next good tick
    re-plans from fresh observations instead of replaying a plan made before the dropout.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from distillery.deploy.manifest import ACTION_OUTPUT, NOISE_INPUT, read_manifest

__all__ = ["Runtime"]


class Runtime:
    """One robot's closed-loop policy runtime over an export written by ``distillery export`` (ONNX format).

    Args:
        path: the export dir (or its ``manifest.json``).
        seed: seeds the noise generator (``np.random.default_rng(seed)``).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
        threads: onnxruntime intra-op threads (1 keeps latency steady beside other robot processes).
        strict: raise ``ValueError`` on bad input instead of holding (for tests and bring-up).
        hold_action: ``(Da,)`` action sent on bad input before any action was sent (default: manifest's).

    Attributes:
        last_error: why the latest ``step`` held instead of acting (None when it acted).
        counters: ``ticks`` (step calls), ``plans`` (graph calls), ``rejected`` (held ticks), ``clamped``
            (ticks whose action was clamped).
        obs_keys, obs_horizon, pred_horizon, action_horizon, action_dim, control_dt, manifest.
    """

    def __init__(self, path: str | os.PathLike, seed: int = 0, providers: Sequence[str] | None = None,
                 threads: int = 1, strict: bool = False, hold_action: Sequence[float] | None = None) -> None:
        self.export_dir, self.manifest = read_manifest(path)
        m = self.manifest
        if m["format"] != "onnx":
            raise ValueError(f"{self.export_dir} holds a {m['format']!r} export; the deploy runtime runs ONNX "
                             f"exports (re-export with export.format=onnx; load TorchScript with torch.jit.load)")
        model_path = self.export_dir / m["file"]
        if not model_path.is_file():
            raise FileNotFoundError(f"model file {model_path} named by the manifest is missing; copy the whole "
                                    f"export dir")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(model_path), sess_options=options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if graph_inputs != list(m["inputs"]):
            raise ValueError(f"{model_path} has inputs {graph_inputs} but the manifest lists {m['inputs']}; the "
                             f"export dir mixes files of different exports, re-export it")

        self.obs_keys: list[str] = list(m["obs_keys"])
        self.obs_horizon = int(m["obs_horizon"])
        self.pred_horizon = int(m["pred_horizon"])
        self.action_horizon = int(m["action_horizon"])
        self.action_dim = int(m["action"]["shape"][0])
        self.control_dt: float | None = m.get("control_dt")
        self._obs_shape = {k: tuple(int(s) for s in m["obs"][k]["shape"]) for k in self.obs_keys}
        self._obs_dtype = {k: np.dtype(m["obs"][k]["dtype"]) for k in self.obs_keys}
        self._obs_input = {k: m["obs"][k]["input"] for k in self.obs_keys}
        self._noise_shape = (1, self.pred_horizon, self.action_dim)
        self.action_low = np.full(self.action_dim, _bound(m["action"]["low"], -math.inf), np.float32)
        self.action_high = np.full(self.action_dim, _bound(m["action"]["high"], math.inf), np.float32)
        hold = m["hold_action"] if hold_action is None else hold_action
        self.hold_action = np.asarray(hold, dtype=np.float32).reshape(-1)
        if self.hold_action.shape != (self.action_dim,) or not np.isfinite(self.hold_action).all():
            raise ValueError(f"hold_action must be {self.action_dim} finite numbers, got {list(hold)}")
        self.hold_action = np.clip(self.hold_action, self.action_low, self.action_high)

        self.strict = bool(strict)
        self._rng = np.random.default_rng(seed)
        self.counters = {"ticks": 0, "plans": 0, "rejected": 0, "clamped": 0}
        self.last_error: str | None = None
        self._history: dict[str, np.ndarray] | None = None  # {group: (1, To, *shape)} float32, graph-ready
        self._queue = np.zeros((self.action_horizon, self.action_dim), np.float32)
        self._queue_next = self.action_horizon  # index of the next queued action; Ta = empty
        self._last_action = self.hold_action.copy()

    # ------------------------------------------------------------------------------------------ control loop
    def reset(self, seed: int | None = None) -> None:
        """Start a new episode: forget history and queue; the hold action falls back to the initial one.

        ``seed`` re-seeds the noise generator (otherwise it continues, as an evaluation's generator does).
        """
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._history = None
        self._queue_next = self.action_horizon
        self._last_action = self.hold_action.copy()
        self.last_error = None

    def step(self, obs: Mapping[str, Any]) -> np.ndarray:
        """One control tick: ``obs {group: array of the spec shape}`` -> action ``(Da,)`` float32 (a fresh copy)."""
        self.counters["ticks"] += 1
        checked = self._check(obs)
        if isinstance(checked, str):
            return self._hold(checked)
        self._push(checked)
        if self._queue_next >= self.action_horizon:
            chunk = self._plan()
            if not np.isfinite(chunk).all():
                self._history = None  # do not plan again from the history that produced this
                return self._hold("the policy returned NaN/inf actions; holding. The export or its inputs are "
                                  "broken (check the observations' units against the manifest)")
            self._queue[:] = chunk
            self._queue_next = 0
        action = self._queue[self._queue_next].copy()
        self._queue_next += 1
        if (action < self.action_low).any() or (action > self.action_high).any():
            np.clip(action, self.action_low, self.action_high, out=action)
            self.counters["clamped"] += 1
        self._last_action = action
        self.last_error = None
        return action.copy()

    # ------------------------------------------------------------------------------------------ internals
    def _check(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray] | str:
        """float32 arrays per group, or the message saying what is wrong with ``obs``."""
        if not isinstance(obs, Mapping):
            return (f"observation must be a dict {{group: array}} with groups {self.obs_keys}, got "
                    f"{type(obs).__name__}")
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            return (f"observation group(s) {missing} missing; expected exactly {self.obs_keys}, got "
                    f"{sorted(map(str, obs))}")
        extra = sorted(str(k) for k in obs if k not in self._obs_shape)
        if extra:
            return (f"unexpected observation group(s) {extra}; the policy takes exactly {self.obs_keys} (drop the "
                    f"others before step)")
        out = {}
        for k in self.obs_keys:
            want_shape, want_dtype = self._obs_shape[k], self._obs_dtype[k]
            try:
                x = np.asarray(obs[k])
            except Exception as e:  # anything np.asarray chokes on is a bad observation, not a crash
                return f"obs[{k!r}] cannot be read as an array ({e}); expected shape {want_shape} {want_dtype}"
            if not _dtype_accepted(x.dtype, want_dtype):
                return (f"obs[{k!r}] has dtype {x.dtype} but the policy expects {want_dtype} (any "
                        f"{'floating' if want_dtype.kind == 'f' else 'integer'} dtype is converted); "
                        f"shape {want_shape}")
            if x.shape != want_shape:
                return (f"obs[{k!r}] has shape {x.shape}, expected {want_shape} (one robot: no batch or time "
                        f"axis) {want_dtype}")
            with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: caught below
                x = x.astype(np.float32, copy=False)
            finite = np.isfinite(x)
            if not finite.all():
                where = [tuple(i) if len(i) > 1 else i[0] for i in np.argwhere(~finite)[:5].tolist()]
                return (f"obs[{k!r}] has {int((~finite).sum())} NaN/inf value(s) (first at indices {where}, after "
                        f"conversion to float32); expected finite values of shape {want_shape}")
            out[k] = x
        return out

    def _push(self, obs: dict[str, np.ndarray]) -> None:
        if self._history is None:  # episode start: repeat the first observation, as in training and Policy.act
            self._history = {k: np.repeat(v[None, None], self.obs_horizon, axis=1) for k, v in obs.items()}
            return
        for k, v in obs.items():
            h = self._history[k]
            h[0, :-1] = h[0, 1:]
            h[0, -1] = v

    def _plan(self) -> np.ndarray:
        assert self._history is not None
        feed = {self._obs_input[k]: self._history[k] for k in self.obs_keys}
        feed[NOISE_INPUT] = self._rng.standard_normal(self._noise_shape, dtype=np.float32)
        self.counters["plans"] += 1
        return self.session.run([ACTION_OUTPUT], feed)[0][0]

    def _hold(self, why: str) -> np.ndarray:
        self.counters["rejected"] += 1
        self.last_error = why
        self._queue_next = self.action_horizon  # a plan made before the bad tick is stale: re-plan on the next
        if self.strict:
            raise ValueError(why)
        return self._last_action.copy()

    def __repr__(self) -> str:
        return (f"Runtime({str(self.export_dir)!r}, policy={self.manifest['policy']['name']!r}, "
                f"sampler={self.manifest.get('sampler')!r}, obs={self.obs_keys}, To={self.obs_horizon}, "
                f"Ta={self.action_horizon}, Da={self.action_dim})")


def _bound(value: float | None, default: float) -> float:
    return default if value is None else float(value)


def _dtype_accepted(got: np.dtype, want: np.dtype) -> bool:
    """Same kind as the spec: any float for a float group (float64 sensors are common), any int for an int group.
    Bools, complex, strings and objects never are (they are bugs upstream, not sensor readings)."""
    if want.kind == "f":
        return got.kind == "f"
    if want.kind in "iu":
        return got.kind in "iu"
    return got == want

