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
``--case LABEL=expert`` plays the scripted expert without mistakes or noise: what the reset distribution allows.

``--repeats K`` plays each case K times on the same episodes with K sampler seeds, to tell whether a policy fails
in particular start states (the same episodes fail every time) or by chance (failures independent of the state,
so an episode fails every time only at the product of the repeats' failure rates).

JSON rows: ``case``, ``checkpoint``, ``sampler``, ``episodes`` (per repeat), ``repeats``, ``success_rate`` (over all
repeats), ``success_per_repeat``, the share of played episodes in each class, ``reached_goal_position`` (failed
episodes whose cube was on the goal position at some step, as a share of all played episodes), and with K > 1
``failed_in_every_repeat`` (share of start states) beside ``failed_in_every_if_by_chance`` (the product).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from distillery import config as config_mod
from distillery.envs import make_expert
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


def failure_modes(checkpoint: str, episodes: int, seed: int, sampler: str | None, num_envs: int,
                  repeats: int = 1) -> dict:
    if checkpoint == "expert":
        policy, task = None, config_mod.compose(["task=push_cube"]).task
    else:
        policy, meta = load_policy(checkpoint)
        task = meta["config"]["task"]
        if task["name"] != "push_cube":
            raise ValueError(f"{checkpoint} was trained on {task['name']!r}; this benchmark classifies push_cube "
                             f"failures")
    counts = dict.fromkeys(SHARES, 0)
    success = []  # (repeats, episodes)
    for k in range(repeats):
        env = env_from_config(task, min(num_envs, episodes), seed)  # the same start states every repeat
        actor = (make_expert("push_cube", env.num_envs, seed=seed) if policy is None
                 else PolicyActor(policy, sampler, seed + k))
        played = [ep for wave in run_waves(env, actor, episodes, seed, record=True) for ep in wave]
        env.close()
        for ep in played:
            if not ep.success:
                counts[classify(ep.obs["state"][-1])] += 1
                counts["reached_goal_position"] += reached_goal_position(ep.obs["state"])
        success.append([bool(ep.success) for ep in played])
    won = np.array(success)
    row = {"checkpoint": checkpoint, "sampler": "expert" if policy is None else sampler or policy.default_sampler.text,
           "episodes": won.shape[1], "repeats": repeats, "success_rate": float(won.mean()),
           "success_per_repeat": [float(r) for r in won.mean(axis=1)], **{k: v / won.size for k, v in counts.items()}}
    if repeats > 1:
        row["failed_in_every_repeat"] = float((~won).all(axis=0).mean())
        row["failed_in_every_if_by_chance"] = float((1.0 - won.mean(axis=1)).prod())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, help="LABEL=CHECKPOINT[@SAMPLER] (repeatable)")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--num-envs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1, help="plays of each case on the same episodes, sampler seeds "
                                                          "seed, seed+1, ...")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cases = [c.split("=", 1) for c in args.case]
    if any(len(c) != 2 for c in cases) or args.episodes < 1 or args.repeats < 1:
        ap.error("--case takes LABEL=CHECKPOINT[@SAMPLER] or LABEL=expert, e.g. --case "
                 "bc=runs/pipeline/push_cube/bc@ddim:5:eta=1; --episodes and --repeats >= 1")
    rows = []
    for label, spec in cases:
        path, _, sampler = spec.partition("@")
        rows.append({"case": label, **failure_modes(path, args.episodes, args.seed, sampler or None, args.num_envs,
                                                    args.repeats)})
    every = ("failed_in_every_repeat", "failed_in_every_if_by_chance") if args.repeats > 1 else ()
    print(f"{'case':<10} {'sampler':<14} {'episodes':>8} {'success':>8} "
          + " ".join(f"{c:>21}" for c in (*SHARES, *every)))
    for r in rows:
        print(f"{r['case']:<10} {r['sampler']:<14} {r['episodes']:>8} {r['success_rate']:>8.3f} "
              + " ".join(f"{r[c]:>21.3f}" for c in (*SHARES, *every)))
    if args.json:
        atomic_write_text(args.json, json.dumps({"benchmark": "push_failures", "seed": args.seed,
                                                 "argv": sys.argv[1:], "rows": rows},
                                                indent=2) + "\n")


if __name__ == "__main__":
    main()
