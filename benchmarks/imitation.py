"""Imitation results: the demo pipeline (collect -> train diffusion and MLP -> evaluate) on one task.

    python benchmarks/imitation.py --task push_cube --json benchmarks/results/imitation_push_cube.json

Runs ``distillery demo task=<task>`` (200 clean expert demonstrations, 200 seeded evaluation episodes
per sampler) and writes its report as rows: ``task``, ``policy``, ``sampler``, ``success_rate``,
``success_ci95``, ``mean_return``, ``latency_ms_p50``, ``params``, ``episodes``. Extra arguments are
passed to the demo as config overrides (e.g. ``agent.steps=2000``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distillery.pipeline import demo
from distillery.runtime import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="push_cube")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    t0 = time.perf_counter()
    report_path = demo([f"task={args.task}", *args.overrides])
    report = json.loads(Path(report_path).read_text())
    keys = ("policy", "sampler", "success_rate", "success_ci95", "mean_return", "latency_ms_p50", "params",
            "episodes")
    rows = [{"task": report["task"], **{k: r[k] for k in keys}} for r in report["results"]]
    print(f"\nimitation on {args.task}: {(time.perf_counter() - t0) / 60:.1f} min in all; report {report_path}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps({"benchmark": "imitation", "command": " ".join(
            ["python benchmarks/imitation.py", f"--task {args.task}", *args.overrides]), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
