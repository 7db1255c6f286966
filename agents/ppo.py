"""Online PPO in batched envs for a Gaussian MLP actor or a diffusion policy (PPO over the denoising chain, DPPO),
and the generic pieces PPO variants reuse.

Reusable, tensor-in/tensor-out (PPO over a denoising chain uses them too):
  * :func:`compute_gae`: generalised advantage estimation with separate termination (no bootstrap) and
    truncation (bootstrap from the final observation's value, but the trace is cut);
  * :func:`ppo_clip_loss`: the clipped surrogate with approx-KL and clip-fraction diagnostics;
  * :class:`RunningMeanStd`: streaming mean/variance for observation and return-based reward normalisation.

:class:`PPOAgent` follows the recipe shared by Stable-Baselines3 and CleanRL (Schulman et al. 2017; "The 37
implementation details of PPO"): N envs x ``num_steps`` per rollout, GAE(lambda), ``epochs`` passes of shuffled
minibatches, per-minibatch advantage normalisation, one Adam (eps 1e-5) over actor and critic, grad-norm clipping,
early stop of the epoch loop when the approximate KL exceeds 1.5 ``target_kl``, running observation normalisation
(written into the policy normaliser, so an evaluated or exported policy sees the same inputs) and reward scaling
by the std of the running discounted return.

A diffusion policy is trained over DPPO's two-level MDP (Ren et al. 2025; RL-100's online stage, algorithms.md
sections 2-3): an env-level decision samples a ``ddim:K`` chain with ``eta > 0`` (each denoising step a Gaussian
policy, floored std), executes the chunk's ``Ta`` actions, and earns their summed reward; GAE runs over decisions
with the value on the current env state; the clipped surrogate is applied to every denoising step with the
decision's advantage. The policy keeps its imitation normaliser (observation normalisation only feeds the critic),
``critic_warmup`` rollouts fit the value before the actor moves (RL-100), and the actor has its own learning rate.
The two actors differ only in :class:`GaussianActor` / :class:`ChainActor`; the rollout, GAE and update are one code.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distillery.agents.distill import ConsistencyHead
from distillery.agents.grad_steps import MetricMeans, clear_grads, clip_grad_norm, load_fused_adam_state
from distillery.envs import BatchedEnv
from distillery.policies import DiffusionPolicy, GaussianPolicy
from distillery.policies.base import to_plain
from distillery.policies.gaussian import make_mlp
from distillery.runtime import flatten_state, load_checkpoint, save_run_checkpoint, unflatten_state

__all__ = ["ChainActor", "GaussianActor", "PPOAgent", "RunningMeanStd", "compute_gae", "ppo_clip_loss"]

CHECKPOINT_KIND = "policy"  # same kind as agents/bc.py: `model.*` is a policy that eval/export load
LR_SCHEDULES = ("constant", "linear")


def compute_gae(rewards: Tensor, values: Tensor, terminated: Tensor, truncated: Tensor, next_values: Tensor,
                gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a rollout, time axis first.

    Args:
        rewards, values: (T, N) reward of step t and V(s_t).
        terminated, truncated: (T, N) bool; the episode ended after step t by success/failure (no bootstrap) or by
            the time limit (bootstrap from ``next_values`` but start a fresh trace).
        next_values: (T, N) V of the observation after step t: V(s_{t+1}), or for an episode that ended at t,
            V of its final observation (``info["final_obs"]``), not of the auto-reset one.
    Returns:
        advantages (T, N) and returns = advantages + values (T, N), the value targets.

    ``delta_t = r_t + gamma (1 - term_t) V'_t - V_t``;  ``A_t = delta_t + gamma lam (1 - done_t) A_{t+1}``.
    """
    if not (rewards.shape == values.shape == terminated.shape == truncated.shape == next_values.shape) \
            or rewards.dim() != 2:
        raise ValueError(f"compute_gae wants (T, N) tensors of one shape; got rewards {tuple(rewards.shape)}, values "
                         f"{tuple(values.shape)}, terminated {tuple(terminated.shape)}, truncated "
                         f"{tuple(truncated.shape)}, next_values {tuple(next_values.shape)}")
    not_term = 1.0 - terminated.to(values.dtype)
    not_done = 1.0 - (terminated | truncated).to(values.dtype)
    deltas = rewards + gamma * not_term * next_values - values
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        last = deltas[t] + gamma * lam * not_done[t] * last
        adv[t] = last
    return adv, adv + values


