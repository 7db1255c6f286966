"""Env-steps/s of BatchedEnv (push_cube) beside raw ``mujoco.batch.Batch`` stepping of the same model.

"ours" runs the full ``BatchedEnv.step``: action validation and clipping, decimated physics, observations
(state + privileged), reward, success, time limits and auto-reset, with random actions from a pre-drawn pool.
"raw" writes pre-drawn controls into the same Batch layout and calls ``Batch.step(nstep=decimation)``: the
physics alone, with the same model, decimation and thread count. ratio = ours / raw.

    python benchmarks/env_throughput.py --seconds 2 --json results/env_throughput.json

Each measurement warms up first; ours and raw alternate over ``--repeats`` rounds and the median is kept, so
background load affects both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import mujoco
import mujoco.batch
import torch

from distillery.envs import make_env


def _rate(step_fn, num_envs: int, seconds: float) -> float:
    """Env-steps/s of ``step_fn`` over about ``seconds`` (after a short warm-up)."""
    for _ in range(5):
        step_fn()
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(10):
            step_fn()
        calls += 10
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * num_envs / elapsed


def bench(task: str, num_envs: int, seconds: float, repeats: int) -> dict[str, float | int | str]:
    env = make_env(task, num_envs, seed=0)
    env.reset()
    g = torch.Generator().manual_seed(0)
    pool = [torch.rand(num_envs, env.task.act_dim, generator=g) * 2 - 1 for _ in range(32)]
    it = {"i": 0}

    def ours() -> None:
        it["i"] = (it["i"] + 1) % len(pool)
        env.step(pool[it["i"]])

    raw_batch = mujoco.batch.Batch(env.backend.model, num_envs, env.backend.nthread)
    raw_ctrl = raw_batch.bind("ctrl")
    ctrl_pool = [env.task.action_to_ctrl(a, env.backend.state).numpy() for a in pool]
    decimation = env.decimation

    def raw() -> None:
        it["i"] = (it["i"] + 1) % len(ctrl_pool)
        raw_ctrl[:] = ctrl_pool[it["i"]]
        raw_batch.step(nstep=decimation)

    ours_rates, raw_rates = [], []
    for _ in range(repeats):
        ours_rates.append(_rate(ours, num_envs, seconds))
        raw_rates.append(_rate(raw, num_envs, seconds))
    env.close()
    o, r = statistics.median(ours_rates), statistics.median(raw_rates)
    return {"task": task, "num_envs": num_envs, "nthread": env.backend.nthread, "decimation": decimation,
            "ours_steps_per_s": round(o, 1), "raw_steps_per_s": round(r, 1), "ratio": round(o / r, 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="push_cube")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--seconds", type=float, default=1.0, help="measurement length per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="alternating ours/raw rounds; median kept")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeats < 1:
        parser.error("--seconds must be > 0 and --repeats >= 1")

    rows = [bench(args.task, n, args.seconds, args.repeats) for n in args.num_envs]
    print(f"{'task':<10} {'envs':>5} {'threads':>7} {'ours steps/s':>13} {'raw steps/s':>12} {'ratio':>6}")
    for row in rows:
        print(f"{row['task']:<10} {row['num_envs']:>5} {row['nthread']:>7} {row['ours_steps_per_s']:>13,.0f} "
              f"{row['raw_steps_per_s']:>12,.0f} {row['ratio']:>6.2f}")
    print(f"(decimation {rows[0]['decimation']} physics steps per env step; torch threads "
          f"{torch.get_num_threads()}; {os.cpu_count()} CPUs)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"benchmark": "env_throughput", "rows": rows}, indent=2))
        os.replace(tmp, args.json)
    return rows


if __name__ == "__main__":
    main()
