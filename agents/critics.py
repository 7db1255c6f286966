"""Critics over action chunks: twin Q, state value, IQL (the offline critic) and FQE (off-policy evaluation).

All critics work on the chunk-level transitions of :func:`distillery.data.transitions.chunk_transitions`:
``obs`` (B, D), ``action`` (B, A) with A = chunk * Da, ``reward``, ``next_obs``, ``done`` and ``discount``
(B,) where ``discount = gamma ** (env steps in the chunk)``. A bootstrapped target is
``reward + discount * (1 - done) * value(next_obs)``; a batch without a ``discount`` column uses the
critic's ``gamma_chunk`` instead.

* :class:`IQL` (Kostrikov, Nair, Levine, ICLR 2022), as RL-100 uses it for its offline advantage
  ``A = min Q - V``: V by expectile regression on the target critic's Q over dataset actions (no policy
  sampling), Q by TD towards ``V(s')``, target Q by Polyak averaging. RL-100's critic: expectile 0.7,
  3 x 512 MLPs, lr 1e-4, tau 0.005, gamma 0.99 per env step.
* :class:`FQE` (fitted Q evaluation, Le, Voloshin, Yue 2019) estimates ``Q^pi`` of any policy from the
  same data: TD towards ``Q_target(s', pi(s'))``. RL-100 gates offline updates with a model-based AM-Q;
  FQE is the model-free substitute: ``estimate(start_obs, pi)`` ranks candidate policies.

Both normalise observations with the mean/std of the first transitions they are fitted on (buffers, so
saved with ``state_dict``); actions are already in [-1, 1] and rewards are used as they are.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.agents.grad_steps import MetricMeans
from distillery.policies.networks.encoders import mlp

PolicyFn = Callable[[Tensor], Tensor]
"""``policy_fn(obs (B, D)) -> action (B, A)``: the evaluated policy's chunk action for the critic's obs."""


def critic_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, layer_norm: bool = False) -> nn.Sequential:
    """ReLU MLP (as in IQL); ``layer_norm`` puts a LayerNorm after every hidden Linear, before its ReLU,
    which keeps Q from growing without bound on out-of-distribution actions."""
    if in_dim < 1 or not hidden or any(int(h) < 1 for h in hidden):
        raise ValueError(f"critic needs in_dim >= 1 and at least one positive hidden size, got in_dim={in_dim}, "
                         f"hidden={tuple(hidden)}")
    net = mlp(in_dim, hidden, out_dim, act=nn.ReLU)
    if not layer_norm:
        return net
    layers: list[nn.Module] = []
    for m in list(net)[:-1]:
        layers.append(m)
        if isinstance(m, nn.Linear):
            layers.append(nn.LayerNorm(m.out_features))
    layers.append(net[-1])
    return nn.Sequential(*layers)


def _check_rows(x: Tensor, dim: int, name: str) -> None:
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must be (B, {dim}), got shape {tuple(x.shape)}")


class TwinQ(nn.Module):
    """Two independent Q heads ``Q_i(obs, act)``; their minimum curbs over-estimation (clipped double Q)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), layer_norm: bool = False):
        super().__init__()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        if self.act_dim < 1:
            raise ValueError(f"act_dim must be >= 1, got {act_dim}")
        self.q1 = critic_mlp(self.obs_dim + self.act_dim, hidden, 1, layer_norm)
        self.q2 = critic_mlp(self.obs_dim + self.act_dim, hidden, 1, layer_norm)

    def forward(self, obs: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        """obs (B, D), act (B, A) -> (q1 (B,), q2 (B,))."""
        _check_rows(obs, self.obs_dim, "obs")
        _check_rows(act, self.act_dim, "act")
        if len(obs) != len(act):
            raise ValueError(f"obs has {len(obs)} rows but act has {len(act)}")
        x = torch.cat([obs, act], dim=1)
        return self.q1(x).squeeze(1), self.q2(x).squeeze(1)

    def min(self, obs: Tensor, act: Tensor) -> Tensor:
        """(B,) elementwise minimum of the two heads."""
        return torch.minimum(*self(obs, act))


class StateValue(nn.Module):
    """``V(obs)``: obs (B, D) -> (B,)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256), layer_norm: bool = False):
        super().__init__()
        self.obs_dim = int(obs_dim)
        self.net = critic_mlp(self.obs_dim, hidden, 1, layer_norm)

    def forward(self, obs: Tensor) -> Tensor:
        _check_rows(obs, self.obs_dim, "obs")
        return self.net(obs).squeeze(1)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """``target <- (1 - tau) * target + tau * source`` for every parameter; buffers are copied."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    t_params, s_params = list(target.parameters()), list(source.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"target has {len(t_params)} parameters but source has {len(s_params)}; pass two copies "
                         f"of the same network")
    torch._foreach_lerp_(t_params, s_params, tau)  # one fused call instead of a Python loop per tensor
    for b_t, b in zip(target.buffers(), source.buffers(), strict=True):
        b_t.copy_(b)


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """Asymmetric squared loss ``mean(|tau - 1(diff < 0)| * diff^2)`` with ``tau = expectile``.

    Minimised over a constant ``v`` with ``diff = x - v`` it gives the tau-expectile of ``x``: the mean for
    tau = 0.5, tending to the maximum as tau -> 1 (IQL's in-sample approximation of ``max_a Q``).
    """
    if not 0.0 < expectile < 1.0:
        raise ValueError(f"expectile must be in (0, 1), got {expectile}")
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.square()).mean()


