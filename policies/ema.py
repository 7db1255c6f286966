"""Exponential moving average of model weights, with Diffusion Policy's warm-up decay.

``decay(step) = clip(1 - (1 + step / inv_gamma) ** -power, min_decay, max_decay)`` with power 0.75, inv_gamma 1,
min 0, max 0.9999: the average follows the raw weights closely early in training (decay 0 at step 0, 0.41 at
step 1, 0.9 near step 20) and becomes a long average later. ``step`` counts the optimiser steps already taken
before this update. Trainable parameters are averaged; buffers (normaliser statistics, counters) and frozen
parameters are copied, as in Diffusion Policy's EMAModel: averaging them would let statistics set after the
EMA was created drift in only slowly.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    def __init__(self, model: nn.Module, power: float = 0.75, inv_gamma: float = 1.0, min_decay: float = 0.0,
                 max_decay: float = 0.9999) -> None:
        if not 0.0 <= min_decay <= max_decay <= 1.0:
            raise ValueError(f"EMA needs 0 <= min_decay <= max_decay <= 1, got {min_decay}, {max_decay}")
        self.power, self.inv_gamma = float(power), float(inv_gamma)
        self.min_decay, self.max_decay = float(min_decay), float(max_decay)
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.last_decay = 0.0

    def decay(self, step: int) -> float:
        value = 1.0 - (1.0 + max(int(step), 0) / self.inv_gamma) ** -self.power
        return min(max(value, self.min_decay), self.max_decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """``shadow <- decay * shadow + (1 - decay) * weights``."""
        d = self.decay(step)
        self.last_decay = d
        state = model.state_dict()
        if state.keys() != self.shadow.keys():
            raise ValueError("EMA.update: model state_dict keys differ from the ones the EMA was built from")
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        avg_s, avg_m, copy_s, copy_m = [], [], [], []
        for k, s in self.shadow.items():
            averaged = k in trainable and s.is_floating_point()
            (avg_s if averaged else copy_s).append(s)
            (avg_m if averaged else copy_m).append(state[k].detach())
        if avg_s:
            torch._foreach_lerp_(avg_s, avg_m, 1.0 - d)
        for s, m in zip(copy_s, copy_m):
            s.copy_(m)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (e.g. for evaluation), restoring them after."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensor dict (safetensors-friendly)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
            raise ValueError(f"EMA.load_state_dict: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self
