"""Per-dimension affine normaliser that lives inside the policy (its buffers are saved in the state_dict).

Each key (an observation group or ``"action"``) maps ``x -> x * scale + offset``:
    ``"limits"``   min/max -> [-1, 1] (Diffusion Policy's limits normaliser; required for actions because the
                   sampler clips x0 to [-1, 1])
    ``"gaussian"`` (x - mean) / std
    ``"identity"`` unchanged (e.g. images already scaled by their encoder)
Dimensions whose range (or std) is below ``eps`` would blow up, so they get scale 1 and are centred instead.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from distillery.specs import TensorSpec

__all__ = ["Normalizer", "NORM_MODES"]

NORM_MODES = ("limits", "gaussian", "identity")


def _buffer_name(key: str) -> str:
    # state_dict keys may not contain dots; group names normally do not, but be safe.
    return key.replace(".", "_")


class Normalizer(nn.Module):
    """Holds ``scale``/``offset`` buffers shaped like each key's spec (stats may be broadcastable, e.g. per channel).

    ``fitted`` is a buffer too, so a policy restored from a checkpoint knows its statistics were set.
    """

    fitted: Tensor

    def __init__(self, specs: Mapping[str, TensorSpec], modes: Mapping[str, str], eps: float = 1e-4) -> None:
        super().__init__()
        missing = set(specs) - set(modes)
        if missing:
            raise ValueError(f"Normalizer: no mode given for keys {sorted(missing)}")
        for key, mode in modes.items():
            if mode not in NORM_MODES:
                raise ValueError(f"Normalizer: mode {mode!r} for {key!r} is invalid; choose one of {NORM_MODES}")
        self.specs = dict(specs)
        self.modes = {k: modes[k] for k in specs}
        self.eps = float(eps)
        for key, spec in self.specs.items():
            self.register_buffer(f"{_buffer_name(key)}_scale", torch.ones(spec.shape))
            self.register_buffer(f"{_buffer_name(key)}_offset", torch.zeros(spec.shape))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _params(self, key: str) -> tuple[Tensor, Tensor]:
        if key not in self.specs:
            raise KeyError(f"Normalizer has no key {key!r}; known keys: {sorted(self.specs)}")
        return getattr(self, f"{_buffer_name(key)}_scale"), getattr(self, f"{_buffer_name(key)}_offset")

    @torch.no_grad()
    def set_stats(self, stats: Mapping[str, Mapping[str, np.ndarray | Tensor]]) -> None:
        """``stats = {key: {"min", "max", "mean", "std"}}`` per-dimension arrays (as ``EpisodeDataset.stats``)."""
        for key, spec in self.specs.items():
            mode = self.modes[key]
            if mode == "identity":
                continue
            if key not in stats:
                raise ValueError(f"normaliser stats are missing key {key!r} (have {sorted(stats)}); "
                                 f"compute them with dataset.stats({sorted(self.specs)})")
            need = ("min", "max") if mode == "limits" else ("mean", "std")
            s = {}
            for name in need:
                if name not in stats[key]:
                    raise ValueError(f"normaliser stats for {key!r} lack {name!r} (mode {mode!r} needs {need})")
                v = torch.as_tensor(np.asarray(stats[key][name]), dtype=torch.float64)
                try:
                    s[name] = torch.broadcast_to(v, spec.shape)
                except RuntimeError as e:
                    raise ValueError(f"normaliser stats {key}.{name} has shape {tuple(v.shape)}, not broadcastable "
                                     f"to the spec shape {spec.shape}") from e
            if mode == "limits":
                lo, hi = s["min"], s["max"]
                rng = hi - lo
                flat = rng < self.eps
                # out = 2 (x - lo) / rng - 1 ; constant dims: out = x - lo (so the constant value maps to 0)
                scale = torch.where(flat, torch.ones_like(rng), 2.0 / rng.clamp(min=self.eps))
                offset = torch.where(flat, -lo, -1.0 - scale * lo)
            else:
                self._write_gaussian(key, s["mean"], s["std"])
                continue
            sc, off = self._params(key)
            sc.copy_(scale.float())
            off.copy_(offset.float())
        self.fitted.fill_(True)

    @torch.no_grad()
    def set_gaussian(self, key: str, mean: Tensor, std: Tensor) -> None:
        """New mean/std of one ``"gaussian"`` key, without :meth:`set_stats`' checks of every key: RL agents
        refresh their running observation statistics this way at every env step."""
        if self.modes.get(key) != "gaussian":
            raise ValueError(f"Normalizer.set_gaussian: key {key!r} has mode {self.modes.get(key)!r}, not 'gaussian'")
        self._write_gaussian(key, mean.to(torch.float64), std.to(torch.float64))

    def _write_gaussian(self, key: str, mean: Tensor, std: Tensor) -> None:
        scale = 1.0 / torch.where(std < self.eps, torch.ones_like(std), std)
        sc, off = self._params(key)
        sc.copy_(scale.float())
        off.copy_((-mean * scale).float())

    def normalize(self, key: str, x: Tensor) -> Tensor:
        """``x (..., *spec.shape)`` in data units -> normalised."""
        scale, offset = self._params(key)
        return x * scale + offset

    def unnormalize(self, key: str, x: Tensor) -> Tensor:
        scale, offset = self._params(key)
        return (x - offset) / scale

    def normalize_dict(self, obs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.normalize(k, v) for k, v in obs.items()}
