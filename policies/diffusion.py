"""Diffusion Policy, CNN variant (Chi et al. 2023): a conditional DDPM over the action chunk.

    training:   k ~ U{0..T-1}, eps ~ N(0, I), A^k = sqrt(ab_k) A^0 + sqrt(1 - ab_k) eps
                L = || eps - eps_theta(A^k, k, f(O)) ||^2                                    (paper Eq. 5)
    inference:  A^T ~ N(0, I), then the reverse chain of the chosen sampler ("ddpm", "ddim:K")   (paper Eq. 4)

``f`` is the observation encoder (global conditioning), ``eps_theta`` the :class:`ConditionalUnet1D`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.policies.base import Policy
from distillery.policies.networks.encoders import make_obs_encoder
from distillery.policies.networks.unet1d import ConditionalUnet1D
from distillery.policies.schedule import NoiseSchedule, SamplerSpec, parse_sampler
from distillery.specs import ObservationSpec, TensorSpec

__all__ = ["DiffusionPolicy"]


class DiffusionPolicy(Policy):
    name: ClassVar[str] = "diffusion"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **Policy.DEFAULTS,
        # Small enough for CPU training (see the README's policy table); the paper's state net is
        # down_dims [256, 512, 1024], step_embed_dim 256, encoder identity (~65.8M params).
        "down_dims": [32, 64, 128],
        "step_embed_dim": 64,
        "kernel_size": 5,
        "n_groups": 8,
        "activation": "mish",
        "num_train_steps": 100,
        "clip_sample": True,
        "sampler": "ddim:10",
        "ddim_eta": 0.0,
        "encoder": {"type": "mlp", "hidden": [256], "out_dim": 128},
    }

    def __init__(self, obs_spec: ObservationSpec, action_spec: TensorSpec, cfg: Mapping[str, Any] | None = None):
        super().__init__(obs_spec, action_spec, cfg)
        c = self.cfg
        self.encoder = make_obs_encoder(obs_spec, self.obs_keys, self.obs_horizon, c["encoder"])
        self.unet = ConditionalUnet1D(self.action_dim, self.encoder.out_dim, c["down_dims"], int(c["step_embed_dim"]),
                                      int(c["kernel_size"]), int(c["n_groups"]), str(c["activation"]))
        self.unet.check_horizon(self.pred_horizon)
        self.schedule = NoiseSchedule(int(c["num_train_steps"]), clip_sample=bool(c["clip_sample"]))
        self.ddim_eta = float(c["ddim_eta"])
        if self.ddim_eta < 0:
            raise ValueError(f"ddim_eta must be >= 0, got {self.ddim_eta}")
        self.default_sampler = self.parse_sampler(c["sampler"])  # fail at construction, not at the first rollout

    def parse_sampler(self, sampler: str | None) -> SamplerSpec:
        return parse_sampler(self.cfg["sampler"] if sampler is None else sampler, self.schedule.num_train_steps)

    # -- pieces reused by RL fine-tuning and distillation ---------------------------------------------------
    def encode_obs(self, nobs: Mapping[str, Tensor]) -> Tensor:
        """Normalised ``{k: (B, To, *shape)}`` -> global condition ``(B, cond_dim)``."""
        return self.encoder(nobs)

    def eps(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """``eps_theta(x_t (B, Tp, Da), t (B,), cond (B, cond_dim)) -> (B, Tp, Da)``."""
        return self.unet(x_t, t, cond)

    # -- contract ----------------------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        nobs, a0 = self.normalized_batch(batch)                                    # a0: (B, Tp, Da) in [-1, 1]
        cond = self.encode_obs(nobs)
        b = a0.shape[0]
        k = torch.randint(0, self.schedule.num_train_steps, (b,), device=a0.device)   # k ~ U{0..T-1}
        noise = torch.randn_like(a0)                                                 # eps ~ N(0, I)
        a_k = self.schedule.q_sample(a0, k, noise)                                  # A^k
        loss = F.mse_loss(self.eps(a_k, k, cond), noise)                             # || eps - eps_theta ||^2
        return loss, {"loss": float(loss.detach())}

    def sample_normalized(self, nobs: Mapping[str, Tensor], sampler: str | None,
                          generator: torch.Generator | None) -> Tensor:
        spec = self.default_sampler if sampler is None else self.parse_sampler(sampler)
        cond = self.encode_obs(nobs)
        shape = (cond.shape[0], self.pred_horizon, self.action_dim)
        return self.schedule.sample(lambda x, t: self.eps(x, t, cond), shape, spec, default_eta=self.ddim_eta,
                                    generator=generator)
