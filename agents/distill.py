"""Distil a trained :class:`DiffusionPolicy` (teacher) into a one-step :class:`ConsistencyPolicy` (student).

This is :class:`BCAgent` with another objective (same optimiser, schedule, EMA, checkpoints and exact resume).
Two objectives, chosen by ``agent.objective``:

``output`` (RL-100's lightweight consistency head, "action_same_noise"): teacher and student start from the same
noise ``z``; the teacher runs its K-step DDIM chain (``agent.teacher_sampler``), the student one step:

    L = || f_theta(z, T-1 | o) - DDIM_K^teacher(z | o) ||^2

With ``eta > 0`` in the teacher's chain (an RL fine-tuned teacher is sampled with the stochastic chain it was
trained on) the chain draws fresh noise after ``z``, and the student learns the mean of the teacher's samples from
``z``.

On an ``agent.multistep_prob`` share of samples the student instead starts at a level ``t ~ U{0..T-2}`` from the
teacher's sample re-noised, ``x_t = q(x_t | DDIM_K(z))``, and must return that sample: without it ``consistency:N``
(N > 1) re-noises to levels the student never saw (measured on push_cube after 500 steps: 0.84 success at one step,
0.11 at three).

``consistency`` (consistency distillation along the teacher's probability-flow ODE, as in Consistency Policy's
CTM-local variant with adjacent levels): on a grid of ``agent.ode_steps`` levels pick adjacent ``t > s``,
``x_t = q(x_t | a0)`` from a dataset chunk, ``x_s`` = one deterministic DDIM step (the PF-ODE's Euler step) of
the frozen teacher, and match the student at ``t`` to an EMA target network at ``s``:

    L = d( f_theta(x_t, t), f_target(x_s, s) ) + w_dsm || f_theta(x_t, t) - a0 ||^2

with ``d`` pseudo-Huber (``sqrt(|x - y|^2 + c^2) - c``, ``c = 0.00054 sqrt(D)``, CP's rule) or squared L2, and
``f(x, -1) = x`` at the clean end of the grid.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.agents.bc import BCAgent
from distillery.policies import ConsistencyPolicy, DiffusionPolicy, make_policy
from distillery.policies.base import to_plain
from distillery.policies.schedule import SamplerSpec

OBJECTIVES = ("output", "consistency")
DISTANCES = ("huber", "l2")
TEACHER_NOISES = ("fresh", "shared")


def pseudo_huber(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample ``sqrt(||x - y||^2 + c^2) - c`` with ``c = 0.00054 sqrt(D)`` (Consistency Policy's metric)."""
    diff = (x - y).flatten(1)
    c = 0.00054 * diff.shape[1] ** 0.5
    return ((diff.pow(2).sum(1) + c * c).sqrt() - c).mean()


def check_distill_config(cfg: Mapping[str, Any]) -> None:
    if cfg["objective"] not in OBJECTIVES:
        raise ValueError(f"agent.objective={cfg['objective']!r}; choose one of {list(OBJECTIVES)}")
    if cfg["teacher_noise"] not in TEACHER_NOISES:
        raise ValueError(f"agent.teacher_noise={cfg['teacher_noise']!r}; choose one of {list(TEACHER_NOISES)}")
    if cfg["distance"] not in DISTANCES:
        raise ValueError(f"agent.distance={cfg['distance']!r}; choose one of {list(DISTANCES)}")
    if not 0.0 <= float(cfg["target_ema"]) < 1.0:
        raise ValueError(f"agent.target_ema must be in [0, 1), got {cfg['target_ema']}")
    if not 0.0 <= float(cfg["multistep_prob"]) <= 1.0:
        raise ValueError(f"agent.multistep_prob must be in [0, 1], got {cfg['multistep_prob']}")
    if int(cfg["ode_steps"]) < 2:
        raise ValueError(f"agent.ode_steps must be >= 2, got {cfg['ode_steps']}")


