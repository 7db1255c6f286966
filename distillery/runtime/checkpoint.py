"""Pickle-free, atomic checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``<path>/`` holding ``model.safetensors`` and ``meta.json``. It is written to
a sibling temp dir, fsync-ed, then renamed into place, so a reader never sees a half-written checkpoint.
``meta.json`` is the caller's meta plus a reserved ``"_checkpoint"`` entry with the format version and
the sha256 of ``model.safetensors`` (safetensors itself has no checksum over the data).

Nested states (optimizer / LR-scheduler ``state_dict``-s, torch / numpy RNG states) go through
:func:`flatten_state` / :func:`unflatten_state`, which split them into path-keyed tensors and a JSON
skeleton that round-trips key types (e.g. the int param ids of an optimizer state) and tuples exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distillery.utils import atomic_write_text, fsync_path

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
CHECKPOINT_FORMAT = 1
_RESERVED = "_checkpoint"
_NEW, _OLD = ".new-", ".old-"  # temp-dir infixes: ".<name>.new-<id>" / ".<name>.old-<id>"
_STEP_RE = re.compile(r"(\d+)$")


# --------------------------------------------------------------------------- atomic files
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- save / load
def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Atomically write ``path/{model.safetensors, meta.json}``; replaces an existing checkpoint at ``path``.

    Args:
        tensors: flat ``{name: Tensor}`` (any device; saved as detached CPU copies, shared storage is fine).
        meta: JSON-compatible dict (no key ``"_checkpoint"``).
    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict[str, Tensor], got {type(tensors).__name__}")
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"tensors must map str -> torch.Tensor; bad entries {bad[:5]}. Use flatten_state() for "
                        f"nested states")
    if _RESERVED in meta:
        raise ValueError(f"meta key {_RESERVED!r} is reserved by the checkpoint format; rename it")
    # Clone: safetensors refuses tensors that share storage (tied weights, views of one buffer).
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:
        meta_text = json.dumps(dict(meta), indent=1)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta must be JSON-compatible: {e}. Put tensors in `tensors` (see "
                        f"flatten_state) and convert numpy scalars with float()/int()") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    token = uuid.uuid4().hex
    tmp = path.with_name(f".{path.name}{_NEW}{token}")
    old = path.with_name(f".{path.name}{_OLD}{token}")
    try:
        tmp.mkdir()
        save_file(cpu, tmp / MODEL_FILE)
        full_meta = json.loads(meta_text)
        full_meta[_RESERVED] = {"format": CHECKPOINT_FORMAT, "files": {MODEL_FILE: {
            "sha256": sha256_file(tmp / MODEL_FILE), "bytes": (tmp / MODEL_FILE).stat().st_size}}}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1), encoding="utf-8")
        for f in (tmp / MODEL_FILE, tmp / META_FILE, tmp):
            fsync_path(f)
        if path.exists() or path.is_symlink():
            # rename() cannot replace a non-empty directory: move the old one aside first. If we die between
            # the two renames, _recover() finishes the swap (".old-<id>" proves ".new-<id>" is complete).
            os.replace(path, old)
            os.replace(tmp, path)
            fsync_path(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap_pairs(path: Path) -> list[tuple[Path, Path]]:
    """(new, old) temp-dir pairs of interrupted swaps of ``path``."""
    pairs = []
    for old in path.parent.glob(f".{glob_escape(path.name)}{_OLD}*"):
        new = path.with_name(old.name.replace(_OLD, _NEW, 1))
        pairs.append((new, old))
    return pairs


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _recover(path: Path) -> None:
    """Finish a swap interrupted between its two renames; drop stale temp dirs of ``path``."""
    for new, old in _swap_pairs(path):
        if not path.exists() and new.is_dir():
            os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    for stale in path.parent.glob(f".{glob_escape(path.name)}{_NEW}*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint dir written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint dir (use :func:`resolve_checkpoint` for run dirs / ``last``).
        device: where to put the tensors.
        verify: check the sha256 of ``model.safetensors`` against ``meta.json``.
    Returns:
        ``(tensors, meta)`` with the caller's meta (the reserved ``"_checkpoint"`` entry removed).
    """
    path, meta, info = _read_meta(path)
    model_path = path / MODEL_FILE
    expected = info.get("files", {}).get(MODEL_FILE, {}).get("sha256")
    if verify and expected is not None and sha256_file(model_path) != expected:
        raise ValueError(f"checkpoint file {model_path} is corrupt (sha256 mismatch with {path / META_FILE}); use "
                         f"another checkpoint or pass verify=False to load it anyway")
    try:
        tensors = load_file(model_path, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint file {model_path} is corrupt or not safetensors ({e}); use another "
                         f"checkpoint") from e
    return tensors, meta


