"""Soft Actor-Critic with automatic temperature, in batched envs, with the WSRL warm start.

SAC (Haarnoja et al. 2018, "SAC: algorithms and applications"): a tanh-squashed Gaussian actor pi, twin Q
critics with Polyak-averaged targets, and a temperature alpha tuned so the policy entropy tracks a target.
One gradient update on a replay batch ``(s, a, r, s', d)`` of ``B`` transitions::

    a' ~ pi(.|s'),  y = r + gamma (1 - d) (min_i Qbar_i(s', a') - alpha log pi(a'|s'))     (critic target)
    L_Q  = sum_i mean (Q_i(s, a) - y)^2
    a~ ~ pi(.|s) (reparameterised),  L_pi = mean (alpha log pi(a~|s) - min_i Q_i(s, a~))
    L_alpha = mean (-alpha (log pi(a~|s) + H_target)),  alpha = exp(log_alpha),  H_target = -Da by default
    Qbar <- (1 - tau) Qbar + tau Q

``d`` is ``terminated`` (success) only: a time-limit ending is not a terminal state, so it bootstraps.

Batched collection: every ``env.step`` of the ``N`` envs adds ``N`` transitions. Step counts in the config
(``env_steps``, ``learning_starts``, ``warm_start.warmup_steps``, ``log_every``, ``eval_every``,
``checkpoint_every``) count transitions, as PPO's and SB3's do; the run takes whole batched steps, so it stops at
the first multiple of ``N`` at or past ``env_steps``. ``utd_ratio`` is the number of gradient updates per batched
step (fractions accumulate; per-transition UTD = utd_ratio / N), as SB3's ``gradient_steps`` per ``env.step``.
High UTD is meant to go with LayerNorm critics (RLPD, WSRL).

WSRL (Zhou et al. 2025, "Efficient online RL fine-tuning need not retain offline data"), ``warm_start``:
initialise the actor (and the critic, if the checkpoint has one) from an offline checkpoint, keep none of the
offline data, fill the empty buffer with ``warmup_steps`` transitions of the *frozen* initial policy (no gradient
update), then run SAC. Without a warm start, the first ``learning_starts`` steps act uniformly at random.

Observations are normalised by the policy's normaliser (mean/std). They are fitted once, from the random-phase
data, and then frozen: the critic and actor must read the same numbers for every transition in the buffer.
A warm-started policy keeps the statistics its checkpoint brought.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from distillery.agents.critics import TwinQ, polyak_update
from distillery.agents.grad_steps import MetricMeans, clear_grads, load_fused_adam_state
from distillery.envs import BatchedEnv
from distillery.policies import GaussianPolicy, Policy
from distillery.runtime import flatten_state, load_checkpoint, resolve_checkpoint, save_run_checkpoint, unflatten_state

__all__ = ["ReplayBuffer", "SACAgent"]

CHECKPOINT_KIND = "policy"  # model.* are policy weights: `distillery eval` / `export` load it like a bc checkpoint


class ReplayBuffer:
    """Ring buffer of transitions, preallocated once: ``capacity`` rows of

    ``obs {k: (*shape)}``, ``action (Da,)`` (normalised, in [-1, 1]), ``reward ()``, ``next_obs {k: (*shape)}``,
    ``terminated ()`` bool. ``add`` writes ``N`` rows (one per env) with a single indexed write.
    """

    def __init__(self, capacity: int, obs_shapes: Mapping[str, tuple[int, ...]], act_dim: int) -> None:
        self.capacity = int(capacity)
        self.obs = {k: torch.zeros((self.capacity, *s)) for k, s in obs_shapes.items()}
        self.next_obs = {k: torch.zeros((self.capacity, *s)) for k, s in obs_shapes.items()}
        self.action = torch.zeros(self.capacity, act_dim)
        self.reward = torch.zeros(self.capacity)
        self.terminated = torch.zeros(self.capacity, dtype=torch.bool)
        self.ptr = 0   # next row to write
        self.size = 0  # rows holding data

    def add(self, obs: Mapping[str, Tensor], action: Tensor, reward: Tensor, next_obs: Mapping[str, Tensor],
            terminated: Tensor) -> None:
        """Append ``N`` transitions: ``obs[k] (N, *shape)``, ``action (N, Da)``, ``reward``/``terminated (N,)``."""
        n = action.shape[0]
        rows = (self.ptr + torch.arange(n)) % self.capacity
        for k in self.obs:
            self.obs[k][rows] = obs[k].float()
            self.next_obs[k][rows] = next_obs[k].float()
        self.action[rows] = action.float()
        self.reward[rows] = reward.float()
        self.terminated[rows] = terminated.bool()
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """``batch_size`` rows drawn uniformly with replacement; same keys as the buffer, leading axis ``B``."""
        idx = torch.randint(self.size, (batch_size,), generator=generator)
        return {"obs": {k: v[idx] for k, v in self.obs.items()}, "action": self.action[idx],
                "reward": self.reward[idx], "next_obs": {k: v[idx] for k, v in self.next_obs.items()},
                "terminated": self.terminated[idx]}

    def state(self, with_data: bool) -> dict[str, Any]:
        """Pointers, plus the filled rows (in storage order) if ``with_data``."""
        out: dict[str, Any] = {"ptr": self.ptr, "size": self.size, "capacity": self.capacity}
        if with_data:
            n = self.size
            out["data"] = {"obs": {k: v[:n] for k, v in self.obs.items()}, "action": self.action[:n],
                           "reward": self.reward[:n], "next_obs": {k: v[:n] for k, v in self.next_obs.items()},
                           "terminated": self.terminated[:n]}
        return out

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state`; without data the buffer comes back empty."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"checkpoint buffer capacity {state['capacity']} != buffer_size {self.capacity}; "
                             f"resume with the run's buffer_size")
        if "data" not in state:
            self.ptr = self.size = 0
            return
        data, n = state["data"], int(state["size"])
        for k in self.obs:
            self.obs[k][:n] = data["obs"][k]
            self.next_obs[k][:n] = data["next_obs"][k]
        self.action[:n], self.reward[:n], self.terminated[:n] = data["action"], data["reward"], data["terminated"]
        self.ptr, self.size = int(state["ptr"]), n


def _resolve_cfg(defaults: Mapping[str, Any], cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with ``cfg`` (the nested ``warm_start`` merges); unknown keys fail with the valid list."""
    user = dict(cfg or {})
    user.pop("name", None)
    out = copy.deepcopy(dict(defaults))
    for k, v in user.items():
        if k not in out:
            raise ValueError(f"sac agent: unknown config key {k!r}; valid keys: {sorted(out)}")
        if isinstance(out[k], dict):
            v = dict(v or {})
            bad = set(v) - set(out[k])
            if bad:
                raise ValueError(f"sac agent: unknown keys {sorted(bad)} in {k!r}; valid keys: {sorted(out[k])}")
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