def output_distill_loss(student: ConsistencyPolicy, teacher: DiffusionPolicy, nobs: Mapping[str, Tensor],
                        teacher_sampler: SamplerSpec, multistep_prob: float,
                        distance: Callable[[Tensor, Tensor], Tensor] = F.mse_loss, cond: Tensor | None = None,
                        cond_teacher: Tensor | None = None, shared_noise: bool = False) -> Tensor:
    """RL-100's head objective on normalised observations ``nobs``: the student maps the teacher's noise ``z`` to
    the teacher's ``teacher_sampler`` sample from ``z`` (see the module docstring). Used by
    :class:`DistillAgent` and by the RL agents' interleaved consistency head (the teacher is then the live policy)."""
    cond = student.encode_obs(nobs) if cond is None else cond
    b = cond.shape[0]
    shape = (b, teacher.pred_horizon, teacher.action_dim)
    z = torch.randn(shape, device=cond.device)
    with torch.no_grad():
        cond_teacher = teacher.encode_obs(nobs) if cond_teacher is None else cond_teacher
        target = teacher.schedule.sample(lambda x, t: teacher.eps(x, t, cond_teacher), shape, teacher_sampler, x_T=z,
                                         step_noise=z if shared_noise else None)
    # the one-step case maps the teacher's own z at the top level; a `multistep_prob` share of samples starts
    # lower, from the teacher's sample re-noised with that z, so consistency:N chains work too
    top = student.schedule.num_train_steps - 1
    t = torch.where(torch.rand(b, device=cond.device) < multistep_prob,
                    torch.randint(0, top, (b,), device=cond.device), torch.full((b,), top, device=cond.device))
    x_t = torch.where((t == top).view(-1, 1, 1), z, student.schedule.q_sample(target, t, z))
    return distance(student.consistency_fn(x_t, t, cond), target)


def make_student(teacher: DiffusionPolicy, overrides: Mapping[str, Any] | None = None,
                 init_from_teacher: bool = True, verbose: bool = False) -> ConsistencyPolicy:
    """A ConsistencyPolicy with the teacher's config overlaid with ``overrides`` (e.g. ``{"down_dims": [32, 64]}``),
    the teacher's normaliser and, if ``init_from_teacher``, every teacher tensor whose name and shape match."""
    cfg = {**teacher.cfg, "sampler": "consistency:1", **(to_plain(overrides) or {})}
    student = make_policy("consistency", teacher.obs_spec, teacher.action_spec, cfg).to(teacher.device)
    student.normalizer.load_state_dict(teacher.normalizer.state_dict())
    if init_from_teacher:
        own = student.state_dict()
        shared = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
        student.load_state_dict(shared, strict=False)
        if verbose:
            print(f"student initialised from the teacher: {len(shared)}/{len(own)} tensors copied")
    return student


