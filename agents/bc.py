"""Imitation learning (behaviour cloning) for any :class:`~distillery.policies.Policy`.

The update is the policy's own ``loss`` on dataset windows ``{"obs": (B, To, ...), "action": (B, Tp, Da)}``
with Diffusion Policy's optimisation recipe: AdamW, linear warm-up then cosine decay of the learning
rate, gradient clipping, and an EMA of the weights that is what gets evaluated and exported.

Resume is exact: a checkpoint holds the weights, the EMA, the optimiser and scheduler states, every
RNG the loop draws from, and the step; continuing from it reproduces the uninterrupted loss curve.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.agents.grad_steps import MetricMeans
from distillery.data import SequenceDataset
from distillery.policies import EMA, Policy
from distillery.runtime import flatten_state, load_checkpoint, save_run_checkpoint, unflatten_state

CHECKPOINT_KIND = "policy"


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear 0 -> 1 over ``warmup_steps``, then cosine 1 -> 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


class BCAgent:
    """Trains ``policy`` on ``data`` for ``cfg.steps`` optimiser steps.

    Args:
        cfg: the ``agent`` config section (see ``configs/agent/bc.yaml``).
        policy: the policy to train (its normaliser is fitted here from the dataset if not yet fitted).
        data: training windows.
        run_dir: checkpoints go to ``run_dir/checkpoints/step_*/`` with ``last`` pointing at the newest.
        logger: a :class:`~distillery.runtime.logging.Logger` (or anything with ``log(metrics, step)``).
        seed: seeds the batch-sampling and noise RNGs.
        evaluate: optional ``f(policy) -> metrics`` run every ``cfg.eval_every`` steps on the EMA weights.
        meta: extra JSON metadata stored in every checkpoint (task, dataset, config).
    """

    def __init__(self, cfg: Mapping[str, Any], policy: Policy, data: SequenceDataset, run_dir: str | Path,
                 logger: Any, seed: int = 0, evaluate: Callable[[Policy], dict[str, float]] | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.policy = policy
        self.data = data
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.evaluate = evaluate
        self.meta = dict(meta or {})
        self.total_steps = int(cfg["steps"])
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=float(cfg["lr"]), betas=tuple(cfg["betas"]),
                                           weight_decay=float(cfg["weight_decay"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(int(cfg["warmup_steps"]), self.total_steps))
        self.ema = EMA(policy, power=float(cfg["ema_power"]), max_decay=float(cfg["ema_max_decay"])) \
            if cfg["ema"] else None
        self.generator = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))  # the policy's loss draws its noise from the global RNG
        self.step = 0

    # ------------------------------------------------------------------------------------------ training
    def train(self) -> dict[str, float]:
        """Run until ``cfg.steps``; returns the last logged metrics."""
        cfg = self.cfg
        self.policy.train()
        metrics: dict[str, float] = {}
        means = MetricMeans()
        bar = self.logger.progress(self.total_steps, desc="train")
        bar.update(self.step)
        t0 = time.perf_counter()
        while self.step < self.total_steps:
            batch = self.data.random_batch(int(cfg["batch_size"]), generator=self.generator)
            loss, m = self.compute_loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), float(cfg["grad_clip"]))
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.policy, self.step)
            self.after_step()
            means.add({**m, "grad_norm": float(grad_norm)})
            bar.update(1)
            if self.step % int(cfg["log_every"]) == 0 or self.step == self.total_steps:
                steps_per_s = means.updates / (time.perf_counter() - t0)
                metrics = means.pop("train/")
                metrics["train/lr"] = self.scheduler.get_last_lr()[0]
                metrics["train/steps_per_s"] = steps_per_s
                self.logger.log(metrics, self.step)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                t0 = time.perf_counter()
            if self.evaluate is not None and cfg["eval_every"] and self.step % int(cfg["eval_every"]) == 0:
                with self.eval_weights():
                    self.logger.log({f"eval/{k}": v for k, v in self.evaluate(self.policy).items()}, self.step)
                self.policy.train()
            if self.step % int(cfg["checkpoint_every"]) == 0 or self.step == self.total_steps:
                self.save()
        bar.close()
        return metrics

    # ------------------------------------------------------------------------------------------ hooks
    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective of one batch; imitation uses the policy's own loss. Variants (distillation) override."""
        return self.policy.loss(batch)

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. to move a target network)."""

    def extra_state(self) -> dict[str, Any]:
        """Further training state a variant must checkpoint for an exact resume (tensors, nested dicts)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def eval_weights(self):
        """Context manager: the EMA weights (if any) loaded into the policy, in eval mode."""
        self.policy.eval()
        if self.ema is None:
            from contextlib import nullcontext
            return nullcontext(self.policy)
        return self.ema.applied_to(self.policy)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write ``checkpoints/step_<N>/`` atomically and point ``checkpoints/last`` at it.

        ``model.*`` holds the weights to deploy (the EMA if enabled); ``train.*`` the rest of the state.
        """
        tensors: dict[str, torch.Tensor] = {}
        deploy = self.ema.state_dict() if self.ema is not None else self.policy.state_dict()
        tensors.update({f"model.{k}": v for k, v in deploy.items()})
        train_state = {
            "online": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                    "numpy": np.random.get_state()},
            "extra": self.extra_state(),
        }
        flat, skeleton = flatten_state(train_state, prefix="train.")
        tensors.update(flat)
        meta = {**self.meta, "kind": CHECKPOINT_KIND, "step": self.step, "policy": self.policy.describe(),
                "train_state": skeleton}
        return save_run_checkpoint(self.run_dir, self.step, tensors, meta)

    def load(self, path: str | Path) -> None:
        """Restore everything :meth:`save` wrote, to continue training exactly."""
        tensors, meta = load_checkpoint(path)
        if "train_state" not in meta:
            raise ValueError(f"checkpoint {path} holds no training state (it was exported for inference); "
                             f"resume from a checkpoint written by `distillery train`")
        state = unflatten_state(tensors, meta["train_state"])
        self.policy.load_state_dict(state["online"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        np.random.set_state(state["rng"]["numpy"])
        self.load_extra_state(state.get("extra", {}))
        self.step = int(meta["step"])
