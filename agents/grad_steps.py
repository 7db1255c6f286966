"""The per-step bookkeeping of the agents: gradients without the generic wrappers around them, and the running
means of per-update metrics between two log lines.

``Optimizer.zero_grad`` and ``nn.utils.clip_grad_norm_`` cost 100-300 us a call in Python (profiler records,
dynamo guards, per-device grouping) while the tensor work is a few microseconds: at thousands of small-network
steps per run that overhead was a tenth of a PPO update. These do the same tensor operations directly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MetricMeans", "clear_grads", "clip_grad_norm", "load_fused_adam_state"]


class MetricMeans:
    """Means of the per-update metric dicts added since the last :meth:`pop` (a key missing from some updates is
    averaged over the updates that reported it)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.updates = 0

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        self.updates += 1

    def means(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v / self.counts[k] for k, v in self.sums.items()}

    def pop(self, prefix: str = "") -> dict[str, float]:
        """:meth:`means`, then start a new window."""
        out = self.means(prefix)
        self.sums, self.counts, self.updates = {}, {}, 0
        return out


def clear_grads(params: Sequence[Tensor]) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` for ``params``."""
    for p in params:
        p.grad = None


@torch.no_grad()
def clip_grad_norm(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """``nn.utils.clip_grad_norm_(params, max_norm)`` (2-norm), bit for bit: the same foreach norm, stacked norm,
    ``min(max_norm / (norm + 1e-6), 1)`` scale and foreach multiply, without torch's per-device grouping when all
    gradients share one device and dtype (otherwise torch's function does the grouping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    first = grads[0]
    if any(g.device != first.device or g.dtype != first.dtype for g in grads):
        return nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    torch._foreach_mul_(grads, torch.clamp(float(max_norm) / (total + 1e-6), max=1.0))
    return total


def load_fused_adam_state(optimizer: torch.optim.Adam, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the fused kernel and the learning rates ``optimizer`` was built
    with. A state saved by a foreach Adam (checkpoints written before the agents went fused) carries
    ``foreach=True`` in its param groups, which would otherwise switch the resumed run back to the slower
    implementation; the moments and step counts are the same in both. The rates come from the run's config, so a
    resumed run whose config.yaml was edited (a lower rate for a long tail) trains at the new rates."""
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, rates):
        group["foreach"], group["fused"], group["lr"] = None, True, lr
