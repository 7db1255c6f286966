"""The one policy contract: horizons, normaliser, chunk prediction and receding-horizon ``act``.

Timeline for one decision (To = obs_horizon, Tp = pred_horizon, Ta = action_horizon; Diffusion Policy's picture):

    obs used:     |o o|                           To = 2 latest observations (t-1, t)
    predicted:    |a a a a a a a a a a a a a a a a|   Tp = 16 actions starting at t-1
    executed:       |a a a a a a a a|                 Ta = 8 actions from index To-1 (the current step t)

Subclasses implement :meth:`loss` and :meth:`sample_normalized`; everything else (input checks, normalising,
un-normalising, the executed slice, per-env observation history and action queue) lives here once.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from distillery.policies.normalizer import NORM_MODES, Normalizer
from distillery.specs import ObservationSpec, TensorSpec, obs_spec_to_json

__all__ = ["Policy", "resolve_config", "to_plain"]


def to_plain(obj: Any) -> Any:
    """Recursively turn mappings/sequences (incl. OmegaConf containers) into dicts/lists for JSON metadata."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (isinstance(obj, Sequence) and not isinstance(obj, (str, bytes))):
        return [to_plain(v) for v in obj]
    return obj


def resolve_config(defaults: Mapping[str, Any], cfg: Mapping[str, Any] | None, owner: str) -> dict[str, Any]:
    """Defaults overlaid with ``cfg``; unknown keys fail with the valid list. Nested dicts merge unless their
    ``type`` changes (a different encoder type starts from a blank config)."""
    user = to_plain(cfg) if cfg is not None else {}
    if not isinstance(user, dict):
        raise TypeError(f"{owner} config must be a mapping, got {type(cfg).__name__}")
    if "name" in user and user.pop("name") != owner:
        raise ValueError(f"config is for policy {cfg['name']!r} but builds {owner!r}")  # type: ignore[index]
    unknown = set(user) - set(defaults)
    if unknown:
        raise ValueError(f"{owner} policy: unknown config keys {sorted(unknown)}; valid keys: {sorted(defaults)}")
    out = copy.deepcopy(dict(defaults))
    for k, v in user.items():
        base = out.get(k)
        if isinstance(base, dict) and isinstance(v, dict) and v.get("type", base.get("type")) == base.get("type"):
            out[k] = {**base, **v}
        else:
            out[k] = v
    return out