_REQUIRED = ("obs", "action", "reward", "next_obs", "done")


def _require(columns: Mapping[str, Tensor], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in columns]
    if missing:
        raise KeyError(f"{what} lacks {missing}; build transitions with "
                       f"distillery.data.transitions.chunk_transitions (keys {list(_REQUIRED)} + 'discount')")


class _ChunkCritic(nn.Module):
    """Shared parts of IQL and FQE: twin Q with a Polyak target, obs normaliser, batch checks, fit loop."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], gamma_chunk: float, lr: float,
                 tau: float, layer_norm: bool, seed: int) -> None:
        super().__init__()
        if not 0.0 < gamma_chunk <= 1.0:
            raise ValueError(f"gamma_chunk must be in (0, 1], got {gamma_chunk}")
        if not 0.0 < tau <= 1.0 or not lr > 0:
            raise ValueError(f"need tau in (0, 1] and lr > 0, got tau={tau}, lr={lr}")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.hidden, self.layer_norm, self.seed = tuple(int(h) for h in hidden), bool(layer_norm), int(seed)
        self.gamma_chunk, self.lr, self.tau = float(gamma_chunk), float(lr), float(tau)
        self.register_buffer("obs_mean", torch.zeros(self.obs_dim))
        self.register_buffer("obs_std", torch.ones(self.obs_dim))
        self.register_buffer("normalizer_fitted", torch.zeros((), dtype=torch.bool))
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(self.seed)
            self.q = TwinQ(obs_dim, act_dim, hidden, layer_norm)
            self._build_extra()
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.q_opt = torch.optim.Adam(self.q.parameters(), lr=self.lr, foreach=True)

    def _build_extra(self) -> None:
        """Subclasses create further networks here (inside the seeded RNG scope)."""

    @property
    def device(self) -> torch.device:
        return self.obs_mean.device

    def normalize(self, obs: Tensor) -> Tensor:
        return (obs.to(self.device, torch.float32) - self.obs_mean) / self.obs_std

    @torch.no_grad()
    def fit_normalizer(self, obs: Tensor) -> None:
        """Set the obs mean/std from ``obs`` (M, D); std is floored so constant dims do not blow up."""
        _check_rows(obs, self.obs_dim, "obs")
        obs = obs.to(self.device, torch.float32)
        self.obs_mean.copy_(obs.mean(0))
        self.obs_std.copy_(obs.std(0, unbiased=False).clamp(min=1e-3))
        self.normalizer_fitted.fill_(True)

    def _batch(self, batch: Mapping[str, Tensor], extra: Sequence[str] = ()) -> dict[str, Tensor]:
        """Checked float32 copy of a batch on the critic's device, obs normalised, ``discount`` filled in."""
        _require(batch, (*_REQUIRED, *extra), "batch")
        out = {k: torch.as_tensor(batch[k]).to(self.device, torch.float32) for k in (*_REQUIRED, *extra)}
        _check_rows(out["obs"], self.obs_dim, "batch['obs']")
        _check_rows(out["next_obs"], self.obs_dim, "batch['next_obs']")
        _check_rows(out["action"], self.act_dim, "batch['action'] (chunk * Da)")
        b = len(out["obs"])
        if "discount" in batch:
            out["discount"] = torch.as_tensor(batch["discount"]).to(self.device, torch.float32)
        else:
            out["discount"] = torch.full((b,), self.gamma_chunk, device=self.device)
        for k in ("reward", "done", "discount"):
            if out[k].shape != (b,):
                raise ValueError(f"batch[{k!r}] must be ({b},), got shape {tuple(out[k].shape)}")
        out["obs"], out["next_obs"] = self.normalize(out["obs"]), self.normalize(out["next_obs"])
        return out

    def _q_step(self, b: Mapping[str, Tensor], next_value: Tensor) -> float:
        """One Adam step of both Q heads towards ``r + discount * (1 - done) * next_value``; Polyak target."""
        target = b["reward"] + b["discount"] * (1.0 - b["done"]) * next_value
        q1, q2 = self.q(b["obs"], b["action"])
        loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.q_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.q_opt.step()
        polyak_update(self.q_target, self.q, self.tau)
        return float(loss.detach())

    def _fit(self, transitions: Mapping[str, Tensor], steps: int, batch_size: int,
             generator: torch.Generator | None, sampler, extra: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """``steps`` calls of ``update`` on minibatches of ``transitions`` (plus ``extra`` columns), rows drawn
        uniformly or by ``sampler`` (a :class:`distillery.data.weighting.WeightedSampler` over the rows).
        Returns each metric averaged over the last tenth of the steps."""
        _require(transitions, _REQUIRED, "transitions")
        keys = [k for k in (*_REQUIRED, "discount") if k in transitions]
        data = {k: torch.as_tensor(transitions[k]).to(self.device) for k in keys} | dict(extra or {})
        n = len(data["obs"])
        lengths = {k: len(v) for k, v in data.items()}
        if set(lengths.values()) != {n}:
            raise ValueError(f"transition columns have different numbers of rows: {lengths}")
        if n == 0 or int(steps) < 0 or int(batch_size) < 1:
            raise ValueError(f"need transitions, steps >= 0 and batch_size >= 1 (got {n} rows, steps={steps}, "
                             f"batch_size={batch_size})")
        if sampler is not None and len(sampler) != n:
            raise ValueError(f"sampler draws from {len(sampler)} rows but the transitions have {n}")
        if not bool(self.normalizer_fitted):
            self.fit_normalizer(data["obs"])
        steps, window = int(steps), max(1, int(steps) // 10)
        last = MetricMeans()
        for i in range(steps):
            idx = sampler.sample(batch_size) if sampler is not None else \
                torch.randint(n, (int(batch_size),), generator=generator)
            metrics = self.update({k: v[idx.to(v.device)] for k, v in data.items()})
            if i >= steps - window:
                last.add(metrics)
        return last.means()

    def update(self, batch: Mapping[str, Tensor]) -> dict[str, float]:  # pragma: no cover - interface
        raise NotImplementedError

    def train_state(self) -> dict:
        """Optimiser states (not in ``state_dict``), for exact resume; flatten with runtime.flatten_state."""
        return {k: v.state_dict() for k, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    def load_train_state(self, state: Mapping) -> None:
        for k, v in state.items():
            getattr(self, k).load_state_dict(v)


class IQL(_ChunkCritic):
    """Implicit Q-learning critic on chunk transitions (see the module docstring).

    Args:
        obs_dim: D of the critic's obs. act_dim: A = chunk * Da.
        hidden: MLP sizes of every Q head and of V. expectile: tau of the V regression (0.7 as in RL-100).
        gamma_chunk: discount of a batch that has no ``discount`` column. tau: Polyak rate of the target Q.
        lr: Adam learning rate of Q and V. layer_norm: LayerNorm in the MLPs. seed: weight initialisation.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (512, 512, 512), expectile: float = 0.7,
                 gamma_chunk: float = 0.99 ** 2, tau: float = 0.005, lr: float = 1e-4, layer_norm: bool = False,
                 seed: int = 0) -> None:
        if not 0.0 < expectile < 1.0:
            raise ValueError(f"expectile must be in (0, 1), got {expectile}")
        self.expectile = float(expectile)
        super().__init__(obs_dim, act_dim, hidden, gamma_chunk, lr, tau, layer_norm, seed)
        self.v_opt = torch.optim.Adam(self.v.parameters(), lr=self.lr, foreach=True)

    def _build_extra(self) -> None:
        self.v = StateValue(self.obs_dim, self.hidden, self.layer_norm)

    def update(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        """One step of V (expectile of the target critic's Q), then of Q (towards the new V(s')), then the
        Polyak target, in the order of the authors' code. Returns losses and means."""
        b = self._batch(batch)
        with torch.no_grad():
            q_t = self.q_target.min(b["obs"], b["action"])
        v = self.v(b["obs"])
        v_loss = expectile_loss(q_t - v, self.expectile)
        self.v_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        self.v_opt.step()
        with torch.no_grad():
            next_v = self.v(b["next_obs"])
        q_loss = self._q_step(b, next_v)
        v = v.detach()
        return {"v_loss": float(v_loss.detach()), "q_loss": q_loss, "v_mean": float(v.mean()),
                "q_mean": float(q_t.mean()), "adv_mean": float((q_t - v).mean())}

    def fit(self, transitions: Mapping[str, Tensor], steps: int, batch_size: int = 256,
            generator: torch.Generator | None = None, sampler=None) -> dict[str, float]:
        """``steps`` updates on minibatches of ``transitions`` (uniform rows, or a ``WeightedSampler`` for
        return/advantage-weighted sampling). Returns the metrics averaged over the last tenth of the steps."""
        return self._fit(transitions, steps, batch_size, generator, sampler)

    @torch.no_grad()
    def value(self, obs: Tensor) -> Tensor:
        """V(obs): (B, D) raw obs -> (B,)."""
        return self.v(self.normalize(obs))

    @torch.no_grad()
    def q_value(self, obs: Tensor, act: Tensor) -> Tensor:
        """min of the target critic's two heads: (B, D), (B, A) -> (B,)."""
        return self.q_target.min(self.normalize(obs), act.to(self.device, torch.float32))

    @torch.no_grad()
    def advantage(self, obs: Tensor, act: Tensor) -> Tensor:
        """``min Q_target(obs, act) - V(obs)``: (B,). Not normalised (RL-100 standardises per batch)."""
        return self.q_value(obs, act) - self.value(obs)


class FQE(_ChunkCritic):
    """Fitted Q evaluation of one fixed policy from offline chunk transitions.

    Make one FQE per evaluated policy. Q is fitted towards ``r + discount * (1 - done) * min Q_target(s',
    pi(s'))``, with ``pi(s')`` computed once per next state at the start of :meth:`fit` (a stochastic policy is
    represented by one sampled action per state). The min over twin heads makes the estimate conservative for
    actions the data do not cover, which is the safe side for accepting a candidate policy.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), gamma_chunk: float = 0.99 ** 2,
                 lr: float = 3e-4, tau: float = 0.005, layer_norm: bool = False, seed: int = 0) -> None:
        super().__init__(obs_dim, act_dim, hidden, gamma_chunk, lr, tau, layer_norm, seed)

    def update(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        """One TD step of Q on a batch that also holds ``next_action`` (B, A) = pi(next_obs)."""
        b = self._batch(batch, extra=("next_action",))
        _check_rows(b["next_action"], self.act_dim, "batch['next_action']")
        with torch.no_grad():
            next_q = self.q_target.min(b["next_obs"], b["next_action"])
        q_loss = self._q_step(b, next_q)
        return {"q_loss": q_loss, "next_q_mean": float(next_q.mean())}

    @torch.no_grad()
    def policy_actions(self, obs: Tensor, policy_fn: PolicyFn, policy_batch: int = 4096) -> Tensor:
        """``policy_fn`` applied to raw ``obs`` (M, D) in batches of ``policy_batch``: (M, A) on the device."""
        obs = torch.as_tensor(obs)
        _check_rows(obs, self.obs_dim, "obs")
        out = []
        for chunk in obs.split(int(policy_batch)):
            act = torch.as_tensor(policy_fn(chunk))
            if act.shape != (len(chunk), self.act_dim):
                raise ValueError(f"policy_fn returned shape {tuple(act.shape)} for {len(chunk)} observations; it "
                                 f"must return ({len(chunk)}, {self.act_dim}) chunk actions")
            out.append(act.to(self.device, torch.float32))
        return torch.cat(out)

    def fit(self, transitions: Mapping[str, Tensor], policy_fn: PolicyFn, steps: int, batch_size: int = 256,
            generator: torch.Generator | None = None, sampler=None, policy_batch: int = 4096) -> dict[str, float]:
        """Evaluate ``policy_fn`` on every ``next_obs`` once, then ``steps`` TD updates on minibatches.
        Returns the metrics averaged over the last tenth of the steps."""
        _require(transitions, _REQUIRED, "transitions")
        next_action = self.policy_actions(transitions["next_obs"], policy_fn, policy_batch)
        return self._fit(transitions, steps, batch_size, generator, sampler, extra={"next_action": next_action})

    @torch.no_grad()
    def estimate(self, obs: Tensor, policy_fn: PolicyFn, policy_batch: int = 4096) -> float:
        """Mean over start states ``obs`` (M, D) of ``min Q(s, pi(s))``: the policy's estimated value."""
        act = self.policy_actions(obs, policy_fn, policy_batch)
        return float(self.q_target.min(self.normalize(torch.as_tensor(obs)), act).mean())


__all__ = ["FQE", "IQL", "PolicyFn", "StateValue", "TwinQ", "critic_mlp", "expectile_loss", "polyak_update"]
