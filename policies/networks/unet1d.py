"""Conditional 1-D temporal U-Net over an action chunk (Diffusion Policy, CNN variant; Chi et al. 2023, Sec. III-B).

Input ``x (B, Tp, Da)`` is treated as ``Da`` channels over ``Tp`` time steps. Every residual block is FiLM-conditioned
on ``cond = [step embedding, global obs feature]``. With ``L = len(down_dims)`` levels the sequence is halved
``L - 1`` times (Tp=16, 3 levels: 16 -> 8 -> 4), so ``Tp`` must be divisible by ``2 ** (L - 1)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "ConditionalUnet1D", "ConditionalResidualBlock1D", "Conv1dBlock", "SinusoidalPosEmb"]

# Mish is the paper's choice; SiLU is offered because Mish's CPU kernels are several times slower.
ACTIVATIONS: dict[str, type[nn.Module]] = {"mish": nn.Mish, "silu": nn.SiLU}


class SinusoidalPosEmb(nn.Module):
    """Transformer-style embedding of the (integer) diffusion step: ``(B,) -> (B, dim)``; ``(B, T) -> (B, T dim)``
    with ``flatten``."""

    def __init__(self, dim: int, flatten: bool = False) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"step embedding dim must be even and >= 4, got {dim}")
        self.dim = dim
        self.flatten = flatten  # (B, T) steps -> (B, T * dim), for per-position steps

    def forward(self, t: Tensor) -> Tensor:
        """``t (...)`` -> ``(..., dim)``."""
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        arg = t.float().unsqueeze(-1) * freqs
        emb = torch.cat([arg.sin(), arg.cos()], dim=-1)
        return emb.flatten(-2) if self.flatten else emb


class Conv1dBlock(nn.Sequential):
    """Conv1d (same padding) -> GroupNorm -> Mish. GroupNorm (not BatchNorm) so EMA weights stay valid."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int,
                 act: type[nn.Module] = nn.Mish) -> None:
        super().__init__(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(n_groups, c_out), act())