class SACAgent:
    """Trains a squashed :class:`GaussianPolicy` (``squash=True``, ``state_std=True``) with SAC on ``env``.

    Args:
        cfg: overrides of :attr:`DEFAULTS` (see ``configs/agent/sac.yaml``).
        policy: the actor; a warm start overwrites its weights (and normaliser) from the checkpoint.
        env: ``N`` batched envs; the agent owns their episodes (it resets them).
        run_dir: checkpoints go to ``run_dir/checkpoints/step_*/`` (step = env transitions), ``last`` -> newest.
        logger: anything with ``log(metrics, step)`` and ``progress(total, desc)``.
        seed: seeds the agent's two generators (updates: replay sampling, policy noise; acting: random actions,
            exploration noise) and the env resets.
        evaluate: optional ``f(policy) -> metrics`` every ``cfg.eval_every`` env steps (deterministic actions are
            the caller's choice: pass ``sampler="mean"`` to the evaluation). Must not use ``env``.
        meta: extra JSON metadata stored in every checkpoint.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "env_steps": 320_000,       # env transitions in all (a batched step of N envs collects N)
        "buffer_size": 1_000_000,   # transitions
        "batch_size": 256,
        "gamma": 0.99,
        "tau": 0.005,
        "lr": 3.0e-4,               # critic; actor and temperature too unless set
        "actor_lr": None,
        "temperature_lr": None,
        "utd_ratio": 1.0,           # gradient updates per batched env step
        "critic_hidden": [256, 256],
        "critic_layer_norm": True,
        "num_q": 2,
        # The authors start at 1.0; here per-step rewards lie in [-1, 0], and alpha = 1 lets the entropy bonus
        # (up to Da log 2 per step) swamp them until alpha has decayed, so start lower.
        "init_temperature": 0.1,
        "target_entropy": None,     # None: -Da
        "backup_entropy": True,     # WSRL fine-tunes without the entropy term in the critic target
        "learning_starts": 4_000,   # cold start: transitions of uniform random actions before any update
        "warm_start": {"checkpoint": None, "warmup_steps": 4_000},
        "log_every": 1_600,         # transitions, like eval_every and checkpoint_every
        "eval_every": 0,
        "checkpoint_every": 80_000,
        "save_buffer": True,        # False: a resume refills the buffer with the current policy, no updates
        # True: a batched step's updates run on a worker thread during the next env step (the action sent then
        # was chosen one step's updates earlier); False: strictly alternate, as SB3 does
        "overlap_updates": True,
    }

    def __init__(self, cfg: Mapping[str, Any] | None, policy: GaussianPolicy, env: BatchedEnv, run_dir: str | Path,
                 logger: Any, seed: int = 0, evaluate: Callable[[Policy], dict[str, float]] | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.cfg = c = _resolve_cfg(self.DEFAULTS, cfg)
        self._check(c, policy, env)
        self.policy, self.env, self.logger, self.evaluate = policy, env, logger, evaluate
        self.run_dir = Path(run_dir)
        self.meta = dict(meta or {})
        self.seed = int(seed)
        self.num_envs = env.num_envs
        self.obs_keys = list(policy.obs_keys)
        da = policy.action_dim
        obs_dim = sum(math.prod(env.observation_spec[k].shape) for k in self.obs_keys)
        self.critic = TwinQ(obs_dim, da, [int(h) for h in c["critic_hidden"]], bool(c["critic_layer_norm"]))
        self.warm_started = c["warm_start"]["checkpoint"] is not None
        self.critic_from_checkpoint = False
        if self.warm_started:
            self._load_warm_start(c["warm_start"]["checkpoint"])
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(float(c["init_temperature"])), requires_grad=True)
        self.target_entropy = -float(da) if c["target_entropy"] is None else float(c["target_entropy"])
        lr = float(c["lr"])
        # fused: one C++ kernel for the whole Adam step; the same update as foreach up to float rounding (~1 ulp)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr, fused=True)
        self.actor_opt = torch.optim.Adam(policy.parameters(), lr=float(c["actor_lr"] or lr), fused=True)
        self._critic_params, self._actor_params = list(self.critic.parameters()), list(policy.parameters())
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=float(c["temperature_lr"] or lr))
        self.buffer = ReplayBuffer(int(c["buffer_size"]), {k: tuple(env.observation_spec[k].shape)
                                                           for k in self.obs_keys}, da)
        # two streams, so the updates (replay sampling, target and actor noise) and the acting (random actions,
        # exploration noise) draw the same numbers whether or not they overlap in time
        self.generator = torch.Generator().manual_seed(self.seed)
        self.act_generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, 1]).generate_state(1)[0]))
        self.env_step = 0    # env transitions collected (N per batched step)
        self.updates = 0     # gradient updates done
        self._owed = 0.0     # fractional updates carried over (utd_ratio < 1 or non-integer)
        # transitions before updates start: the WSRL warm-up (frozen policy) or the random phase (cold start)
        self.collect_until = int(c["warm_start"]["warmup_steps"] if self.warm_started else c["learning_starts"])
        self.random_until = 0 if self.warm_started else int(c["learning_starts"])
        self._obs: dict[str, Tensor] | None = None  # current env observation (None: reset before acting)
        self._ep_return = torch.zeros(self.num_envs)
        self._timers = {"env_s": 0.0, "update_s": 0.0}

    @staticmethod
    def _check(c: Mapping[str, Any], policy: Policy, env: BatchedEnv) -> None:
        if not isinstance(policy, GaussianPolicy) or not (policy.squash and policy.state_std):
            raise ValueError("SAC needs a tanh-squashed Gaussian actor with a log-std head: policy=gaussian with "
                             "policy.squash=true policy.state_std=true")
        if tuple(policy.action_spec.shape) != tuple(env.action_spec.shape):
            raise ValueError(f"policy action shape {policy.action_spec.shape} != env action shape "
                             f"{env.action_spec.shape}; build the policy from this env's specs")
        missing = [k for k in policy.obs_keys if k not in env.observation_spec]
        if missing:
            raise ValueError(f"policy obs_keys {missing} are not observation groups of the env "
                             f"({sorted(env.observation_spec)})")
        if int(c["num_q"]) != 2:
            raise ValueError(f"num_q={c['num_q']}: only twin critics (num_q=2, TwinQ) are implemented")
        checks = {"batch_size": int(c["batch_size"]) >= 1, "gamma": 0.0 <= float(c["gamma"]) < 1.0,
                  "tau": 0.0 < float(c["tau"]) <= 1.0, "utd_ratio": float(c["utd_ratio"]) >= 0.0,
                  "init_temperature": float(c["init_temperature"]) > 0.0,
                  "buffer_size": int(c["buffer_size"]) >= env.num_envs,
                  "learning_starts": int(c["learning_starts"]) >= 0,
                  "warm_start.warmup_steps": int(c["warm_start"]["warmup_steps"]) >= 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"sac agent: invalid values for {bad} (need batch_size >= 1, 0 <= gamma < 1, "
                             f"0 < tau <= 1, utd_ratio >= 0, init_temperature > 0, buffer_size >= num_envs "
                             f"({env.num_envs}), learning_starts and warmup_steps >= 0)")
        if c["warm_start"]["checkpoint"] is None and not bool(policy.normalizer.fitted) \
                and int(c["learning_starts"]) < 1:
            raise ValueError("the policy's observation normaliser is unfitted and learning_starts=0: set "
                             "learning_starts >= 1 (its random-action data fits the normaliser) or warm-start "
                             "from a checkpoint (warm_start.checkpoint)")

    def _load_warm_start(self, path: str | Path) -> None:
        """Actor weights (``model.*``, normaliser included) and, if present, critic weights (``critic.*``)."""
        tensors, meta = load_checkpoint(resolve_checkpoint(path))
        desc = meta.get("policy", {})
        if desc.get("name") != "gaussian" or not desc.get("cfg", {}).get("squash") \
                or not desc.get("cfg", {}).get("state_std"):
            raise ValueError(f"warm-start checkpoint {path} holds policy {desc.get('name')!r} (cfg squash="
                             f"{desc.get('cfg', {}).get('squash')}, state_std={desc.get('cfg', {}).get('state_std')}); "
                             f"SAC needs a gaussian policy with squash and state_std, e.g. pre-trained offline")
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        critic = {k[len("critic."):]: v for k, v in tensors.items() if k.startswith("critic.")}
        try:
            self.policy.load_state_dict(model)
            if critic:
                self.critic.load_state_dict(critic)
        except RuntimeError as e:
            raise ValueError(f"warm-start checkpoint {path} does not fit this actor/critic ({e}); build the policy "
                             f"with the checkpoint's config and set critic_hidden / critic_layer_norm to match") from e
        if not bool(self.policy.normalizer.fitted):
            raise ValueError(f"warm-start checkpoint {path} has an unfitted observation normaliser")
        self.critic_from_checkpoint = bool(critic)

    # ------------------------------------------------------------------------------------------ pieces
    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.exp()

    def features(self, obs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Raw ``obs {k: (B, *shape)}`` -> normalised (actor input ``{k: (B, 1, *shape)}``, critic input ``(B, D)``)."""
        n = self.policy.normalizer.normalize_dict({k: obs[k] for k in self.obs_keys})
        return {k: v.unsqueeze(1) for k, v in n.items()}, torch.cat([n[k].flatten(1) for k in self.obs_keys], 1)

    @torch.no_grad()
    def td_target(self, batch: Mapping[str, Any], noise: Tensor | None = None) -> Tensor:
        """``y (B,) = r + gamma (1 - terminated) (min_i Qbar_i(s', a') - alpha log pi(a'|s'))``, ``a' ~ pi(.|s')``.

        ``noise (B, Da)``: the standard-normal draw behind ``a'`` (default: from the agent's generator)."""
        nobs, feat = self.features(batch["next_obs"])
        a_next, logp_next = self.policy.sample_and_log_prob(nobs, self.generator, noise)
        v_next = self.critic_target.min(feat, a_next)
        if self.cfg["backup_entropy"]:
            v_next = v_next - self.alpha * logp_next
        not_done = 1.0 - batch["terminated"].float()
        return batch["reward"] + float(self.cfg["gamma"]) * not_done * v_next

    def temperature_loss(self, log_prob: Tensor) -> Tensor:
        """``mean(-alpha (log pi + H_target))``; its gradient in ``log_alpha`` is ``-alpha mean(log pi + H_target)``:
        entropy (-log pi) above the target -> positive gradient -> alpha shrinks, and vice versa."""
        return -(self.alpha * (log_prob.detach() + self.target_entropy)).mean()

    def update(self) -> dict[str, float]:
        """One gradient update (critic, actor, temperature, target) on a fresh replay batch; returns metrics."""
        batch = self.buffer.sample(int(self.cfg["batch_size"]), self.generator)
        # critic: regress both heads on the shared twin-min target
        y = self.td_target(batch)
        nobs, feat = self.features(batch["obs"])
        q1, q2 = self.critic(feat, batch["action"])
        critic_loss = (q1 - y).pow(2).mean() + (q2 - y).pow(2).mean()
        clear_grads(self._critic_params)
        critic_loss.backward()
        self.critic_opt.step()
        # actor: reparameterised action through the (just updated) critic; only the actor's optimiser steps, so
        # only the actor's gradients are computed (the critic's weight gradients would be thrown away)
        action, logp = self.policy.sample_and_log_prob(nobs, self.generator)
        alpha = self.alpha.detach()
        actor_loss = (alpha * logp - self.critic.min(feat, action)).mean()
        grads = torch.autograd.grad(actor_loss, self._actor_params, allow_unused=True)
        for p, g in zip(self._actor_params, grads, strict=True):
            p.grad = g
        self.actor_opt.step()
        # temperature: track the entropy target
        alpha_loss = self.temperature_loss(logp)
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        polyak_update(self.critic_target, self.critic, float(self.cfg["tau"]))
        self.updates += 1
        return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(), "alpha": alpha.item(),
                "entropy": -logp.mean().item(), "q": q1.mean().item()}

    @torch.no_grad()
    def act(self, obs: Mapping[str, Tensor]) -> Tensor:
        """Exploration action ``(N, Da)`` in [-1, 1]: uniform in the random phase, else a draw from pi."""
        n = self.num_envs
        if self.env_step < self.random_until:
            return torch.rand(n, self.policy.action_dim, generator=self.act_generator) * 2.0 - 1.0
        nobs, _ = self.features(obs)
        return self.policy.sample_and_log_prob(nobs, self.act_generator)[0]

    def _fit_normalizer(self) -> None:
        """Freeze mean/std of the buffer's observations into the policy (once, before the first update)."""
        obs = {k: v[:self.buffer.size] for k, v in self.buffer.obs.items()}
        self.policy.set_obs_stats({k: v.mean(0) for k, v in obs.items()}, {k: v.std(0) for k, v in obs.items()})

    # ------------------------------------------------------------------------------------------ training loop
    def train(self) -> dict[str, float]:
        """Collect and update until ``cfg.env_steps`` transitions; returns the last logged metrics."""
        c = self.cfg
        total, utd = int(c["env_steps"]), float(c["utd_ratio"])
        if self._obs is None:
            # a fresh run, or a resume: episodes restart from a reset seeded by (seed, step)
            self._obs = self.env.reset(seed=int(np.random.SeedSequence([self.seed, self.env_step])
                                                .generate_state(1)[0]))
            self._ep_return.zero_()
        metrics: dict[str, float] = {}
        means = MetricMeans()
        returns, successes = [], []
        bar = self.logger.progress(total, desc="sac")
        bar.update(self.env_step)
        # overlap_updates: one worker thread runs the gradient updates while the envs step (see below)
        with (ThreadPoolExecutor(1, thread_name_prefix="sac-updates") if c["overlap_updates"]
              else contextlib.nullcontext()) as pool:
            while self.env_step < total:
                t0 = time.perf_counter()
                if not bool(self.policy.normalizer.fitted) and self.env_step >= self.random_until:
                    self._fit_normalizer()  # the random phase is over: its data fixes the observation statistics
                action = self.act(self._obs)
                # Overlap: the updates owed for the data so far run on a worker thread while the envs step (MuJoCo and
                # torch kernels release the GIL). They sample only rows already in the buffer, and the next action
                # waits for them, so the one difference from strict alternation is that the action just sent was
                # chosen one step's updates earlier.
                job = pool.submit(self._pay_owed, means) if pool is not None and self._owed >= 1 else None
                obs_next, reward, terminated, truncated, info = self.env.step(
                    self.policy.normalizer.unnormalize("action", action))
                self._timers["env_s"] += time.perf_counter() - t0
                if job is not None:
                    job.result()  # the main thread touches neither means nor _owed before this
                # info["final_obs"] is s' for every env (the pre-reset obs of finished ones, obs of the others)
                self.buffer.add(self._obs, action, reward, info["final_obs"], terminated)
                done = terminated | truncated
                self._ep_return += reward.float()
                if bool(done.any()):
                    returns += self._ep_return[done].tolist()
                    successes += terminated[done].float().tolist()
                    self._ep_return[done] = 0.0
                self._obs = obs_next
                self.env_step += self.num_envs
                if self.env_step > self.collect_until:  # the first collect_until transitions only fill the buffer
                    self._owed += utd
                if pool is None or self.env_step >= total:  # alternating, or the last step: update now
                    self._pay_owed(means)
                bar.update(self.num_envs)
                if self._crossed(c["log_every"]) or self.env_step >= total:
                    metrics = means.pop("train/")
                    metrics.update(self.speed())
                    if returns:
                        metrics["rollout/return"] = float(np.mean(returns))
                        metrics["rollout/success"] = float(np.mean(successes))
                    metrics["train/updates"] = float(self.updates)
                    self.logger.log(metrics, self.env_step)
                    returns, successes = [], []
                if self.evaluate is not None and self._crossed(c["eval_every"]):
                    self.policy.eval()
                    self.logger.log({f"eval/{k}": v for k, v in self.evaluate(self.policy).items()}, self.env_step)
                    self.policy.train()
                if self._crossed(c["checkpoint_every"]) or self.env_step >= total:
                    self.save()
        bar.close()
        return metrics

    def _pay_owed(self, means: MetricMeans) -> None:
        """The whole gradient updates owed so far, in a row (timed as update time), their metrics into ``means``."""
        t0 = time.perf_counter()
        owed = int(self._owed)
        for _ in range(owed):
            means.add(self.update())
        self._owed -= owed
        self._timers["update_s"] += time.perf_counter() - t0

    def _crossed(self, every: Any) -> bool:
        """Whether the last batched step passed a multiple of ``every`` transitions (never for 0)."""
        every = int(every or 0)
        return every > 0 and self.env_step // every > (self.env_step - self.num_envs) // every

    def speed(self) -> dict[str, float]:
        """Throughput so far in this process: env transitions/s while collecting, gradient updates/s while updating."""
        env_s, upd_s = self._timers["env_s"], self._timers["update_s"]
        out = {}
        if env_s > 0:
            out["speed/env_steps_per_s"] = self.env_step / env_s
        if upd_s > 0:
            out["speed/updates_per_s"] = self.updates / upd_s
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    def _train_state(self) -> dict[str, Any]:
        return {
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "critic_opt": self.critic_opt.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "buffer": self.buffer.state(bool(self.cfg["save_buffer"])),
            "rng": {"generator": self.generator.get_state(), "act_generator": self.act_generator.get_state()},
            "counters": {"env_step": self.env_step, "updates": self.updates, "owed": self._owed,
                         "collect_until": self.collect_until, "random_until": self.random_until},
        }

    def save(self) -> Path:
        """Write ``checkpoints/step_<env_step>/`` atomically; ``last`` points at it.

        ``model.*``: the policy (normaliser included) as `distillery eval`/`export` load it; ``critic.*``: the twin
        critic (a later run can warm-start from it); ``train.*``: target critic, temperature, optimisers,
        generator, counters and the replay buffer's filled rows (pointers only if ``save_buffer`` is false).
        """
        tensors = {f"model.{k}": v for k, v in self.policy.state_dict().items()}
        tensors.update({f"critic.{k}": v for k, v in self.critic.state_dict().items()})
        flat, skeleton = flatten_state(self._train_state(), prefix="train.")
        tensors.update(flat)
        meta = {**self.meta, "kind": CHECKPOINT_KIND, "agent": "sac", "step": self.env_step, "step_unit": "transitions",
                "updates": self.updates,
                "policy": self.policy.describe(), "sac_cfg": self.cfg, "train_state": skeleton}
        return save_run_checkpoint(self.run_dir, self.env_step, tensors, meta)

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote; the next updates match an uninterrupted run bit for bit. The envs'
        episodes restart (a reset seeded by seed and step). Without a saved buffer the run first refills it
        for ``warmup_steps`` (warm start) or ``learning_starts`` transitions of the current policy. A checkpoint
        written when these counters were batched env steps (no ``step_unit`` in its meta) is converted."""
        tensors, meta = load_checkpoint(resolve_checkpoint(path))
        if meta.get("agent") != "sac" or "train_state" not in meta:
            raise ValueError(f"checkpoint {path} was not written by SACAgent.save (agent={meta.get('agent')!r}); "
                             f"to start SAC from another checkpoint use warm_start.checkpoint")
        state = unflatten_state(tensors, meta["train_state"])
        self.policy.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.critic.load_state_dict({k[len("critic."):]: v for k, v in tensors.items() if k.startswith("critic.")})
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        load_fused_adam_state(self.critic_opt, state["critic_opt"])
        load_fused_adam_state(self.actor_opt, state["actor_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.buffer.load_state(state["buffer"])
        self.generator.set_state(state["rng"]["generator"])
        if "act_generator" in state["rng"]:  # checkpoints before the split drew actions from `generator`
            self.act_generator.set_state(state["rng"]["act_generator"])
        cnt = state["counters"]
        self.env_step, self.updates, self._owed = int(cnt["env_step"]), int(cnt["updates"]), float(cnt["owed"])
        self.collect_until, self.random_until = int(cnt["collect_until"]), int(cnt["random_until"])
        if meta.get("step_unit") != "transitions":  # counters in batched env steps
            self.env_step, self.collect_until, self.random_until = (
                x * self.num_envs for x in (self.env_step, self.collect_until, self.random_until))
        if "data" not in state["buffer"]:
            refill = self.cfg["warm_start"]["warmup_steps"] if self.warm_started else self.cfg["learning_starts"]
            self.collect_until = self.env_step + int(refill)
        self._obs = None