def load_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The caller's meta of a checkpoint dir, checked as :func:`load_checkpoint` checks it, without reading the
    weights (e.g. to learn what kind of run wrote it)."""
    return _read_meta(path)[1]


def _read_meta(path: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``(checkpoint dir actually read, caller's meta, reserved checkpoint info)``; both files must exist."""
    path = Path(path)
    if not path.exists():
        # Read-only fallback for a save killed mid-swap: its complete new dir sits beside the old one.
        done = [new for new, _ in _swap_pairs(path) if new.is_dir()]
        if not done:
            raise FileNotFoundError(f"checkpoint {path} does not exist; pass a checkpoint dir (containing "
                                    f"{MODEL_FILE} and {META_FILE}), a run dir or its checkpoints/last")
        path = done[0]
    meta_path, model_path = path / META_FILE, path / MODEL_FILE
    for f in (meta_path, model_path):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file {f} is missing; {path} is not a complete checkpoint. "
                                    f"Point to another checkpoint (e.g. an earlier step dir)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint file {meta_path} is corrupt ({e}); use another checkpoint") from e
    info = meta.pop(_RESERVED, None) if isinstance(meta, dict) else None
    if not isinstance(info, dict) or "format" not in info:
        raise ValueError(f"{meta_path} is not a Distillery checkpoint meta (no {_RESERVED!r} entry); point to a "
                         f"dir written by save_checkpoint")
    if info["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {info['format']}, this distillery reads format "
                         f"{CHECKPOINT_FORMAT}; use the distillery version that wrote it")
    return path, meta, info


def checkpoint_sha256(path: str | os.PathLike) -> str | None:
    """The recorded sha256 of a checkpoint dir's ``model.safetensors`` (identifies the weights), or None."""
    meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
    return meta.get(_RESERVED, {}).get("files", {}).get(MODEL_FILE, {}).get("sha256")


