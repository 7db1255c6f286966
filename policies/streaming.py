"""Streaming Diffusion Policy (SDP; Hoeg, Du, Egeland 2024): a rolling action buffer with per-position noise levels.

Buffer positions are grouped into ``h = (Tp - (To - 1)) // Ta`` chunks of ``Ta`` actions (positions before
``To - 1`` belong to chunk 0, the tail after the last whole chunk to the last one). With ``s = stream_steps``
denoising steps per observation the levels live on a grid of ``M = h s`` DDPM timesteps
``g[m] = round((m + 1) T / M) - 1`` (``g[M-1] = T - 1``; index -1 means clean). Around one plan:

    before:  chunk i at grid index (i + 1) s - 1     (chunk 0 one stride from clean, the last chunk pure noise)
    s steps: every position moves one grid index down per network call (a per-position DDIM step)
    after:   chunk i at index i s - 1                (chunk 0 clean: its Ta actions are executed)
    shift:   drop Ta actions, append Ta fresh N(0, I) actions at index M - 1, re-noise positions that arrive
             cleaner than their chunk's "before" level (the first To - 1 ones) -> "before" of the next plan

So each observation costs ``s`` network calls instead of a full chain. Training (Eq. of SDP): epsilon-prediction
with per-position levels, chunk-wise ``(i + 1) s - 1 - j`` with a random offset ``j ~ U{0..s-1}`` (covers every
buffer state met at inference), or w.p. ``constant_level_prob`` one level ``k ~ U{0..T-1}`` for all positions
(which also makes plain ``ddim:K``/``ddpm`` sampling valid, used to fill the buffer at an episode start).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.policies.diffusion import DiffusionPolicy, split_rows
from distillery.policies.schedule import SamplerSpec, _bad_sampler, register_sampler_kind
from distillery.specs import ObservationSpec, TensorSpec

__all__ = ["StreamingPolicy"]


def _parse_streaming(text: str, args: str, num_train_steps: int) -> SamplerSpec:
    if args:
        raise _bad_sampler(text, "'streaming' takes no arguments (steps per observation are policy.stream_steps)")
    return SamplerSpec("streaming", 0, 0.0, text)


register_sampler_kind("streaming", "'streaming' (Streaming Diffusion Policy buffer)", _parse_streaming)


class StreamingPolicy(DiffusionPolicy):
    name: ClassVar[str] = "streaming"
    SAMPLER_KINDS: ClassVar[tuple[str, ...]] = ("streaming", "ddim", "ddpm")
    EVAL_SAMPLERS: ClassVar[tuple[str, ...]] = ("streaming",)
    PER_POSITION_STEPS: ClassVar[bool] = True
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **DiffusionPolicy.DEFAULTS,
        "sampler": "streaming",
        "stream_steps": 2,            # s: network calls per observation
        "constant_level_prob": 0.2,   # SDP's share of constant-level training samples
    }

    grid: Tensor
    chunk_of: Tensor

    def __init__(self, obs_spec: ObservationSpec, action_spec: TensorSpec, cfg: Mapping[str, Any] | None = None):
        super().__init__(obs_spec, action_spec, cfg)
        to, tp, ta = self.obs_horizon, self.pred_horizon, self.action_horizon
        self.num_chunks = (tp - (to - 1)) // ta
        self.stream_steps = int(self.cfg["stream_steps"])
        self.constant_level_prob = float(self.cfg["constant_level_prob"])
        if self.stream_steps < 1:
            raise ValueError(f"stream_steps must be >= 1, got {self.stream_steps}")
        if not 0.0 <= self.constant_level_prob <= 1.0:
            raise ValueError(f"constant_level_prob must be in [0, 1], got {self.constant_level_prob}")
        levels = self.num_chunks * self.stream_steps
        t = self.schedule.num_train_steps
        if levels > t:
            raise ValueError(f"{self.num_chunks} chunks x stream_steps {self.stream_steps} = {levels} noise levels "
                             f"exceed the {t} train steps; lower stream_steps or raise action_horizon")
        grid = torch.tensor([round((m + 1) * t / levels) - 1 for m in range(levels)], dtype=torch.long)
        pos = torch.arange(tp)
        chunk_of = ((pos - (to - 1)).clamp(min=0) // ta).clamp(max=self.num_chunks - 1)
        self.register_buffer("grid", grid, persistent=False)
        self.register_buffer("chunk_of", chunk_of, persistent=False)

    # -- levels ---------------------------------------------------------------------------------------------
    def level_index(self, stage: str) -> Tensor:
        """Grid index per buffer position ``(Tp,)`` ``before`` or ``after`` a plan (-1 = clean)."""
        s = self.stream_steps
        if stage == "before":
            return (self.chunk_of + 1) * s - 1
        if stage == "after":
            return self.chunk_of * s - 1
        raise ValueError(f"stage must be 'before' or 'after', got {stage!r}")

    def timestep_of(self, index: Tensor) -> Tensor:
        """DDPM timestep of grid indices (index -1 -> timestep -1, clean)."""
        return torch.where(index >= 0, self.grid[index.clamp(min=0)], torch.full_like(index, -1))

    # -- training -------------------------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        nobs, a0 = self.normalized_batch(batch)
        cond = self.encode_obs(nobs)
        b = a0.shape[0]
        offset = torch.randint(0, self.stream_steps, (b, 1), device=a0.device)
        chunkwise = self.grid[self.level_index("before")[None, :] - offset]                    # (B, Tp)
        constant = torch.randint(0, self.schedule.num_train_steps, (b, 1), device=a0.device).expand_as(chunkwise)
        use_constant = torch.rand(b, 1, device=a0.device) < self.constant_level_prob
        t = torch.where(use_constant, constant, chunkwise)
        noise = torch.randn_like(a0)
        loss = F.mse_loss(self.eps(self.schedule.q_sample(a0, t, noise), t, cond), noise)
        return loss, {"loss": float(loss.detach())}

    # -- sampling -------------------------------------------------------------------------------------------
    def sample_normalized(self, nobs: Mapping[str, Tensor], sampler: str | None,
                          generator: torch.Generator | None, noise: Tensor | None = None,
                          carry: dict[str, Tensor] | None = None) -> Tensor:
        spec = self.default_sampler if sampler is None else self.parse_sampler(sampler)
        if spec.kind != "streaming":
            return super().sample_normalized(nobs, sampler, generator, noise)
        cond = self.encode_obs(nobs)
        shape = (cond.shape[0], self.pred_horizon, self.action_dim)
        x = torch.randn(shape, generator=generator, device=cond.device) if noise is None else noise
        warm = carry["valid"] if carry is not None else torch.zeros(shape[0], dtype=torch.bool, device=x.device)
        seq = split_rows(
            warm, torch.empty_like(x),
            lambda rows: self.stream_denoise(self.shift(carry["buffer"][rows], generator),  # type: ignore[index]
                                             cond[rows]),
            lambda rows: self.fill(x[rows], cond[rows], generator))
        if carry is not None:
            carry["buffer"] = seq
        return seq

    def shift(self, buffer: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """An "after" buffer -> the next plan's "before" buffer: drop ``Ta`` executed actions, append fresh noise,
        re-noise positions that are cleaner than their new chunk's level (``q(x_to | x_from)`` of the forward chain)."""
        ta = self.action_horizon
        fresh = torch.randn(buffer[:, :ta].shape, generator=generator, device=buffer.device)
        x = torch.cat([buffer[:, ta:], fresh], dim=1)
        last = torch.full((ta,), len(self.grid) - 1, device=buffer.device)
        current = torch.cat([self.level_index("after")[ta:], last])
        target = self.level_index("before")
        ab_from = self.schedule.alpha_bar(self.timestep_of(current), 2)[None]     # (1, Tp, 1)
        ab_to = self.schedule.alpha_bar(self.timestep_of(target), 2)[None]
        ratio = ab_to / ab_from
        z = torch.randn(x.shape, generator=generator, device=x.device)
        renoised = ratio.sqrt() * x + (1.0 - ratio).clamp(min=0).sqrt() * z
        return torch.where((current < target)[None, :, None], renoised, x)

    def stream_denoise(self, buffer: Tensor, cond: Tensor) -> Tensor:
        """``s`` per-position DDIM steps: a "before" buffer -> an "after" buffer (chunk 0 clean)."""
        index = self.level_index("before").expand(buffer.shape[0], -1)
        x = buffer
        for _ in range(self.stream_steps):
            t, t_prev = self.timestep_of(index), self.timestep_of(index - 1)
            x, _, _ = self.schedule.ddim_step(x, self.eps(x, t, cond), t, t_prev, eta=0.0)
            index = index - 1
        return x

    def fill(self, noise: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Episode start: a clean chunk from the full ``M``-level chain (constant levels), noised to "after" levels."""
        grid = self.grid.tolist()
        steps = [(grid[m], grid[m - 1] if m > 0 else -1) for m in range(len(grid) - 1, -1, -1)]
        x0 = self.schedule.run_chain(lambda x, t: self.eps(x, t, cond), noise, steps, False, 0.0)
        t_after = self.timestep_of(self.level_index("after")).expand(noise.shape[0], -1)
        z = torch.randn(noise.shape, generator=generator, device=noise.device)
        return self.schedule.q_sample(x0, t_after, z)
