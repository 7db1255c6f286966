"""One-step offline RL straight from the demonstrations (OFQL) against the pipeline's distill-after-RL.

One-Step Flow Q-Learning (`distillery train agent=ofql`, algorithms.md section 7) learns a one-step policy and
its critic from the demonstrations alone: no imitation stage before it, no environment interaction, no
distillation after it. For each task it trains on the demonstrations of `distillery pipeline` (ROOT/<task>/
data.zarr; collected first, as the pipeline collects them, if absent) and is evaluated on the pipeline's own
evaluation episodes (same seed, same count). The pipeline's rows from ROOT/<task>/report.json, when it exists,
are set beside it: BC, the offline RL stage (the other purely offline policy) and the one-step student distilled
after online RL.

    python benchmarks/ofql_baseline.py --task push_cube --root runs/pipeline \\
        --json benchmarks/results/ofql_baseline.json [agent.steps=... more overrides]

With ``--json``, rows of tasks not run by this invocation are kept from the file. JSON rows: ``task``, ``stage``
(``ofql``, or the pipeline's ``bc`` | ``offline`` | ``one_step`` with ``source: pipeline``), ``success_rate``,
``episodes``, ``wall_s`` (training), the 95% CI and, for OFQL, the latency of one plan at batch 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distillery import config as config_mod
from distillery.pipeline import (EVAL_SEED_OFFSET, evaluate_ofql_run, pipeline_demonstrations, pipeline_root,
                                 resume_arg, run_stage, train)
from distillery.runtime import atomic_write_text

PIPELINE_STAGES = ("bc", "offline", "one_step")


def run_task(task: str, root: Path, overrides: list[str]) -> list[dict]:
    common = [f"task={task}", f"pipeline.root={root / task}", "logger.wandb=false"]
    base = config_mod.compose(common)
    task_root = pipeline_root(base)
    data = Path(pipeline_demonstrations(common)["path"])
    run_dir = task_root / "ofql"
    # a stage of its own beside the pipeline's: skipped once finished, resumed if interrupted
    record = run_stage(task_root, "ofql", lambda: train(config_mod.compose(
        [*common, "agent=ofql", f"dataset={data}", f"run_dir={run_dir}", *overrides]), resume=resume_arg(run_dir)))

    episodes, seed = int(base.pipeline.eval_episodes), int(base.seed) + EVAL_SEED_OFFSET
    row, _ = evaluate_ofql_run(run_dir, episodes, seed, int(base.eval.num_envs))
    rows = [{"task": task, "stage": "ofql", "success_rate": row["success_rate"], "episodes": episodes,
             "wall_s": record["wall_s"], "success_ci95": row["success_ci95"], "mean_return": row["mean_return"],
             "sampler": "one_step", "latency_ms_p50": row["latency_ms_p50"], "eval_wall_s": row["eval_wall_s"],
             "checkpoint": row["checkpoint"], "source": "this benchmark"}]
    report = task_root / "report.json"
    if report.is_file():
        for r in json.loads(report.read_text())["rows"]:
            if r["stage"] in PIPELINE_STAGES:
                rows.append({k: r[k] for k in ("task", "stage", "success_rate", "episodes", "wall_s",
                                               "success_ci95", "sampler") if k in r} | {"source": "pipeline"})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'task':<10} {'stage':<9} {'source':<14} {'success':>8} {'95% CI':>13} {'episodes':>8} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lo, hi = r["success_ci95"]
        lines.append(f"{r['task']:<10} {r['stage']:<9} {r['source']:<14} {r['success_rate']:>8.3f} "
                     f"{f'[{lo:.2f}, {hi:.2f}]':>13} {r['episodes']:>8} {r['wall_s']:>8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", action="append", default=None, help="repeatable; default: push_cube and lift_cube")
    ap.add_argument("--root", type=Path, default=Path("runs/pipeline"),
                    help="the pipeline's root: demonstrations in ROOT/<task>/data.zarr, OFQL run in ROOT/<task>/ofql")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="overrides of the OFQL run, e.g. agent.steps=20000 agent.chunk=4")
    args = ap.parse_args(argv)
    tasks = args.task or ["push_cube", "lift_cube"]
    rows = [r for task in tasks for r in run_task(task, args.root, args.overrides)]
    print(format_rows(rows))
    if args.json:
        kept = json.loads(args.json.read_text()) if args.json.is_file() else {}
        rows_out = [r for r in kept.get("rows", []) if r["task"] not in tasks] + rows
        # each task's command line, as rl_pipeline.py keeps them (the README's table footer lists them)
        summary = [s for s in kept.get("summary", []) if s["task"] not in tasks] + \
            [{"task": t, "argv": sys.argv[1:] if argv is None else argv} for t in tasks]
        atomic_write_text(args.json, json.dumps({"benchmark": "ofql_baseline", "rows": rows_out,
                                                 "summary": summary}, indent=1))
    return rows


if __name__ == "__main__":
    main()
