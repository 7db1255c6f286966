"""Regression baseline: observation encoder + MLP head predicting the whole normalised chunk in one shot.

``L = || A^0 - g(f(O)) ||^2`` on normalised actions. Deterministic, so with multimodal demonstrations it regresses
to the conditional mean (the failure mode Diffusion Policy's paper motivates against).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.policies.base import Policy
from distillery.policies.networks.encoders import make_obs_encoder, mlp
from distillery.specs import ObservationSpec, TensorSpec

__all__ = ["MLPPolicy"]


class MLPPolicy(Policy):
    name: ClassVar[str] = "mlp"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **Policy.DEFAULTS,
        "encoder": {"type": "mlp", "hidden": [256], "out_dim": 256},
        "hidden": [256, 256],
    }
    SAMPLERS: ClassVar[tuple[str, ...]] = ("direct",)

    def __init__(self, obs_spec: ObservationSpec, action_spec: TensorSpec, cfg: Mapping[str, Any] | None = None):
        super().__init__(obs_spec, action_spec, cfg)
        self.encoder = make_obs_encoder(obs_spec, self.obs_keys, self.obs_horizon, self.cfg["encoder"])
        self.head = mlp(self.encoder.out_dim, self.cfg["hidden"], self.pred_horizon * self.action_dim)

    def forward_normalized(self, nobs: Mapping[str, Tensor]) -> Tensor:
        """Normalised ``{k: (B, To, *shape)}`` -> normalised chunk ``(B, Tp, Da)``."""
        return self.head(self.encoder(nobs)).unflatten(-1, (self.pred_horizon, self.action_dim))

    def loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        nobs, a0 = self.normalized_batch(batch)
        loss = F.mse_loss(self.forward_normalized(nobs), a0)
        return loss, {"loss": float(loss.detach())}

    def sample_normalized(self, nobs: Mapping[str, Tensor], sampler: str | None,
                          generator: torch.Generator | None, noise: Tensor | None = None,
                          carry: dict[str, Tensor] | None = None) -> Tensor:
        if sampler is not None and sampler not in self.SAMPLERS:
            raise ValueError(f"the mlp policy is deterministic and has no sampler {sampler!r}; "
                             f"pass sampler=None or one of {list(self.SAMPLERS)}")
        return self.forward_normalized(nobs)

    def is_deterministic(self, sampler: str | None) -> bool:
        return True
