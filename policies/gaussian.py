"""Gaussian MLP policy: the actor of PPO (state-independent log-std) and SAC (tanh-squashed, log-std head).

Everything is in normalised units, like every :class:`Policy`: observations go through the policy normaliser
(``"gaussian"`` mode by default, fed with running mean/std by the RL agent via :meth:`GaussianPolicy.set_obs_stats`)
and actions live in ``[-1, 1]`` (``"limits"`` from the action spec bounds). One decision uses one observation and
yields one action (``To = Tp = Ta = 1``).

    feature = concat(normalised obs groups)                      (B, D)
    mean, log_std = net(feature)                                  (B, Da) each
    u ~ N(mean, exp(log_std)^2)                                   raw Gaussian sample
    action = u            (squash False: PPO; the env clips to [-1, 1])
    action = tanh(u)      (squash True: SAC), log p(a) = log N(u) - sum log(1 - tanh(u)^2)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.policies.base import Policy
from distillery.policies.networks.encoders import make_obs_encoder, mlp
from distillery.specs import ObservationSpec, TensorSpec

__all__ = ["ACTIVATIONS", "GaussianPolicy", "gaussian_log_prob", "make_mlp"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "mish": nn.Mish}
_LOG_2PI = math.log(2.0 * math.pi)


def make_mlp(in_dim: int, hidden: list[int], out_dim: int, activation: str = "tanh", layer_norm: bool = False,
             out_gain: float = 1.0) -> nn.Sequential:
    """:func:`encoders.mlp` with a named activation, optional LayerNorm after each hidden Linear, and orthogonal
    init (hidden gain sqrt(2), output gain ``out_gain``), the initialisation PPO implementations rely on."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    net = mlp(in_dim, hidden, out_dim, act=ACTIVATIONS[activation])
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for lin in linears:
        nn.init.orthogonal_(lin.weight, gain=out_gain if lin is linears[-1] else math.sqrt(2.0))
        nn.init.zeros_(lin.bias)
    if not layer_norm:
        return net
    layers: list[nn.Module] = []
    for m in net:
        layers.append(m)
        if isinstance(m, nn.Linear) and m is not linears[-1]:
            layers.append(nn.LayerNorm(m.out_features))
    return nn.Sequential(*layers)


