"""Observation encoders: ``obs dict {group: (B, To, *shape)} -> (B, out_dim)`` global conditioning feature.

Two registries keep new modalities a small addition:
  * group encoders by *kind* of group (``"vector"`` for 1-D specs now; ``"image"`` / ``"tactile"`` later), each mapping
    one time step ``(N, *shape) -> (N, feat_dim)``;
  * obs encoders by *name* (``cfg.encoder.type``): how per-step group features become the global feature.
The per-step features of all groups are concatenated, the ``To`` steps are flattened (Diffusion Policy's
``obs_as_global_cond``), and an optional MLP head compresses them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillery.specs import TensorSpec

__all__ = [
    "ObsEncoder", "MultiGroupObsEncoder", "VectorGroupEncoder", "group_kind", "make_obs_encoder", "mlp",
    "register_group_encoder", "register_obs_encoder", "OBS_ENCODERS", "GROUP_ENCODERS",
]


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, act: type[nn.Module] = nn.Mish) -> nn.Sequential:
    """``Linear -> act`` for each hidden size, then a final ``Linear`` to ``out_dim``."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, int(h)), act()]
        d = int(h)
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class ObsEncoder(nn.Module):
    """Interface: ``forward(obs {key: (B, To, *shape)}) -> (B, out_dim)``; inputs are already normalised."""

    out_dim: int
    obs_keys: list[str]
    obs_horizon: int

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- group encoders

GroupEncoderFactory = Callable[[TensorSpec, Mapping[str, Any]], nn.Module]
GROUP_ENCODERS: dict[str, GroupEncoderFactory] = {}


def register_group_encoder(kind: str, factory: GroupEncoderFactory) -> None:
    """``factory(spec, group_cfg) -> module`` with ``out_dim``, mapping ``(N, *spec.shape) -> (N, out_dim)``."""
    GROUP_ENCODERS[kind] = factory


def group_kind(spec: TensorSpec) -> str:
    """Which group encoder handles a spec: decided by its shape (1-D vector; (C, H, W) image)."""
    if len(spec.shape) == 1:
        return "vector"
    if len(spec.shape) == 3:
        return "image"
    return f"{len(spec.shape)}d"


class VectorGroupEncoder(nn.Module):
    """A 1-D group is its own per-step feature (the head MLP, if any, mixes groups and steps)."""

    def __init__(self, spec: TensorSpec, cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.out_dim = spec.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return x


register_group_encoder("vector", lambda spec, cfg: VectorGroupEncoder(spec, cfg))


# --------------------------------------------------------------------------------------------- obs encoders

class MultiGroupObsEncoder(ObsEncoder):
    """Encode each group per step, concatenate groups, flatten ``To``, then an optional MLP head.

    ``hidden=None`` / ``out_dim=None`` means no head: the feature is the flattened ``(To * sum feat_dim)`` vector
    (Diffusion Policy's low-dim setting).
    """

    def __init__(self, obs_spec: Mapping[str, TensorSpec], obs_keys: Sequence[str], obs_horizon: int,
                 hidden: Sequence[int] | None = None, out_dim: int | None = None,
                 group_cfg: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self.obs_keys, self.obs_horizon = list(obs_keys), int(obs_horizon)
        self.specs = {k: obs_spec[k] for k in self.obs_keys}
        group_cfg = group_cfg or {}
        self.groups = nn.ModuleDict()
        for key, spec in self.specs.items():
            kind = group_kind(spec)
            if kind not in GROUP_ENCODERS:
                raise ValueError(f"no encoder for observation group {key!r} of shape {spec.shape} (kind {kind!r}); "
                                 f"registered kinds: {sorted(GROUP_ENCODERS)}. Drop it from obs_keys or register "
                                 f"one with register_group_encoder({kind!r}, factory)")
            self.groups[key] = GROUP_ENCODERS[kind](spec, group_cfg.get(key, {}))
        self.flat_dim = self.obs_horizon * sum(int(g.out_dim) for g in self.groups.values())
        if out_dim is None:
            if hidden:
                raise ValueError("encoder.hidden was given without encoder.out_dim; set out_dim or drop hidden")
            self.head: nn.Module = nn.Identity()
            self.out_dim = self.flat_dim
        else:
            self.head = nn.Sequential(mlp(self.flat_dim, list(hidden or []), int(out_dim)), nn.Mish())
            self.out_dim = int(out_dim)

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        feats = []
        for key, enc in self.groups.items():
            x = obs[key]
            b, t = x.shape[:2]
            feats.append(enc(x.flatten(0, 1)).unflatten(0, (b, t)))  # (B, To, feat)
        return self.head(torch.cat(feats, dim=-1).flatten(1))


ObsEncoderFactory = Callable[[Mapping[str, TensorSpec], Sequence[str], int, Mapping[str, Any]], ObsEncoder]
OBS_ENCODERS: dict[str, ObsEncoderFactory] = {}
_OBS_ENCODER_KEYS: dict[str, frozenset[str]] = {}


def register_obs_encoder(name: str, factory: ObsEncoderFactory, config_keys: Sequence[str]) -> None:
    """``factory(obs_spec, obs_keys, obs_horizon, encoder_cfg) -> ObsEncoder``; ``config_keys`` it accepts
    (besides ``type``), so typos in ``cfg.encoder`` fail early."""
    OBS_ENCODERS[name] = factory
    _OBS_ENCODER_KEYS[name] = frozenset(config_keys) | {"type"}


def _mlp_factory(obs_spec, obs_keys, obs_horizon, cfg) -> ObsEncoder:
    return MultiGroupObsEncoder(obs_spec, obs_keys, obs_horizon, hidden=cfg.get("hidden", [256]),
                                out_dim=int(cfg.get("out_dim", 128)), group_cfg=cfg.get("groups"))


def _identity_factory(obs_spec, obs_keys, obs_horizon, cfg) -> ObsEncoder:
    return MultiGroupObsEncoder(obs_spec, obs_keys, obs_horizon, group_cfg=cfg.get("groups"))


register_obs_encoder("mlp", _mlp_factory, ["hidden", "out_dim", "groups"])
register_obs_encoder("identity", _identity_factory, ["groups"])


def make_obs_encoder(obs_spec: Mapping[str, TensorSpec], obs_keys: Sequence[str], obs_horizon: int,
                     cfg: Mapping[str, Any]) -> ObsEncoder:
    """Build the encoder named by ``cfg["type"]`` (``"mlp"`` | ``"identity"`` | registered names)."""
    name = cfg.get("type", "mlp")
    if name not in OBS_ENCODERS:
        raise ValueError(f"unknown encoder type {name!r}; choose one of {sorted(OBS_ENCODERS)}")
    unknown = set(cfg) - _OBS_ENCODER_KEYS[name]
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} for encoder type {name!r}; "
                         f"valid keys: {sorted(_OBS_ENCODER_KEYS[name])}")
    return OBS_ENCODERS[name](obs_spec, obs_keys, obs_horizon, cfg)
