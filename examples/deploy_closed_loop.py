"""Run an exported policy in closed loop on its MuJoCo task, the way a robot would: through the deploy runtime.

    python examples/deploy_closed_loop.py EXPORT_DIR [--episodes 20] [--seed 0]

The policy side is only :class:`distillery.deploy.Runtime` (numpy + onnxruntime), fed one robot's observation per
control tick as numpy arrays. The simulator side uses torch (distillery.envs), so this process does load torch;
tests/test_deploy.py proves the runtime itself runs in a process where torch cannot be imported.

Prints the success rate and the per-tick latency of ``runtime.step``: p50 over all ticks, over the ticks that
re-planned (one graph call: the worst case a controller's deadline has to cover) and over the ticks served from the
action queue.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from distillery.deploy import Runtime


def run(export_dir: str, episodes: int, seed: int, threads: int = 1) -> dict[str, float]:
    import torch  # simulator side only

    from distillery.pipeline import env_from_config

    runtime = Runtime(export_dir, seed=seed, threads=threads)
    task = runtime.manifest.get("task")
    if not task or "max_episode_steps" not in task:
        raise SystemExit(f"{export_dir}: the manifest names no task config; export from a training checkpoint")
    env = env_from_config(task, num_envs=1, seed=seed)
    if runtime.control_dt is not None and abs(env.control_dt - runtime.control_dt) > 1e-9:
        raise SystemExit(f"the env steps every {env.control_dt} s but the policy was exported for "
                         f"{runtime.control_dt} s per tick")
    obs = env.reset(seed=seed)
    successes, tick_ms, plan_ms, queue_ms = [], [], [], []
    while len(successes) < episodes:
        observation = {k: obs[k][0].numpy() for k in runtime.obs_keys}  # one robot: no batch axis
        plans = runtime.counters["plans"]
        t0 = time.perf_counter()
        action = runtime.step(observation)
        elapsed = (time.perf_counter() - t0) * 1e3
        tick_ms.append(elapsed)
        (plan_ms if runtime.counters["plans"] > plans else queue_ms).append(elapsed)
        obs, _, terminated, truncated, info = env.step(torch.from_numpy(action)[None])
        if bool(terminated[0] | truncated[0]):  # the env auto-resets; the runtime starts a new episode too
            successes.append(bool(info["success"][0]))
            runtime.reset()
    env.close()
    result = {"episodes": episodes, "success_rate": float(np.mean(successes)), "ticks": len(tick_ms),
              "tick_ms_p50": float(np.median(tick_ms)), "plan_tick_ms_p50": float(np.median(plan_ms)),
              "queue_tick_ms_p50": float(np.median(queue_ms)) if queue_ms else float("nan"),
              "tick_ms_p99": float(np.percentile(tick_ms, 99)), "rejected": runtime.counters["rejected"],
              "clamped": runtime.counters["clamped"]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", help="directory written by `distillery export` (manifest.json + policy.onnx)")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = p.parse_args()
    r = run(args.export_dir, args.episodes, args.seed, args.threads)
    print(f"success {r['success_rate']:.3f} over {r['episodes']} episodes ({r['ticks']} ticks); runtime.step "
          f"latency p50 {r['tick_ms_p50']:.3f} ms (re-planning ticks {r['plan_tick_ms_p50']:.3f} ms, queued ticks "
          f"{r['queue_tick_ms_p50']:.3f} ms), p99 {r['tick_ms_p99']:.3f} ms; rejected {r['rejected']}, "
          f"clamped {r['clamped']}")


if __name__ == "__main__":
    main()