def ppo_clip_loss(log_prob_new: Tensor, log_prob_old: Tensor, advantages: Tensor,
                  clip: float) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate ``-mean(min(r A, clip(r, 1-eps, 1+eps) A))`` with ``r = exp(new - old)``; all (B,).

    Metrics: ``approx_kl`` = mean((r - 1) - log r) (an unbiased, non-negative estimate of KL(old || new)),
    ``clipfrac`` = fraction of samples with |r - 1| > eps, ``ratio_max``. Normalise ``advantages`` beforehand if
    wanted; this function does not.
    """
    if not log_prob_new.shape == log_prob_old.shape == advantages.shape:
        raise ValueError(f"ppo_clip_loss wants equal shapes, got new {tuple(log_prob_new.shape)}, old "
                         f"{tuple(log_prob_old.shape)}, advantages {tuple(advantages.shape)}")
    log_ratio = log_prob_new - log_prob_old
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
    with torch.no_grad():
        metrics = {"approx_kl": float(((ratio - 1.0) - log_ratio).mean()),
                   "clipfrac": float(((ratio - 1.0).abs() > clip).float().mean()),
                   "ratio_max": float(ratio.max())}
    return -surrogate.mean(), metrics


class RunningMeanStd:
    """Streaming per-dimension mean and (population) variance of batches ``(B, *shape)``, in float64.

    Merges batch moments with Chan et al.'s parallel formula; ``count`` starts at ``epsilon`` (mean 0, var 1) so the
    first normalisation is defined.
    """

    def __init__(self, shape: Sequence[int] = (), epsilon: float = 1e-4) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.mean = torch.zeros(self.shape, dtype=torch.float64)
        self.var = torch.ones(self.shape, dtype=torch.float64)
        self.count = torch.tensor(float(epsilon), dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """Fold in a batch ``x (B, *shape)``."""
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"RunningMeanStd of shape {self.shape} got a batch of shape {tuple(x.shape)}; "
                             f"expected (B, {', '.join(map(str, self.shape))})")
        b = x.shape[0]
        if b == 0:
            return
        b_mean, b_var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + b
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * b + delta.pow(2) * self.count * b / total
        self.mean = self.mean + delta * b / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.mean, self.var, self.count = (state[k].to(torch.float64).clone() for k in ("mean", "var", "count"))


class GaussianActor:
    """PPO's view of a :class:`GaussianPolicy`: one action per decision from the current observation."""

    live_obs_stats = True  # PPO's running observation stats are the policy's normaliser

    def __init__(self, policy: GaussianPolicy) -> None:
        if policy.squash:
            raise ValueError("PPO needs an unsquashed Gaussian (its log-probs are of the raw sample the env clips); "
                             "build the policy with squash=False")
        self.policy = policy
        self.obs_horizon, self.action_horizon = 1, 1

    def act(self, nobs: Mapping[str, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """-> (what the update re-scores (N, Da), log-prob (N,), env actions (N, 1, Da))."""
        action, log_prob = self.policy.sample_and_log_prob(nobs, generator)
        return action, log_prob, self.policy.normalizer.unnormalize("action", action)[:, None]

    def log_prob(self, nobs: Mapping[str, Tensor], action: Tensor) -> tuple[Tensor, Tensor | None]:
        """-> (log-prob (B,), entropy (B,)), from one forward pass."""
        return self.policy.log_prob_and_entropy(nobs, action)

    def metrics(self, nobs: Mapping[str, Tensor]) -> dict[str, float]:
        return {"train/std": float(self.policy.dist_params(nobs)[1].detach().exp().mean())}


class ChainActor:
    """PPO's view of a :class:`DiffusionPolicy` (DPPO): a decision is a recorded ``ddim:K`` chain with ``eta > 0``
    whose chunk executes ``Ta`` actions; its log-prob is per denoising step, ``(N, K)``."""

    live_obs_stats = False  # the imitation normaliser stays: the network was trained on it

    def __init__(self, policy: DiffusionPolicy, mdp: Any) -> None:
        self.policy, self.mdp = policy, mdp
        self.obs_horizon, self.action_horizon = policy.obs_horizon, policy.action_horizon

    def act(self, nobs: Mapping[str, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """-> (chain (N, K+1, Tp, Da), log-probs (N, K), env actions (N, Ta, Da) clipped to the action bounds)."""
        chain, log_prob = self.policy.sample_chain(nobs, self.mdp, generator)
        start = self.obs_horizon - 1
        return chain, log_prob, self.policy.to_env_action(chain[:, -1, start:start + self.action_horizon])

    def log_prob(self, nobs: Mapping[str, Tensor], chain: Tensor) -> tuple[Tensor, Tensor | None]:
        """-> (log-probs (B, K), None): the chain's noise is fixed by the schedule and the floors, so it has no
        entropy to regularise."""
        return self.policy.chain_log_prob(nobs, chain, self.mdp), None

    def metrics(self, nobs: Mapping[str, Tensor]) -> dict[str, float]:
        return {}


class PPOAgent:
    """PPO for a :class:`GaussianPolicy` or a :class:`DiffusionPolicy` in a :class:`BatchedEnv` (module docstring).

    Args:
        cfg: the agent config; keys and defaults in :attr:`DEFAULTS` (unknown keys are an error).
        policy: the actor. A Gaussian must have ``squash=False`` (actions are raw samples that the env clips); a
            diffusion policy is fine-tuned over all ``ddim_steps`` denoising steps of its chain.
        env: N envs stepped together; episodes auto-reset.
        run_dir: checkpoints go to ``run_dir/checkpoints/step_<env_steps>/``, ``last`` points at the newest.
        logger: anything with ``log(metrics, step)`` (the step logged is the env-step count).
        seed: seeds action sampling, minibatch shuffling and the env resets.
        meta: extra JSON metadata stored in every checkpoint.
    """

    DEFAULTS: dict[str, Any] = {
        "env_steps": 1_000_000,    # total env transitions (all envs, every executed action) to train for
        "num_steps": 64,           # decisions per env per rollout; batch = num_envs * num_steps
        "gamma": 0.99,             # per decision (a diffusion decision executes Ta actions)
        "gae_lambda": 0.95,
        "clip": 0.2,
        "epochs": 10,
        "minibatch_size": 256,
        "lr": 3e-4,                # critic, and the actor unless actor_lr is set
        "actor_lr": None,
        "lr_schedule": "constant",  # or "linear": both learning rates fall linearly to 0 at env_steps (SB3/CleanRL)
        "adam_eps": 1e-5,
        "vf_coef": 0.5,
        "ent_coef": 0.0,           # Gaussian only: a chain has no free entropy
        "max_grad_norm": 0.5,
        "target_kl": None,         # None: no early stop; else stop the epochs once approx KL > 1.5 target_kl
        "norm_adv": True,
        "norm_obs": True,          # running mean/std of the observation groups (critic; and a Gaussian's normaliser)
        "norm_reward": True,       # divide rewards by the std of the running discounted return
        "clip_reward": 10.0,       # after reward scaling
        "value_obs_keys": None,    # None: the actor's obs_keys; e.g. ["privileged"] for an asymmetric critic
        "value_hidden": [256, 256],
        "value_activation": "tanh",
        "critic_warmup": 0,        # first rollouts that train only the value (RL-100: a fine-tuned actor must not
                                   # follow the advantages of an untrained critic)
        # diffusion policy only: the denoising MDP (policies/diffusion.py DenoisingMDP)
        "ddim_steps": 10,
        "eta": 1.0,
        "std_min_sample": 0.1,     # DPPO's exploration floor; evaluation samples with the policy's own sampler
        "std_min_logprob": 0.1,
        "noise_clip": 3.0,
        # diffusion policy only: RL-100's one-step head, distilled from the live policy after every update;
        # written as a standalone policy run in run_dir/head (deployable as it is)
        "consistency_head": False,
        "head": {"student": None, "lr": 1e-4, "multistep_prob": 0.3, "teacher_sampler": None},  # None: ddim:K
        "head_steps": 8,           # distillation steps per update, on minibatches of the rollout's observations
        "log_every": 1,            # rollouts between log lines
        "checkpoint_every": 0,     # env steps between checkpoints (0: only at the end)
    }

    def __init__(self, cfg: Mapping[str, Any] | None, policy: GaussianPolicy | DiffusionPolicy, env: BatchedEnv,
                 run_dir: str | Path, logger: Any, seed: int = 0, meta: Mapping[str, Any] | None = None) -> None:
        user = {k: v for k, v in to_plain(cfg or {}).items() if k != "name"}
        unknown = set(user) - set(self.DEFAULTS)
        if unknown:
            raise ValueError(f"ppo agent: unknown config keys {sorted(unknown)}; valid keys: {sorted(self.DEFAULTS)}")
        self.cfg = c = {**copy.deepcopy(self.DEFAULTS), **user}
        if isinstance(policy, GaussianPolicy):
            self.actor: GaussianActor | ChainActor = GaussianActor(policy)
        elif isinstance(policy, DiffusionPolicy) and policy.name == "diffusion":
            # all steps are trained: the checkpoint is one network that eval and export sample end to end, with
            # the (stochastic) chain it was fine-tuned on
            mdp = policy.denoising_mdp(
                int(c["ddim_steps"]), None, float(c["eta"]), float(c["std_min_sample"]), float(c["std_min_logprob"]),
                None if c["noise_clip"] is None else float(c["noise_clip"]))
            policy.set_sampler(mdp.sampler)
            self.actor = ChainActor(policy, mdp)
        else:
            raise TypeError(f"PPOAgent trains a GaussianPolicy (policy=gaussian) or a diffusion policy "
                            f"(policy=diffusion), got {type(policy).__name__}")
        self.head = None
        if c["consistency_head"]:
            if not isinstance(self.actor, ChainActor):
                raise ValueError("ppo.consistency_head distils a diffusion policy; this policy is a Gaussian")
            self.head = ConsistencyHead(policy, **{**self.DEFAULTS["head"], **c["head"]}, seed=int(seed))
        if c["lr_schedule"] not in LR_SCHEDULES:
            raise ValueError(f"ppo.lr_schedule must be one of {LR_SCHEDULES}, got {c['lr_schedule']!r}")
        for key in ("num_steps", "epochs", "minibatch_size"):
            if int(c[key]) < 1:
                raise ValueError(f"ppo.{key} must be >= 1, got {c[key]}")
        self.policy, self.env, self.logger = policy, env, logger
        self.run_dir = Path(run_dir)
        self.meta = dict(meta or {})
        self.seed = int(seed)
        self.num_envs = env.num_envs
        self.batch_size = self.num_envs * int(c["num_steps"])
        self.device = policy.device

        self.value_keys = list(c["value_obs_keys"] or policy.obs_keys)
        missing = [k for k in self.value_keys if k not in env.observation_spec]
        if missing:
            raise ValueError(f"ppo.value_obs_keys {missing} are not observation groups of {env.task_name} "
                             f"(groups: {sorted(env.observation_spec)})")
        for k in policy.obs_keys:
            if k not in env.observation_spec or env.observation_spec[k].shape != policy.obs_spec[k].shape:
                raise ValueError(f"the policy's obs group {k!r} {policy.obs_spec.get(k)} does not match the env's "
                                 f"{env.observation_spec.get(k)}; build the policy from env.observation_spec")
        stat_keys = (policy.obs_keys if self.actor.live_obs_stats else []) + self.value_keys
        self.obs_rms = {k: RunningMeanStd(env.observation_spec[k].shape) for k in dict.fromkeys(stat_keys)}
        self.ret_rms = RunningMeanStd(())
        value_in = sum(env.observation_spec[k].numel for k in self.value_keys)
        self.value = make_mlp(value_in, [int(h) for h in c["value_hidden"]], 1, str(c["value_activation"]),
                              out_gain=1.0).to(self.device)
        actor_lr = float(c["lr"] if c["actor_lr"] is None else c["actor_lr"])
        # fused: one C++ kernel per group for the whole Adam step; the same update as foreach up to float rounding
        # (~1 ulp), at a third of its cost for these small networks
        self.optimizer = torch.optim.Adam([{"params": list(policy.parameters()), "lr": actor_lr},
                                           {"params": list(self.value.parameters()), "lr": float(c["lr"])}],
                                          eps=float(c["adam_eps"]), fused=True)
        self.base_lrs = [actor_lr, float(c["lr"])]
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.env_steps = 0
        self.updates = 0
        self._obs: dict[str, Tensor] | None = None  # current env observation (raw); None: reset before the rollout
        self._hist: dict[str, Tensor] | None = None  # the actor's raw observation history {k: (N, To, ...)}
        self._disc_ret = torch.zeros(self.num_envs, dtype=torch.float64)  # running discounted return (reward norm)
        self._ep_ret = torch.zeros(self.num_envs)
        self._sync_policy_normalizer()

    # ------------------------------------------------------------------------------------------ normalisation
    def _sync_policy_normalizer(self) -> None:
        """Write the running observation stats into a Gaussian's normaliser (identity stats if norm_obs is off)."""
        if not self.actor.live_obs_stats:
            return
        keys = self.policy.obs_keys
        if self.cfg["norm_obs"]:
            self.policy.set_obs_stats({k: self.obs_rms[k].mean for k in keys}, {k: self.obs_rms[k].std for k in keys})
        else:
            self.policy.set_obs_stats({k: torch.zeros(self.obs_rms[k].shape) for k in keys},
                                      {k: torch.ones(self.obs_rms[k].shape) for k in keys})

    def _observe(self, obs: Mapping[str, Tensor], update: bool) -> Tensor:
        """Raw env obs ``{k: (N, ...)}`` -> critic input (N, Dv); ``update`` folds them into the running stats."""
        if update and self.cfg["norm_obs"]:
            for k, rms in self.obs_rms.items():
                rms.update(obs[k])
            self._sync_policy_normalizer()
        parts = []
        for k in self.value_keys:
            x = obs[k].to(self.device).flatten(1)
            if self.cfg["norm_obs"]:  # the critic is internal, so it may clip as SB3's VecNormalize does
                rms = self.obs_rms[k]
                x = ((x - rms.mean.to(x)) / (rms.var.to(x) + 1e-8).sqrt()).clamp(-10.0, 10.0)
            parts.append(x)
        return torch.cat(parts, dim=1)

    def _push_history(self, obs: Mapping[str, Tensor], restart: Tensor | None) -> None:
        """Append ``obs`` to the actor's history; envs in ``restart`` (N,) (all when there is no history yet) just
        reset, so their history is ``obs`` repeated, as ``Policy.act`` does after a reset."""
        to = self.actor.obs_horizon
        if self._hist is None:
            self._hist = {k: obs[k].cpu().unsqueeze(1).repeat_interleave(to, 1) for k in self.policy.obs_keys}
            return
        for k, h in self._hist.items():
            x = obs[k].cpu()
            new = torch.cat([h[:, 1:], x[:, None]], 1)
            if restart is not None and bool(restart.any()):
                new[restart] = x[restart].unsqueeze(1).expand(-1, to, *x.shape[1:])
            self._hist[k] = new

    def _actor_obs(self) -> dict[str, Tensor]:
        assert self._hist is not None
        return self.policy.normalizer.normalize_dict({k: h.to(self.device) for k, h in self._hist.items()})

    def _scale_reward(self, reward: Tensor, done: Tensor) -> Tensor:
        """Divide by the std of the running discounted return (SB3 VecNormalize's scheme), then clip."""
        if not self.cfg["norm_reward"]:
            return reward
        self._disc_ret = self._disc_ret * float(self.cfg["gamma"]) + reward.double().cpu()
        self.ret_rms.update(self._disc_ret)
        self._disc_ret[done.cpu()] = 0.0
        clip = float(self.cfg["clip_reward"])
        return (reward / float(np.sqrt(float(self.ret_rms.var) + 1e-8))).clamp(-clip, clip)

    # ------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def collect(self) -> dict[str, Any]:
        """One rollout of ``num_steps`` x N decisions; returns the buffer (time axis first) and episode stats.

        A decision executes ``Ta`` actions (1 for a Gaussian) and earns their summed reward. If the episode ends
        inside the chunk, the decision ends there (terminated / truncated, bootstrapping from V(final obs)); the
        env has auto-reset and plays out the chunk's remaining actions in its new episode, whose history restarts.
        """
        T, N, Ta, env = int(self.cfg["num_steps"]), self.num_envs, self.actor.action_horizon, self.env
        fresh = self._obs is None
        if fresh:
            self._obs = env.reset(seed=self.seed + 7919 * self.updates)
            self._hist = None
            self._push_history(self._obs, None)
            self._disc_ret.zero_()
            self._ep_ret.zero_()
        vobs = self._observe(self._obs, update=fresh)  # a carried-over obs was counted when it arrived
        nobs = self._actor_obs()
        buf: dict[str, Any] = {"nobs": {k: torch.zeros((T,) + tuple(v.shape)) for k, v in nobs.items()},
                               "vobs": torch.zeros(T, *vobs.shape), "value": torch.zeros(T, N),
                               "next_value": torch.zeros(T, N), "reward": torch.zeros(T, N),
                               "terminated": torch.zeros(T, N, dtype=torch.bool),
                               "truncated": torch.zeros(T, N, dtype=torch.bool)}
        returns, successes = [], []
        value = self.value(vobs).squeeze(-1)
        obs = self._obs
        for t in range(T):
            stored, log_prob, env_actions = self.actor.act(nobs, self.generator)
            if t == 0:
                buf["action"] = torch.zeros((T,) + tuple(stored.shape))
                buf["log_prob"] = torch.zeros((T,) + tuple(log_prob.shape))
            reward = torch.zeros(N)
            terminated = torch.zeros(N, dtype=torch.bool)
            truncated = torch.zeros(N, dtype=torch.bool)
            final_value = torch.zeros(N)
            alive = torch.ones(N, dtype=torch.bool)  # still in the episode this decision was taken in
            for j in range(Ta):
                obs, r, term, trunc, info = env.step(env_actions[:, j].to(env.device))
                r, term, trunc = r.cpu().float(), term.cpu(), trunc.cpu()
                reward += torch.where(alive, r, torch.zeros_like(r))
                self._ep_ret += r
                ended = term | trunc
                if bool(ended.any()):
                    ids = ended.nonzero().squeeze(1)
                    first = (ended & alive).nonzero().squeeze(1)
                    terminated[first], truncated[first] = term[first], trunc[first]
                    final_vobs = self._observe({k: v[first] for k, v in info["final_obs"].items()}, update=False)
                    final_value[first] = self.value(final_vobs).squeeze(-1).cpu()
                    returns += self._ep_ret[ids].tolist()
                    successes += term[ids].tolist()
                    self._ep_ret[ids] = 0.0
                    alive &= ~ended
                self._push_history(obs, ended)
            for k, v in nobs.items():
                buf["nobs"][k][t] = v
            buf["vobs"][t], buf["action"][t], buf["log_prob"][t], buf["value"][t] = vobs, stored, log_prob, value
            buf["terminated"][t], buf["truncated"][t] = terminated, truncated
            done = terminated | truncated
            buf["reward"][t] = self._scale_reward(reward, done)
            vobs = self._observe(obs, update=True)
            nobs = self._actor_obs()
            value = self.value(vobs).squeeze(-1)
            buf["next_value"][t] = torch.where(done, final_value, value.cpu())
        self._obs = obs
        self.env_steps += T * N * Ta
        adv, ret = compute_gae(buf["reward"], buf["value"], buf["terminated"], buf["truncated"], buf["next_value"],
                               float(self.cfg["gamma"]), float(self.cfg["gae_lambda"]))
        buf["advantage"], buf["return"] = adv, ret
        buf["episode_returns"], buf["episode_successes"] = returns, successes
        return buf

    # ------------------------------------------------------------------------------------------ update
    def update(self, buf: Mapping[str, Any]) -> dict[str, float]:
        """``epochs`` passes of shuffled minibatches over the flattened rollout; returns mean losses/diagnostics.

        The first ``critic_warmup`` updates train only the value. A diffusion decision's advantage is applied to
        each of its denoising steps, each clipped on its own ratio (RL-100 Eq. 7 / DPPO)."""
        c = self.cfg
        flat = {"vobs": buf["vobs"].flatten(0, 1), "action": buf["action"].flatten(0, 1),
                "log_prob": buf["log_prob"].flatten(0, 1), "advantage": buf["advantage"].flatten(0, 1),
                "return": buf["return"].flatten(0, 1)}
        nobs = {k: v.flatten(0, 1) for k, v in buf["nobs"].items()}
        n, mb = self.batch_size, min(int(c["minibatch_size"]), self.batch_size)
        target_kl = c["target_kl"]
        actor_frozen = self.updates < int(c["critic_warmup"])
        means = MetricMeans()
        stopped = False
        params = list(self.policy.parameters()) + list(self.value.parameters())
        self.policy.train()
        for _ in range(int(c["epochs"])):
            perm = torch.randperm(n, generator=self.generator, device=self.device)
            # one gather per epoch; each minibatch is then a slice (a view) of the shuffled rollout
            shuffled, snobs = {k: v[perm] for k, v in flat.items()}, {k: v[perm] for k, v in nobs.items()}
            for start in range(0, n - mb + 1, mb):  # drop a ragged tail: every minibatch has mb samples
                rows = slice(start, start + mb)
                value = self.value(shuffled["vobs"][rows]).squeeze(-1)
                value_loss = (value - shuffled["return"][rows]).pow(2).mean()
                loss = float(c["vf_coef"]) * value_loss
                m: dict[str, float] = {"value_loss": float(value_loss.detach())}
                if not actor_frozen:
                    mnobs = {k: v[rows] for k, v in snobs.items()}
                    adv = shuffled["advantage"][rows]
                    if c["norm_adv"]:
                        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                    log_prob, entropy = self.actor.log_prob(mnobs, shuffled["action"][rows])
                    old = shuffled["log_prob"][rows]
                    adv = adv.view(-1, *[1] * (log_prob.dim() - 1)).expand_as(log_prob)  # one per denoising step
                    pg_loss, pm = ppo_clip_loss(log_prob.flatten(), old.flatten(), adv.flatten(), float(c["clip"]))
                    if target_kl is not None and pm["approx_kl"] > 1.5 * float(target_kl):
                        stopped = True
                        break
                    loss = loss + pg_loss
                    m.update(pm, policy_loss=float(pg_loss.detach()))
                    if entropy is not None:
                        loss = loss - float(c["ent_coef"]) * entropy.mean()
                        m["entropy"] = float(entropy.mean().detach())
                clear_grads(params)
                loss.backward()
                m["grad_norm"] = float(clip_grad_norm(params, float(c["max_grad_norm"])))
                self.optimizer.step()
                means.add(m)
            if stopped:
                break
        self.updates += 1
        out = means.means()
        ret, val = flat["return"], buf["value"].flatten(0, 1)
        out["explained_variance"] = float(1.0 - (ret - val).var() / (ret.var() + 1e-8))
        out["minibatches"] = float(means.updates)
        out["early_stop"] = float(stopped)
        out["actor_frozen"] = float(actor_frozen)
        return out

    def set_learning_rates(self, progress: float) -> None:
        """Learning rates for the update after a rollout that starts at ``progress`` (env steps done / total):
        constant, or ``base * (1 - progress)`` (linear). A function of the env-step count alone, so a resumed run
        continues the same schedule."""
        scale = 1.0 - progress if self.cfg["lr_schedule"] == "linear" else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * max(scale, 0.0)

    def _update_head(self, buf: Mapping[str, Any]) -> float:
        """``head_steps`` distillation steps of the one-step head from the just-updated policy."""
        nobs = {k: v.flatten(0, 1) for k, v in buf["nobs"].items()}
        n = next(iter(nobs.values())).shape[0]
        losses = []
        for _ in range(int(self.cfg["head_steps"])):
            idx = torch.randint(0, n, (min(int(self.cfg["minibatch_size"]), n),), generator=self.generator,
                                device=self.device)
            losses.append(self.head.update({k: v[idx] for k, v in nobs.items()}))  # type: ignore[union-attr]
        return float(np.mean(losses)) if losses else 0.0

    # ------------------------------------------------------------------------------------------ training
    def train(self) -> dict[str, float]:
        """Alternate rollouts and updates until ``cfg.env_steps``; returns the last logged metrics."""
        c = self.cfg
        total = int(c["env_steps"])
        ckpt_every = int(c["checkpoint_every"])
        metrics: dict[str, float] = {}
        returns: list[float] = []
        successes: list[bool] = []
        t0, steps0 = time.perf_counter(), self.env_steps
        next_ckpt = (self.env_steps // ckpt_every + 1) * ckpt_every if ckpt_every > 0 else None
        while self.env_steps < total:
            self.set_learning_rates(self.env_steps / total)
            buf = self.collect()
            m = self.update(buf)
            if self.head is not None:
                m["head_loss"] = self._update_head(buf)
            returns += buf["episode_returns"]
            successes += buf["episode_successes"]
            if self.updates % int(c["log_every"]) == 0 or self.env_steps >= total:
                dt = time.perf_counter() - t0
                metrics = {"env_steps": float(self.env_steps), **{f"train/{k}": v for k, v in m.items()},
                           **self.actor.metrics({k: v[0, :1] for k, v in buf["nobs"].items()}),
                           "train/steps_per_s": (self.env_steps - steps0) / max(dt, 1e-9),
                           "train/actor_lr": float(self.optimizer.param_groups[0]["lr"])}
                if returns:
                    metrics["rollout/episodes"] = float(len(returns))
                    metrics["rollout/mean_return"] = float(np.mean(returns))
                    metrics["rollout/success_rate"] = float(np.mean(successes))
                self.logger.log(metrics, self.env_steps)
                returns, successes = [], []
                t0, steps0 = time.perf_counter(), self.env_steps
            if next_ckpt is not None and self.env_steps >= next_ckpt and self.env_steps < total:
                self.save()
                next_ckpt = (self.env_steps // ckpt_every + 1) * ckpt_every
        self.save()
        self.policy.eval()
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write ``checkpoints/step_<env_steps>/`` atomically (``model.*`` = the policy with its observation stats,
        as agents/bc.py writes it; ``train.*`` = critic, optimiser, running stats, RNGs) and point ``last`` at it."""
        self._sync_policy_normalizer()
        tensors = {f"model.{k}": v for k, v in self.policy.state_dict().items()}
        train_state = {
            "value": self.value.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "obs_rms": {k: r.state_dict() for k, r in self.obs_rms.items()},
            "ret_rms": self.ret_rms.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
        }
        if self.head is not None:
            train_state["head"] = {"student": self.head.student.state_dict(), **self.head.train_state()}
            self.head.save_policy(self.run_dir / "head", self.env_steps, self.meta)
        flat, skeleton = flatten_state(train_state, prefix="train.")
        tensors.update(flat)
        meta = {**self.meta, "kind": CHECKPOINT_KIND, "agent": "ppo", "step": self.env_steps,
                "updates": self.updates, "agent_cfg": self.cfg, "policy": self.policy.describe(),
                "train_state": skeleton}
        return save_run_checkpoint(self.run_dir, self.env_steps, tensors, meta)

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote. The learner state resumes exactly; the envs cannot be snapshotted, so
        the next rollout starts fresh episodes from a reset seeded by (seed, update count)."""
        tensors, meta = load_checkpoint(path)
        if meta.get("agent") != "ppo" or "train_state" not in meta:
            raise ValueError(f"checkpoint {path} was not written by PPOAgent (agent={meta.get('agent')!r}); resume "
                             f"a PPO run from its own checkpoints/last")
        state = unflatten_state(tensors, meta["train_state"])
        self.policy.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.value.load_state_dict(state["value"])
        load_fused_adam_state(self.optimizer, state["optimizer"])
        for k, r in self.obs_rms.items():
            r.load_state_dict(state["obs_rms"][k])
        self.ret_rms.load_state_dict(state["ret_rms"])
        if self.head is not None and "head" in state:
            self.head.student.load_state_dict(state["head"]["student"])
            self.head.load_train_state(state["head"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        self.env_steps, self.updates = int(meta["step"]), int(meta["updates"])
        self._obs = None