class Policy(nn.Module):
    """Base policy. Construct with ``(obs_spec, action_spec, cfg)``; reconstruct with the same plus ``state_dict``.

    Attributes: ``obs_horizon`` (To), ``pred_horizon`` (Tp), ``action_horizon`` (Ta), ``obs_keys``, ``cfg`` (resolved,
    JSON-able), ``normalizer`` (buffers in the state_dict).
    """

    name: ClassVar[str] = "policy"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "obs_horizon": 2,
        "pred_horizon": 16,
        "action_horizon": 2,  # see configs/policy/diffusion.yaml for why not 8
        "obs_keys": ["state"],
        # "limits" | "gaussian" | "identity", or a {group: mode} mapping
        "obs_norm": "limits",
    }

    def __init__(self, obs_spec: ObservationSpec, action_spec: TensorSpec, cfg: Mapping[str, Any] | None = None):
        super().__init__()
        self.cfg = resolve_config(type(self).DEFAULTS, cfg, self.name)
        c = self.cfg
        self.obs_horizon, self.pred_horizon, self.action_horizon = (int(c["obs_horizon"]), int(c["pred_horizon"]),
                                                                    int(c["action_horizon"]))
        if min(self.obs_horizon, self.pred_horizon, self.action_horizon) < 1:
            raise ValueError(f"horizons must be >= 1, got To={self.obs_horizon}, Tp={self.pred_horizon}, "
                             f"Ta={self.action_horizon}")
        if self.obs_horizon - 1 + self.action_horizon > self.pred_horizon:
            raise ValueError(f"obs_horizon - 1 + action_horizon = {self.obs_horizon - 1 + self.action_horizon} exceeds "
                             f"pred_horizon={self.pred_horizon}: the executed slice [To-1, To-1+Ta) must fit in the "
                             f"predicted chunk; lower action_horizon or raise pred_horizon")
        self.obs_keys = [str(k) for k in c["obs_keys"]]
        if not self.obs_keys:
            raise ValueError("obs_keys is empty; list the observation groups the policy sees, e.g. ['state']")
        missing = [k for k in self.obs_keys if k not in obs_spec]
        if missing:
            raise ValueError(f"obs_keys {missing} are not in the observation spec (groups: {sorted(obs_spec)})")
        if "action" in self.obs_keys:
            raise ValueError("an observation group may not be called 'action' (reserved for the action normaliser)")
        if len(action_spec.shape) != 1:
            raise ValueError(f"action_spec must be 1-D (Da,), got shape {action_spec.shape}")
        self.obs_spec: ObservationSpec = dict(obs_spec)
        self.action_spec = action_spec
        self.action_dim = int(action_spec.shape[0])

        obs_norm = c["obs_norm"]
        modes = dict(obs_norm) if isinstance(obs_norm, dict) else {k: obs_norm for k in self.obs_keys}
        bad = {k: m for k, m in modes.items() if m not in NORM_MODES}
        if bad or set(modes) != set(self.obs_keys):
            raise ValueError(f"obs_norm must be one of {NORM_MODES} or a mapping of every obs key "
                             f"{self.obs_keys} to one; got {obs_norm!r}")
        modes["action"] = "limits"  # the sampler clips to [-1, 1], so actions must live there
        self.normalizer = Normalizer({**{k: obs_spec[k] for k in self.obs_keys}, "action": action_spec}, modes)

        # act() state: per-env raw observation history, action queue, and "history must be refilled" flags
        self._hist: dict[str, Tensor] | None = None
        self._queue: Tensor | None = None
        self._queue_idx: Tensor | None = None
        self._fresh: Tensor | None = None
        self._carry: dict[str, Tensor] = {}  # per-env sampler state (warm starts), rows = envs

    # ------------------------------------------------------------------------------------------ to implement
    def loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """``batch = {"obs": {k: (B, To, *shape)}, "action": (B, Tp, Da)}`` in data units -> (scalar loss, metrics)."""
        raise NotImplementedError

    def sample_normalized(self, nobs: Mapping[str, Tensor], sampler: str | None,
                          generator: torch.Generator | None, noise: Tensor | None = None,
                          carry: dict[str, Tensor] | None = None) -> Tensor:
        """Normalised ``nobs {k: (B, To, *shape)}`` -> normalised action sequence ``(B, Tp, Da)``.

        ``noise (B, Tp, Da)``: the initial sample ``x_T`` to use instead of a draw from ``generator`` (export and
        parity checks feed it as an input). ``carry``: per-env state of a warm-started sampler (``rti``,
        ``streaming``) for exactly these rows; the sampler reads and updates it in place. ``carry["valid"] (B,)``
        is False for envs with no previous plan (episode start or reset).
        """
        raise NotImplementedError

    def is_deterministic(self, sampler: str | None) -> bool:
        """True if ``sampler`` is a pure function of (observations, initial noise): exportable as one graph."""
        return False

    # ------------------------------------------------------------------------------------------ shared
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_normalizer(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        """``stats = {group or "action": {"min", "max", "mean", "std"}}`` from ``EpisodeDataset.stats``."""
        self.normalizer.set_stats(stats)

    def check_obs(self, obs: Mapping[str, Any], time_axis: bool = True) -> dict[str, Tensor]:
        """Check ``obs[k]`` is ``(B, To, *shape)`` (``(B, *shape)`` if not ``time_axis``); float32 on our device."""
        out: dict[str, Tensor] = {}
        batch = None
        for k in self.obs_keys:
            if k not in obs:
                raise KeyError(f"observation group {k!r} missing; got groups {sorted(obs)}")
            x = torch.as_tensor(obs[k])
            want = ((self.obs_horizon,) if time_axis else ()) + tuple(self.obs_spec[k].shape)
            if x.dim() != len(want) + 1 or tuple(x.shape[1:]) != want:
                lead = "(B, To=%d, ...)" % self.obs_horizon if time_axis else "(B, ...)"
                raise ValueError(f"obs[{k!r}] has shape {tuple(x.shape)}; expected (B, {', '.join(map(str, want))}) "
                                 f"i.e. {lead} with the spec shape {self.obs_spec[k].shape}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"obs groups disagree on batch size: {batch} vs {x.shape[0]} for {k!r}")
            batch = x.shape[0]
            out[k] = x.to(device=self.device, dtype=torch.float32)
        return out

    def normalized_batch(self, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        """Checked, normalised ``(nobs {k: (B, To, ...)}, naction (B, Tp, Da))`` for a training batch."""
        if not bool(self.normalizer.fitted):
            raise RuntimeError("the policy normaliser has no statistics; call "
                               "policy.set_normalizer(dataset.stats(obs_keys + ['action'])) before training")
        obs = self.check_obs(batch["obs"])
        action = torch.as_tensor(batch["action"]).to(device=self.device, dtype=torch.float32)
        b = next(iter(obs.values())).shape[0]
        if tuple(action.shape) != (b, self.pred_horizon, self.action_dim):
            raise ValueError(f"batch['action'] has shape {tuple(action.shape)}; expected (B={b}, "
                             f"Tp={self.pred_horizon}, Da={self.action_dim}). Build the dataset with "
                             f"pred_horizon={self.pred_horizon}")
        return self.normalizer.normalize_dict(obs), self.normalizer.normalize("action", action)

    @torch.no_grad()
    def predict_sequence(self, obs_history: Mapping[str, Any], sampler: str | None = None,
                         generator: torch.Generator | None = None, noise: Tensor | None = None,
                         carry: dict[str, Tensor] | None = None) -> Tensor:
        """Full predicted chunk ``(B, Tp, Da)`` in env units (clamped to the action spec bounds).

        ``noise``/``carry``: see :meth:`sample_normalized`. A ``carry`` dict passed here persists the sampler's
        state across calls (``{}`` to start), which is how latency benchmarks time warm-started samplers.
        """
        nobs = self.normalizer.normalize_dict(self.check_obs(obs_history))
        b = next(iter(nobs.values())).shape[0]
        if noise is not None and tuple(noise.shape) != (b, self.pred_horizon, self.action_dim):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected (B={b}, Tp={self.pred_horizon}, "
                             f"Da={self.action_dim})")
        if carry is not None and "valid" not in carry:
            carry["valid"] = torch.zeros(b, dtype=torch.bool, device=self.device)
        seq = self.sample_normalized(nobs, sampler, generator, noise=noise, carry=carry)
        if carry is not None:
            carry["valid"] = torch.ones_like(carry["valid"])
        return self.to_env_action(seq)

    def to_env_action(self, normalized: Tensor) -> Tensor:
        """Normalised actions ``(..., Da)`` -> env units, clamped to the action spec's bounds where it has them."""
        action = self.normalizer.unnormalize("action", normalized)
        low, high = self.action_spec.low, self.action_spec.high
        return action.clamp(min=low, max=high) if low is not None or high is not None else action

    def predict_chunk(self, obs_history: Mapping[str, Any], sampler: str | None = None,
                      generator: torch.Generator | None = None, noise: Tensor | None = None,
                      carry: dict[str, Tensor] | None = None) -> Tensor:
        """``obs_history {k: (B, To, *shape)}`` -> executed actions ``(B, Ta, Da)`` = sequence[:, To-1 : To-1+Ta]."""
        start = self.obs_horizon - 1
        seq = self.predict_sequence(obs_history, sampler, generator, noise=noise, carry=carry)
        return seq[:, start:start + self.action_horizon]

    # ------------------------------------------------------------------------------------------ closed loop
    def reset(self, mask: Tensor | None = None) -> None:
        """Forget history and queued actions: of all envs (``mask=None``) or of envs where ``mask (B,)`` is True."""
        if mask is None or self._fresh is None:
            self._hist = self._queue = self._queue_idx = self._fresh = None
            self._carry = {}
            return
        mask = torch.as_tensor(mask, dtype=torch.bool, device=self._fresh.device)
        if mask.shape != self._fresh.shape:
            raise ValueError(f"reset mask has shape {tuple(mask.shape)}, expected ({self._fresh.shape[0]},) "
                             f"= the batch size act() has been called with")
        self._fresh |= mask
        self._queue_idx[mask] = self.action_horizon  # type: ignore[index]
        if "valid" in self._carry:
            self._carry["valid"][mask] = False  # a warm-started sampler starts these envs from scratch

    @torch.no_grad()
    def act(self, obs: Mapping[str, Any], sampler: str | None = None,
            generator: torch.Generator | None = None, mask: Tensor | None = None) -> Tensor:
        """One control step: ``obs {k: (B, *shape)}`` -> action ``(B, Da)`` on the observations' device.

        Envs whose queue is empty re-plan (only those rows go through the network); after a reset an env's
        history is filled by repeating its first observation, as Diffusion Policy's env runner does.
        ``mask (B,)``: envs whose action is wanted; the others never re-plan (their rows of the result are
        stale), which saves the network calls of envs an evaluation no longer counts.
        """
        x = self.check_obs(obs, time_axis=False)
        out_device = torch.as_tensor(obs[self.obs_keys[0]]).device
        b = next(iter(x.values())).shape[0]
        dev = self.device
        if self._fresh is None or self._fresh.shape[0] != b or self._fresh.device != dev:
            self._hist = {k: v.unsqueeze(1).repeat_interleave(self.obs_horizon, 1) for k, v in x.items()}
            self._queue = torch.zeros(b, self.action_horizon, self.action_dim, device=dev)
            self._queue_idx = torch.full((b,), self.action_horizon, dtype=torch.long, device=dev)
            self._fresh = torch.zeros(b, dtype=torch.bool, device=dev)
            self._carry = {"valid": torch.zeros(b, dtype=torch.bool, device=dev)}
        else:
            assert self._hist is not None
            for k, v in x.items():
                h = self._hist[k]
                fresh = self._fresh.view((b,) + (1,) * (h.dim() - 1))
                self._hist[k] = torch.where(fresh, v.unsqueeze(1).expand_as(h), torch.cat([h[:, 1:], v[:, None]], 1))
            self._fresh.zero_()
        assert self._queue is not None and self._queue_idx is not None
        need = self._queue_idx >= self.action_horizon
        if mask is not None:
            need &= torch.as_tensor(mask, dtype=torch.bool, device=dev)
        if bool(need.all()):
            self._queue = self.predict_chunk(self._hist, sampler, generator, carry=self._carry)
            self._queue_idx.zero_()
        elif bool(need.any()):
            rows = need.nonzero().squeeze(1)
            carry = {k: v[rows] for k, v in self._carry.items()}
            self._queue[rows] = self.predict_chunk({k: h[rows] for k, h in self._hist.items()}, sampler, generator,
                                                   carry=carry)
            for k, v in carry.items():  # scatter the planned rows' sampler state back (new keys start at zero)
                if k not in self._carry:
                    self._carry[k] = torch.zeros((b,) + tuple(v.shape[1:]), dtype=v.dtype, device=dev)
                self._carry[k][rows] = v
            self._queue_idx[rows] = 0
        # masked-out envs may have run past their queue: hold them at its end until they re-plan
        action = self._queue[torch.arange(b, device=dev), self._queue_idx.clamp(max=self.action_horizon - 1)]
        self._queue_idx = (self._queue_idx + 1).clamp(max=self.action_horizon)
        return action.to(out_device)

    # ------------------------------------------------------------------------------------------ metadata
    def describe(self) -> dict[str, Any]:
        """JSON-able metadata; with the state_dict it is enough to rebuild the policy (``policy_from_description``)."""
        return {
            "name": self.name,
            "params": self.num_params(),
            "obs_horizon": self.obs_horizon,
            "pred_horizon": self.pred_horizon,
            "action_horizon": self.action_horizon,
            "obs_keys": list(self.obs_keys),
            "cfg": copy.deepcopy(self.cfg),
            "obs_spec": obs_spec_to_json({k: self.obs_spec[k] for k in self.obs_keys}),
            "action_spec": self.action_spec.to_json(),
        }
