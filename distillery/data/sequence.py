"""Fixed-horizon training windows over episodes, edge-padded as in Diffusion Policy.

Sample ``i`` corresponds to step ``t`` (global index ``i``) of its episode ``[s, e)``. Its window covers
steps ``t-To+1 .. t-To+Tp`` (inclusive); indices are clamped into ``[s, e-1]``, which repeats the first
step before the episode start and the last step after its end. Observations use the first ``To`` window
entries (the history ending at ``t``), actions all ``Tp``, so ``action[To-1]`` is the action executed at
``t``. Every step of every episode is a sample (Diffusion Policy's sampler with ``pad_before=To-1`` and
unbounded ``pad_after``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from distillery.data.episodes import EpisodeDataset


class SequenceDataset(Dataset):
    """Torch dataset of ``{"obs": {k: (To, *shape)}, "action": (Tp, Da)}`` float32 windows.

    All data lives in memory as tensors on ``device`` with a precomputed ``(N, Tp)`` step-index table, so
    ``__getitem__`` is one gather and :meth:`sample_batch` builds a whole ``(B, ...)`` batch in one
    vectorised gather (prefer it over a DataLoader, whose per-item collation dominates for small data).

    Args:
        dataset: the episodes.
        obs_keys: obs groups to include.
        obs_horizon: To >= 1. pred_horizon: Tp >= To.
        episode_weights: optional (E,) non-negative sampling weight per episode (e.g. by demo quality);
            each step of episode ``e`` is then drawn with probability proportional to ``weights[e]``.
        device: where the tensors live (``"cuda"`` makes :meth:`sample_batch` a pure GPU gather).
    """

    def __init__(self, dataset: EpisodeDataset, obs_keys: Sequence[str], obs_horizon: int, pred_horizon: int,
                 episode_weights: Sequence[float] | np.ndarray | None = None,
                 device: str | torch.device = "cpu") -> None:
        if isinstance(obs_keys, str):
            raise TypeError(f"obs_keys must be a list of obs group names, got the string {obs_keys!r}")
        obs_keys = list(obs_keys)
        missing = [k for k in obs_keys if k not in dataset.obs]
        if missing:
            raise KeyError(f"obs keys {missing} are not in dataset {dataset.path}; it has {sorted(dataset.obs)}")
        if int(obs_horizon) < 1:
            raise ValueError(f"obs_horizon must be >= 1, got {obs_horizon}")
        if int(pred_horizon) < int(obs_horizon):
            raise ValueError(f"pred_horizon ({pred_horizon}) must be >= obs_horizon ({obs_horizon}) so the window "
                             f"contains the action executed at the current step (index obs_horizon-1)")
        if dataset.num_steps == 0:
            raise ValueError(f"dataset {dataset.path} has no episodes; collect data first")
        self.dataset = dataset
        self.obs_keys = obs_keys
        self.obs_horizon, self.pred_horizon = int(obs_horizon), int(pred_horizon)
        self.device = torch.device(device)

        ends = dataset.episode_ends
        starts = dataset.episode_starts
        lengths = ends - starts
        # episode_index: (N,) episode of each step; window rows clamp into that episode's [start, end-1].
        self.episode_index = np.repeat(np.arange(dataset.num_episodes), lengths)
        t = np.arange(dataset.num_steps, dtype=np.int64)
        offsets = np.arange(self.pred_horizon, dtype=np.int64) - (self.obs_horizon - 1)
        lo = starts[self.episode_index][:, None]
        hi = (ends[self.episode_index] - 1)[:, None]
        index = np.clip(t[:, None] + offsets[None, :], lo, hi)  # (N, Tp)
        self.index_table = torch.from_numpy(index).to(self.device)
        self._obs = {k: torch.from_numpy(np.ascontiguousarray(dataset.obs[k])).to(self.device) for k in obs_keys}
        self._action = torch.from_numpy(np.ascontiguousarray(dataset.action)).to(self.device)

        self.sample_weights: torch.Tensor | None = None
        if episode_weights is not None:
            w = np.asarray(episode_weights, dtype=np.float64)
            if w.shape != (dataset.num_episodes,):
                raise ValueError(f"episode_weights must have shape ({dataset.num_episodes},) (one per episode), "
                                 f"got {w.shape}")
            if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError("episode_weights must be finite, non-negative and not all zero")
            self.sample_weights = torch.from_numpy(w[self.episode_index]).to(self.device)

    def __len__(self) -> int:
        return self.index_table.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        idx = self.index_table[i]
        return {"obs": {k: v[idx[: self.obs_horizon]].float() for k, v in self._obs.items()},
                "action": self._action[idx].float()}

    @staticmethod
    def balanced_episode_weights(dataset: EpisodeDataset) -> np.ndarray:
        """``episode_weights`` (E,) that make every episode equally likely: ``1 / length``. A mediocre demonstrator's
        failed episodes run to the time limit, so step-uniform sampling is dominated by them."""
        lengths = np.diff(np.concatenate([[0], np.asarray(dataset.episode_ends, np.int64)]))
        return 1.0 / np.maximum(lengths, 1)

    def sample_batch(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> dict[str, Any]:
        """Batch of samples ``indices`` (B,): ``{"obs": {k: (B, To, *shape)}, "action": (B, Tp, Da)}`` float32."""
        ind = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        if ind.ndim != 1:
            raise ValueError(f"indices must be 1-D (B,), got shape {tuple(ind.shape)}")
        rows = self.index_table[ind]  # (B, Tp)
        obs_rows = rows[:, : self.obs_horizon]
        return {"obs": {k: v[obs_rows].float() for k, v in self._obs.items()}, "action": self._action[rows].float()}

    def random_batch(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Draw ``batch_size`` samples with replacement (weighted by ``episode_weights`` if given)."""
        if self.sample_weights is not None:
            ind = torch.multinomial(self.sample_weights, batch_size, replacement=True, generator=generator)
        else:
            ind = torch.randint(len(self), (batch_size,), device=self.device, generator=generator)
        return self.sample_batch(ind)
