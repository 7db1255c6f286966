"""Batch-1 latency of an exported policy under onnxruntime vs the same checkpoint in PyTorch (eager), per chunk.

    OMP_NUM_THREADS=1 python benchmarks/export_latency.py --export runs/exports/push_cube_diffusion_ddim10 \
        --export runs/exports/push_cube_mlp --json benchmarks/results/export_latency.json

Both sides compute the same thing: one executed chunk ``(1, Ta, Da)`` from a real observation history of the task
(first reset observation repeated ``To`` times) and fixed initial noise, with the sampler baked into the export.
The PyTorch policy is rebuilt from the manifest's source checkpoint (its sha256 must match). Each round times
``--iters`` calls of each side after a warm-up, the sides alternate over ``--repeats`` rounds so background load
hits both alike, and the median of all calls is reported. ``speedup`` = torch / onnxruntime.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from distillery.deploy.manifest import read_manifest
from distillery.evaluate import load_policy
from distillery.pipeline import env_from_config


def _times_ms(fn: Callable[[], Any], iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench(export_dir: Path, threads: int, iters: int, repeats: int, seed: int) -> dict[str, Any]:
    export_dir, m = read_manifest(export_dir)
    if m["format"] != "onnx":
        raise SystemExit(f"{export_dir} is a {m['format']} export; this benchmark times ONNX exports")
    src = m.get("source_checkpoint")
    if not src:
        raise SystemExit(f"{export_dir}: the manifest names no source checkpoint to compare against")
    digest = hashlib.sha256((Path(src["path"]) / src["file"]).read_bytes()).hexdigest()
    if digest != src["sha256"]:
        raise SystemExit(f"{src['path']} changed since the export (sha256 mismatch); re-export first")
    policy, meta = load_policy(src["path"])
    sampler = m["sampler"]

    env = env_from_config(meta["config"]["task"], 1, seed)
    obs = env.reset(seed=seed)
    env.close()
    history = {k: obs[k][:1].unsqueeze(1).repeat_interleave(policy.obs_horizon, 1).contiguous()
               for k in policy.obs_keys}
    noise = torch.randn(1, policy.pred_horizon, policy.action_dim, generator=torch.Generator().manual_seed(seed))

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(export_dir / m["file"]), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    feed = {m["obs"][k]["input"]: history[k].numpy() for k in policy.obs_keys}
    feed[m["noise"]["input"]] = noise.numpy()

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return policy.predict_chunk(history, sampler, noise=noise)

    def run_onnx() -> np.ndarray:
        return session.run([m["outputs"][0]], feed)[0]

    diff = float(np.abs(run_onnx() - run_torch().numpy()).max())
    torch_ms: list[float] = []
    onnx_ms: list[float] = []
    for _ in range(repeats):
        for fn, sink in ((run_torch, torch_ms), (run_onnx, onnx_ms)):
            _times_ms(fn, 3)  # warm-up: allocator and caches after the other side ran
            sink.extend(_times_ms(fn, iters))
    t, o = statistics.median(torch_ms), statistics.median(onnx_ms)
    return {"export": str(export_dir), "policy": m["policy"]["name"], "sampler": sampler,
            "params": m["policy"]["params"], "threads": threads, "calls": len(onnx_ms),
            "torch_ms_p50": round(t, 4), "onnxruntime_ms_p50": round(o, 4), "speedup": round(t / o, 2),
            "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", action="append", required=True, type=Path, metavar="DIR",
                    help="export dir written by `distillery export` (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per side per round")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write {benchmark, rows} here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'policy':<10} {'sampler':<10} {'params':>8} {'torch ms':>9} {'ort ms':>8} {'speedup':>7} {'max|diff|':>9}")
    for export_dir in args.export:
        r = bench(export_dir, args.threads, args.iters, args.repeats, args.seed)
        rows.append(r)
        print(f"{r['policy']:<10} {r['sampler']:<10} {r['params']:>8} {r['torch_ms_p50']:>9.3f} "
              f"{r['onnxruntime_ms_p50']:>8.3f} {r['speedup']:>7.2f} {r['max_abs_diff']:>9.1e}", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"benchmark": "export_latency", "argv": sys.argv[1:], "rows": rows}, indent=2)
                       + "\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
