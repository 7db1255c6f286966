"""Evaluate policies in batched envs: success rate (95% CI), return, length, latency; ``report.json``.

``report.json`` follows DESIGN.md ("Results are data")::

    {"task": ..., "episodes": ..., "seed": ...,
     "results": [{"policy", "sampler", "success_rate", "success_ci95", "mean_return", "mean_length",
                  "latency_ms_p50", "params", "checkpoint"}, ...]}
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.envs import BatchedEnv
from distillery.policies import Policy, policy_from_description
from distillery.rollout import Episode, run_waves, summarize
from distillery.runtime import atomic_write_text, checkpoint_sha256, load_checkpoint, resolve_checkpoint

REPORT_FILE = "report.json"


class PolicyActor:
    """Adapts a policy's receding-horizon ``act`` to the rollout loop with a fixed sampler and noise stream."""

    def __init__(self, policy: Policy, sampler: str | None, seed: int = 0) -> None:
        self.policy, self.sampler = policy, sampler
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, obs: dict[str, torch.Tensor], active: torch.Tensor | None = None) -> torch.Tensor:
        return self.policy.act(obs, sampler=self.sampler, generator=self.generator, mask=active)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        self.policy.reset(mask)


def load_policy(path: str | Path) -> tuple[Policy, dict[str, Any]]:
    """Rebuild a policy from a checkpoint (run dir, ``checkpoints/last`` or a step dir); returns (policy, meta)."""
    ckpt = resolve_checkpoint(path)
    tensors, meta = load_checkpoint(ckpt)
    if meta.get("kind") == "ofql":
        raise ValueError(f"checkpoint {ckpt} is an OFQL agent's (`distillery train agent=ofql`), not a Policy: "
                         f"`distillery eval checkpoint=...` evaluates it; export and the pipeline stages take "
                         f"policies trained by bc, offline, ppo, sac or distill")
    if "policy" not in meta:
        raise ValueError(f"checkpoint {ckpt} has no policy description in meta.json; it was not written by "
                         f"`distillery train`")
    policy = policy_from_description(meta["policy"])
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    policy.load_state_dict(weights)
    policy.eval()
    meta["checkpoint_path"] = str(ckpt)
    meta["checkpoint_sha256"] = checkpoint_sha256(ckpt)
    return policy, meta


def evaluate_policy(policy: Policy, env: BatchedEnv, episodes: int, seed: int, sampler: str | None,
                    progress: Any = None, video_episodes: int = 0) -> tuple[dict[str, Any], list[Episode]]:
    """Success rate (with 95% CI), mean return and length over ``episodes`` seeded episodes."""
    policy.eval()
    return evaluate_actor(PolicyActor(policy, sampler, seed), env, episodes, seed, progress, video_episodes)


def evaluate_actor(actor: Any, env: BatchedEnv, episodes: int, seed: int, progress: Any = None,
                   video_episodes: int = 0) -> tuple[dict[str, Any], list[Episode]]:
    """:func:`evaluate_policy` for any rollout actor (``distillery.rollout.Actor``), e.g. an OFQL agent's."""
    played: list[Episode] = []
    for wave in run_waves(env, actor, episodes, seed, render_episodes=video_episodes):
        played.extend(wave)
        if progress is not None:
            progress.update(len(wave))
    return summarize(played), played


@torch.no_grad()
def measure_latency(policy: Policy, env: BatchedEnv, sampler: str | None, calls: int = 20,
                    warmup: int = 3) -> float:
    """Median wall time (ms) of one action-chunk prediction at batch 1 from a real observation.

    Warm-started samplers (``rti``, ``streaming``) keep their state across the calls, so after the first
    (cold) warm-up call the steady-state cost of one plan is what gets timed."""
    obs = env.reset(seed=0)
    history = {k: obs[k][:1].unsqueeze(1).repeat_interleave(policy.obs_horizon, 1) for k in policy.obs_keys}
    carry: dict[str, torch.Tensor] = {}
    return _median_ms(lambda: policy.predict_chunk(history, sampler, carry=carry), calls, warmup)


