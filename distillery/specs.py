"""Shared shape contracts between envs, policies, exporters and datasets.

A spec describes one tensor *per environment* (no leading batch axis). Specs are plain data: they
round-trip through JSON so checkpoints, datasets and deploy manifests can carry them without an env.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and optional elementwise bounds of one tensor for a single env."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    low: float | None = None
    high: float | None = None
    description: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "low": self.low, "high": self.high,
                "description": self.description}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(shape=tuple(int(s) for s in d["shape"]), dtype=str(d.get("dtype", "float32")),
                   low=d.get("low"), high=d.get("high"), description=str(d.get("description", "")))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


ObservationSpec = dict[str, TensorSpec]
"""Observation groups (``state``, ``privileged``, ``image``, ``tactile``, ...) to their specs."""


def obs_spec_to_json(spec: ObservationSpec) -> dict[str, Any]:
    return {k: v.to_json() for k, v in spec.items()}


def obs_spec_from_json(d: dict[str, Any]) -> ObservationSpec:
    return {k: TensorSpec.from_json(v) for k, v in d.items()}
