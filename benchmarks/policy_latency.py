"""Batch-1 CPU latency per action chunk, and closed-loop success, of every fast sampler side by side.

    # trained policies of one or more tasks (a case dir holds train_diffusion/, train_streaming/, and one or more
    # students distill<suffix>/ with their exports export<suffix>/)
    python benchmarks/policy_latency.py --case push_cube=runs/bench/push_cube --case lift_cube=runs/bench/lift_cube \
        --episodes 200 --json benchmarks/results/policy_latency.json
    # latency only, random weights (no trained runs needed)
    python benchmarks/policy_latency.py

Rows per case: the diffusion teacher with ``ddpm`` (100 steps), ``ddim:10`` and ``rti:K`` (warm start), the
streaming policy (SDP), the distilled consistency student with ``consistency:1`` and ``consistency:3``, and the
exported ONNX graph of ``consistency:1`` run by onnxruntime. Latency is the median of ``--iters`` batch-1 calls
from a real observation on ``--threads`` threads (warm-started samplers keep their state, so the steady-state
cost is timed). Success is over ``--episodes`` seeded episodes per row (same seeds for every row). The ONNX row's
episodes run the exported graph for every plan (history and action queue kept by ``Policy.act``).

Always also timed (latency only, random weights): Diffusion Policy's paper state configuration
(``dp-paper-config``: To 2, Tp 16, down dims 256/512/1024, step embedding 256, kernel 5) for one network forward,
``ddim:10`` and optionally ``ddpm`` (``--paper-ddpm``), to compare with other implementations at equal size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.policies import Policy, make_policy
from distillery.specs import TensorSpec

ACTION_SPEC = TensorSpec((2,), low=-1.0, high=1.0, description="push_cube-like 2-D action")
PUSH_OBS = {"state": TensorSpec((10,), description="push_cube-like state")}
PAPER_OBS = {"state": TensorSpec((20,), description="Push-T state: 9 keypoints + agent xy")}
PAPER_CFG = {"down_dims": [256, 512, 1024], "step_embed_dim": 256, "kernel_size": 5, "n_groups": 8,
             "encoder": {"type": "identity"}}
RTI = "rti:3"  # push_cube teacher, 50 episodes: rti:2 / rti:3 / rti:5 -> 0.34 / 0.90 / 0.92 (ddim:10 0.94)
# (label, case sub-directory, sampler); every `distill<suffix>/` of a case is a student labelled
# `consistency<suffix>`, and `export<suffix>/` its ONNX export
TORCH_ROWS = [("diffusion", "train_diffusion", "ddpm"), ("diffusion", "train_diffusion", "ddim:10"),
              ("diffusion", "train_diffusion", RTI), ("streaming", "train_streaming", "streaming"),
              ("consistency", "distill", "consistency:1"), ("consistency", "distill", "consistency:3")]


def case_rows(case: Path) -> list[tuple[str, str, str]]:
    rows = [r for r in TORCH_ROWS if r[1] != "distill"]
    for student in sorted(p.name for p in case.glob("distill*")):
        suffix = student[len("distill"):]
        rows += [("consistency" + suffix, student, s) for s in ("consistency:1", "consistency:3")]
    return rows


def median_ms(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def fit_unit_stats(policy: Policy, obs_dim: int) -> None:
    policy.set_normalizer({"state": {"min": -np.ones(obs_dim), "max": np.ones(obs_dim)},
                           "action": {"min": -np.ones(2), "max": np.ones(2)}})


def onnx_session(export_dir: Path, threads: int):
    import onnxruntime as ort

    manifest = json.loads((export_dir / "manifest.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    sess = ort.InferenceSession(str(export_dir / manifest["file"]), opts, providers=["CPUExecutionProvider"])
    return sess, manifest


def onnx_chunk_fn(sess, policy: Policy) -> Callable[..., torch.Tensor]:
    """``predict_chunk`` replacement that runs the exported graph (noise drawn from the caller's generator)."""
    names = [i.name for i in sess.get_inputs()]

    def predict_chunk(history, sampler=None, generator=None, noise=None, carry=None):
        b = next(iter(history.values())).shape[0]
        if noise is None:
            noise = torch.randn(b, policy.pred_horizon, policy.action_dim, generator=generator)
        feed = {n: (noise if n == "noise" else history[n.split(".", 1)[1]]).numpy().astype(np.float32)
                for n in names}
        return torch.from_numpy(sess.run(None, feed)[0])
    return predict_chunk


# ------------------------------------------------------------------------------------------------ trained cases
def run_case(task: str, case: Path, episodes: int, iters: int, threads: int, seed: int) -> list[dict[str, Any]]:
    from distillery.evaluate import evaluate_policy, load_policy, measure_latency
    from distillery.pipeline import env_from_config

    rows: list[dict[str, Any]] = []
    loaded: dict[str, tuple[Policy, dict]] = {}
    latency_env = None

    def add(label: str, policy: Policy, sampler: str, runtime: str, latency: float, task_cfg: dict) -> None:
        row = {"task": task, "policy": label, "sampler": sampler, "runtime": runtime, "params": policy.num_params(),
               "latency_ms_p50": round(latency, 4)}
        if episodes:
            env = env_from_config(task_cfg, min(200, episodes), seed)
            t0 = time.perf_counter()
            summary, _ = evaluate_policy(policy, env, episodes, seed, sampler)
            env.close()
            row.update(success_rate=summary["success_rate"], success_ci95=summary["success_ci95"],
                       episodes=summary["episodes"], eval_wall_s=round(time.perf_counter() - t0, 1))
        rows.append(row)
        sr = f"{row['success_rate']:.3f} ({row['episodes']} ep)" if episodes else "-"
        print(f"  {task:<10} {label:<12} {sampler:<14} {runtime:<6} {latency:10.3f} ms   success {sr}", flush=True)

    for label, sub, sampler in case_rows(case):
        path = case / sub
        if not path.exists():
            print(f"  {task:<10} {label:<12} {sampler:<14} skipped: {path} does not exist", flush=True)
            continue
        if sub not in loaded:
            loaded[sub] = load_policy(path)
        policy, meta = loaded[sub]
        latency_env = latency_env or env_from_config(meta["config"]["task"], 1, seed)
        latency = measure_latency(policy, latency_env, sampler, iters)
        add(label, policy, sampler, "torch", latency, meta["config"]["task"])
    for student in sorted(k for k in loaded if k.startswith("distill")):
        suffix = student[len("distill"):]
        export = case / ("export" + suffix)
        if not export.exists():
            continue
        policy, meta = loaded[student]
        sess, manifest = onnx_session(export, threads)
        fn = onnx_chunk_fn(sess, policy)
        obs = latency_env.reset(seed=0)
        hist = {k: obs[k][:1].unsqueeze(1).repeat_interleave(policy.obs_horizon, 1) for k in policy.obs_keys}
        latency = median_ms(lambda: fn(hist), iters * 5)
        policy.predict_chunk = fn  # type: ignore[method-assign]  # closed loop through the ONNX graph
        try:
            add("consistency" + suffix, policy, manifest["sampler"], "onnx", latency, meta["config"]["task"])
        finally:
            del policy.predict_chunk
    if latency_env is not None:
        latency_env.close()
    return rows


# ------------------------------------------------------------------------------------------------ random weights
def run_random(iters: int) -> list[dict[str, Any]]:
    """Latency of every sampler with untrained default-size networks (push_cube-like specs)."""
    rows = []
    obs = {"state": torch.randn(1, 2, 10)}
    policies = {name: make_policy(name, PUSH_OBS, ACTION_SPEC, {}).eval() for name in
                ("diffusion", "streaming", "consistency", "mlp")}
    for p in policies.values():
        fit_unit_stats(p, 10)
    for label, _, sampler in [*TORCH_ROWS, ("mlp", "", "direct")]:
        p = policies[label]
        carry: dict[str, torch.Tensor] = {}
        s = None if sampler == "direct" else sampler
        ms = median_ms(lambda: p.predict_chunk(obs, s, carry=carry), iters)
        rows.append({"task": "random-weights", "policy": label, "sampler": sampler, "runtime": "torch",
                     "params": p.num_params(), "latency_ms_p50": round(ms, 4)})
        print(f"  random     {label:<12} {sampler:<14} torch  {ms:10.3f} ms", flush=True)
    return rows


def run_paper(iters: int, paper_ddpm: bool) -> list[dict[str, Any]]:
    paper = make_policy("diffusion", PAPER_OBS, ACTION_SPEC, PAPER_CFG).eval()
    fit_unit_stats(paper, 20)
    obs = {"state": torch.randn(1, 2, 20)}
    cond = paper.encode_obs(paper.normalizer.normalize_dict(obs))
    x, t = torch.randn(1, paper.pred_horizon, 2), torch.tensor([50])
    cases = [("forward", lambda: paper.eps(x, t, cond), max(iters, 5)),
             ("ddim:10", lambda: paper.predict_chunk(obs, "ddim:10"), iters)]
    if paper_ddpm:
        cases.append(("ddpm", lambda: paper.predict_chunk(obs, "ddpm"), max(iters // 4, 1)))
    rows = []
    for sampler, fn, n in cases:
        ms = median_ms(fn, n, warmup=2)
        rows.append({"task": "-", "policy": "dp-paper-config", "sampler": sampler, "runtime": "torch",
                     "params": paper.num_params(), "latency_ms_p50": round(ms, 3)})
        print(f"  -          dp-paper-config {sampler:<11} torch  {ms:10.2f} ms", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ report
def ratios(rows: list[dict[str, Any]]) -> list[tuple[str, str, float, str, bool]]:
    """(task, what, value, target, met) for the issue's targets, from rows of the same run."""
    out = []
    lat = lambda r: r["latency_ms_p50"]  # noqa: E731
    for task in sorted({r["task"] for r in rows if r["policy"] != "dp-paper-config"}):
        by = {(r["policy"], r["sampler"], r["runtime"]): r for r in rows if r["task"] == task}
        ddim, ddpm = by.get(("diffusion", "ddim:10", "torch")), by.get(("diffusion", "ddpm", "torch"))
        stream = by.get(("streaming", "streaming", "torch"))
        for student in sorted({p for p, _, _ in by if p.startswith("consistency")}):
            c1, onnx = by.get((student, "consistency:1", "torch")), by.get((student, "consistency:1", "onnx"))
            if c1 and ddpm:
                v = lat(ddpm) / lat(c1)
                out.append((task, f"ddpm / {student} consistency:1 latency", v, ">= 50", v >= 50))
            if c1 and ddim:
                v = lat(ddim) / lat(c1)
                out.append((task, f"ddim:10 / {student} consistency:1 latency", v, ">= 6", v >= 6))
            if onnx:
                out.append((task, f"{student} consistency:1 onnx ms", lat(onnx), "<= 1", lat(onnx) <= 1.0))
            if c1 and ddim and "success_rate" in c1:
                v = c1["success_rate"] / max(ddim["success_rate"], 1e-9)
                out.append((task, f"{student} consistency:1 / teacher ddim:10 success", v, ">= 0.95", v >= 0.95))
        if stream and ddim:
            v = lat(ddim) / lat(stream)
            out.append((task, "ddim:10 / streaming latency", v, ">= 2", v >= 2))
        if stream and ddim and "success_rate" in stream:
            v = stream["success_rate"] - ddim["success_rate"]
            out.append((task, "streaming - ddim:10 success", v, ">= -0.05", v >= -0.05))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=[], metavar="TASK=DIR",
                    help="trained runs of TASK in DIR/{train_diffusion,train_streaming,distill*,export*}")
    ap.add_argument("--episodes", type=int, default=200, help="success episodes per row (0 = latency only)")
    ap.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads (default 1)")
    ap.add_argument("--iters", type=int, default=20, help="timed batch-1 calls per row")
    ap.add_argument("--iters-slow", type=int, default=5, help="timed calls per row for the paper-size network")
    ap.add_argument("--paper-ddpm", action="store_true", help="also time 100-step DDPM at paper size (slow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write {benchmark, rows, ratios} here")
    args = ap.parse_args()
    cases = []
    for c in args.case:
        task, sep, path = c.partition("=")
        if not sep or not Path(path).is_dir():
            raise SystemExit(f"--case {c!r}: expected TASK=DIR with an existing DIR")
        cases.append((task, Path(path)))
    if args.threads < 1 or args.iters < 1 or args.episodes < 0:
        raise SystemExit("--threads and --iters must be >= 1, --episodes >= 0")
    torch.set_num_threads(args.threads)
    print(f"policy_latency: batch 1, torch {torch.__version__}, {args.threads} thread(s)")
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for task, path in cases:
            rows += run_case(task, path, args.episodes, args.iters, args.threads, args.seed)
        if not cases:
            rows += run_random(args.iters)
        rows += run_paper(args.iters_slow, args.paper_ddpm)
    print("\n| task | policy | sampler | runtime | params | latency_ms_p50 | success_rate | episodes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sr = f"{r['success_rate']:.3f}" if "success_rate" in r else "-"
        print(f"| {r['task']} | {r['policy']} | {r['sampler']} | {r['runtime']} | {r['params']:,} | "
              f"{r['latency_ms_p50']:.3f} | {sr} | {r.get('episodes', '-')} |")
    checks = ratios(rows)
    if checks:
        print("\n| task | ratio (same run) | value | target | met |\n|---|---|---|---|---|")
        for task, what, v, target, ok in checks:
            print(f"| {task} | {what} | {v:.3f} | {target} | {'yes' if ok else 'NO'} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"benchmark": "policy_latency", "threads": args.threads, "argv": sys.argv[1:],
                                   "torch": torch.__version__, "rows": rows,
                                   "ratios": [dict(zip(("task", "what", "value", "target", "met"), c))
                                              for c in checks]}, indent=2))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