def _median_ms(call: Any, calls: int, warmup: int) -> float:
    """Median wall time (ms) of ``call()`` over ``calls`` timed calls after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + calls):
        t0 = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def load_ofql_actor(path: str | Path, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """An ``agent=ofql`` run's one-step policy as a rollout actor, and its checkpoint meta (``config`` holds the
    task it was trained on). Its one sampler is ``one_step``: one network call per action chunk."""
    from distillery.agents.ofql import OFQLActor, OFQLAgent

    ckpt = resolve_checkpoint(path)
    agent = OFQLAgent.from_checkpoint(ckpt)
    if "config" not in agent.meta:
        raise ValueError(f"OFQL checkpoint {ckpt} has no task config in its meta.json; evaluate runs trained with "
                         f"`distillery train agent=ofql`")
    da = agent.act_dim // int(agent.cfg["chunk"])
    meta = {**agent.meta, "checkpoint_path": str(ckpt), "checkpoint_sha256": checkpoint_sha256(ckpt),
            "params": sum(p.numel() for p in agent.actor.parameters())}
    return OFQLActor(agent, int(agent.cfg["chunk"]), da, seed=seed), meta


@torch.no_grad()
def measure_actor_latency(actor: Any, env: BatchedEnv, calls: int = 20, warmup: int = 3) -> float:
    """:func:`measure_latency` for an OFQL actor: median ms of one plan (one network call) at batch 1."""
    obs = env.reset(seed=0)[actor.obs_key][:1].float()
    return _median_ms(lambda: actor.agent.act(obs, actor.generator), calls, warmup)


def evaluate_deployed(export_dir: str | Path, episodes: int, seed: int, threads: int = 1) -> dict[str, Any]:
    """Closed loop on the export's task the way a robot runs it: one env, one observation per tick as numpy, the
    policy side only :class:`distillery.deploy.Runtime`. Returns a report row (``runtime = "onnx-runtime"``,
    latency = median tick that re-planned)."""
    from distillery.deploy import Runtime
    from distillery.pipeline import env_from_config

    runtime = Runtime(export_dir, seed=seed, threads=threads)
    task = runtime.manifest.get("task")
    if not task or "max_episode_steps" not in task:
        raise ValueError(f"{export_dir}: the manifest names no task config; export from a training checkpoint")
    env = env_from_config(task, 1, seed)
    if runtime.control_dt is not None and abs(env.control_dt - runtime.control_dt) > 1e-9:
        raise ValueError(f"the env steps every {env.control_dt} s but the policy was exported for "
                         f"{runtime.control_dt} s per tick")
    obs = env.reset(seed=seed)
    played: list[Episode] = []
    rewards: list[float] = []
    plan_ms: list[float] = []
    while len(played) < episodes:
        plans = runtime.counters["plans"]
        t0 = time.perf_counter()
        action = runtime.step({k: obs[k][0].numpy() for k in runtime.obs_keys})
        if runtime.counters["plans"] > plans:
            plan_ms.append((time.perf_counter() - t0) * 1e3)
        obs, reward, terminated, truncated, info = env.step(torch.from_numpy(action)[None])
        rewards.append(float(reward[0]))
        if bool(terminated[0] | truncated[0]):  # the env auto-resets; the runtime starts a new episode too
            n = len(rewards)
            played.append(Episode({}, np.zeros((n, 0)), np.array(rewards), np.eye(1, n, n - 1, dtype=bool)[0]
                                  & bool(terminated[0]), np.eye(1, n, n - 1, dtype=bool)[0] & bool(truncated[0])))
            rewards = []
            runtime.reset()
    env.close()
    m = runtime.manifest
    return {"policy": m["policy"]["name"], "sampler": m["sampler"], "runtime": "onnx-runtime", **summarize(played),
            "latency_ms_p50": float(np.median(plan_ms)), "params": m["policy"]["params"],
            "checkpoint": str(export_dir), "rejected": runtime.counters["rejected"],
            "clamped": runtime.counters["clamped"]}


def write_report(run_dir: str | Path, task: str, episodes: int, seed: int,
                 results: Sequence[Mapping[str, Any]]) -> Path:
    path = Path(run_dir) / REPORT_FILE
    report = {"task": task, "episodes": int(episodes), "seed": int(seed), "results": [dict(r) for r in results]}
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    return path


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Human-readable results table."""
    head = (f"{'policy':<12} {'sampler':<14} {'runtime':<12} {'episodes':>8} {'success':>8} {'95% CI':>13} "
            f"{'return':>8} {'length':>7} {'ms/chunk':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lo, hi = r["success_ci95"]
        lines.append(f"{r['policy']:<12} {r['sampler']:<14} {r.get('runtime', 'torch'):<12} {r['episodes']:>8} "
                     f"{r['success_rate']:>8.3f} {f'[{lo:.2f}, {hi:.2f}]':>13} {r['mean_return']:>8.2f} "
                     f"{r['mean_length']:>7.1f} {r['latency_ms_p50']:>9.2f}")
    return "\n".join(lines)


def save_video(frames: Sequence[np.ndarray], path: str | Path, fps: float) -> Path:
    """Write RGB frames (H, W, 3) uint8 as an animated GIF (Pillow; no ffmpeg needed)."""
    from PIL import Image

    path = Path(path)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