# --------------------------------------------------------------------------- nested states
def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into ``({key: Tensor}, json_skeleton)`` with no pickling.

    Handles dict (any str/int/float/bool/None keys), list, tuple, torch.Tensor, numpy ndarray and scalars,
    and JSON scalars (floats incl. nan/inf). Tensors are keyed by their path (``prefix + "state/0/exp_avg"``);
    the skeleton replaces them with ``{"__tensor__": key}``. numpy arrays are stored as raw bytes (any dtype,
    e.g. the uint32 MT19937 state) with dtype/shape in the skeleton.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc_key(k: Any, where: str) -> Any:
        if k is None or isinstance(k, (bool, int, float, str)):
            return k
        raise TypeError(f"flatten_state: unsupported dict key {k!r} ({type(k).__name__}) at {where or '<root>'}")

    def go(x: Any, where: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = prefix + (where or "tensor")
            tensors[key] = x
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                raise TypeError(f"flatten_state: object arrays are not supported (at {where or '<root>'})")
            key = prefix + (where or "array")
            a = np.ascontiguousarray(x)
            tensors[key] = torch.from_numpy(a.view(np.uint8).reshape(-1).copy())
            return {"__ndarray__": key, "dtype": a.dtype.str, "shape": list(a.shape)}
        if isinstance(x, np.generic):
            return {"__npscalar__": x.item(), "dtype": x.dtype.str}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, Mapping):
            items = list(x.items())
            if all(isinstance(k, str) and not k.startswith("__") for k, _ in items):
                return {k: go(v, f"{where}/{k}" if where else k) for k, v in items}
            # Non-str keys (optimizer param ids) or keys that clash with our tags: keep them typed.
            return {"__dict__": [[enc_key(k, where), go(v, f"{where}/{k}" if where else str(k))] for k, v in items]}
        if isinstance(x, tuple):
            return {"__tuple__": [go(v, f"{where}/{i}" if where else str(i)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [go(v, f"{where}/{i}" if where else str(i)) for i, v in enumerate(x)]
        raise TypeError(f"flatten_state: cannot store {type(x).__name__} at {where or '<root>'}; only tensors, "
                        f"numpy arrays, JSON scalars, lists, tuples and dicts are supported")

    skeleton = go(obj, "")
    return tensors, skeleton


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state` (tensors come back on whatever device ``tensors`` holds them)."""

    def go(x: Any) -> Any:
        if isinstance(x, list):
            return [go(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            key = x["__tensor__"]
            if key not in tensors:
                raise KeyError(f"unflatten_state: tensor {key!r} is missing from the checkpoint tensors")
            return tensors[key]
        if "__ndarray__" in x:
            key = x["__ndarray__"]
            if key not in tensors:
                raise KeyError(f"unflatten_state: array {key!r} is missing from the checkpoint tensors")
            raw = tensors[key].detach().cpu().numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(x["dtype"])).reshape(x["shape"]).copy()
        if "__npscalar__" in x:
            return np.dtype(x["dtype"]).type(x["__npscalar__"])
        if "__tuple__" in x:
            return tuple(go(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {k: go(v) for k, v in x["__dict__"]}
        return {k: go(v) for k, v in x.items()}

    return go(skeleton)


# --------------------------------------------------------------------------- run-dir helpers
def step_dir_name(step: int) -> str:
    """Canonical checkpoint dir name for a training step (zero-padded so names sort by step)."""
    return f"step_{int(step):09d}"


def update_link(link_path: str | os.PathLike, target: str | os.PathLike) -> None:
    """Atomically point symlink ``link_path`` (e.g. ``checkpoints/last``) at ``target``.

    The link is relative when ``target`` is inside the link's folder, so run dirs stay movable.
    """
    link_path, target = Path(link_path), Path(target)
    if not target.exists():
        raise FileNotFoundError(f"update_link: target {target} does not exist")
    if link_path.exists() and not link_path.is_symlink():
        raise FileExistsError(f"update_link: {link_path} exists and is not a symlink; remove it first")
    try:
        rel = os.path.relpath(target.resolve(), link_path.parent.resolve())
    except ValueError:  # different drives (Windows)
        rel = str(target.resolve())
    tmp = link_path.with_name(f".{link_path.name}.tmp-{uuid.uuid4().hex}")
    os.symlink(rel, tmp)
    try:
        os.replace(tmp, link_path)
    finally:
        if tmp.is_symlink():
            tmp.unlink()
    fsync_path(link_path.parent)


def _is_checkpoint(p: Path) -> bool:
    return (p / META_FILE).is_file() and (p / MODEL_FILE).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Find the checkpoint dir meant by ``path``: a step dir, ``checkpoints/last``, a checkpoints dir or a run dir.

    For a checkpoints dir (or a run dir's ``checkpoints/``), ``last`` wins if it resolves to a complete
    checkpoint; otherwise the complete child with the highest trailing step number.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist; pass a run dir, its checkpoints dir, "
                                f"checkpoints/last or a step dir")
    if _is_checkpoint(path):
        return path.resolve() if path.is_symlink() else path
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    last = ckpt_dir / "last"
    if last.exists() and _is_checkpoint(last):
        return last.resolve()
    candidates = []
    for child in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        m = _STEP_RE.search(child.name)
        if m and not child.name.startswith(".") and child.is_dir() and _is_checkpoint(child):
            candidates.append((int(m.group(1)), child))
    if not candidates:
        raise FileNotFoundError(f"no checkpoint found under {path} (looked for {MODEL_FILE} + {META_FILE} in "
                                f"{ckpt_dir}/last and {ckpt_dir}/step_*); has the run saved one yet?")
    return max(candidates)[1]


__all__ = ["save_checkpoint", "load_checkpoint", "load_checkpoint_meta", "flatten_state", "unflatten_state", "update_link",
           "resolve_checkpoint", "step_dir_name", "atomic_write_text", "MODEL_FILE", "META_FILE"]


def save_run_checkpoint(run_dir: str | os.PathLike, step: int, tensors: Mapping[str, torch.Tensor],
                        meta: Mapping[str, Any]) -> Path:
    """Every agent's checkpoint layout: write ``run_dir/checkpoints/step_<step>/`` atomically, then point
    ``checkpoints/last`` at it (what ``--resume`` and ``checkpoint=<run dir>`` read)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    path = save_checkpoint(ckpt_dir / step_dir_name(int(step)), tensors, meta)
    update_link(ckpt_dir / "last", path)
    return path
