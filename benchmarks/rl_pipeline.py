"""From a noisy expert's demonstrations to a one-step policy: success after every stage of `distillery pipeline`.

For each task: the expert (its demonstrations succeed at most ~60%), BC on them, RL-100 offline RL, online PPO over
the denoising chain, and the one-step consistency student distilled from the online policy, each evaluated on the
same ``pipeline.eval_episodes`` seeded episodes (500 by default). ``wall_s`` is the training wall time of the stage
(collection for the expert); ``pipeline_wall_h`` in the summary is the whole pipeline: every stage (rollouts of
the online policy and the export included) and the evaluations. Stages that finished earlier under ``--root`` are reused, so an interrupted benchmark
continues where it stopped.

    python benchmarks/rl_pipeline.py --task push_cube --task lift_cube --root runs/pipeline \\
        --json benchmarks/results/rl_pipeline.json [pipeline overrides ...]

With ``--json``, rows of tasks not run by this invocation are kept from the file (each summary line keeps the
``argv`` that produced it), so one task can be rerun without rerunning the other.

JSON rows: ``task``, ``stage`` (expert | bc | offline | online | one_step), ``success_rate``, ``episodes``,
``wall_s``, plus the 95% CI, sampler and evaluation time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distillery.pipeline import format_pipeline_table, rl_pipeline
from distillery.runtime import atomic_write_text

TARGETS = "offline >= bc + 0.10; online >= 0.99; one_step >= 0.98; pipeline <= 2 h per task on 2 CPU cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", action="append", default=None, help="repeatable; default: push_cube and lift_cube")
    ap.add_argument("--root", type=Path, default=Path("runs/pipeline"), help="stage run dirs go to ROOT/<task>/")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides for every stage, e.g. pipeline.eval_episodes=200")
    args = ap.parse_args()
    rows, summary = [], []
    for task in args.task or ["push_cube", "lift_cube"]:
        report = json.loads(rl_pipeline([f"task={task}", f"pipeline.root={args.root / task}", "logger.wandb=false",
                                         *args.overrides]).read_text())
        rows += report["rows"]
        by = {r["stage"]: r["success_rate"] for r in report["rows"]}
        summary.append({"task": task, "argv": sys.argv[1:], "offline_minus_bc": by["offline"] - by["bc"],
                        "online": by["online"], "one_step": by["one_step"],
                        "pipeline_wall_h": report["pipeline_wall_s"] / 3600,
                        "met": ", ".join(f"{k}: {'yes' if ok else 'no'}" for k, ok in (
                            ("offline >= bc + 0.10", by["offline"] - by["bc"] >= 0.10),
                            ("online >= 0.99", by["online"] >= 0.99), ("one step >= 0.98", by["one_step"] >= 0.98),
                            ("<= 2 h", report["pipeline_wall_s"] <= 7200)))})
    print(format_pipeline_table(rows))
    print(f"targets: {TARGETS}")
    for s in summary:
        print(json.dumps(s))
    if args.json:
        ran = {s["task"] for s in summary}
        kept = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": [], "summary": []}
        rows = [r for r in kept["rows"] if r["task"] not in ran] + rows
        summary = [s for s in kept["summary"] if s["task"] not in ran] + summary
        atomic_write_text(args.json, json.dumps({"benchmark": "rl_pipeline", "targets": TARGETS, "rows": rows,
                                                 "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
