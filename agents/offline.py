"""RL-100's iterative offline RL for a diffusion policy (Lei et al. 2025, algorithms.md section 2, stage 2).

One round on a dataset ``D``::

    critic:  IQL (expectile V, twin Q, Polyak target) on chunk transitions of D
    inner:   behaviour pi_b <- the last accepted policy
             repeat ppo_steps times:
                 states s ~ D (uniform, or Hong et al.'s return/advantage-weighted trajectory sampling)
                 chain, logp_b <- pi_b's DDIM(eta) chain (the denoising MDP, last ft_steps recorded)
                 A = normalise(Q(s, a) - V(s)) for the executed chunk a at the end of the chain
                 pi <- pi - lr * grad [-mean_k min(r_k A, clip(r_k) A) + bc_coef * L_IL(windows ~ D)],
                       r_k = pi(x_k-1|x_k) / pi_b(x_k-1|x_k)
                 [consistency head: one distillation step from pi]
                 every ope_every steps: OPE gate -- accept pi as the new pi_b if
                     J(pi) - J(pi_b) >= ope_margin * |J(pi_b)|
    collect: (optional) roll out the accepted policy, append the episodes to D, next round (the collection opens
             the next round, so a resumed run completes one a crash cut short).

``L_IL`` is the policy's own imitation loss on dataset windows drawn with the same sampler: RL-100 keeps the policy
anchored to imitation (it re-trains the IL policy on each round's data); with Hong et al.'s return weighting the
anchor is the dataset's high-return trajectories, so a mixed dataset's systematic failures (which the in-sample
critic may not separate from their successes) are imitated less. ``bc_coef=0`` is RL-100's plain update.

The critic sees the policy's observation history (flattened) and the privileged state: a fitted-Q evaluator of the
policy can then decode the policy's inputs from the critic's. OPE is fitted-Q evaluation (``ope=fqe``; RL-100 uses a
model-based AM-Q, algorithms.md allows FQE) or the IQL critic's ``E_s Q(s, pi(s))`` (``ope=q``, cheap).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distillery.agents.critics import FQE, IQL
from distillery.agents.distill import ConsistencyHead
from distillery.agents.ppo import ppo_clip_loss
from distillery.data.episodes import EpisodeDataset
from distillery.data.sequence import SequenceDataset
from distillery.data.transitions import chunk_transitions, episode_returns
from distillery.data.weighting import WeightedSampler, linear_advantages, transition_sampling_probs
from distillery.policies import DiffusionPolicy
from distillery.policies.base import to_plain
from distillery.runtime import flatten_state, load_checkpoint, save_run_checkpoint, unflatten_state

CHECKPOINT_KIND = "distillery.train"
SAMPLERS = ("uniform", "return", "advantage")
OPE_KINDS = ("fqe", "q")


def chain_ppo_loss(policy: DiffusionPolicy, nobs: Mapping[str, Tensor], chain: Tensor, old_log_prob: Tensor,
                   advantages: Tensor, mdp: Any, clip: float) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip summed over the recorded denoising steps with one env-level advantage per sample (RL-100 Eq. 7,
    DPPO): ``chain (B, K'+1, Tp, Da)``, ``old_log_prob (B, K')``, ``advantages (B,)``; the mean over the ``B*K'``
    (sample, step) pairs is the sum over steps up to the constant ``1/K'``."""
    new = policy.chain_log_prob(nobs, chain, mdp)
    k = new.shape[1]
    return ppo_clip_loss(new.flatten(), old_log_prob.flatten(), advantages.repeat_interleave(k), clip)


