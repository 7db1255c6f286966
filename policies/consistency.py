"""Consistency policy: a one-step (or few-step) student distilled from a trained :class:`DiffusionPolicy`.

The student has the teacher's network but its output is the clean chunk itself, ``f_theta(x_t, t) = F_theta(x_t,
t)`` for every level ``t >= 0`` (the boundary ``f(x, -1) = x`` is applied by the trainer at the clean end). The
teacher's epsilon parameterisation would give ``x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``, which at the top
level of the squared-cosine schedule divides by ``sqrt(ab_99) ~ 1e-3``: measured on the push_cube teacher, that
one-step x0 is 0.81 MSE away from the teacher's own ddim:10 sample (whose spread over noise is 0.04), and the
clipping it needs zeroes the gradients. Initialising from the teacher's weights still reuses its features
(observation encoder and U-Net). Training is done by
:class:`distillery.agents.DistillAgent` (consistency distillation along the teacher's probability-flow ODE, or
RL-100's output matching to the teacher's K-step DDIM sample).

Sampling ``consistency:N`` (Song et al. 2023, multistep consistency sampling; Consistency Policy's chaining):
``x0 = f(z, T-1)`` from ``z ~ N(0, I)``; for each further level ``t_i`` re-noise ``x0`` to ``t_i`` and map it back.
The levels are evenly spaced: N = 3 gives ``t = 99, 66, 32`` for 100 train steps (CP chains at 2/3 and 1/3 of
its 80 bins).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from distillery.policies.diffusion import DiffusionPolicy
from distillery.policies.schedule import SamplerSpec, _bad_sampler, register_sampler_kind

__all__ = ["ConsistencyPolicy", "chain_levels"]


def _parse_consistency(text: str, args: str, num_train_steps: int) -> SamplerSpec:
    if not args.isdigit() or not 1 <= int(args) <= num_train_steps:
        raise _bad_sampler(text, f"expected 'consistency:N' with an integer 1 <= N <= {num_train_steps}")
    return SamplerSpec("consistency", int(args), 0.0, text)


register_sampler_kind("consistency", "'consistency:N' (N-step consistency sampling; N = 1 is one network call)",
                      _parse_consistency)


def chain_levels(num_train_steps: int, steps: int) -> list[int]:
    """Noise levels of ``consistency:N``: ``round(T (N - i) / N) - 1`` for ``i = 0..N-1`` (first = ``T - 1``)."""
    return [round(num_train_steps * (steps - i) / steps) - 1 for i in range(steps)]


class ConsistencyPolicy(DiffusionPolicy):
    name: ClassVar[str] = "consistency"
    SAMPLER_KINDS: ClassVar[tuple[str, ...]] = ("consistency",)
    EVAL_SAMPLERS: ClassVar[tuple[str, ...]] = ("consistency:1", "consistency:3")
    DEFAULTS: ClassVar[dict[str, Any]] = {**DiffusionPolicy.DEFAULTS, "sampler": "consistency:1"}

    def consistency_fn(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """``f_theta(x_t (B, Tp, Da), t (B,), cond) -> x0 (B, Tp, Da)`` (normalised units, not clipped: the
        sampler clips, training keeps the gradient)."""
        return self.unet(x_t, t, cond)

    def loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        raise RuntimeError("a consistency policy is trained from a diffusion teacher: run "
                           "`distillery distill teacher=<diffusion checkpoint>` (agents.DistillAgent), not `train`")

    def is_deterministic(self, sampler: str | None) -> bool:
        return self.parse_sampler(sampler).steps == 1

    def sample_normalized(self, nobs: Mapping[str, Tensor], sampler: str | None,
                          generator: torch.Generator | None, noise: Tensor | None = None,
                          carry: dict[str, Tensor] | None = None) -> Tensor:
        spec = self.default_sampler if sampler is None else self.parse_sampler(sampler)
        cond = self.encode_obs(nobs)
        shape = (cond.shape[0], self.pred_horizon, self.action_dim)
        x = torch.randn(shape, generator=generator, device=cond.device) if noise is None else noise
        x0 = x
        for i, level in enumerate(chain_levels(self.schedule.num_train_steps, spec.steps)):
            t = torch.full((shape[0],), level, device=cond.device, dtype=torch.long)
            if i > 0:  # re-noise the current estimate to the next (lower) level
                x = self.schedule.q_sample(x0, t, torch.randn(shape, generator=generator, device=cond.device))
            x0 = self.consistency_fn(x, t, cond)
            if self.schedule.clip_sample:
                x0 = x0.clamp(-self.schedule.clip_range, self.schedule.clip_range)
        return x0
