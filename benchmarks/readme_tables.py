"""Rewrite the README's result tables from the JSON files in ``benchmarks/results/``.

    python benchmarks/readme_tables.py

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in README.md and is
generated from ``benchmarks/results/NAME*.json`` (so no number in the README is typed by hand).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Column key of the results file a row came from: "main" for NAME.json, "SUFFIX" for NAME_SUFFIX.json (a variant run
# whose rows would otherwise read like the main run's).
RUN = "_run"

COLUMNS = {
    "imitation": [("task", "task", "{}"), ("policy", "policy", "{}"), ("sampler", "sampler", "{}"),
                  ("success", "success_rate", "{:.3f}"), ("95% CI", "success_ci95", "[{0[0]:.2f}, {0[1]:.2f}]"),
                  ("mean return", "mean_return", "{:.1f}"), ("ms / chunk (batch 1)", "latency_ms_p50", "{:.2f}"),
                  ("params", "params", "{:,}"), ("episodes", "episodes", "{}")],
    "env_throughput": [("task", "task", "{}"), ("envs", "num_envs", "{}"), ("ours steps/s", "ours_steps_per_s",
                       "{:,.0f}"), ("raw Batch steps/s", "raw_steps_per_s", "{:,.0f}"), ("ratio", "ratio", "{:.2f}")],
    "policy_latency": [("task", "task", "{}"), ("policy", "policy", "{}"), ("sampler", "sampler", "{}"),
                       ("runtime", "runtime", "{}"), ("params", "params", "{:,}"),
                       ("ms / chunk p50", "latency_ms_p50", "{:.2f}"), ("success", "success_rate", "{:.3f}"),
                       ("95% CI", "success_ci95", "[{0[0]:.2f}, {0[1]:.2f}]"), ("episodes", "episodes", "{}")],
    "policy_latency_ratios": [("task", "task", "{}"), ("measured in the same run", "what", "{}"),
                              ("value", "value", "{:.3f}"), ("target", "target", "{}"),
                              ("met", "met", "{}")],
    "export_latency": [("policy", "policy", "{}"), ("sampler", "sampler", "{}"), ("params", "params", "{:,}"),
                       ("torch ms", "torch_ms_p50", "{:.3f}"), ("onnxruntime ms", "onnxruntime_ms_p50", "{:.3f}"),
                       ("speedup", "speedup", "{:.2f}"), ("max abs diff", "max_abs_diff", "{:.1e}")],
    "rl_pipeline": [("run", RUN, "{}"), ("task", "task", "{}"), ("stage", "stage", "{}"), ("success", "success_rate", "{:.3f}"),
                    ("95% CI", "success_ci95", "[{0[0]:.2f}, {0[1]:.2f}]"), ("episodes", "episodes", "{}"),
                    ("sampler", "sampler", "{}"), ("stage wall s", "wall_s", "{:.0f}")],
    "rl_pipeline_summary": [("run", RUN, "{}"), ("task", "task", "{}"), ("offline - bc", "offline_minus_bc", "{:+.3f}"),
                            ("online", "online", "{:.3f}"), ("one step", "one_step", "{:.3f}"),
                            ("pipeline h", "pipeline_wall_h", "{:.2f}"), ("targets met", "met", "{}")],
    "ofql_baseline": [("task", "task", "{}"), ("policy", "stage", "{}"), ("from", "source", "{}"),
                      ("success", "success_rate", "{:.3f}"), ("95% CI", "success_ci95", "[{0[0]:.2f}, {0[1]:.2f}]"),
                      ("episodes", "episodes", "{}"), ("sampler", "sampler", "{}"), ("train s", "wall_s", "{:.0f}"),
                      ("ms / plan (batch 1)", "latency_ms_p50", "{:.2f}")],
    "sb3_comparison": [("run", RUN, "{}"), ("task", "task", "{}"), ("agent", "agent", "{}"),
                       ("envs", "num_envs", "{}"),
                       ("vec env", "vec_env", "{}"),
                       ("env steps", "env_steps", "{:,}"), ("success", "success_rate", "{:.3f}"),
                       ("95% CI", "success_ci95", "[{0[0]:.2f}, {0[1]:.2f}]"), ("steps/s", "env_steps_per_s", "{:,.0f}"),
                       ("speed / SB3 (its DummyVecEnv)", "speed_ratio_vs_sb3", "{:.2f}"),
                       ("speed / SB3 (our batched env)", "speed_ratio_vs_sb3_batched", "{:.2f}")],
    "push_failures": [("case", "case", "{}"), ("sampler", "sampler", "{}"), ("episodes", "episodes", "{}"),
                      ("success", "success_rate", "{:.3f}"), ("failed: wrong yaw at the goal", "wrong_yaw", "{:.3f}"),
                      ("failed: cube out of reach", "out_of_reach", "{:.3f}"),
                      ("failed: elsewhere", "elsewhere", "{:.3f}"),
                      ("failed, the cube on the goal position at some step", "reached_goal_position", "{:.3f}"),
                      ("repeats", "repeats", "{}"),
                      ("start states failed in every repeat", "failed_in_every_repeat", "{:.3f}"),
                      ("... if failures were chance", "failed_in_every_if_by_chance", "{:.4f}")],
}
# tables built from another key of a benchmark's JSON: name -> (file stem, key)
SOURCES = {"policy_latency_ratios": ("policy_latency", "ratios"), "rl_pipeline_summary": ("rl_pipeline", "summary")}


def table(name: str) -> str:
    stem, key = SOURCES.get(name, (name, "rows"))
    files = sorted(RESULTS.glob(f"{stem}.json")) + sorted(RESULTS.glob(f"{stem}_*.json"))
    if not files:
        return f"_no results yet: run the command above to create benchmarks/results/{name}*.json_"
    cols = COLUMNS[name]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    commands = []
    for f in files:
        data = json.loads(f.read_text())
        if data.get("command"):
            commands.append(data["command"])
        elif data.get("argv"):
            commands.append(f"python benchmarks/{data['benchmark']}.py " + " ".join(data["argv"]))
        # a benchmark whose rows per task may come from separate invocations records each one's argv
        commands += [f"python benchmarks/{data['benchmark']}.py " + " ".join(s["argv"])
                     for s in data.get("summary", []) if "argv" in s]
        run = f.stem[len(stem):].lstrip("_") or "main"
        for row in data.get(key, []):
            row = {RUN: run, **row}
            lines.append("| " + " | ".join(fmt.format(row[c]) if c in row else "" for _, c, fmt in cols) + " |")
    src = ", ".join(f"`{f.relative_to(ROOT)}`" for f in files)
    return "\n".join(lines) + f"\n\n<sub>Generated from {src}" + \
        (f" by `{'`, `'.join(dict.fromkeys(commands))}`" if commands else "") + ".</sub>"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in COLUMNS:
        pattern = re.compile(rf"(<!-- table:{name} -->).*?(<!-- /table:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + "\n" + table(name) + "\n" + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
