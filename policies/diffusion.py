"""Diffusion Policy, CNN variant (Chi et al. 2023): a conditional DDPM over the action chunk.

    training:   k ~ U{0..T-1}, eps ~ N(0, I), A^k = sqrt(ab_k) A^0 + sqrt(1 - ab_k) eps
                L = || eps - eps_theta(A^k, k, f(O)) ||^2                                    (paper Eq. 5)
    inference:  A^T ~ N(0, I), then the reverse chain of the chosen sampler ("ddpm", "ddim:K")   (paper Eq. 4)

``f`` is the observation encoder (global conditioning), ``eps_theta`` the :class:`ConditionalUnet1D`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.policies.base import Policy
from distillery.policies.networks.encoders import make_obs_encoder
from distillery.policies.networks.unet1d import ConditionalUnet1D
from distillery.policies.schedule import NoiseSchedule, SamplerSpec, parse_sampler
from distillery.specs import ObservationSpec, TensorSpec

__all__ = ["DenoisingMDP", "DiffusionPolicy", "split_rows"]


def split_rows(warm: Tensor, out: Tensor, warm_fn: Callable[[Tensor], Tensor],
               cold_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Fill ``out``'s rows with ``warm_fn(rows)`` where ``warm (B,)`` and ``cold_fn(rows)`` elsewhere (envs with and
    without a previous plan, for warm-started samplers); warm rows first, so generator draws keep one order."""
    for mask, fn in ((warm, warm_fn), (~warm, cold_fn)):
        if bool(mask.any()):
            rows = mask.nonzero().squeeze(1)
            out[rows] = fn(rows)
    return out


@dataclass(frozen=True)
class DenoisingMDP:
    """A ``ddim:K`` chain with ``eta > 0`` seen as K Gaussian policies (DPPO's inner MDP, RL-100's sub-MDP).

    Only the last ``ft_steps`` steps are RL actions (their log-probs are recorded and trained); the earlier ones run
    under the frozen pre-RL network. ``std_min_sample`` / ``std_min_logprob`` floor each step's std when drawing
    and when scoring (DPPO: 0.1 / 0.1; RL-100: 0.0067 for both); ``noise_clip`` clips the standard-normal draw
    (DPPO: 3). ``executed_only`` scores only the ``Ta`` executed positions of the chunk, as DPPO does.
    """

    steps: tuple[tuple[int, int], ...]
    ft_steps: int
    eta: float = 1.0
    std_min_sample: float = 0.1
    std_min_logprob: float = 0.1
    noise_clip: float | None = 3.0
    executed_only: bool = True

    @property
    def ft_grid(self) -> list[tuple[int, int]]:
        return list(self.steps[len(self.steps) - self.ft_steps:])

    @property
    def sampler(self) -> str:
        """The sampler string of this chain (``ddim:K:eta=E``, without the std floors and noise clip): what a
        policy fine-tuned over it is evaluated and deployed with. RL trains the stochastic chain, not its eta-0
        ODE: lift_cube's online policy scored 1.000 with ``ddim:5:eta=1.0`` and 0.940 with ``ddim:5``."""
        return f"ddim:{len(self.steps)}:eta={self.eta:g}"