class ConsistencyHead:
    """RL-100's one-step head trained alongside RL: a student distilled with :func:`output_distill_loss` from the
    *live* policy being fine-tuned (one step per RL actor update), so every RL stage ends with a deployable
    one-step policy. The student starts as a copy of the teacher's weights."""

    def __init__(self, teacher: DiffusionPolicy, student: Mapping[str, Any] | None = None, lr: float = 1e-4,
                 multistep_prob: float = 0.3, teacher_sampler: str | None = None, seed: int = 0) -> None:
        self.teacher = teacher
        self.student = make_student(teacher, student)
        self.sampler = teacher.parse_sampler(teacher_sampler)  # None: the teacher's own (fine-tuned) chain
        self.multistep_prob = float(multistep_prob)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=float(lr), weight_decay=0.0)

    def update(self, nobs: Mapping[str, Tensor]) -> float:
        """One distillation step on normalised observations ``nobs`` (the RL batch); returns the loss."""
        was_training = self.teacher.training
        self.teacher.eval()
        self.student.train()
        loss = output_distill_loss(self.student, self.teacher, {k: v.detach() for k, v in nobs.items()},
                                   self.sampler, self.multistep_prob)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.teacher.train(was_training)
        return float(loss.detach())

    def train_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def save_policy(self, run_dir: Any, step: int, meta: Mapping[str, Any]) -> Any:
        """Write the head as a standalone policy run (``run_dir/checkpoints/...``, ``model.*`` = the student) that
        `distillery eval` and `export` load like any trained policy."""
        from distillery.runtime import save_run_checkpoint

        tensors = {f"model.{k}": v for k, v in self.student.state_dict().items()}
        return save_run_checkpoint(run_dir, step, tensors, {**meta, "kind": "policy", "step": step,
                                                            "policy": self.student.describe()})

    def load_train_state(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class DistillAgent(BCAgent):
    """Trains ``policy`` (a ConsistencyPolicy) to reproduce ``teacher`` (a frozen DiffusionPolicy)."""

    def __init__(self, cfg: Mapping[str, Any], policy: ConsistencyPolicy, teacher: DiffusionPolicy, data: Any,
                 run_dir: Any, logger: Any, seed: int = 0, evaluate: Any = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        check_distill_config(cfg)
        if (policy.pred_horizon, policy.action_dim) != (teacher.pred_horizon, teacher.action_dim):
            raise ValueError(f"student predicts ({policy.pred_horizon}, {policy.action_dim}) but the teacher "
                             f"({teacher.pred_horizon}, {teacher.action_dim}); distillation needs the same chunk shape")
        super().__init__(cfg, policy, data, run_dir, logger, seed=seed, evaluate=evaluate, meta=meta)
        self.teacher = teacher.eval().requires_grad_(False)
        self.objective = str(cfg["objective"])
        # None: the teacher's own default sampler (for an RL fine-tuned teacher, the chain it was trained on)
        self.teacher_sampler = teacher.parse_sampler(cfg["teacher_sampler"])
        if self.objective == "output" and self.teacher_sampler.kind != "ddim":
            raise ValueError(f"agent.teacher_sampler={self.teacher_sampler.text!r}: output matching runs the "
                             f"teacher's DDIM chain; use 'ddim:K' or 'ddim:K:eta=E' (or null: the teacher's own)")
        self.grid = torch.tensor(teacher.schedule.timesteps(SamplerSpec("ddim", int(cfg["ode_steps"]))))  # (N, 2)
        self.target = None
        if self.objective == "consistency":
            self.target = copy.deepcopy(policy).eval().requires_grad_(False)

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        student, teacher = self.policy, self.teacher
        nobs, a0 = student.normalized_batch(batch)
        cond = student.encode_obs(nobs)
        b = a0.shape[0]
        with torch.no_grad():
            cond_teacher = teacher.encode_obs(nobs)
        if self.objective == "output":
            loss = output_distill_loss(student, teacher, nobs, self.teacher_sampler, float(self.cfg["multistep_prob"]),
                                       self._distance, cond=cond, cond_teacher=cond_teacher,
                                       shared_noise=self.cfg["teacher_noise"] == "shared")
            return loss, {"loss": float(loss.detach())}
        assert self.target is not None
        pair = self.grid[torch.randint(0, len(self.grid), (b,))].to(a0.device)  # adjacent (t, s) per sample
        t, s = pair[:, 0], pair[:, 1]
        noise = torch.randn_like(a0)
        x_t = student.schedule.q_sample(a0, t, noise)
        with torch.no_grad():
            x_s, _, _ = teacher.schedule.ddim_step(x_t, teacher.eps(x_t, t, cond_teacher), t, s, eta=0.0)
            target = self.target.consistency_fn(x_s, s.clamp(min=-1), self.target.encode_obs(nobs))
            target = torch.where((s < 0).view(-1, 1, 1), x_s, target)  # f(x, clean) = x
        pred = student.consistency_fn(x_t, t, cond)
        cd = self._distance(pred, target)
        w = float(self.cfg["dsm_weight"])
        if w == 0:
            return cd, {"loss": float(cd.detach())}
        dsm = F.mse_loss(pred, a0)  # denoising score matching in x0 form: the student's clean-chunk regression
        loss = cd + w * dsm
        return loss, {"loss": float(loss.detach()), "cd": float(cd.detach()), "dsm": float(dsm.detach())}

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        return pseudo_huber(x, y) if self.cfg["distance"] == "huber" else F.mse_loss(x, y)

    def after_step(self) -> None:
        if self.target is not None:  # theta^- <- mu theta^- + (1 - mu) theta
            mu = float(self.cfg["target_ema"])
            with torch.no_grad():
                for p_t, p in zip(self.target.parameters(), self.policy.parameters()):
                    p_t.lerp_(p, 1.0 - mu)

    def extra_state(self) -> dict[str, Any]:
        return {"target": self.target.state_dict()} if self.target is not None else {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if self.target is not None and "target" in state:
            self.target.load_state_dict(state["target"])
