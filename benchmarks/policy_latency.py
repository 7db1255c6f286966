"""Batch-1 latency of one action-chunk prediction (``policy.predict_chunk``) for the default diffusion policy
under ``ddpm`` (100 network evaluations) and ``ddim:10``, the MLP baseline, and Diffusion Policy's paper-size
state network (``dp-paper-config``: down dims 256/512/1024, step embed 256, ~65.8M params).

    python benchmarks/policy_latency.py --threads 1 --json results/policy_latency.json

Weights are random: latency does not depend on their values. Specs mimic push_cube (state 10-dim, action 2-dim);
the paper row uses its own 20-dim state so its parameter count matches the paper. Each row warms up first and
reports the median of ``--iters`` calls (``--iters-slow`` for the paper network).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.policies import DiffusionPolicy, Policy, make_policy
from distillery.specs import TensorSpec

ACTION_SPEC = TensorSpec((2,), low=-1.0, high=1.0, description="push_cube-like 2-D action")
PUSH_OBS = {"state": TensorSpec((10,), description="push_cube-like state")}
PAPER_OBS = {"state": TensorSpec((20,), description="Push-T state: 9 keypoints + agent xy")}
PAPER_CFG = {"down_dims": [256, 512, 1024], "step_embed_dim": 256, "kernel_size": 5, "n_groups": 8,
             "encoder": {"type": "identity"}}


def _fit_identity_stats(policy: Policy, obs_dim: int) -> None:
    policy.set_normalizer({"state": {"min": -np.ones(obs_dim), "max": np.ones(obs_dim)},
                           "action": {"min": -np.ones(2), "max": np.ones(2)}})


def _median_ms(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def run(iters: int, iters_slow: int, warmup: int, paper_ddpm: bool) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    push_obs = {"state": torch.randn(1, 2, 10)}
    paper_obs = {"state": torch.randn(1, 2, 20)}

    def add(label: str, policy: Policy, sampler: str, fn: Callable[[], Any], n: int) -> None:
        ms = _median_ms(fn, n, warmup)
        rows.append({"policy": label, "sampler": sampler, "runtime": "torch", "latency_ms_p50": round(ms, 3),
                     "params": policy.num_params()})
        print(f"  {label:<16} {sampler:<8} {ms:10.2f} ms", flush=True)

    with torch.inference_mode():
        dp = make_policy("diffusion", PUSH_OBS, ACTION_SPEC, {}).eval()
        _fit_identity_stats(dp, 10)
        for sampler in ("ddpm", "ddim:10"):
            add("diffusion", dp, sampler, lambda s=sampler: dp.predict_chunk(push_obs, sampler=s), iters)
        mlp = make_policy("mlp", PUSH_OBS, ACTION_SPEC, {}).eval()
        _fit_identity_stats(mlp, 10)
        add("mlp", mlp, "direct", lambda: mlp.predict_chunk(push_obs), iters)

        paper = make_policy("diffusion", PAPER_OBS, ACTION_SPEC, PAPER_CFG).eval()
        assert isinstance(paper, DiffusionPolicy)
        _fit_identity_stats(paper, 20)
        cond = paper.encode_obs(paper.normalizer.normalize_dict(paper_obs))
        x, t = torch.randn(1, paper.pred_horizon, 2), torch.tensor([50])
        add("dp-paper-config", paper, "forward", lambda: paper.eps(x, t, cond), max(iters_slow, 5))
        add("dp-paper-config", paper, "ddim:10", lambda: paper.predict_chunk(paper_obs, sampler="ddim:10"), iters_slow)
        if paper_ddpm:
            add("dp-paper-config", paper, "ddpm", lambda: paper.predict_chunk(paper_obs, sampler="ddpm"),
                max(iters_slow // 4, 1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per row for the small policies")
    ap.add_argument("--iters-slow", type=int, default=10, help="timed calls per row for the paper-size network")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--paper-ddpm", action="store_true", help="also time 100-step DDPM at paper size (slow)")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args()
    if args.threads < 1 or args.iters < 1 or args.iters_slow < 1:
        raise SystemExit("--threads, --iters and --iters-slow must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"policy_latency: batch 1, torch {torch.__version__}, {args.threads} thread(s)")
    rows = run(args.iters, args.iters_slow, args.warmup, args.paper_ddpm)
    print(f"\n| policy | sampler | runtime | latency_ms_p50 | params |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['sampler']} | {r['runtime']} | {r['latency_ms_p50']:.2f} | {r['params']:,} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"benchmark": "policy_latency", "threads": args.threads,
                                   "torch": torch.__version__, "rows": rows}, indent=2))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
