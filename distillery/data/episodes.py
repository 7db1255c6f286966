"""Episode storage: a crash-safe zarr writer and an in-memory reader.

Store layout (zarr v3 directory store, Diffusion-Policy-like)::

    <path>/                      root group; attrs = caller meta + specs + commit record
      data/obs/<group>           (Nsteps, *obs_spec[group].shape)
      data/action                (Nsteps, Da)
      data/reward                (Nsteps,) float32
      data/terminated            (Nsteps,) bool
      data/truncated             (Nsteps,) bool
      meta/episode_ends          (E,) int64, cumulative (episode i spans [ends[i-1], ends[i]))

Crash safety. zarr's ``LocalStore`` writes every key (chunk or ``zarr.json``) to a temporary file and
``os.replace``-s it into place, so each single key is atomic under SIGKILL, but one episode touches many
keys (a chunk per array, plus metadata when an array grows) and those are *not* atomic together. So the
writer never trusts array shapes: arrays are over-allocated in large blocks and the only source of truth
is the commit record ``attrs["distillery_commit"] = {"num_episodes": E, "num_steps": N}`` in the root
``zarr.json``. An append (1) grows arrays if needed, (2) writes the rows ``[N, N+T)`` and
``episode_ends[E]``, and only then (3) rewrites the root ``zarr.json`` with the new counts (atomic
replace), followed by an fsync of that file and its directory. A kill before (3) leaves the previous
commit, and rows past it are garbage that readers ignore and the next append overwrites; committed rows
are only ever rewritten with identical bytes (zarr read-modify-writes a shared boundary chunk as a whole
and replaces it atomically). ``durable=True`` additionally ``os.sync()``-s before each commit so the data
also survives power loss, not just process death.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from distillery.specs import ObservationSpec, TensorSpec, obs_spec_from_json, obs_spec_to_json
from distillery.utils import fsync_path

FORMAT_VERSION = 1
"""Bumped on any incompatible change of the store layout; readers refuse other versions."""

_COMMIT_KEY = "distillery_commit"
_FORMAT_KEY = "distillery_format"
_RESERVED_META = ("obs_spec", "action_spec", _FORMAT_KEY, _COMMIT_KEY)
_CHUNK_BYTES = 1 << 20  # ~1 MiB uncompressed per chunk: cheap boundary-chunk rewrites on append
_ENDS_CHUNK = 4096
_PARTIAL_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr LocalStore's temp files (uuid4 hex)


def _distillery_version() -> str:
    try:
        from importlib.metadata import version

        return version("distillery")
    except Exception:  # not installed (e.g. running from a bare checkout)
        return "unknown"


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Accept numpy arrays and torch tensors (moved to CPU) without importing torch eagerly."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def _rows_per_chunk(row_shape: tuple[int, ...], dtype: np.dtype) -> int:
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize)
    return int(min(65536, max(1, _CHUNK_BYTES // row_bytes)))


def _check_json(meta: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"dataset meta must be JSON-compatible (str keys; str/int/float/bool/None/list/dict values, finite "
            f"floats): {e}. Convert numpy scalars with float()/int() and specs with to_json()."
        ) from e


class EpisodeWriter:
    """Appends whole episodes to a zarr dataset; safe against being killed at any moment.

    Args:
        path: dataset directory (conventionally ``*.zarr``).
        meta: JSON-compatible metadata stored as root attrs (e.g. ``task``, ``expert_noise``, ``seed``).
        obs_spec: observation groups to store, each row of ``obs[group]`` has shape ``spec.shape``.
        action_spec: per-step action spec, rows of shape ``(Da,)``.
        mode: ``"a"`` create or resume an existing dataset (default), ``"w"`` delete and recreate,
            ``"w-"`` fail if ``path`` exists.
        durable: ``os.sync()`` before every commit so appended episodes also survive power loss.

    Resuming checks that the stored specs and ``task`` equal the given ones; other meta keys that differ
    are recorded in ``attrs["resumes"]`` (the original values are kept). Only one writer may hold a
    dataset at a time (an advisory ``flock`` on the directory, released automatically if the process dies).
    """

    def __init__(self, path: str | os.PathLike, meta: Mapping[str, Any], obs_spec: ObservationSpec,
                 action_spec: TensorSpec, *, mode: Literal["a", "w", "w-"] = "a", durable: bool = False) -> None:
        if mode not in ("a", "w", "w-"):
            raise ValueError(f"EpisodeWriter mode must be 'a', 'w' or 'w-', got {mode!r}")
        if not obs_spec:
            raise ValueError("EpisodeWriter needs a non-empty obs_spec (dict of group name -> TensorSpec)")
        for k, s in obs_spec.items():
            if not isinstance(s, TensorSpec):
                raise TypeError(f"obs_spec[{k!r}] must be a TensorSpec, got {type(s).__name__}")
            if "/" in k or not k:
                raise ValueError(f"obs group name {k!r} must be a non-empty name without '/'")
        if not isinstance(action_spec, TensorSpec) or len(action_spec.shape) != 1:
            raise ValueError(f"action_spec must be a TensorSpec of shape (Da,), got {action_spec!r}")
        self.path = Path(path)
        self.obs_spec: ObservationSpec = dict(obs_spec)
        self.action_spec = action_spec
        self.durable = durable
        self._closed = False
        meta = _check_json(meta)
        for key, value in (("obs_spec", obs_spec_to_json(self.obs_spec)), ("action_spec", action_spec.to_json())):
            if key in meta and meta[key] != _check_json({key: value})[key]:
                raise ValueError(f"meta[{key!r}] disagrees with the {key} argument; drop it from meta "
                                 f"(the writer stores the spec itself)")
        for key in (_FORMAT_KEY, _COMMIT_KEY):
            if key in meta:
                raise ValueError(f"meta key {key!r} is reserved for the dataset format; rename it")

        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"dataset path {self.path} is a file, not a directory; choose another path")
        if mode == "w" and self.path.exists():
            self._remove_existing_dataset()
        if mode == "w-" and self.path.exists():
            raise FileExistsError(f"{self.path} already exists; pass mode='a' to resume it or mode='w' to replace it")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release_lock()
            raise RuntimeError(f"another EpisodeWriter is appending to {self.path}; wait for it to finish or "
                               f"write to a different path") from None
        try:
            if self._read_commit_if_any() is None:
                self._create(meta)
            else:
                self._resume(meta)
        except BaseException:
            self._release_lock()
            raise

    # ---------------------------------------------------------------- setup
    def _remove_existing_dataset(self) -> None:
        if self.path.is_dir() and not any(self.path.iterdir()):
            return
        if not (self.path / "zarr.json").is_file():
            raise FileExistsError(f"{self.path} exists and is not a zarr dataset; refusing to delete it with "
                                  f"mode='w'. Remove it yourself or choose another path")
        shutil.rmtree(self.path)

    def _read_commit_if_any(self) -> dict[str, int] | None:
        """The committed counts of a dataset at ``path``; None if nothing was ever committed there."""
        if not (self.path / "zarr.json").is_file():
            if any(self.path.iterdir()):
                raise FileExistsError(f"{self.path} exists, is not empty and is not a zarr dataset; "
                                      f"choose another path")
            return None
        attrs = dict(zarr.open_group(self.path, mode="r").attrs)
        if _FORMAT_KEY not in attrs:
            raise ValueError(f"{self.path} is a zarr store but not a Distillery dataset; choose another path")
        if _COMMIT_KEY not in attrs:
            return None  # killed during creation, before the first commit: nothing to preserve
        return attrs[_COMMIT_KEY]

    def _create(self, meta: dict[str, Any]) -> None:
        attrs = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(), "distillery_version": _distillery_version()}
        attrs.update(meta)
        attrs.update({"obs_spec": obs_spec_to_json(self.obs_spec), "action_spec": self.action_spec.to_json(),
                      _FORMAT_KEY: FORMAT_VERSION})
        # Clear leftovers of a creation killed before its first commit ourselves: zarr's mode="w" would
        # rmtree and recreate the directory, orphaning the flock we hold on it.
        for child in self.path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        self._root = zarr.create_group(self.path, attributes=attrs)
        data = self._root.require_group("data")
        obs = data.require_group("obs")
        self._arrays: dict[str, zarr.Array] = {}
        for k, s in self.obs_spec.items():
            self._arrays[f"obs/{k}"] = self._new_array(obs, k, s.shape, np.dtype(s.dtype))
        self._arrays["action"] = self._new_array(data, "action", self.action_spec.shape,
                                                 np.dtype(self.action_spec.dtype))
        self._arrays["reward"] = self._new_array(data, "reward", (), np.dtype(np.float32))
        self._arrays["terminated"] = self._new_array(data, "terminated", (), np.dtype(bool))
        self._arrays["truncated"] = self._new_array(data, "truncated", (), np.dtype(bool))
        self._ends = self._root.require_group("meta").create_array(
            "episode_ends", shape=(_ENDS_CHUNK,), chunks=(_ENDS_CHUNK,), dtype=np.int64, fill_value=0)
        self.num_episodes, self.num_steps = 0, 0
        self._commit()  # the dataset exists (empty) only once this lands

    @staticmethod
    def _new_array(group: zarr.Group, name: str, row_shape: tuple[int, ...], dtype: np.dtype) -> zarr.Array:
        rows = _rows_per_chunk(row_shape, dtype)
        return group.create_array(name, shape=(rows, *row_shape), chunks=(rows, *row_shape), dtype=dtype,
                                  fill_value=False if dtype == np.bool_ else 0)

    def _resume(self, meta: dict[str, Any]) -> None:
        self._root = zarr.open_group(self.path, mode="r+")
        attrs = dict(self._root.attrs)
        check_layout_version(self.path, attrs)
        stored_obs = obs_spec_from_json(attrs["obs_spec"])
        stored_act = TensorSpec.from_json(attrs["action_spec"])
        if stored_obs != self.obs_spec or stored_act != self.action_spec:
            raise ValueError(
                f"cannot resume {self.path}: it stores obs_spec={attrs['obs_spec']}, action_spec="
                f"{attrs['action_spec']} but the writer was given obs_spec={obs_spec_to_json(self.obs_spec)}, "
                f"action_spec={self.action_spec.to_json()}. Use a new path or mode='w' to overwrite")
        if "task" in meta and "task" in attrs and meta["task"] != attrs["task"]:
            raise ValueError(f"cannot resume {self.path}: it holds task {attrs['task']!r}, not {meta['task']!r}. "
                             f"Use a new path or mode='w' to overwrite")
        self._remove_stale_partials()
        self._arrays = {f"obs/{k}": self._root[f"data/obs/{k}"] for k in self.obs_spec}
        for k in ("action", "reward", "terminated", "truncated"):
            self._arrays[k] = self._root[f"data/{k}"]
        self._ends = self._root["meta/episode_ends"]
        commit = attrs[_COMMIT_KEY]
        self.num_episodes, self.num_steps = int(commit["num_episodes"]), int(commit["num_steps"])
        changed = {k: v for k, v in meta.items() if k not in ("created", "distillery_version") and attrs.get(k) != v}
        if changed:
            resumes = list(attrs.get("resumes", []))
            resumes.append({"at_episode": self.num_episodes, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                            "meta": changed})
            self._root.attrs.update({"resumes": resumes})

    def _remove_stale_partials(self) -> None:
        """Delete zarr temp files orphaned by a kill mid-write (never referenced, only clutter)."""
        for p in self.path.rglob("*.partial"):
            if _PARTIAL_RE.search(p.name):
                p.unlink(missing_ok=True)

    # ---------------------------------------------------------------- append
    def append(self, obs: Mapping[str, Any], action: Any, reward: Any, terminated: Any, truncated: Any) -> int:
        """Validate and append one episode of ``T`` steps; returns its episode index.

        Args:
            obs: ``{group: (T, *obs_spec[group].shape)}`` with exactly the spec's groups and dtypes.
            action: ``(T, Da)`` with ``action_spec.dtype``.
            reward: ``(T,)`` floating. terminated, truncated: ``(T,)`` bool, only the last step may be True.
        Numpy arrays or torch tensors are accepted. The episode is durable (readable by any later reader, even
        if this process is killed) as soon as this returns.
        """
        if self._closed:
            raise RuntimeError(f"EpisodeWriter for {self.path} is closed; open a new one (mode='a') to append")
        rows = self._validate(obs, action, reward, terminated, truncated)
        t = len(rows["action"])
        n0, n1 = self.num_steps, self.num_steps + t
        for key, arr in self._arrays.items():
            self._ensure_capacity(arr, n1)
            arr[n0:n1] = rows[key]
        self._ensure_capacity(self._ends, self.num_episodes + 1)
        self._ends[self.num_episodes] = n1
        self.num_episodes += 1
        self.num_steps = n1
        self._commit()
        return self.num_episodes - 1

    def _validate(self, obs: Mapping[str, Any], action: Any, reward: Any, terminated: Any,
                  truncated: Any) -> dict[str, np.ndarray]:
        if not isinstance(obs, Mapping):
            raise TypeError(f"obs must be a dict of group -> (T, ...) array, got {type(obs).__name__}")
        if set(obs) != set(self.obs_spec):
            raise ValueError(f"obs groups {sorted(obs)} do not match the dataset's obs_spec groups "
                             f"{sorted(self.obs_spec)}; pass exactly those groups")
        rows: dict[str, np.ndarray] = {}
        for k, s in self.obs_spec.items():
            rows[f"obs/{k}"] = self._check_rows(f"obs[{k!r}]", obs[k], s.shape, np.dtype(s.dtype))
        rows["action"] = self._check_rows("action", action, self.action_spec.shape, np.dtype(self.action_spec.dtype))
        r = _to_numpy(reward, "reward")
        if not np.issubdtype(r.dtype, np.floating) and not np.issubdtype(r.dtype, np.integer):
            raise TypeError(f"reward must be a real-valued (T,) array, got dtype {r.dtype}")
        rows["reward"] = self._check_rows("reward", r.astype(np.float32, copy=False), (), np.dtype(np.float32))
        for name, x in (("terminated", terminated), ("truncated", truncated)):
            rows[name] = self._check_rows(name, x, (), np.dtype(bool))
        lengths = {k: len(v) for k, v in rows.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"episode arrays have different lengths {lengths}; every array needs the same T")
        if lengths["action"] == 0:
            raise ValueError("cannot append an empty episode (T == 0)")
        done = rows["terminated"] | rows["truncated"]
        if done[:-1].any():
            first = int(np.flatnonzero(done[:-1])[0])
            raise ValueError(f"terminated/truncated is True at step {first} of {len(done)}: an episode may only end "
                             f"at its last step. Split the data into separate episodes before appending")
        return rows

    @staticmethod
    def _check_rows(name: str, x: Any, row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        a = _to_numpy(x, name)
        if a.ndim != 1 + len(row_shape) or tuple(a.shape[1:]) != tuple(row_shape):
            want = "(T, " + ", ".join(map(str, row_shape)) + ")" if row_shape else "(T,)"
            raise ValueError(f"{name} has shape {tuple(a.shape)} but the spec needs {want}")
        if a.dtype != dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but the spec says {dtype}; "
                            f"cast it with .astype({dtype.name!r})")
        if np.issubdtype(dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf; fix the source (a diverged simulation?) before storing")
        return np.ascontiguousarray(a)

    @staticmethod
    def _ensure_capacity(arr: zarr.Array, rows: int) -> None:
        cap = arr.shape[0]
        if rows <= cap:
            return
        # Grow geometrically in whole chunks so metadata rewrites stay rare (O(log N) resizes).
        chunk = arr.chunks[0]
        new_cap = max(rows, 2 * cap)
        arr.resize((int(math.ceil(new_cap / chunk) * chunk), *arr.shape[1:]))

    def _commit(self) -> None:
        if self.durable:
            os.sync()  # push data chunks to disk before the commit can become durable
        self._root.attrs.update({_COMMIT_KEY: {"num_episodes": self.num_episodes, "num_steps": self.num_steps}})
        fsync_path(self.path / "zarr.json")
        fsync_path(self.path)

    # ---------------------------------------------------------------- close
    def close(self) -> None:
        """Trim the over-allocated tails so plain zarr readers see exact shapes, then release the lock.

        Trimming is crash-safe too: shapes never drop below the committed counts.
        """
        if self._closed:
            return
        try:
            for arr in self._arrays.values():
                if arr.shape[0] != self.num_steps:
                    arr.resize((self.num_steps, *arr.shape[1:]))
            if self._ends.shape[0] != self.num_episodes:
                self._ends.resize((self.num_episodes,))
        finally:
            self._closed = True
            self._release_lock()

    def _release_lock(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)  # closing the fd drops the flock
            self._lock_fd = None

    def __enter__(self) -> "EpisodeWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._release_lock()


def check_layout_version(path: Path, attrs: Mapping[str, Any]) -> None:
    fmt = attrs.get(_FORMAT_KEY)
    if fmt is None:
        raise ValueError(f"{path} is a zarr store but not a Distillery dataset (no {_FORMAT_KEY!r} attribute); "
                         f"collect one with the Distillery collection command")
    if fmt != FORMAT_VERSION:
        raise ValueError(f"{path} uses dataset format {fmt} (written by distillery {attrs.get('distillery_version')}) "
                         f"but this distillery reads format {FORMAT_VERSION}; re-collect the dataset or use the "
                         f"matching distillery version")


class EpisodeDataset:
    """Read-only view of a dataset written by :class:`EpisodeWriter`, fully loaded into memory.

    Only committed episodes are visible (safe to open while a writer is still appending).

    Attributes:
        num_episodes: E. num_steps: N. episode_ends: int64 (E,), cumulative end index of each episode.
        meta: JSON attrs (task, expert_noise, seed, obs_spec/action_spec as JSON, created, ...).
        obs_spec / action_spec: the specs as objects.
        obs: ``{group: (N, ...)}``. action: (N, Da). reward: float32 (N,). terminated, truncated: bool (N,).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            what = "does not exist" if not self.path.exists() else "is not a zarr dataset (no zarr.json)"
            raise FileNotFoundError(f"dataset {self.path} {what}; check the path or collect a dataset first")
        root = zarr.open_group(self.path, mode="r")
        attrs = dict(root.attrs)
        check_layout_version(self.path, attrs)
        if _COMMIT_KEY not in attrs:
            raise ValueError(f"dataset {self.path} was never committed (its writer died while creating it); "
                             f"delete it and collect again")
        commit = attrs[_COMMIT_KEY]
        e, n = int(commit["num_episodes"]), int(commit["num_steps"])
        # without the format keys, so that a writer appending to this dataset can be given this meta back
        self.meta: dict[str, Any] = {k: v for k, v in attrs.items() if k not in (_FORMAT_KEY, _COMMIT_KEY)}
        self.obs_spec: ObservationSpec = obs_spec_from_json(attrs["obs_spec"])
        self.action_spec = TensorSpec.from_json(attrs["action_spec"])
        try:
            self.episode_ends: np.ndarray = np.asarray(root["meta/episode_ends"][:e], dtype=np.int64)
            self.obs: dict[str, np.ndarray] = {k: root[f"data/obs/{k}"][:n] for k in self.obs_spec}
            self.action: np.ndarray = root["data/action"][:n]
            self.reward: np.ndarray = root["data/reward"][:n]
            self.terminated: np.ndarray = root["data/terminated"][:n]
            self.truncated: np.ndarray = root["data/truncated"][:n]
        except KeyError as err:
            raise ValueError(f"dataset {self.path} is missing array {err}; it is corrupt, collect it again") from err
        arrays = {**{f"obs/{k}": v for k, v in self.obs.items()}, "action": self.action, "reward": self.reward,
                  "terminated": self.terminated, "truncated": self.truncated}
        short = {k: len(v) for k, v in arrays.items() if len(v) != n}
        ends_ok = len(self.episode_ends) == e and (e == 0 or (self.episode_ends[-1] == n and
                                                              (np.diff(self.episode_ends, prepend=0) > 0).all()))
        if short or not ends_ok:
            raise ValueError(f"dataset {self.path} is corrupt: commit says {e} episodes / {n} steps but arrays hold "
                             f"{short or 'enough rows'} and episode_ends ends at "
                             f"{self.episode_ends[-1] if len(self.episode_ends) else None}; collect it again")
        self.num_episodes, self.num_steps = e, n

    @property
    def episode_starts(self) -> np.ndarray:
        """int64 (E,): first step index of each episode."""
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64) if self.num_episodes else \
            np.zeros(0, np.int64)

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    def __len__(self) -> int:
        return self.num_episodes

    def episode(self, i: int) -> dict[str, Any]:
        """Views of episode ``i``: ``{"obs": {group: (T, ...)}, "action": (T, Da), "reward", "terminated",
        "truncated": (T,)}``."""
        if not -self.num_episodes <= i < self.num_episodes:
            raise IndexError(f"episode {i} out of range for {self.num_episodes} episodes in {self.path}")
        i %= self.num_episodes
        s, e = int(self.episode_starts[i]), int(self.episode_ends[i])
        return {"obs": {k: v[s:e] for k, v in self.obs.items()}, "action": self.action[s:e],
                "reward": self.reward[s:e], "terminated": self.terminated[s:e], "truncated": self.truncated[s:e]}

    def stats(self, keys: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        """Per-dimension statistics over all steps.

        Args:
            keys: obs group names and/or ``"action"``.
        Returns:
            ``{key: {"min", "max", "mean", "std"}}``, each float32 of the row shape (e.g. ``(Do,)``);
            ``std`` is the population std (ddof=0). Computed in float64 for accuracy.
        """
        if isinstance(keys, str):
            keys = [keys]
        if self.num_steps == 0:
            raise ValueError(f"dataset {self.path} has no steps; cannot compute statistics")
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in keys:
            if key == "action":
                x = self.action
            elif key in self.obs:
                x = self.obs[key]
            else:
                raise KeyError(f"unknown stats key {key!r}; choose from {['action', *self.obs]}")
            x64 = x.astype(np.float64)
            out[key] = {"min": x64.min(0).astype(np.float32), "max": x64.max(0).astype(np.float32),
                        "mean": x64.mean(0).astype(np.float32), "std": x64.std(0).astype(np.float32)}
        return out

    def __repr__(self) -> str:
        return (f"EpisodeDataset({str(self.path)!r}, episodes={self.num_episodes}, steps={self.num_steps}, "
                f"task={self.meta.get('task')!r})")


__all__ = ["EpisodeWriter", "EpisodeDataset", "FORMAT_VERSION"]