class PolicyFeatures:
    """Per dataset row: the policy's observation history and the critic's input ``[history (flat), privileged]``.

    The history of row ``g`` is the ``To`` observations ending at ``g`` with the episode's first repeated before its
    start (Diffusion Policy's padding, as ``act()`` does after a reset).
    """

    def __init__(self, dataset: EpisodeDataset, policy: DiffusionPolicy, critic_key: str = "privileged") -> None:
        if critic_key not in dataset.obs:
            raise KeyError(f"critic obs group {critic_key!r} is not in {dataset.path}; groups: {sorted(dataset.obs)}")
        starts = np.repeat(dataset.episode_starts, dataset.episode_lengths)
        rows = np.arange(dataset.num_steps)
        to = policy.obs_horizon
        hist_rows = np.maximum(rows[:, None] - np.arange(to - 1, -1, -1)[None, :], starts[:, None])  # (S, To)
        self.keys = list(policy.obs_keys)
        self.history = {k: torch.as_tensor(np.asarray(dataset.obs[k])[hist_rows], dtype=torch.float32)
                        for k in self.keys}                                                     # {k: (S, To, ...)}
        self.shapes = {k: tuple(v.shape[1:]) for k, v in self.history.items()}
        flat = torch.cat([v.flatten(1) for v in self.history.values()]
                         + [torch.as_tensor(np.asarray(dataset.obs[critic_key]), dtype=torch.float32)], 1)
        self.critic_obs = flat                                                                  # (S, D)
        self.history_dim = sum(int(np.prod(s)) for s in self.shapes.values())

    def decode(self, critic_obs: Tensor) -> dict[str, Tensor]:
        """The policy's raw history ``{k: (B, To, ...)}`` from critic inputs ``(B, D)``."""
        out, i = {}, 0
        for k, shape in self.shapes.items():
            n = int(np.prod(shape))
            out[k] = critic_obs[:, i:i + n].reshape((-1,) + shape)
            i += n
        return out


def build_transitions(dataset: EpisodeDataset, features: PolicyFeatures, chunk: int, gamma: float) -> dict[str, Tensor]:
    """:func:`chunk_transitions` with ``obs``/``next_obs`` replaced by the critic inputs of the same rows, plus the
    global row index ``row`` of each chunk start."""
    tr = chunk_transitions(dataset, next(iter(dataset.obs)), chunk, gamma)
    first = torch.as_tensor(dataset.episode_starts)[tr["episode"]] + tr["t"]
    last = torch.as_tensor(dataset.episode_starts + dataset.episode_lengths - 1)[tr["episode"]]
    next_row = torch.minimum(first + chunk, last)  # the same next row chunk_transitions uses
    tr["obs"], tr["next_obs"], tr["row"] = features.critic_obs[first], features.critic_obs[next_row], first
    return tr


