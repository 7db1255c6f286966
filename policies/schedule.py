"""DDPM noise schedule, the one shared denoising-step implementation, and sampler strings.

Notation (Ho et al. 2020; Song et al. 2021): ``T`` train steps, ``alpha_bar[t] = prod_{s<=t} (1 - beta_s)``,
``t = -1`` means "clean" with ``alpha_bar[-1] = 1`` (diffusers' ``set_alpha_to_one`` convention).

Every sampler is a chain of :meth:`NoiseSchedule.ddim_step` (or :meth:`NoiseSchedule.ddpm_step`, the textbook
posterior, kept separate so tests can check that DDIM with ``eta=1`` reproduces it). Steps return
``(x_prev, mean, std)`` so RL code can evaluate per-step Gaussian log-probs ``N(x_prev; mean, std^2)`` without
re-deriving the math.

Sampler strings:
    ``"ddpm"``               all ``T`` ancestral steps with the posterior variance ("fixed_small")
    ``"ddim:K"``             ``K`` evenly spaced steps (``t = (K-1)r, ..., r, 0`` with ``r = T // K``), eta from config
    ``"ddim:K:eta=E"``       same with an explicit eta (``E = 1`` and ``K = T`` equals ``"ddpm"``)
    ``"rti:K[:of=M]"``       RTI-DP warm start: previous plan shifted, re-noised, last ``K`` steps of ``ddim:M``
Further kinds (``consistency:N``, ``streaming[:S]``) register themselves with :func:`register_sampler_kind`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "NoiseSchedule", "SamplerSpec", "parse_sampler", "register_sampler_kind", "sampler_forms",
    "squaredcos_cap_v2_betas",
]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
"""``eps_theta(x_t (B, Tp, Da), t (B,) long) -> eps (B, Tp, Da)``."""


def squaredcos_cap_v2_betas(num_steps: int, max_beta: float = 0.999) -> Tensor:
    """iDDPM cosine schedule (Nichol & Dhariwal 2021), float64 ``(T,)``.

    ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2`` on ``s in [0, 1]``;
    ``beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta)``. The cap avoids ``beta = 1`` at the end,
    where ``alpha_bar(1) = 0``.
    """
    s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


# --------------------------------------------------------------------------------------------- sampler strings

@dataclass(frozen=True)
class SamplerSpec:
    """Parsed sampler string. ``steps`` is the number of network evaluations; ``eta=None`` = policy default."""

    kind: str
    steps: int
    eta: float | None = None
    text: str = ""
    grid: int = 0  # rti: size M of the ddim:M chain whose last `steps` steps are run


# kind -> (human-readable form, parser(rest_of_string, num_train_steps) -> SamplerSpec)
_SAMPLER_KINDS: dict[str, tuple[str, Callable[[str, str, int], SamplerSpec]]] = {}


def register_sampler_kind(kind: str, form: str, parser: Callable[[str, str, int], SamplerSpec]) -> None:
    """Add a sampler kind: ``parser(text, args_after_colon, num_train_steps) -> SamplerSpec`` (raise ValueError)."""
    _SAMPLER_KINDS[kind] = (form, parser)


def sampler_forms() -> list[str]:
    return [form for form, _ in _SAMPLER_KINDS.values()]


def _bad_sampler(text: str, why: str) -> ValueError:
    return ValueError(f"invalid sampler {text!r}: {why}. Valid forms: {', '.join(sampler_forms())}")


def _parse_ddpm(text: str, args: str, num_train_steps: int) -> SamplerSpec:
    if args:
        raise _bad_sampler(text, "'ddpm' takes no arguments (it always runs all train steps)")
    return SamplerSpec("ddpm", num_train_steps, 1.0, text)


_DDIM_RE = re.compile(r"^(\d+)(?::eta=([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?))?$")


def _parse_ddim(text: str, args: str, num_train_steps: int) -> SamplerSpec:
    m = _DDIM_RE.match(args)
    if m is None:
        raise _bad_sampler(text, "expected 'ddim:K' or 'ddim:K:eta=E' with integer K and float E >= 0")
    steps = int(m.group(1))
    if not 1 <= steps <= num_train_steps:
        raise _bad_sampler(text, f"K must be in [1, {num_train_steps}] (the number of train steps)")
    eta = float(m.group(2)) if m.group(2) is not None else None
    return SamplerSpec("ddim", steps, eta, text)


_RTI_RE = re.compile(r"^(\d+)(?::of=(\d+))?$")


def _parse_rti(text: str, args: str, num_train_steps: int) -> SamplerSpec:
    m = _RTI_RE.match(args)
    if m is None:
        raise _bad_sampler(text, "expected 'rti:K' or 'rti:K:of=M' with integers 1 <= K <= M")
    steps, grid = int(m.group(1)), int(m.group(2) or 10)
    if not 1 <= grid <= num_train_steps or not 1 <= steps <= grid:
        raise _bad_sampler(text, f"need 1 <= K <= M <= {num_train_steps} (K warm steps of the ddim:M chain)")
    return SamplerSpec("rti", steps, 0.0, text, grid)


register_sampler_kind("ddpm", "'ddpm'", _parse_ddpm)
register_sampler_kind("ddim", "'ddim:K' or 'ddim:K:eta=E' (1 <= K <= train steps)", _parse_ddim)
register_sampler_kind("rti", "'rti:K' or 'rti:K:of=M' (warm start: last K of the ddim:M steps, M = 10 by default)",
                      _parse_rti)


def parse_sampler(text: str, num_train_steps: int) -> SamplerSpec:
    """Parse ``"ddpm"``, ``"ddim:10"``, ``"ddim:10:eta=1.0"``, ... ; ValueError listing valid forms otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"sampler must be a string such as 'ddim:10', got {type(text).__name__}")
    kind, _, args = text.strip().partition(":")
    if kind not in _SAMPLER_KINDS:
        raise _bad_sampler(text, f"unknown kind {kind!r}")
    return _SAMPLER_KINDS[kind][1](text, args, num_train_steps)


