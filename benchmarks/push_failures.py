"""Why push_cube policies fail: each failed episode of a checkpoint classified by where the cube ended.

    python benchmarks/push_failures.py --case bc=runs/pipeline/push_cube/bc@ddim:5:eta=1 \\
        --case online=runs/pipeline/push_cube/online --episodes 500 --json benchmarks/results/push_failures.json

Classes of a failed (timed-out) episode, from its last observation:
  * ``wrong_yaw``: the cube is on the goal position (within the 2 cm tolerance) but off the goal orientation, the
    demonstrator's systematic mistake;
  * ``out_of_reach``: the cube is past the pusher's workspace (``|x|`` or ``|y|`` beyond ``WORKSPACE_HALF`` less
    the pusher's and the cube's half widths), where the pusher can no longer get behind it;
  * ``elsewhere``: any other position miss.
Across the classes, ``reached_goal_position`` counts the failed episodes whose cube was on the goal position at some step (it
got there, wrong in yaw, and either stayed or was pushed off again while the policy tried to turn it): the share of
failures that orientation alone explains.
Every case is played on the same seeded episodes, with the sampler after ``@`` or its checkpoint's default one.
JSON rows: ``case``, ``checkpoint``, ``sampler``, ``episodes``, ``success_rate``, the share of episodes in each
class, and ``reached_goal_position`` (failed episodes whose cube was on the goal position at some step, as a share of
all episodes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from distillery.envs.tasks.push_cube.task import CUBE_HALF, POS_TOL, PUSHER_RADIUS, WORKSPACE_HALF
from distillery.evaluate import PolicyActor, load_policy
from distillery.pipeline import env_from_config
from distillery.rollout import run_waves
from distillery.runtime import atomic_write_text

REACH = WORKSPACE_HALF - PUSHER_RADIUS - CUBE_HALF  # a cube centre beyond this cannot be pushed back inwards
CLASSES = ("wrong_yaw", "out_of_reach", "elsewhere")
# the shares each row reports: one per class, plus the failures that reached the goal position in any class
SHARES = (*CLASSES, "reached_goal_position")


def classify(state: np.ndarray) -> str:
    """Failure class of push_cube's final ``state`` observation (10,): pusher xy, cube xy, cube (cos 4yaw, sin
    4yaw), goal xy, goal (cos 4yaw, sin 4yaw)."""
    cube, goal = state[2:4], state[6:8]
    if float(np.hypot(*(goal - cube))) < POS_TOL:
        return "wrong_yaw"
    return "out_of_reach" if float(np.abs(cube).max()) > REACH else "elsewhere"


def reached_goal_position(states: np.ndarray) -> bool:
    """Whether the cube centre was within the position tolerance of the goal at any step of ``states`` (T, 10)."""
    return bool((np.hypot(*(states[:, 6:8] - states[:, 2:4]).T) < POS_TOL).any())


def failure_modes(checkpoint: str, episodes: int, seed: int, sampler: str | None, num_envs: int) -> dict:
    policy, meta = load_policy(checkpoint)
    task = meta["config"]["task"]
    if task["name"] != "push_cube":
        raise ValueError(f"{checkpoint} was trained on {task['name']!r}; this benchmark classifies push_cube failures")
    env = env_from_config(task, min(num_envs, episodes), seed)
    played = [ep for wave in run_waves(env, PolicyActor(policy, sampler, seed), episodes, seed, record=True)
              for ep in wave]
    env.close()
    counts = dict.fromkeys(SHARES, 0)
    for ep in played:
        if not ep.success:
            counts[classify(ep.obs["state"][-1])] += 1
            counts["reached_goal_position"] += reached_goal_position(ep.obs["state"])
    n = len(played)
    return {"checkpoint": checkpoint, "sampler": sampler or policy.default_sampler.text, "episodes": n,
            "success_rate": sum(ep.success for ep in played) / n, **{k: v / n for k, v in counts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, help="LABEL=CHECKPOINT[@SAMPLER] (repeatable)")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--num-envs", type=int, default=100)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cases = [c.split("=", 1) for c in args.case]
    if any(len(c) != 2 for c in cases) or args.episodes < 1:
        ap.error("--case takes LABEL=CHECKPOINT[@SAMPLER], e.g. --case bc=runs/pipeline/push_cube/bc@ddim:5:eta=1; "
                 "--episodes >= 1")
    rows = []
    for label, spec in cases:
        path, _, sampler = spec.partition("@")
        rows.append({"case": label, **failure_modes(path, args.episodes, args.seed, sampler or None, args.num_envs)})
    print(f"{'case':<10} {'sampler':<14} {'episodes':>8} {'success':>8} " + " ".join(f"{c:>21}" for c in SHARES))
    for r in rows:
        print(f"{r['case']:<10} {r['sampler']:<14} {r['episodes']:>8} {r['success_rate']:>8.3f} "
              + " ".join(f"{r[c]:>21.3f}" for c in SHARES))
    if args.json:
        atomic_write_text(args.json, json.dumps({"benchmark": "push_failures", "seed": args.seed,
                                                 "argv": sys.argv[1:], "rows": rows},
                                                indent=2) + "\n")


if __name__ == "__main__":
    main()
