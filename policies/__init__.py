"""Policies behind one contract (:class:`Policy`): Diffusion Policy (CNN U-Net), its distilled one-step
ConsistencyPolicy, the StreamingPolicy (SDP), an MLP regression baseline, and the Gaussian actor of PPO/SAC.

``make_policy(name, obs_spec, action_spec, cfg)`` builds one; ``policy_from_description(policy.describe())`` plus
``load_state_dict`` rebuilds it from checkpoint metadata. This package imports only torch, numpy and
``distillery.specs``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distillery.policies.base import Policy
from distillery.policies.consistency import ConsistencyPolicy
from distillery.policies.diffusion import DiffusionPolicy
from distillery.policies.ema import EMA
from distillery.policies.gaussian import GaussianPolicy
from distillery.policies.mlp import MLPPolicy
from distillery.policies.normalizer import Normalizer
from distillery.policies.schedule import NoiseSchedule, SamplerSpec, parse_sampler
from distillery.policies.streaming import StreamingPolicy
from distillery.specs import ObservationSpec, TensorSpec, obs_spec_from_json

__all__ = [
    "POLICIES", "ConsistencyPolicy", "DiffusionPolicy", "EMA", "GaussianPolicy", "MLPPolicy", "NoiseSchedule",
    "Normalizer", "Policy", "SamplerSpec", "StreamingPolicy",
    "make_policy", "parse_sampler", "policy_from_description", "register_policy",
]

POLICIES: dict[str, type[Policy]] = {"diffusion": DiffusionPolicy, "mlp": MLPPolicy, "consistency": ConsistencyPolicy,
                                     "streaming": StreamingPolicy, "gaussian": GaussianPolicy}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator adding a policy under ``cls.name``."""
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, obs_spec: ObservationSpec | Mapping[str, Any], action_spec: TensorSpec | Mapping[str, Any],
                cfg: Mapping[str, Any] | None = None) -> Policy:
    """Build policy ``name`` ("diffusion" | "mlp" | registered). Specs may be given as objects or their JSON dicts."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    if not isinstance(action_spec, TensorSpec):
        action_spec = TensorSpec.from_json(dict(action_spec))
    if any(not isinstance(v, TensorSpec) for v in obs_spec.values()):
        obs_spec = obs_spec_from_json({k: dict(v) for k, v in obs_spec.items()})
    return POLICIES[name](obs_spec, action_spec, cfg)  # type: ignore[arg-type]


def policy_from_description(desc: Mapping[str, Any]) -> Policy:
    """Rebuild an (untrained) policy from ``Policy.describe()`` output; then ``load_state_dict`` the weights."""
    return make_policy(desc["name"], desc["obs_spec"], desc["action_spec"], desc["cfg"])