class OfflineRLAgent:
    """RL-100 offline stage for a :class:`DiffusionPolicy` trained by imitation (see the module docstring).

    Args:
        cfg: agent config, keys and defaults in :attr:`DEFAULTS` (unknown keys are an error).
        policy: the BC policy; trained in place; the accepted weights end in :attr:`accepted`.
        dataset: path of the zarr dataset (appended to when ``collect_episodes > 0``).
        run_dir, logger, seed, meta: as for the other agents.
        collect: ``f(policy, episodes, round) -> None`` that appends rollouts of ``policy`` to ``dataset``
            (required when ``collect_episodes > 0``).
    """

    DEFAULTS: dict[str, Any] = {
        "rounds": 2,
        "gamma": 0.99,
        "critic_obs": "privileged",
        "critic_steps": 3000,
        "critic_hidden": [256, 256, 256],
        "critic_lr": 3e-4,
        "expectile": 0.7,
        "critic_batch": 256,
        "ppo_steps": 300,           # candidate updates per round
        "batch_size": 256,
        "lr": 3e-5,
        "clip": 0.25,               # RL-100 clip_ratio
        "max_grad_norm": 0.5,
        "bc_coef": 0.0,             # weight of the imitation loss on sampler-drawn windows in each candidate update
        "ddim_steps": 10,
        "ft_steps": None,           # None: all ddim_steps are RL actions
        "eta": 1.0,
        "std_min": 0.0067,          # RL-100's clip_std_min, for sampling and log-probs
        "sampler": "uniform",       # uniform | return | advantage (Hong et al. trajectory weighting)
        "sampler_temperature": 0.1,
        "ope": "fqe",               # fqe | q
        "ope_every": 100,
        "ope_steps": 2000,
        "ope_margin": 0.05,         # accept iff J(pi) - J(pi_b) >= margin * |J(pi_b)|
        "ope_states": 1024,         # start states for the OPE estimate (episode starts first)
        "ope_rows": 4096,           # transitions FQE is fitted on (a fixed random subset: the policy runs on each)
        "collect_episodes": 0,      # rollouts of the accepted policy appended to the dataset between rounds
        "consistency_head": False,  # distil a one-step head from the improving policy, one step per PPO step
        "head": {"student": None, "lr": 1e-4, "multistep_prob": 0.3, "teacher_sampler": None},  # None: ddim:K
        "log_every": 25,
    }

    def __init__(self, cfg: Mapping[str, Any] | None, policy: DiffusionPolicy, dataset: str | Path,
                 run_dir: str | Path, logger: Any, seed: int = 0, meta: Mapping[str, Any] | None = None,
                 collect: Callable[[DiffusionPolicy, int, int], None] | None = None) -> None:
        user = {k: v for k, v in to_plain(cfg or {}).items() if k != "name"}
        unknown = set(user) - set(self.DEFAULTS)
        if unknown:
            raise ValueError(f"offline agent: unknown config keys {sorted(unknown)}; valid: {sorted(self.DEFAULTS)}")
        self.cfg = c = {**copy.deepcopy(self.DEFAULTS), **user}
        if c["sampler"] not in SAMPLERS:
            raise ValueError(f"offline.sampler={c['sampler']!r}; choose one of {list(SAMPLERS)}")
        if float(c["bc_coef"]) < 0:
            raise ValueError(f"offline.bc_coef={c['bc_coef']} must be >= 0 (0 = no imitation term)")
        if c["ope"] not in OPE_KINDS:
            raise ValueError(f"offline.ope={c['ope']!r}; choose one of {list(OPE_KINDS)}")
        if not isinstance(policy, DiffusionPolicy) or policy.name != "diffusion":
            raise TypeError(f"offline RL fine-tunes a diffusion policy's denoising chain, got {policy.name!r}")
        if int(c["collect_episodes"]) > 0 and collect is None:
            raise ValueError("offline.collect_episodes > 0 needs a collect function (the pipeline provides one)")
        self.policy, self.dataset_path, self.logger = policy, Path(dataset), logger
        self.run_dir, self.meta, self.seed, self.collect = Path(run_dir), dict(meta or {}), int(seed), collect
        self.mdp = policy.denoising_mdp(int(c["ddim_steps"]), c["ft_steps"], float(c["eta"]), float(c["std_min"]),
                                        float(c["std_min"]))
        if c["ft_steps"] is None:  # the accepted policy is sampled with the chain it was fine-tuned on
            policy.set_sampler(self.mdp.sampler)
        self.frozen = copy.deepcopy(policy).eval().requires_grad_(False)  # the BC network runs the untrained steps
        self.accepted = copy.deepcopy(policy).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=float(c["lr"]), weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.head = ConsistencyHead(policy, **c["head"], seed=self.seed) if c["consistency_head"] else None
        self.round = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------------------ pieces
    def _load_data(self) -> None:
        ds = EpisodeDataset(self.dataset_path)
        self.features = PolicyFeatures(ds, self.policy, str(self.cfg["critic_obs"]))
        self.transitions = build_transitions(ds, self.features, self.policy.action_horizon, float(self.cfg["gamma"]))
        p = self.policy
        # windows of every dataset row (global row index = window index) for the imitation term
        self.windows = SequenceDataset(ds, p.obs_keys, p.obs_horizon, p.pred_horizon) \
            if float(self.cfg["bc_coef"]) > 0 else None
        self.sampler = None
        mode = self.cfg["sampler"]
        if mode != "uniform":
            returns = episode_returns(ds, float(self.cfg["gamma"]))
            adv = None
            if mode == "advantage":
                adv = linear_advantages(returns, self.features.critic_obs[torch.as_tensor(ds.episode_starts)].numpy())
            probs = transition_sampling_probs(self.transitions["episode"].numpy(), returns, mode,
                                              float(self.cfg["sampler_temperature"]), adv)
            self.sampler = WeightedSampler(probs, self.generator)
        starts = self.transitions["t"] == 0
        order = torch.cat([starts.nonzero().squeeze(1), (~starts).nonzero().squeeze(1)])
        self.ope_obs = self.transitions["obs"][order[:int(self.cfg["ope_states"])]]
        self.num_episodes = ds.num_episodes
        n = len(self.transitions["obs"])
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:int(self.cfg["ope_rows"])]
        self.ope_transitions = {k: v[subset] for k, v in self.transitions.items()}

    def _rows(self, n: int) -> Tensor:
        if self.sampler is not None:
            return self.sampler.sample(n)
        return torch.randint(len(self.transitions["obs"]), (n,), generator=self.generator)

    def _nobs(self, critic_obs: Tensor, policy: DiffusionPolicy | None = None) -> dict[str, Tensor]:
        p = self.policy if policy is None else policy
        return p.normalizer.normalize_dict(p.check_obs(self.features.decode(critic_obs)))

    def executed(self, chain_end: Tensor) -> Tensor:
        """The executed chunk of normalised sequences ``(B, Tp, Da)`` in env units, flattened ``(B, Ta*Da)``."""
        p = self.policy
        start = p.obs_horizon - 1
        return p.to_env_action(chain_end[:, start:start + p.action_horizon]).flatten(1)

    def policy_fn(self, policy: DiffusionPolicy) -> Callable[[Tensor], Tensor]:
        """Critic obs ``(B, D)`` -> the policy's executed chunk ``(B, Ta*Da)`` from the chain it is fine-tuned over, with
        a fixed noise stream (a deterministic function of the batch, as FQE's target needs)."""
        sampler = self.mdp.sampler

        def fn(obs: Tensor) -> Tensor:
            hist = self.features.decode(obs)
            return policy.predict_chunk(hist, sampler, torch.Generator().manual_seed(0)).flatten(1)
        return fn

    def ope(self, policy: DiffusionPolicy) -> float:
        """Estimated value of ``policy`` from the OPE start states (higher is better)."""
        fn = self.policy_fn(policy)
        if self.cfg["ope"] == "q":
            with torch.no_grad():
                return float(self.critic.q_value(self.ope_obs, fn(self.ope_obs)).mean())
        c = self.cfg
        fqe = FQE(self.transitions["obs"].shape[1], self.transitions["action"].shape[1],
                  tuple(int(h) for h in c["critic_hidden"]), float(c["gamma"]) ** self.policy.action_horizon,
                  float(c["critic_lr"]), seed=self.seed + 1)
        fqe.fit(self.ope_transitions, fn, int(c["ope_steps"]), int(c["critic_batch"]),
                torch.Generator().manual_seed(self.seed + 2))
        return fqe.estimate(self.ope_obs, fn)

    def ppo_step(self, behaviour: DiffusionPolicy) -> dict[str, float]:
        """One candidate update on a batch of dataset states with actions sampled from ``behaviour``."""
        c = self.cfg
        obs = self.transitions["obs"][self._rows(int(c["batch_size"]))]
        nobs = self._nobs(obs)
        chain, old = behaviour.sample_chain(nobs, self.mdp, self.generator, frozen=self.frozen)
        with torch.no_grad():
            adv = self.critic.advantage(obs, self.executed(chain[:, -1]))
            adv_n = (adv - adv.mean()) / (adv.std() + 1e-8)
        self.policy.train()
        loss, metrics = chain_ppo_loss(self.policy, nobs, chain, old, adv_n, self.mdp, float(c["clip"]))
        if self.windows is not None:  # the imitation anchor, on windows drawn with the same (weighted) sampler
            bc_loss, _ = self.policy.loss(self.windows.sample_batch(self.transitions["row"][self._rows(len(obs))]))
            loss = loss + float(c["bc_coef"]) * bc_loss
            metrics["bc_loss"] = float(bc_loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), float(c["max_grad_norm"]))
        self.optimizer.step()
        metrics.update(loss=float(loss.detach()), grad_norm=float(grad), adv_raw=float(adv.mean()))
        if self.head is not None:
            metrics["head_loss"] = self.head.update(nobs)
        return metrics

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        c = self.cfg
        while self.round < int(c["rounds"]):
            t0 = time.perf_counter()
            self._collect_owed()
            self._load_data()
            hidden = tuple(int(h) for h in c["critic_hidden"])
            self.critic = IQL(self.transitions["obs"].shape[1], self.transitions["action"].shape[1], hidden,
                              float(c["expectile"]), float(c["gamma"]) ** self.policy.action_horizon,
                              lr=float(c["critic_lr"]), seed=self.seed + self.round)
            cm = self.critic.fit(self.transitions, int(c["critic_steps"]), int(c["critic_batch"]), self.generator,
                                 self.sampler)
            self.logger.log({f"offline/critic_{k}": v for k, v in cm.items()}, self.round)
            behaviour = copy.deepcopy(self.accepted)
            self.policy.load_state_dict(self.accepted.state_dict())
            j_b = self.ope(behaviour)
            j_start, accepted_updates = j_b, 0
            for step in range(1, int(c["ppo_steps"]) + 1):
                m = self.ppo_step(behaviour)
                if step % int(c["log_every"]) == 0:
                    self.logger.log({f"offline/{k}": v for k, v in m.items()}, step)
                if step % int(c["ope_every"]) == 0 or step == int(c["ppo_steps"]):
                    j = self.ope(self.policy)
                    accept = j - j_b >= float(c["ope_margin"]) * abs(j_b)
                    self.logger.log({"offline/ope_candidate": j, "offline/ope_behaviour": j_b,
                                     "offline/accepted": float(accept)}, step)
                    if accept:  # the candidate becomes the behaviour policy of the next updates
                        self.accepted.load_state_dict(self.policy.state_dict())
                        behaviour = copy.deepcopy(self.accepted)
                        j_b, accepted_updates = j, step
            row = {"round": self.round, "ope_start": j_start, "ope_accepted": j_b, "accepted_at": accepted_updates,
                   "episodes": self.num_episodes, "wall_s": time.perf_counter() - t0}
            print("offline round " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in row.items()))
            self.history.append(row)
            self.round += 1
            self.save()
        return self.history[-1] if self.history else {}

    def _collect_owed(self) -> None:
        """Before every round but the first: the rollouts of the accepted policy that the dataset still lacks (all
        of them, or the rest of a collection a crash interrupted: the writer commits whole episodes)."""
        n = int(self.cfg["collect_episodes"])
        if self.round == 0 or n <= 0:
            return
        owed = int(self.history[-1]["episodes"]) + n - EpisodeDataset(self.dataset_path).num_episodes
        if owed > 0:
            assert self.collect is not None
            self.collect(self.accepted, owed, self.round)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """``model.*`` = the accepted policy (what eval/export load); ``head.*`` the consistency head if any;
        ``train.*`` the rest. Saved after every round, so a resume restarts at the next round."""
        tensors = {f"model.{k}": v for k, v in self.accepted.state_dict().items()}
        state = {"online": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state(), "frozen": self.frozen.state_dict()}
        if self.head is not None:
            tensors.update({f"head.{k}": v for k, v in self.head.student.state_dict().items()})
            state["head"] = self.head.train_state()
        flat, skeleton = flatten_state(state, prefix="train.")
        tensors.update(flat)
        meta = {**self.meta, "kind": CHECKPOINT_KIND, "step": self.round, "policy": self.accepted.describe(),
                "train_state": skeleton, "offline_history": self.history,
                "head_policy": self.head.student.describe() if self.head is not None else None}
        if self.head is not None:  # also as a policy run of its own: run_dir/head is deployable as it is
            self.head.save_policy(self.run_dir / "head", self.round, self.meta)
        return save_run_checkpoint(self.run_dir, self.round, tensors, meta)

    def load(self, path: str | Path) -> None:
        tensors, meta = load_checkpoint(path)
        if "train_state" not in meta or "offline_history" not in meta:
            raise ValueError(f"checkpoint {path} was not written by the offline agent; resume from its run dir")
        state = unflatten_state(tensors, meta["train_state"])
        self.accepted.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.policy.load_state_dict(state["online"])
        self.frozen.load_state_dict(state["frozen"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if self.head is not None and "head" in state:
            self.head.student.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
            self.head.load_train_state(state["head"])
        self.round = int(meta["step"])
        self.history = list(meta["offline_history"])


__all__ = ["OfflineRLAgent", "PolicyFeatures", "build_transitions", "chain_ppo_loss"]