class DiffusionPolicy(Policy):
    name: ClassVar[str] = "diffusion"
    SAMPLER_KINDS: ClassVar[tuple[str, ...]] = ("ddpm", "ddim", "rti")
    EVAL_SAMPLERS: ClassVar[tuple[str, ...]] = ("ddpm", "ddim:10")  # `eval` runs these unless `sampler=` is given
    PER_POSITION_STEPS: ClassVar[bool] = False  # one diffusion step per position (StreamingPolicy)
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **Policy.DEFAULTS,
        # Small enough for CPU training (see the README's policy table); the paper's state net is
        # down_dims [256, 512, 1024], step_embed_dim 256, encoder identity (~65.8M params).
        "down_dims": [32, 64, 128],
        "step_embed_dim": 64,
        "kernel_size": 5,
        "n_groups": 8,
        "activation": "mish",
        "num_train_steps": 100,
        "clip_sample": True,
        "sampler": "ddim:10",
        "ddim_eta": 0.0,
        "encoder": {"type": "mlp", "hidden": [256], "out_dim": 128},
    }

    def __init__(self, obs_spec: ObservationSpec, action_spec: TensorSpec, cfg: Mapping[str, Any] | None = None):
        super().__init__(obs_spec, action_spec, cfg)
        c = self.cfg
        self.encoder = make_obs_encoder(obs_spec, self.obs_keys, self.obs_horizon, c["encoder"])
        self.unet = ConditionalUnet1D(self.action_dim, self.encoder.out_dim, c["down_dims"], int(c["step_embed_dim"]),
                                      int(c["kernel_size"]), int(c["n_groups"]), str(c["activation"]),
                                      step_positions=self.pred_horizon if self.PER_POSITION_STEPS else 0)
        self.unet.check_horizon(self.pred_horizon)
        self.schedule = NoiseSchedule(int(c["num_train_steps"]), clip_sample=bool(c["clip_sample"]))
        self.ddim_eta = float(c["ddim_eta"])
        if self.ddim_eta < 0:
            raise ValueError(f"ddim_eta must be >= 0, got {self.ddim_eta}")
        self.default_sampler = self.parse_sampler(c["sampler"])  # fail at construction, not at the first rollout

    def parse_sampler(self, sampler: str | None) -> SamplerSpec:
        spec = parse_sampler(self.cfg["sampler"] if sampler is None else sampler, self.schedule.num_train_steps)
        if spec.kind not in self.SAMPLER_KINDS:
            raise ValueError(f"the {self.name} policy cannot sample with {spec.text!r}; its sampler kinds are "
                             f"{list(self.SAMPLER_KINDS)}")
        return spec

    def set_sampler(self, sampler: str) -> None:
        """Make ``sampler`` the default (stored in the config, so checkpoints, eval and export use it): an RL
        fine-tuned policy is only trained for the ``ddim:K`` chain it was fine-tuned on."""
        self.default_sampler = self.parse_sampler(sampler)
        self.cfg["sampler"] = sampler

    # -- pieces reused by RL fine-tuning and distillation ---------------------------------------------------
    def encode_obs(self, nobs: Mapping[str, Tensor]) -> Tensor:
        """Normalised ``{k: (B, To, *shape)}`` -> global condition ``(B, cond_dim)``."""
        return self.encoder(nobs)

    def eps(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """``eps_theta(x_t (B, Tp, Da), t (B,), cond (B, cond_dim)) -> (B, Tp, Da)``."""
        return self.unet(x_t, t, cond)

    # -- contract ----------------------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        nobs, a0 = self.normalized_batch(batch)                                    # a0: (B, Tp, Da) in [-1, 1]
        cond = self.encode_obs(nobs)
        b = a0.shape[0]
        k = torch.randint(0, self.schedule.num_train_steps, (b,), device=a0.device)   # k ~ U{0..T-1}
        noise = torch.randn_like(a0)                                                 # eps ~ N(0, I)
        a_k = self.schedule.q_sample(a0, k, noise)                                  # A^k
        loss = F.mse_loss(self.eps(a_k, k, cond), noise)                             # || eps - eps_theta ||^2
        return loss, {"loss": float(loss.detach())}

    def sample_normalized(self, nobs: Mapping[str, Tensor], sampler: str | None,
                          generator: torch.Generator | None, noise: Tensor | None = None,
                          carry: dict[str, Tensor] | None = None) -> Tensor:
        spec = self.default_sampler if sampler is None else self.parse_sampler(sampler)
        cond = self.encode_obs(nobs)
        shape = (cond.shape[0], self.pred_horizon, self.action_dim)
        if spec.kind == "rti":
            return self._sample_rti(cond, shape, spec, generator, noise, carry)
        return self.schedule.sample(lambda x, t: self.eps(x, t, cond), shape, spec, default_eta=self.ddim_eta,
                                    generator=generator, x_T=noise)

    def is_deterministic(self, sampler: str | None) -> bool:
        spec = self.default_sampler if sampler is None else self.parse_sampler(sampler)
        eta = spec.eta if spec.eta is not None else self.ddim_eta
        return spec.kind == "ddim" and eta == 0

    # -- the denoising chain as an MDP (RL fine-tuning) ---------------------------------------------------
    def denoising_mdp(self, ddim_steps: int = 10, ft_steps: int | None = None, eta: float = 1.0,
                      std_min_sample: float = 0.1, std_min_logprob: float = 0.1, noise_clip: float | None = 3.0,
                      executed_only: bool = True) -> DenoisingMDP:
        """The ``ddim:ddim_steps`` chain as an MDP whose last ``ft_steps`` (default all) steps are trained."""
        steps = tuple(self.schedule.timesteps(parse_sampler(f"ddim:{ddim_steps}", self.schedule.num_train_steps)))
        ft = len(steps) if ft_steps is None else int(ft_steps)
        if not 1 <= ft <= len(steps):
            raise ValueError(f"ft_steps must be in [1, ddim_steps={len(steps)}], got {ft_steps}")
        if eta <= 0 or min(std_min_sample, std_min_logprob) < 0:
            raise ValueError(f"the denoising MDP needs eta > 0 (a Gaussian per step) and std floors >= 0; got "
                             f"eta={eta}, std_min_sample={std_min_sample}, std_min_logprob={std_min_logprob}")
        if std_min_logprob == 0:
            raise ValueError("std_min_logprob must be > 0: the last DDIM step has std 0 and no density without a floor")
        return DenoisingMDP(steps, ft, float(eta), float(std_min_sample), float(std_min_logprob), noise_clip,
                            bool(executed_only))

    def _positions(self, mdp: DenoisingMDP) -> slice | None:
        start = self.obs_horizon - 1
        return slice(start, start + self.action_horizon) if mdp.executed_only else None

    @torch.no_grad()
    def sample_chain(self, nobs: Mapping[str, Tensor], mdp: DenoisingMDP, generator: torch.Generator | None = None,
                     frozen: "DiffusionPolicy | None" = None) -> tuple[Tensor, Tensor]:
        """Sample normalised chunks recording the trained part of the chain.

        The first ``K - ft_steps`` steps run (DDIM ``eta``, unfloored) under ``frozen`` (the pre-RL network; this
        policy if None), the last ``ft_steps`` under this policy with the floors. Returns ``chain (B, ft+1, Tp, Da)``
        (``chain[:, -1]`` is the sampled chunk) and ``log_prob (B, ft)``.
        """
        cond = self.encode_obs(nobs)
        b = cond.shape[0]
        x = torch.randn((b, self.pred_horizon, self.action_dim), generator=generator, device=cond.device)
        early = list(mdp.steps[:len(mdp.steps) - mdp.ft_steps])
        if early:
            net = self if frozen is None else frozen
            c0 = cond if frozen is None else frozen.encode_obs(nobs)
            x = self.schedule.run_chain(lambda xx, t: net.eps(xx, t, c0), x, early, False, mdp.eta, generator)
        return self.schedule.sample_chain(lambda xx, t: self.eps(xx, t, cond), x, mdp.ft_grid, mdp.eta,
                                          mdp.std_min_sample, generator, mdp.std_min_logprob, self._positions(mdp),
                                          mdp.noise_clip)

    def chain_log_prob(self, nobs: Mapping[str, Tensor], chain: Tensor, mdp: DenoisingMDP) -> Tensor:
        """Log-probs ``(B, ft)`` of a recorded ``chain`` under the current weights (differentiable)."""
        cond = self.encode_obs(nobs).repeat_interleave(mdp.ft_steps, 0)
        return self.schedule.chain_log_prob(lambda xx, t: self.eps(xx, t, cond), chain, mdp.ft_grid, mdp.eta,
                                            mdp.std_min_logprob, self._positions(mdp))

    def _sample_rti(self, cond: Tensor, shape: tuple[int, ...], spec: SamplerSpec,
                    generator: torch.Generator | None, noise: Tensor | None,
                    carry: dict[str, Tensor] | None) -> Tensor:
        """RTI-DP warm start (Duan et al. 2025): the previous plan shifted by the ``Ta`` executed actions (last action
        repeated) is re-noised to level ``t_K`` and only the last ``K`` steps of the ``ddim:M`` chain are run. Envs
        without a previous plan (episode start, reset, ``carry=None``) run the full chain; with ``K = M`` every env
        does, which is exactly ``ddim:M`` (same noise draws)."""
        full = self.schedule.timesteps(SamplerSpec("ddim", spec.grid))
        x = torch.randn(shape, generator=generator, device=self.device) if noise is None else noise
        warm = torch.zeros(shape[0], dtype=torch.bool, device=x.device)
        if carry is not None and spec.steps < spec.grid:
            warm = carry["valid"]

        def warm_start(rows: Tensor) -> Tensor:
            prev = carry["prev"][rows]  # type: ignore[index]  # (b, Tp, Da): the last clean plan
            ta = self.action_horizon
            guess = torch.cat([prev[:, ta:], prev[:, -1:].expand(-1, ta, -1)], dim=1)
            t_k = torch.full((len(rows),), full[-spec.steps][0], device=x.device)
            z = torch.randn(guess.shape, generator=generator, device=x.device)
            c = cond[rows]
            return self.schedule.run_chain(lambda xx, t: self.eps(xx, t, c), self.schedule.q_sample(guess, t_k, z),
                                           full[-spec.steps:], False, 0.0)

        def cold_start(rows: Tensor) -> Tensor:
            c = cond[rows]
            return self.schedule.run_chain(lambda xx, t: self.eps(xx, t, c), x[rows], full, False, 0.0)

        seq = split_rows(warm, torch.empty_like(x), warm_start, cold_start)
        if carry is not None:
            carry["prev"] = seq
        return seq
