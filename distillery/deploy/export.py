"""Export a policy as one graph (ONNX or TorchScript) plus ``manifest.json``, checked for parity at export time.

The graph is the whole decision: raw observation history -> normalise -> sample (from the given initial noise) ->
un-normalise -> clamp -> executed chunk ``(B, Ta, Da)``. It is built by tracing ``policy.predict_chunk`` itself, so
there is no second implementation of the policy to drift from the trained one. Only samplers that are a pure
function of (observations, initial noise) can be exported this way (``policy.is_deterministic``): DDIM with eta 0,
the MLP, one-step consistency sampling. The noise is an input so the robot side owns the randomness.

An export is written into a temp dir next to ``out_dir`` and renamed into place only after the parity check passed:
a failed or killed export never leaves a half-written (or unchecked) export behind.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import os
import platform
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distillery.deploy.manifest import (
    ACTION_OUTPUT,
    EXPORT_DIR_FILES,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    MODEL_FILES,
    NOISE_INPUT,
    obs_input_name,
)
from distillery.policies import Policy
from distillery.utils import atomic_write_text, fsync_path

__all__ = ["DEFAULT_PARITY_BATCHES", "DEFAULT_PARITY_TOL", "ExportParityError", "ExportableChunkPredictor",
           "export", "export_policy"]

DEFAULT_PARITY_TOL = 1e-4
DEFAULT_PARITY_BATCHES = (1, 4, 16)
# Example batch for tracing: torch.export specialises sizes 0 and 1, so 1 would freeze the batch axis.
_TRACE_BATCH = 2


class ExportParityError(ValueError):
    """The exported graph disagrees with the PyTorch policy beyond the tolerance (nothing was written)."""


class ExportableChunkPredictor(nn.Module):
    """``policy.predict_chunk`` with a fixed sampler as a module of positional tensors.

    ``forward(*obs_groups, noise)``: one raw ``(B, To, *shape)`` float32 tensor per group in ``policy.obs_keys``
    order, then ``noise (B, Tp, Da)``; returns the executed chunk ``(B, Ta, Da)`` in env units. Positional inputs
    (not a dict) keep the TorchScript and ONNX signatures plain for C++ and other non-Python callers.
    """

    def __init__(self, policy: Policy, sampler: str | None) -> None:
        super().__init__()
        self.policy = policy
        self.sampler = sampler

    def forward(self, *inputs: Tensor) -> Tensor:
        *obs, noise = inputs
        return self.policy.predict_chunk(dict(zip(self.policy.obs_keys, obs)), self.sampler, noise=noise)


# ----------------------------------------------------------------------------------------------- export
def export_policy(policy: Policy, out_dir: str | os.PathLike, sampler: str | None = None, fmt: str = "onnx",
                  source_checkpoint: str | os.PathLike | None = None, meta: Mapping[str, Any] | None = None,
                  control_dt: float | None = None, opset: int | None = None,
                  parity_tol: float = DEFAULT_PARITY_TOL, parity_batches: Sequence[int] = DEFAULT_PARITY_BATCHES,
                  hold_action: Sequence[float] | None = None, seed: int = 0) -> Path:
    """Write ``out_dir/{policy.onnx | policy.pt, manifest.json}``; returns ``out_dir``.

    Args:
        policy: a policy with a fitted normaliser (left untouched: a CPU copy is exported).
        sampler: sampler string baked into the graph; ``None`` = the policy's default. Must be deterministic.
        fmt: ``"onnx"`` (one self-contained file, dynamic batch) or ``"torchscript"`` (``torch.jit.trace``).
        source_checkpoint: checkpoint the weights came from (recorded with its sha256); defaults to
            ``meta["checkpoint_path"]`` as set by :func:`distillery.evaluate.load_policy`.
        meta: checkpoint meta; its ``config.task`` (or ``task``) and ``step`` are recorded.
        control_dt: seconds per control tick of the task, recorded for the robot side.
        opset: ONNX opset (``None`` = the exporter's default).
        parity_tol: largest allowed ``max |exported - PyTorch|`` over the parity batches.
        parity_batches: batch sizes of the random parity batches (one batch each).
        hold_action: action sent before the first valid action (default: the middle of the action bounds).
        seed: seeds the parity batches.
    Raises:
        ValueError: unknown format, non-deterministic sampler, unfitted normaliser, ``out_dir`` holding other files.
        ExportParityError: parity above ``parity_tol`` (nothing is written).
    """
    if fmt not in MODEL_FILES:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {sorted(MODEL_FILES)}")
    if not policy.is_deterministic(sampler):
        kinds = getattr(policy, "SAMPLER_KINDS", None)
        raise ValueError(
            f"cannot export the {policy.name} policy with sampler {sampler!r}: it draws random numbers inside the "
            f"chain (or keeps state between calls), so it is not a pure function of (observations, initial noise) "
            f"and cannot be one graph. Use sampler=ddim:K (eta 0) for a diffusion policy or consistency:1 for a "
            f"consistency policy" + (f" (this policy's sampler kinds: {list(kinds)})" if kinds else ""))
    if not bool(policy.normalizer.fitted):
        raise ValueError("the policy normaliser has no statistics, so the exported graph would see un-normalised "
                         "inputs; call policy.set_normalizer(...) (or export a trained checkpoint)")
    batches = [int(b) for b in parity_batches]
    if not batches or min(batches) < 1:
        raise ValueError(f"parity_batches must list batch sizes >= 1, got {list(parity_batches)}")
    if not any(b > 1 for b in batches) or 1 not in batches:
        raise ValueError(f"parity_batches {batches} must include batch 1 and a batch > 1: the robot runs batch 1, "
                         f"and a batch > 1 proves the batch axis is really dynamic")
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    if sampler is None:
        sampler_name = str(policy.cfg.get("sampler", "direct"))  # what the policy runs when given no sampler
    else:
        sampler_name = sampler

    cpu_policy = copy.deepcopy(policy).cpu().eval()
    cpu_policy.reset()  # drop any act() history/queue copied along: the graph is stateless
    cpu_policy.requires_grad_(False)
    module = ExportableChunkPredictor(cpu_policy, sampler).eval()
    input_names = [obs_input_name(k) for k in cpu_policy.obs_keys] + [NOISE_INPUT]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.new-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        model_path = tmp / MODEL_FILES[fmt]
        example = _random_inputs(cpu_policy, _TRACE_BATCH, torch.Generator().manual_seed(int(seed) + 7919))
        if fmt == "onnx":
            used_opset = _write_onnx(module, example, model_path, input_names, opset)
        else:
            _write_torchscript(module, example, model_path)
            used_opset = None
        parity = _parity(cpu_policy, sampler, model_path, fmt, input_names, batches, int(seed))
        parity["tol"] = float(parity_tol)
        parity["passed"] = bool(parity["max_abs_diff"] <= parity_tol)
        if not parity["passed"]:
            raise ExportParityError(
                f"exported {fmt} graph differs from the PyTorch policy by {parity['max_abs_diff']:.3g} "
                f"(> parity_tol {parity_tol:g}) on batch sizes {batches}; nothing was written. Check the policy for "
                f"data-dependent Python control flow, or raise export.parity_tol if the difference is numerical")
        manifest = _manifest(cpu_policy, fmt, sampler_name, input_names, control_dt, hold_action, meta,
                             source_checkpoint, used_opset, parity)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for f in (model_path, tmp / MANIFEST_FILE, tmp):
            fsync_path(f)
        _publish(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _random_inputs(policy: Policy, batch: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Raw observation histories spread over the normaliser's data range, then standard-normal noise.

    Drawn uniformly in normalised units [-1, 1] and mapped back, so the parity batches exercise the network where
    the training data lived rather than saturating clips and clamps (which would make any two graphs agree).
    """
    obs = []
    for key in policy.obs_keys:
        shape = (batch, policy.obs_horizon, *policy.obs_spec[key].shape)
        unit = torch.rand(shape, generator=generator) * 2.0 - 1.0
        obs.append(policy.normalizer.unnormalize(key, unit).float().contiguous())
    noise = torch.randn(batch, policy.pred_horizon, policy.action_dim, generator=generator)
    return (*obs, noise)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the dynamo exporter's known-harmless chatter (missing torchvision ops, deprecation notes) so an
    export prints only its own result; real errors still raise."""
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    old_level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # torch marks TorchScript deprecated; the caller asked for it explicitly (ONNX is the default format)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
            yield
    finally:
        registration_log.setLevel(old_level)


def _write_onnx(module: nn.Module, example: tuple[Tensor, ...], path: Path, input_names: list[str],
                opset: int | None) -> int:
    """One self-contained ``.onnx`` file (weights inside) with a dynamic batch axis; returns the opset used."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    # *inputs is a single varargs parameter, hence one tuple holding a spec per positional tensor
    dynamic_shapes = (tuple({0: batch} for _ in example),)
    with _quiet_exporter():
        torch.onnx.export(module, example, str(path), dynamo=True, external_data=False, input_names=input_names,
                          output_names=[ACTION_OUTPUT], dynamic_shapes=dynamic_shapes, opset_version=opset,
                          verbose=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    names = [i.name for i in model.graph.input]
    if names != input_names:
        # the exporter drops inputs the graph never reads (e.g. noise of the MLP); the contract keeps them all
        raise ValueError(f"exported ONNX inputs {names} differ from the contract {input_names}")
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _write_torchscript(module: nn.Module, example: tuple[Tensor, ...], path: Path) -> None:
    # check_trace would re-run the trace and compare; the parity check below does that on fresh batch sizes
    with _quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(path))


@torch.no_grad()
def _parity(policy: Policy, sampler: str | None, model_path: Path, fmt: str, input_names: list[str],
            batches: list[int], seed: int) -> dict[str, Any]:
    """Max abs difference between the exported file (as the robot loads it) and the PyTorch policy."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])

        def run(inputs: tuple[Tensor, ...]) -> np.ndarray:
            return session.run([ACTION_OUTPUT], {n: t.numpy() for n, t in zip(input_names, inputs)})[0]
        backend = f"onnxruntime {ort.__version__}"
    else:
        with _quiet_exporter():
            loaded = torch.jit.load(str(model_path))

        def run(inputs: tuple[Tensor, ...]) -> np.ndarray:
            return loaded(*inputs).numpy()
        backend = f"torch.jit {torch.__version__}"
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batches:
        inputs = _random_inputs(policy, b, generator)
        *obs, noise = inputs
        expected = policy.predict_chunk(dict(zip(policy.obs_keys, obs)), sampler, noise=noise).numpy()
        got = run(inputs)
        if got.shape != expected.shape:
            raise ExportParityError(f"exported {fmt} graph returned shape {got.shape} for batch {b}, expected "
                                    f"{expected.shape}; the batch axis did not stay dynamic")
        diff = float(np.max(np.abs(got - expected))) if np.isfinite(got).all() else float("inf")
        worst = max(worst, diff)
    return {"backend": backend, "batch_sizes": batches, "max_abs_diff": worst}


def _source_record(source_checkpoint: str | os.PathLike | None, meta: Mapping[str, Any]) -> dict[str, Any] | None:
    from distillery.runtime.checkpoint import MODEL_FILE, resolve_checkpoint, sha256_file

    path = source_checkpoint if source_checkpoint is not None else meta.get("checkpoint_path")
    if path is None:
        return None
    ckpt = resolve_checkpoint(path)
    # hash the bytes themselves (not the copy recorded in meta.json): this is what the export was made from
    return {"path": str(Path(ckpt).resolve()), "file": MODEL_FILE, "sha256": sha256_file(Path(ckpt) / MODEL_FILE),
            "step": meta.get("step")}


def _versions(opset: int | None) -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"torch": torch.__version__, "opset": opset, "python": platform.python_version()}
    for name in ("onnx", "onnxruntime", "onnxscript", "distillery"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _bound(value: float | None) -> float | None:
    return None if value is None else float(value)


def _manifest(policy: Policy, fmt: str, sampler: str, input_names: list[str], control_dt: float | None,
              hold_action: Sequence[float] | None, meta: Mapping[str, Any] | None,
              source_checkpoint: str | os.PathLike | None, opset: int | None,
              parity: dict[str, Any]) -> dict[str, Any]:
    meta = dict(meta or {})
    spec = policy.action_spec
    if hold_action is None:
        # middle of the bounds: zeros for the usual [-1, 1] actions; the runtime holds the last good action after that
        mid = 0.0 if spec.low is None or spec.high is None else (float(spec.low) + float(spec.high)) / 2.0
        hold = [mid] * policy.action_dim
    else:
        hold = [float(v) for v in hold_action]
        if len(hold) != policy.action_dim or not all(np.isfinite(hold)):
            raise ValueError(f"hold_action must be {policy.action_dim} finite numbers, got {list(hold_action)}")
    task = meta.get("config", {}).get("task") if isinstance(meta.get("config"), Mapping) else None
    if task is None and isinstance(meta.get("task"), str):
        task = {"name": meta["task"]}
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "file": MODEL_FILES[fmt],
        "inputs": input_names,
        "outputs": [ACTION_OUTPUT],
        "obs_keys": list(policy.obs_keys),
        "obs": {k: {"input": obs_input_name(k), "shape": list(policy.obs_spec[k].shape),
                    "dtype": policy.obs_spec[k].dtype, "low": _bound(policy.obs_spec[k].low),
                    "high": _bound(policy.obs_spec[k].high)} for k in policy.obs_keys},
        "noise": {"input": NOISE_INPUT, "shape": [policy.pred_horizon, policy.action_dim], "dtype": "float32",
                  "distribution": "standard_normal"},
        "action": {"output": ACTION_OUTPUT, "shape": [policy.action_dim], "dtype": "float32",
                   "low": _bound(spec.low), "high": _bound(spec.high)},
        "hold_action": hold,
        "obs_horizon": policy.obs_horizon,
        "pred_horizon": policy.pred_horizon,
        "action_horizon": policy.action_horizon,
        "control_dt": None if control_dt is None else float(control_dt),
        "sampler": sampler,
        "policy": {"name": policy.name, "params": policy.num_params(), "cfg": copy.deepcopy(policy.cfg)},
        "task": copy.deepcopy(task),
        "source_checkpoint": _source_record(source_checkpoint, meta),
        "versions": _versions(opset),
        "parity": parity,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_replaceable(out_dir: Path) -> None:
    """An existing ``out_dir`` may only be replaced if it is empty or an earlier export: never a run dir."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"export out_dir {out_dir} is a file; pass a directory path")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_DIR_FILES)
        if foreign:
            raise ValueError(f"export out_dir {out_dir} holds other files {foreign[:5]}; an export replaces its "
                             f"whole directory, so pass a new or empty directory (e.g. {out_dir / 'export'})")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished export into place (replacing an earlier export at ``out_dir``)."""
    _check_replaceable(out_dir)  # again: something may have appeared there while we exported
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex}")
        os.replace(out_dir, old)  # rename() cannot replace a non-empty dir: move the old export aside first
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out_dir.is_dir():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    fsync_path(out_dir.parent)


# ----------------------------------------------------------------------------------------------- CLI stage
def export(cfg: Any) -> Path:
    """``distillery export checkpoint=CKPT [sampler=...] [export.format=...] [export.out_dir=...]``.

    Loads the checkpoint, exports it with the task's control rate, writes the composed ``config.yaml`` beside the
    export and returns the export dir. ``export.out_dir`` null -> ``run_dir`` or ``runs/<stamp>_export_<task>``.
    """
    from distillery import config as config_mod
    from distillery.evaluate import load_policy
    from distillery.pipeline import RUNS_DIR, env_from_config

    if not cfg.checkpoint:
        raise ValueError("export needs checkpoint=<run dir | checkpoints/last | step dir>")
    sampler = None if cfg.sampler is None else str(cfg.sampler).strip()
    if sampler is not None and "," in sampler:
        raise config_mod.ConfigError(f"sampler={sampler!r}: export bakes one sampler into the graph; pass one, "
                                     f"e.g. sampler=ddim:10")
    fmt = str(cfg.export.format)
    if fmt not in MODEL_FILES:
        raise config_mod.ConfigError(f"export.format={fmt!r}; choose one of {', '.join(sorted(MODEL_FILES))}")
    if not cfg.export.parity_tol > 0:
        raise config_mod.ConfigError(f"export.parity_tol must be > 0, got {cfg.export.parity_tol}")
    policy, meta = load_policy(cfg.checkpoint)
    task_cfg = meta.get("config", {}).get("task")
    control_dt = None
    if task_cfg is not None:
        env = env_from_config(task_cfg, 1, int(cfg.seed))  # the control rate the policy was trained at
        control_dt = float(env.control_dt)
        env.close()
    if cfg.export.out_dir:
        out_dir = Path(cfg.export.out_dir)
    elif cfg.run_dir:
        out_dir = Path(cfg.run_dir)
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        out_dir = RUNS_DIR / f"{stamp}_export_{(task_cfg or {}).get('name', policy.name)}"
    export_policy(policy, out_dir, sampler=sampler, fmt=fmt, meta=meta, control_dt=control_dt,
                  opset=cfg.export.opset, parity_tol=float(cfg.export.parity_tol),
                  parity_batches=list(cfg.export.parity_batches), seed=int(cfg.seed))
    atomic_write_text(out_dir / "config.yaml", config_mod.to_yaml(cfg))
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    parity = manifest["parity"]
    print(f"exported {manifest['policy']['name']} ({manifest['sampler']}, {manifest['policy']['params'] / 1e6:.2f}M "
          f"params) as {fmt}: parity max |diff| {parity['max_abs_diff']:.2e} on batch sizes {parity['batch_sizes']} "
          f"({parity['backend']}) -> {out_dir / manifest['file']}")
    return out_dir