def gaussian_log_prob(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Diagonal Gaussian log-density summed over the last axis: ``(..., Da) -> (...)``."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)


def _tanh_log_det(u: Tensor) -> Tensor:
    """``sum log(1 - tanh(u)^2)`` over the last axis, in the overflow-free form 2 (log 2 - u - softplus(-2u))."""
    return (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)


class GaussianPolicy(Policy):
    """Diagonal Gaussian actor over the concatenated normalised observation groups.

    Config (``DEFAULTS``): ``hidden`` sizes, ``activation`` (tanh | relu | mish), ``layer_norm``, ``squash``
    (tanh-squashed, for SAC), ``state_std`` (False: one learned log-std vector as in PPO; True: a log-std head as
    in SAC, softly bounded), ``init_log_std`` (initial log-std of the PPO vector), ``log_std_bounds`` [lo, hi].
    Samplers: ``"mean"`` (deterministic, default, exportable) and ``"sample"``.
    """

    name: ClassVar[str] = "gaussian"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **Policy.DEFAULTS,
        "obs_horizon": 1,
        "pred_horizon": 1,
        "action_horizon": 1,
        "obs_keys": ["state"],
        "obs_norm": "gaussian",
        "hidden": [256, 256],
        "activation": "tanh",
        "layer_norm": False,
        "squash": False,
        "state_std": False,
        "init_log_std": -0.5,
        "log_std_bounds": [-5.0, 2.0],
    }
    SAMPLERS: ClassVar[tuple[str, ...]] = ("mean", "sample")

    def __init__(self, obs_spec: ObservationSpec, action_spec: TensorSpec, cfg: Mapping[str, Any] | None = None):
        super().__init__(obs_spec, action_spec, cfg)
        c = self.cfg
        if (self.obs_horizon, self.pred_horizon, self.action_horizon) != (1, 1, 1):
            raise ValueError(f"the gaussian policy maps one observation to one action: set obs_horizon, "
                             f"pred_horizon and action_horizon to 1 (got {self.obs_horizon}, {self.pred_horizon}, "
                             f"{self.action_horizon})")
        lo, hi = (float(v) for v in c["log_std_bounds"])
        if not lo < hi:
            raise ValueError(f"log_std_bounds must be [low, high] with low < high, got {c['log_std_bounds']}")
        if not lo <= float(c["init_log_std"]) <= hi:
            raise ValueError(f"init_log_std={c['init_log_std']} lies outside log_std_bounds {c['log_std_bounds']}")
        self.log_std_low, self.log_std_high = lo, hi
        self.squash, self.state_std = bool(c["squash"]), bool(c["state_std"])
        # "identity" encoder: the feature is the concatenated normalised groups; the MLP below mixes them.
        self.encoder = make_obs_encoder(obs_spec, self.obs_keys, 1, {"type": "identity"})
        da = self.action_dim
        # A small output gain starts the mean near 0 (the centre of the action box), as PPO implementations do.
        self.net = make_mlp(self.encoder.out_dim, [int(h) for h in c["hidden"]], 2 * da if self.state_std else da,
                            str(c["activation"]), bool(c["layer_norm"]), out_gain=0.01)
        if not self.state_std:
            self.log_std = nn.Parameter(torch.full((da,), float(c["init_log_std"])))

    # ------------------------------------------------------------------------------------------ distribution
    def set_obs_stats(self, mean: Mapping[str, Tensor], std: Mapping[str, Tensor]) -> None:
        """Write running observation statistics ``{group: (*shape,)}`` into the normaliser (actions: the spec's
        bounds -> [-1, 1]). RL agents call this at every env step; imitation uses
        ``set_normalizer(dataset.stats(...))``."""
        fast = all(self.normalizer.modes[k] == "gaussian" for k in self.obs_keys)
        if fast and bool(self.normalizer.fitted):  # the action bounds are already in: only the observations change
            for k in self.obs_keys:
                self.normalizer.set_gaussian(k, mean[k], std[k])
            return
        low, high = self.action_spec.low, self.action_spec.high
        if low is None or high is None:
            raise ValueError("the gaussian policy needs a bounded action spec (low/high) to normalise actions")
        stats: dict[str, dict[str, Any]] = {k: {"mean": mean[k], "std": std[k]} for k in self.obs_keys}
        shape = self.action_spec.shape
        stats["action"] = {"min": torch.full(shape, float(low)), "max": torch.full(shape, float(high))}
        self.set_normalizer(stats)

    def dist_params(self, nobs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Normalised ``{k: (B, 1, *shape)}`` -> ``(mean (B, Da), log_std (B, Da))`` of the pre-squash Gaussian."""
        out = self.net(self.encoder(nobs))
        if self.state_std:
            mean, raw = out.chunk(2, dim=-1)
            # tanh keeps the head inside the bounds with a gradient everywhere (a hard clamp would stall it)
            log_std = self.log_std_low + 0.5 * (self.log_std_high - self.log_std_low) * (torch.tanh(raw) + 1.0)
        else:
            mean = out
            log_std = self.log_std.clamp(self.log_std_low, self.log_std_high).expand_as(mean)
        return mean, log_std

    def sample_and_log_prob(self, nobs: Mapping[str, Tensor], generator: torch.Generator | None = None,
                            noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Reparameterised draw: ``(action (B, Da), log_prob (B,))``; ``noise (B, Da)`` replaces the N(0, I) draw.

        Unsquashed: the raw Gaussian sample (may leave [-1, 1]; the env clips). Squashed: ``tanh`` of it, with the
        log-det correction in ``log_prob``."""
        mean, log_std = self.dist_params(nobs)
        eps = noise if noise is not None else torch.randn(mean.shape, generator=generator, device=mean.device)
        u = mean + torch.exp(log_std) * eps
        logp = gaussian_log_prob(u, mean, log_std)
        if self.squash:
            return torch.tanh(u), logp - _tanh_log_det(u)
        return u, logp

    def log_prob(self, nobs: Mapping[str, Tensor], action: Tensor) -> Tensor:
        """Log-density of normalised ``action (B, Da)`` -> ``(B,)``. Squashed: ``action`` is inverted through
        ``atanh`` (clamped 1e-6 inside +-1, so saturated data actions get a finite density)."""
        return self.log_prob_and_entropy(nobs, action)[0]

    def entropy(self, nobs: Mapping[str, Tensor]) -> Tensor:
        """Entropy ``(B,)`` of the Gaussian before any squash: ``sum(log_std) + Da/2 (1 + log 2 pi)``."""
        _, log_std = self.dist_params(nobs)
        return (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1)

    def log_prob_and_entropy(self, nobs: Mapping[str, Tensor], action: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`log_prob` and :meth:`entropy` from one forward pass (PPO needs both per minibatch)."""
        mean, log_std = self.dist_params(nobs)
        entropy = (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1)
        if not self.squash:
            return gaussian_log_prob(action, mean, log_std), entropy
        u = torch.atanh(action.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
        return gaussian_log_prob(u, mean, log_std) - _tanh_log_det(u), entropy

    # ------------------------------------------------------------------------------------------ Policy contract
    def loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Behaviour cloning: Gaussian negative log-likelihood of the data actions (normalised units)."""
        nobs, a0 = self.normalized_batch(batch)
        nll = -self.log_prob(nobs, a0[:, 0]).mean()
        return nll, {"loss": float(nll.detach())}

    def sample_normalized(self, nobs: Mapping[str, Tensor], sampler: str | None,
                          generator: torch.Generator | None, noise: Tensor | None = None,
                          carry: dict[str, Tensor] | None = None) -> Tensor:
        """``(B, 1, Da)``: the mean (``"mean"``/None; ``tanh`` of it if squashed) or a draw (``"sample"``; ``noise
        (B, 1, Da)`` is then the standard-normal draw)."""
        sampler = sampler or "mean"
        if sampler not in self.SAMPLERS:
            raise ValueError(f"the gaussian policy has no sampler {sampler!r}; choose one of {list(self.SAMPLERS)}")
        if sampler == "sample":
            action, _ = self.sample_and_log_prob(nobs, generator, None if noise is None else noise[:, 0])
        else:
            mean, _ = self.dist_params(nobs)
            action = torch.tanh(mean) if self.squash else mean
        return action.unsqueeze(1)

    def is_deterministic(self, sampler: str | None) -> bool:
        return (sampler or "mean") == "mean"