class ConditionalResidualBlock1D(nn.Module):
    """``x (B, C_in, T), cond (B, D) -> (B, C_out, T)``: two Conv1dBlocks, FiLM after the first, 1x1 residual."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int,
                 act: type[nn.Module] = nn.Mish) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Conv1dBlock(c_in, c_out, kernel_size, n_groups, act),
                                     Conv1dBlock(c_out, c_out, kernel_size, n_groups, act)])
        # FiLM: per-channel scale and bias predicted from the condition
        self.cond_encoder = nn.Sequential(act(), nn.Linear(cond_dim, 2 * c_out))
        self.residual = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.c_out = c_out

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.blocks[0](x)
        scale, bias = self.cond_encoder(cond).unflatten(-1, (2, self.c_out)).unsqueeze(-1).unbind(1)
        h = self.blocks[1](scale * h + bias)
        return h + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """eps_theta(x_t, k, obs_feature).

    Args:
        action_dim: ``Da`` (input/output channels).
        global_cond_dim: size of the observation feature concatenated to the step embedding.
        down_dims: channels per level; the paper's state config is (256, 512, 1024).
        step_embed_dim: ``d`` of the step encoder ``SinPosEmb(d) -> Linear(d, 4d) -> Mish -> Linear(4d, d)``.
        activation: ``"mish"`` (paper) or ``"silu"`` (faster on CPU), used everywhere in the network.
        step_positions: 0 for one diffusion step per sample (``timestep (B,)``); ``Tp`` for one step per position
            (``timestep (B, Tp)``, Streaming Diffusion Policy): the ``Tp`` sinusoidal embeddings are concatenated
            and the first Linear maps ``Tp d -> 4d``.
    """

    def __init__(self, action_dim: int, global_cond_dim: int, down_dims: Sequence[int] = (256, 512, 1024),
                 step_embed_dim: int = 256, kernel_size: int = 5, n_groups: int = 8,
                 activation: str = "mish", step_positions: int = 0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        act = ACTIVATIONS[activation]
        down_dims = [int(d) for d in down_dims]
        if not down_dims:
            raise ValueError("down_dims must list at least one level, e.g. [64, 128, 256]")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding keeps the length), got {kernel_size}")
        bad = [d for d in down_dims if d % n_groups]
        if bad:
            raise ValueError(f"every down_dims entry must be divisible by n_groups={n_groups}; offending: {bad}")
        self.action_dim, self.global_cond_dim, self.down_dims = int(action_dim), int(global_cond_dim), down_dims
        self.num_levels = len(down_dims)
        cond_dim = step_embed_dim + global_cond_dim
        block = lambda ci, co: ConditionalResidualBlock1D(ci, co, cond_dim, kernel_size, n_groups, act)  # noqa: E731

        d = step_embed_dim
        self.step_positions = int(step_positions)
        self.step_encoder = nn.Sequential(SinusoidalPosEmb(d, flatten=bool(step_positions)),
                                          nn.Linear(d * max(1, self.step_positions), 4 * d), act(),
                                          nn.Linear(4 * d, d))
        dims = [action_dim] + down_dims
        in_out = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        for i, (ci, co) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.down.append(nn.ModuleList([block(ci, co), block(co, co),
                                            nn.Conv1d(co, co, 3, stride=2, padding=1) if not last else nn.Identity()]))
        self.mid = nn.ModuleList([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])
        self.up = nn.ModuleList()
        # Each up level consumes the skip of one down level, deepest first, then doubles the length; the skip of
        # the shallowest level is never used, exactly as in Diffusion Policy (L-1 downsamples, L-1 upsamples).
        for ci, co in reversed(in_out[1:]):
            self.up.append(nn.ModuleList([block(2 * co, ci), block(ci, ci),
                                          nn.ConvTranspose1d(ci, ci, 4, stride=2, padding=1)]))
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups, act),
                                   nn.Conv1d(down_dims[0], action_dim, 1))

    def check_horizon(self, horizon: int) -> None:
        factor = 2 ** (self.num_levels - 1)
        if horizon % factor:
            raise ValueError(f"pred_horizon={horizon} is not divisible by 2**(len(down_dims)-1)={factor}: the U-Net "
                             f"halves the sequence {self.num_levels - 1} times. Use a pred_horizon that is a multiple "
                             f"of {factor} or fewer down_dims levels")

    def forward(self, x: Tensor, timestep: Tensor, global_cond: Tensor) -> Tensor:
        """``x (B, Tp, Da)``, ``timestep (B,)`` int, ``global_cond (B, global_cond_dim)`` -> ``eps (B, Tp, Da)``."""
        if x.dim() != 3 or x.shape[-1] != self.action_dim:
            raise ValueError(f"ConditionalUnet1D expects x of shape (B, Tp, {self.action_dim}), got {tuple(x.shape)}")
        if global_cond.shape != (x.shape[0], self.global_cond_dim):
            raise ValueError(f"global_cond must be ({x.shape[0]}, {self.global_cond_dim}), "
                             f"got {tuple(global_cond.shape)}")
        self.check_horizon(x.shape[1])
        timestep = timestep.expand(x.shape[0]) if timestep.dim() == 0 else timestep
        if self.step_positions:  # one level per position; a per-sample level applies to all of them
            timestep = timestep[:, None].expand(-1, x.shape[1]) if timestep.dim() == 1 else timestep
            if tuple(timestep.shape) != (x.shape[0], self.step_positions):
                raise ValueError(f"per-position timesteps must be (B, {self.step_positions}), got "
                                 f"{tuple(timestep.shape)}")
        cond = torch.cat([self.step_encoder(timestep), global_cond], dim=-1)
        h = x.transpose(1, 2)
        skips = []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, cond), cond)
            skips.append(h)
            h = downsample(h)
        for res in self.mid:
            h = res(h, cond)
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(res2(res1(h, cond), cond))
        return self.final(h).transpose(1, 2)