# --------------------------------------------------------------------------------------------- schedule
def _gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, positions: slice | None = None) -> Tensor:
    """``log N(x; mean, diag(std^2))`` of ``(B, Tp, Da)`` tensors summed over chunk positions ``positions`` (all if
    None) and action dims -> ``(B,)``."""
    z = (x - mean) / std
    per_dim = -0.5 * z.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)
    if positions is not None:
        per_dim = per_dim[:, positions]
    return per_dim.flatten(1).sum(1)


class NoiseSchedule(nn.Module):
    """Discrete DDPM schedule with epsilon prediction, fixed_small variance and optional x0 clipping.

    Schedule tensors are non-persistent buffers: they follow ``.to(device)`` but are rebuilt from the config
    rather than stored in checkpoints.
    """

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor

    def __init__(self, num_train_steps: int = 100, clip_sample: bool = True, clip_range: float = 1.0,
                 beta_schedule: str = "squaredcos_cap_v2") -> None:
        super().__init__()
        if num_train_steps < 1:
            raise ValueError(f"num_train_steps must be >= 1, got {num_train_steps}")
        if beta_schedule != "squaredcos_cap_v2":
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; only 'squaredcos_cap_v2' is implemented")
        self.num_train_steps = int(num_train_steps)
        self.clip_sample = bool(clip_sample)
        self.clip_range = float(clip_range)
        betas = squaredcos_cap_v2_betas(self.num_train_steps)
        alphas = 1.0 - betas
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas", alphas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(alphas, 0).float(), persistent=False)

    # -- helpers ------------------------------------------------------------------------------------------
    def alpha_bar(self, t: Tensor | int, ndim: int) -> Tensor:
        """``alpha_bar[t]`` for int or ``(B,)`` long ``t`` (``t < 0`` -> 1), shaped to broadcast over ``ndim``."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device, dtype=torch.long)
        ab = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), device=t.device))
        return ab.reshape(ab.shape + (1,) * (ndim - ab.dim()))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``; ``x0, noise (B, ...)``, ``t (B,)``."""
        ab = self.alpha_bar(t, x0.dim())
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def predict_x0(self, x_t: Tensor, eps: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """``x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``, clipped if configured.

        Returns ``(x0_hat, eps_hat)`` where ``eps_hat`` is re-derived from the clipped ``x0_hat`` so the pair stays
        consistent with ``x_t`` (diffusers' ``use_clipped_model_output``); without this DDIM with ``eta = 1`` would
        not equal the DDPM posterior whenever clipping is active.
        """
        ab = self.alpha_bar(t, x_t.dim())
        x0 = (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()
        if not self.clip_sample:
            return x0, eps
        x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0, (x_t - ab.sqrt() * x0) / (1.0 - ab).sqrt()

    # -- the step math (shared by every sampler) ----------------------------------------------------------
    def ddim_step(self, x_t: Tensor, eps: Tensor, t: Tensor | int, t_prev: Tensor | int, eta: float,
                  noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Generalised DDIM step ``t -> t_prev`` (Song et al. 2021, Eq. 12); ``t_prev = -1`` ends at x0.

            sigma^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)
            mean    = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat
            x_prev  = mean + sigma * noise

        ``x_t, eps, noise (B, Tp, Da)``; ``t, t_prev`` int or ``(B,)``. Returns ``(x_prev, mean, std)`` with
        ``std`` broadcastable to ``x_t``. ``noise=None`` means deterministic (``x_prev = mean``).
        """
        if eta < 0:
            raise ValueError(f"DDIM eta must be >= 0, got {eta}")
        ab_t = self.alpha_bar(t, x_t.dim())
        ab_prev = self.alpha_bar(t_prev, x_t.dim())
        x0, eps = self.predict_x0(x_t, eps, t)
        var = eta**2 * (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
        std = var.clamp(min=0.0).sqrt()
        mean = ab_prev.sqrt() * x0 + (1.0 - ab_prev - var).clamp(min=0.0).sqrt() * eps
        x_prev = mean if noise is None else mean + std * noise
        return x_prev, mean, std

    def ddpm_step(self, x_t: Tensor, eps: Tensor, t: Tensor | int,
                  noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Ancestral DDPM step ``t -> t-1`` with the true posterior ``q(x_{t-1} | x_t, x0_hat)`` (Ho et al. Eq. 7).

            mean = sqrt(ab_prev) beta_t / (1 - ab_t) x0_hat + sqrt(alpha_t) (1 - ab_prev) / (1 - ab_t) x_t
            var  = (1 - ab_prev) / (1 - ab_t) beta_t          ("fixed_small")
        """
        t = torch.as_tensor(t, device=self.betas.device, dtype=torch.long)
        ab_t = self.alpha_bar(t, x_t.dim())
        ab_prev = self.alpha_bar(t - 1, x_t.dim())
        beta_t = 1.0 - ab_t / ab_prev
        x0, _ = self.predict_x0(x_t, eps, t)
        mean = (ab_prev.sqrt() * beta_t / (1.0 - ab_t)) * x0 + ((1.0 - beta_t).sqrt() * (1.0 - ab_prev)
                                                                / (1.0 - ab_t)) * x_t
        std = ((1.0 - ab_prev) / (1.0 - ab_t) * beta_t).clamp(min=0.0).sqrt()
        x_prev = mean if noise is None else mean + std * noise
        return x_prev, mean, std

    # -- samplers ---------------------------------------------------------------------------------------
    def timesteps(self, spec: SamplerSpec) -> list[tuple[int, int]]:
        """``[(t, t_prev), ...]`` from noisiest to clean for ``ddpm`` / ``ddim`` ("leading" spacing, offset 0)."""
        if spec.kind == "ddpm":
            return [(t, t - 1) for t in range(self.num_train_steps - 1, -1, -1)]
        if spec.kind == "ddim":
            ratio = self.num_train_steps // spec.steps
            ts = [k * ratio for k in range(spec.steps - 1, -1, -1)]
            return [(t, t - ratio) for t in ts]
        raise ValueError(f"NoiseSchedule has no timesteps for sampler kind {spec.kind!r}")

    def sample(self, eps_fn: DenoiseFn, shape: tuple[int, ...], spec: SamplerSpec, default_eta: float = 0.0,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               x_T: Tensor | None = None, step_noise: Tensor | None = None) -> Tensor:
        """Run the reverse chain from ``x_T ~ N(0, I)`` of ``shape = (B, Tp, Da)`` (or the given ``x_T``) to ``x_0``.

        Randomness order (kept fixed so samplers are comparable under one generator): ``x_T`` first, then one
        ``N(0, I)`` draw per step for stochastic steps (``ddpm``, ``ddim`` with ``eta > 0``), none when ``eta = 0``.
        ``step_noise`` (shape of ``x``), if given, is every stochastic step's noise instead of those draws.
        """
        x = torch.randn(shape, generator=generator, device=self.betas.device, dtype=dtype) if x_T is None else x_T
        eta = spec.eta if spec.eta is not None else default_eta
        return self.run_chain(eps_fn, x, self.timesteps(spec), spec.kind == "ddpm", eta, generator, step_noise)

    def sample_chain(self, eps_fn: DenoiseFn, x_T: Tensor, steps: list[tuple[int, int]], eta: float,
                     std_min: float = 0.0, generator: torch.Generator | None = None,
                     logprob_std_min: float | None = None, positions: slice | None = None,
                     noise_clip: float | None = None) -> tuple[Tensor, Tensor]:
        """DDIM(eta) sampling recorded as a chain of Gaussian policies (DPPO / RL-100's denoising MDP).

        Each step draws ``x_prev = mean + max(std, std_min) * z`` with ``z ~ N(0, I)`` (clipped to ``+-noise_clip``
        if given, DPPO's ``randn_clip_value``). Returns ``(chain (B, K+1, Tp, Da), log_prob (B, K))``: ``chain[:, 0] =
        x_T``, ``chain[:, -1]`` the sample, ``log_prob[:, k]`` the log-density of step ``k`` under std floor
        ``logprob_std_min`` (default ``std_min``; DPPO floors sampling and likelihood separately), summed over the
        chunk ``positions`` (all if None) and action dims. A floor > 0 keeps the last step (``std = 0``) defined.
        """
        lp_min = std_min if logprob_std_min is None else logprob_std_min
        chain, log_probs, x = [x_T], [], x_T
        for t, t_prev in steps:
            _, mean, std = self.ddim_step(x, eps_fn(x, torch.full((x.shape[0],), t, device=x.device)), t, t_prev,
                                          eta)
            z = torch.randn(mean.shape, generator=generator, device=x.device, dtype=x.dtype)
            if noise_clip is not None:
                z = z.clamp(-noise_clip, noise_clip)
            x = mean + std.clamp(min=std_min).expand_as(mean) * z
            chain.append(x)
            log_probs.append(_gaussian_log_prob(x, mean, std.clamp(min=lp_min).expand_as(mean), positions))
        return torch.stack(chain, 1), torch.stack(log_probs, 1)

    def chain_log_prob(self, eps_fn: DenoiseFn, chain: Tensor, steps: list[tuple[int, int]], eta: float,
                       std_min: float = 0.0, positions: slice | None = None) -> Tensor:
        """Log-probabilities ``(B, K)`` of a recorded ``chain (B, K+1, Tp, Da)`` under the current ``eps_fn`` (the
        PPO ratio's numerator); equals :meth:`sample_chain`'s ``log_prob`` (same ``logprob_std_min`` and
        ``positions``) for the network that sampled it. All K steps go through the network as one batch: ``eps_fn`` gets
        ``B*K`` rows ordered ``(b, k)``, so per-row conditioning must be repeated with ``repeat_interleave(K, 0)``."""
        b, k = chain.shape[0], len(steps)
        x = chain[:, :k].flatten(0, 1)                                            # (B*K, Tp, Da), row = (b, k)
        t = torch.tensor([s[0] for s in steps], device=chain.device).repeat(b)
        t_prev = torch.tensor([s[1] for s in steps], device=chain.device).repeat(b)
        _, mean, std = self.ddim_step(x, eps_fn(x, t), t, t_prev, eta)
        lp = _gaussian_log_prob(chain[:, 1:].flatten(0, 1), mean, std.clamp(min=std_min).expand_as(mean), positions)
        return lp.view(b, k)

    def run_chain(self, eps_fn: DenoiseFn, x: Tensor, steps: list[tuple[int, int]], ddpm: bool, eta: float,
                  generator: torch.Generator | None = None, step_noise: Tensor | None = None) -> Tensor:
        """Denoise ``x`` along ``steps = [(t, t_prev), ...]`` with DDPM posterior steps or DDIM(eta) steps; the
        stochastic steps draw fresh noise, or all use ``step_noise`` if given."""
        stochastic = ddpm or eta > 0
        for t, t_prev in steps:
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps = eps_fn(x, t_batch)
            noise = None
            if stochastic:
                noise = step_noise if step_noise is not None else torch.randn(
                    x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if ddpm:
                x, _, _ = self.ddpm_step(x, eps, t, noise)
            else:
                x, _, _ = self.ddim_step(x, eps, t, t_prev, eta, noise)
        return x
