"""One-Step Flow Q-Learning (OFQL; Nguyen & Yoo, arXiv 2508.13904): an offline actor-critic whose policy is a
MeanFlow average-velocity model, so one network call generates an action and the Q term needs no
backpropagation through a sampling chain.

Flow path between an action (chunk) ``a`` and noise ``eps ~ N(0, I)``: ``z_t = (1 - t) a + t eps`` (``t = 1`` is
noise) with conditional velocity ``v = eps - a``. The network ``u_theta(z_t, r, t | s)`` is the *average* velocity
over ``[r, t]``; the MeanFlow identity ``u = v - (t - r) du/dt`` with ``du/dt = v . d_z u + d_t u`` (one JVP)
gives the flow-BC loss

    L_FBC = E || u_theta(z_t, r, t | s) - sg(v - (t - r)(v . d_z u_theta + d_t u_theta)) ||^2,

with ``(t, r)`` two logit-normal(-0.4, 1) draws ordered ``t >= r`` and ``r = t`` (plain flow matching) on a
``flow_ratio`` share. One-step action: ``a = eps - u_theta(eps, 0, 1 | s)``, clipped to [-1, 1].

Actor-critic as Diffusion-QL (Wang et al. 2023) with that one-step sampler:
    critic  L(phi)   = E[(r + discount (1 - done) min_i Q_{phi'_i}(s', a') - Q_{phi_i}(s, a))^2],  a' ~ pi_{theta'}
    actor   L(theta) = L_FBC - eta * Q_j(s, a_pi) / sg(E|Q_k(s, a_pi)|),   (j, k) a random order of the two heads
where ``theta'`` is an EMA of the actor and ``phi'`` a Polyak copy of the critic. Transitions may be action
chunks (``distillery.data.transitions.chunk_transitions``): ``reward`` is then the discounted sum inside the
chunk and ``discount`` = gamma^steps, so the backup above is the chunk's n-step target.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.agents.critics import TwinQ, polyak_update
from distillery.agents.grad_steps import MetricMeans
from distillery.policies.base import resolve_config
from distillery.policies.networks.encoders import mlp
from distillery.policies.networks.unet1d import SinusoidalPosEmb
from distillery.runtime import (flatten_state, load_checkpoint, load_checkpoint_meta, save_checkpoint,
                                 save_run_checkpoint, unflatten_state)
from distillery.runtime.checkpoint import resolve_checkpoint

__all__ = ["FlowActor", "OFQLAgent", "OFQLActor", "meanflow_loss", "sample_flow_times", "CHECKPOINT_KIND"]

CHECKPOINT_KIND = "ofql"
TRANSITION_KEYS = ("obs", "action", "reward", "next_obs", "done", "discount")


class FlowActor(nn.Module):
    """Average-velocity network ``u(z, r, t | s)``: obs ``(B, obs_dim)``, z ``(B, act_dim)``, r, t ``(B, 1)``
    -> ``(B, act_dim)``. An MLP over ``[s_norm, z, emb(t), emb(r)]``; the observation normaliser (Gaussian, fitted
    on the dataset) lives in its buffers so a checkpoint carries it.

    Args:
        time_embed_dim: size of each sinusoidal embedding of ``t`` and ``r`` (the paper adds one for ``r``).
        time_scale: ``t`` and ``r`` in [0, 1] are multiplied by this before the embedding, spreading its
            frequencies over the unit interval while keeping ``d_t u`` (inside the JVP target) moderate.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], time_embed_dim: int = 16,
                 time_scale: float = 10.0) -> None:
        super().__init__()
        self.obs_dim, self.act_dim, self.time_scale = int(obs_dim), int(act_dim), float(time_scale)
        self.time_emb = SinusoidalPosEmb(int(time_embed_dim))
        self.net = mlp(self.obs_dim + self.act_dim + 2 * int(time_embed_dim), hidden, self.act_dim)
        self.register_buffer("obs_mean", torch.zeros(self.obs_dim))
        self.register_buffer("obs_std", torch.ones(self.obs_dim))

    @torch.no_grad()
    def fit_normalizer(self, obs: Tensor, eps: float = 1e-3) -> None:
        """Gaussian normaliser from dataset observations ``(N, obs_dim)``; near-constant dims keep scale 1."""
        std = obs.std(0)
        self.obs_mean.copy_(obs.mean(0))
        self.obs_std.copy_(torch.where(std < eps, torch.ones_like(std), std))

    def normalize(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def forward(self, obs_n: Tensor, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """Average velocity; ``obs_n`` is the *normalised* observation (see :meth:`normalize`)."""
        emb = self.time_emb(torch.cat([t, r], 1) * self.time_scale).flatten(1)  # (B, 2, E) -> (B, 2E)
        return self.net(torch.cat([obs_n, z, emb], 1))

    def one_step(self, obs_n: Tensor, noise: Tensor) -> Tensor:
        """``a = eps - u(eps, r=0, t=1 | s)`` clipped to [-1, 1]: ``(B, act_dim)``, differentiable in the weights."""
        ones = noise.new_ones(noise.shape[0], 1)
        return (noise - self(obs_n, noise, torch.zeros_like(ones), ones)).clamp(-1.0, 1.0)


def sample_flow_times(batch: int, flow_ratio: float, mu: float = -0.4, sigma: float = 1.0,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(t, r)``, each ``(B, 1)``: two logit-normal(mu, sigma) draws ordered so ``t >= r``; ``r = t`` on a
    ``flow_ratio`` share of rows (those rows train instantaneous velocity, i.e. plain flow matching)."""
    x = torch.sigmoid(mu + sigma * torch.randn(batch, 2, generator=generator))
    t, r = x.max(1, keepdim=True).values, x.min(1, keepdim=True).values
    same = torch.rand(batch, 1, generator=generator) < flow_ratio
    return t, torch.where(same, t, r)


def meanflow_loss(u_fn: Callable[[Tensor, Tensor, Tensor], Tensor], action: Tensor, noise: Tensor, t: Tensor,
                  r: Tensor) -> Tensor:
    """MeanFlow flow-BC loss ``mean ||u(z_t, r, t) - sg(v - (t - r)(v . d_z u + d_t u))||^2`` (a scalar).

    Args:
        u_fn: ``(z (B, A), r (B, 1), t (B, 1)) -> u (B, A)`` (the observation is bound inside).
        action: data actions ``a`` ``(B, A)``; noise: ``eps`` ``(B, A)``; t, r: ``(B, 1)`` with ``t >= r``.
    The mean runs over batch *and* action dims (Diffusion-QL's BC MSE), which fixes the scale against ``eta``.
    """
    z = (1.0 - t) * action + t * noise
    v = noise - action
    # d/dt u(z_t, r, t) along the path: tangent v for z, 0 for r, 1 for t; one forward-mode pass
    u, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    target = (v - (t - r) * dudt).detach()
    return F.mse_loss(u, target)


def _check_transitions(transitions: Mapping[str, Any], obs_dim: int, act_dim: int) -> dict[str, Tensor]:
    """Float32 tensors of the keys the agent uses, with shapes checked; errors say what to pass instead."""
    missing = [k for k in TRANSITION_KEYS if k not in transitions]
    if missing:
        raise ValueError(f"OFQL transitions lack keys {missing}; build them with "
                         f"distillery.data.transitions.chunk_transitions(dataset, obs_key, chunk, gamma)")
    out = {k: torch.as_tensor(np.asarray(transitions[k]), dtype=torch.float32) for k in TRANSITION_KEYS}
    n = out["obs"].shape[0]
    want = {"obs": (n, obs_dim), "next_obs": (n, obs_dim), "action": (n, act_dim), "reward": (n,), "done": (n,),
            "discount": (n,)}
    bad = {k: tuple(out[k].shape) for k, s in want.items() if tuple(out[k].shape) != s}
    if bad:
        raise ValueError(f"OFQL transitions have shapes {bad}, expected {want} (obs_dim={obs_dim}, act_dim={act_dim}: "
                         f"act_dim is the flat chunk size chunk * Da)")
    if n == 0:
        raise ValueError("OFQL transitions are empty; the dataset holds no complete chunk")
    return out


class OFQLAgent:
    """Trains a :class:`FlowActor` and a :class:`TwinQ` critic offline on chunked transitions.

    Args:
        cfg: the ``agent`` config section (keys of :attr:`DEFAULTS`; unknown keys are an error).
        obs_dim: observation size ``D``; act_dim: flat action size ``A`` the policy outputs (``chunk * Da``).
        transitions: ``{"obs" (N, D), "action" (N, A), "reward" (N,), "next_obs" (N, D), "done" (N,),
            "discount" (N,)}`` (``chunk_transitions``' output), or None for an agent only used to act / resume.
        run_dir: checkpoints go to ``run_dir/checkpoints/step_*/`` with ``last`` pointing at the newest.
        logger: anything with ``log(metrics, step)`` and ``progress(total, desc)`` (``runtime.logging.Logger``).
        seed: seeds the weights, batch sampling and all noise.
        meta: extra JSON metadata stored in every checkpoint (the train command adds the task and its config).
    """

    DEFAULTS: dict[str, Any] = {
        "name": "ofql",
        "obs_key": "privileged",  # observation group the policy reads (transitions and OFQLActor)
        "chunk": 2,               # actions per transition / per plan (transitions are built with it)
        "gamma": 0.99,            # per-env-step discount; reaches the agent as the transitions' "discount"
        "steps": 20000,
        "batch_size": 256,
        "lr": 3.0e-4,             # Adam, actor and critic (paper / Diffusion-QL)
        "eta": 1.0,               # weight of the normalised Q term (Diffusion-QL locomotion: 1.0)
        "flow_ratio": 0.5,        # P(r = t); paper ablation: 0.5 best, 1.0 = plain flow matching
        "time_mu": -0.4,          # logit-normal (t, r) sampling
        "time_sigma": 1.0,
        "actor_hidden": [256, 256, 256],   # Diffusion-QL: 3 x 256 Mish
        "critic_hidden": [256, 256, 256],
        "critic_layer_norm": False,
        "time_embed_dim": 16,
        "time_scale": 10.0,
        "tau": 0.005,             # Polyak rate of the target critic
        "actor_ema": 0.995,       # EMA of the target actor (Diffusion-QL: 0.995 every 5 steps after 1000)
        "actor_ema_every": 5,
        "actor_ema_start": 1000,
        "grad_clip": 10.0,        # max grad norm of actor and critic; 0 turns clipping off
        "log_every": 100,
        "checkpoint_every": 5000,
    }

    def __init__(self, cfg: Mapping[str, Any] | None, obs_dim: int, act_dim: int,
                 transitions: Mapping[str, Any] | None, run_dir: str | Path, logger: Any, seed: int = 0,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.cfg = resolve_config(self.DEFAULTS, cfg, "ofql")
        self.meta = dict(meta or {})
        _check_config(self.cfg)
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.data = _check_transitions(transitions, self.obs_dim, self.act_dim) if transitions is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.logger = logger
        c = self.cfg
        torch.manual_seed(int(seed))  # weight init
        self.actor = FlowActor(self.obs_dim, self.act_dim, list(c["actor_hidden"]), c["time_embed_dim"],
                               c["time_scale"])
        if self.data is not None:
            self.actor.fit_normalizer(self.data["obs"])
        self.critic = TwinQ(self.obs_dim, self.act_dim, list(c["critic_hidden"]), bool(c["critic_layer_norm"]))
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=float(c["lr"]))
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=float(c["lr"]))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.step = 0

    # ------------------------------------------------------------------------------------------ pieces
    def q_target(self, next_obs_n: Tensor, reward: Tensor, discount: Tensor, done: Tensor, noise: Tensor) -> Tensor:
        """Bellman target ``r + discount (1 - done) min_i Q'_i(s', a')`` with ``a'`` the target actor's one-step
        action from ``noise`` ``(B, A)``; ``next_obs_n`` normalised. Returns ``(B,)``."""
        with torch.no_grad():
            a_next = self.actor_target.one_step(next_obs_n, noise)
            q1, q2 = self.critic_target(next_obs_n, a_next)
            return reward + discount * (1.0 - done) * torch.minimum(q1, q2).reshape(-1)

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.generator)

    def update(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        """One critic step then one actor step on ``batch`` (transition keys, ``B`` rows). Returns metrics."""
        c = self.cfg
        obs = self.actor.normalize(batch["obs"])
        next_obs = self.actor.normalize(batch["next_obs"])
        action = batch["action"]
        b = action.shape[0]
        target = self.q_target(next_obs, batch["reward"], batch["discount"], batch["done"], self._randn(b, self.act_dim))
        q1, q2 = self.critic(obs, action)
        critic_loss = F.mse_loss(q1.reshape(-1), target) + F.mse_loss(q2.reshape(-1), target)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_gn = self._clip(self.critic)
        self.critic_opt.step()

        t, r = sample_flow_times(b, float(c["flow_ratio"]), float(c["time_mu"]), float(c["time_sigma"]),
                                 self.generator)
        flow_loss = meanflow_loss(lambda z, r_, t_: self.actor(obs, z, r_, t_), action, self._randn(b, self.act_dim),
                                  t, r)
        metrics = {"critic_loss": float(critic_loss.detach()), "flow_loss": float(flow_loss.detach()),
                   "q_mean": float(q1.detach().mean())}
        actor_loss = flow_loss
        if float(c["eta"]) > 0:
            qa, qb = self.critic(obs, self.actor.one_step(obs, self._randn(b, self.act_dim)))
            if torch.rand((), generator=self.generator) < 0.5:  # Diffusion-QL: random head, the other normalises
                qa, qb = qb, qa
            q_loss = -qa.mean() / qb.abs().mean().detach()
            actor_loss = flow_loss + float(c["eta"]) * q_loss
            metrics["q_loss"] = float(q_loss.detach())
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_gn = self._clip(self.actor)
        self.actor_opt.step()
        self.critic.zero_grad(set_to_none=True)  # the Q term left gradients on the critic: not a critic step

        self.step += 1
        polyak_update(self.critic_target, self.critic, float(c["tau"]))
        if self.step % int(c["actor_ema_every"]) == 0:
            # before actor_ema_start the target actor copies the actor (Diffusion-QL's step_start_ema)
            rate = 1.0 if self.step < int(c["actor_ema_start"]) else 1.0 - float(c["actor_ema"])
            polyak_update(self.actor_target, self.actor, rate)
        return {**metrics, "actor_loss": float(actor_loss.detach()), "critic_grad_norm": critic_gn,
                "actor_grad_norm": actor_gn, "target_mean": float(target.mean())}

    def _clip(self, module: nn.Module) -> float:
        clip = float(self.cfg["grad_clip"])
        params = [p for p in module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        return float(norm)

    # ------------------------------------------------------------------------------------------ training
    def sample_batch(self, batch_size: int) -> dict[str, Tensor]:
        """Uniformly drawn transitions (with replacement), from the agent's generator."""
        if self.data is None:
            raise RuntimeError("this OFQLAgent was built without transitions; pass them to train it")
        idx = torch.randint(0, self.data["obs"].shape[0], (batch_size,), generator=self.generator)
        return {k: v[idx] for k, v in self.data.items()}

    def train(self) -> dict[str, float]:
        """Run until ``cfg.steps`` updates (continuing from :attr:`step`); returns the last logged metrics."""
        c = self.cfg
        total = int(c["steps"])
        metrics: dict[str, float] = {}
        means = MetricMeans()
        bar = self.logger.progress(total, desc="ofql")
        bar.update(self.step)
        t0 = time.perf_counter()
        while self.step < total:
            means.add(self.update(self.sample_batch(int(c["batch_size"]))))
            bar.update(1)
            if self.step % int(c["log_every"]) == 0 or self.step == total:
                steps_per_s = means.updates / (time.perf_counter() - t0)
                metrics = {**means.pop("train/"), "train/steps_per_s": steps_per_s}
                self.logger.log(metrics, self.step)
                t0 = time.perf_counter()
            if self.run_dir is not None and (self.step % int(c["checkpoint_every"]) == 0 or self.step == total):
                self.save()
        bar.close()
        return metrics

    @torch.no_grad()
    def act(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One-step actions ``(B, A)`` in [-1, 1] for raw observations ``(B, D)`` (online actor, as Diffusion-QL
        evaluates); noise from ``generator`` (the global RNG if None)."""
        obs = torch.as_tensor(obs, dtype=torch.float32)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"OFQLAgent.act expects observations (B, {self.obs_dim}), got {tuple(obs.shape)}")
        noise = torch.randn(obs.shape[0], self.act_dim, generator=generator)
        return self.actor.one_step(self.actor.normalize(obs), noise)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path | None = None) -> Path:
        """Write everything needed to act and to resume exactly (weights, targets, optimisers, RNG, step) to
        ``path`` (default ``run_dir/checkpoints/step_<N>/``, then ``checkpoints/last`` points at it)."""
        nets = {"actor": self.actor, "actor_target": self.actor_target, "critic": self.critic,
                "critic_target": self.critic_target}
        tensors = {f"{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}
        flat, skeleton = flatten_state({"actor_opt": self.actor_opt.state_dict(),
                                        "critic_opt": self.critic_opt.state_dict(),
                                        "generator": self.generator.get_state()}, prefix="train.")
        tensors.update(flat)
        meta = {**self.meta, "kind": CHECKPOINT_KIND, "step": self.step, "cfg": self.cfg, "obs_dim": self.obs_dim,
                "act_dim": self.act_dim, "train_state": skeleton}
        if path is not None:
            return save_checkpoint(path, tensors, meta)
        if self.run_dir is None:
            raise ValueError("OFQLAgent.save: no path given and the agent has no run_dir")
        return save_run_checkpoint(self.run_dir, self.step, tensors, meta)

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote (a step dir, ``checkpoints/last``, or a run dir)."""
        tensors, meta = load_checkpoint(resolve_checkpoint(path))
        if meta.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"checkpoint {path} is a {meta.get('kind')!r} checkpoint, not an OFQL one; point to a "
                             f"run trained with the ofql agent")
        if (meta["obs_dim"], meta["act_dim"]) != (self.obs_dim, self.act_dim):
            raise ValueError(f"checkpoint {path} has obs_dim/act_dim {meta['obs_dim']}/{meta['act_dim']}, this agent "
                             f"{self.obs_dim}/{self.act_dim}; build the agent with the checkpoint's task and chunk")
        for name in ("actor", "actor_target", "critic", "critic_target"):
            getattr(self, name).load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items()
                                                 if k.startswith(name + ".")})
        state = unflatten_state(tensors, meta["train_state"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.generator.set_state(state["generator"])
        self.step = int(meta["step"])

    @classmethod
    def from_checkpoint(cls, path: str | Path, transitions: Mapping[str, Any] | None = None,
                        run_dir: str | Path | None = None, logger: Any = None) -> "OFQLAgent":
        """An agent rebuilt from a checkpoint's config and dims, with its state loaded (to act or resume)."""
        meta = load_checkpoint_meta(resolve_checkpoint(path))  # the weights are read once, by load()
        if meta.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"checkpoint {path} is a {meta.get('kind')!r} checkpoint, not an OFQL one")
        keep = {k: v for k, v in meta.items() if k not in ("kind", "step", "cfg", "obs_dim", "act_dim", "train_state")}
        agent = cls(meta["cfg"], meta["obs_dim"], meta["act_dim"], transitions, run_dir, logger, meta=keep)
        agent.load(path)
        return agent


def _check_config(c: Mapping[str, Any]) -> None:
    if not 0.0 <= float(c["flow_ratio"]) <= 1.0:
        raise ValueError(f"agent.flow_ratio = P(r = t) must be in [0, 1], got {c['flow_ratio']}")
    if float(c["eta"]) < 0:
        raise ValueError(f"agent.eta (weight of the Q term) must be >= 0, got {c['eta']}")
    if not 0.0 < float(c["tau"]) <= 1.0 or not 0.0 <= float(c["actor_ema"]) < 1.0:
        raise ValueError(f"agent.tau must be in (0, 1] and agent.actor_ema in [0, 1), got {c['tau']}, "
                         f"{c['actor_ema']}")
    for k in ("steps", "batch_size", "chunk", "actor_ema_every", "log_every", "checkpoint_every"):
        if int(c[k]) < 1:
            raise ValueError(f"agent.{k} must be a positive integer, got {c[k]}")


class OFQLActor:
    """Runs an :class:`OFQLAgent` in batched envs (the :class:`distillery.rollout.Actor` protocol): each env plans
    a chunk ``(chunk, Da)`` from ``obs[obs_key]`` and executes it over the next ``chunk`` steps, then re-plans.

    Args:
        agent: a trained agent with ``agent.act_dim == chunk * act_dim``.
        chunk: actions per plan; act_dim: per-step action size ``Da``.
        obs_key: observation group (default ``agent.cfg["obs_key"]``); seed: seeds the sampling noise.
    """

    def __init__(self, agent: OFQLAgent, chunk: int, act_dim: int, obs_key: str | None = None, seed: int = 0) -> None:
        if agent.act_dim != chunk * act_dim:
            raise ValueError(f"OFQLActor: the agent outputs {agent.act_dim} numbers per plan but chunk={chunk} x "
                             f"act_dim={act_dim} = {chunk * act_dim}; pass the chunk the agent was trained with")
        self.agent, self.chunk, self.act_dim = agent, int(chunk), int(act_dim)
        self.obs_key = obs_key or str(agent.cfg["obs_key"])
        self.generator = torch.Generator().manual_seed(int(seed))
        self.plan: Tensor | None = None  # (N, chunk, Da)
        self.pos: Tensor | None = None   # (N,) index of the next action of each env's plan; chunk = re-plan

    def reset(self, mask: Tensor | None = None) -> None:
        """Forget the plans of envs in ``mask`` (N,) bool (all if None): they re-plan on their next call."""
        if self.pos is None:
            return
        if mask is None:
            self.pos.fill_(self.chunk)
        else:
            self.pos[mask.to(self.pos.device)] = self.chunk

    def __call__(self, obs: Mapping[str, Tensor], active: Tensor | None = None) -> Tensor:
        """Actions ``(N, Da)``; rows with ``active`` False keep their plans untouched (they are not counted)."""
        if self.obs_key not in obs:
            raise KeyError(f"OFQLActor reads observation group {self.obs_key!r} but got {sorted(obs)}; set agent "
                           f"obs_key to one of them")
        x = obs[self.obs_key].float()
        n = x.shape[0]
        if self.plan is None or self.plan.shape[0] != n:
            self.plan = torch.zeros(n, self.chunk, self.act_dim)
            self.pos = torch.full((n,), self.chunk, dtype=torch.long)
        assert self.pos is not None
        need = self.pos >= self.chunk
        if active is not None:
            need &= active.to(need.device)
        if bool(need.any()):
            ids = need.nonzero().squeeze(1)
            self.plan[ids] = self.agent.act(x[ids], self.generator).view(-1, self.chunk, self.act_dim)
            self.pos[ids] = 0
        action = self.plan[torch.arange(n), self.pos.clamp(max=self.chunk - 1)]
        self.pos += 1
        return action
