"""Our PPO and SAC beside Stable-Baselines3's on the same task, env-step budget and number of envs.

Ours step one ``BatchedEnv`` of ``--num-envs`` envs. SB3 runs as an SB3 user runs it (``--sb3-vec dummy``, the
default): its own ``DummyVecEnv`` over ``--num-envs`` single gymnasium envs of the task
(:class:`distillery.envs.gym_view.GymTaskEnv`), so the speed ratio is what batched simulation and our learner buy
over that. ``--sb3-vec batched`` trains SB3 through :class:`distillery.envs.sb3_vec_env.SB3VecEnv` over the same
``BatchedEnv`` instead (both sides then pay the same simulation cost and the ratio compares the learners);
``both`` runs each. Every agent is then evaluated with its deterministic policy on the same fixed-seed episodes
(``distillery.rollout.run_waves``: same initial states for every agent).

    python benchmarks/sb3_comparison.py --task lift_cube --env-steps 100000 --num-envs 16 --eval-episodes 32 \\
        --sb3-vec both --json benchmarks/results/sb3_comparison.json

Matched settings (both sides): PPO -- 64 steps per env per rollout, minibatch 256, 10 epochs, lr 3e-4, gamma 0.99,
GAE 0.95, clip 0.2, grad-norm 0.5, tanh MLP 64x64 actor and critic, initial log-std -0.5, running observation and
return normalisation (ours built in; SB3 via VecNormalize). SAC -- ReLU MLP 256x256, batch 256, lr 3e-4, gamma
0.99, tau 0.005, one gradient step per batched env step, automatic temperature from 0.1, target entropy -Da, the
same number (4000) of uniform-random warm-up transitions; observation normalisation (ours: fitted once from the warm-up
data; SB3: VecNormalize running obs stats, rewards unscaled). Our SAC critics use LayerNorm (its default), SB3's
do not. Our SAC runs each batched step's gradient updates on a worker thread while the envs take the next step
(``overlap_updates``, its default; its action then lags one step of updates), SB3's alternates.
``env_steps`` counts transitions summed over envs; steps/s is ``env_steps`` over training wall time (collection +
updates), torch on one intra-op thread.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch

from distillery.envs import make_env
from distillery.evaluate import PolicyActor
from distillery.policies import make_policy
from distillery.rollout import run_waves, summarize
from distillery.runtime import atomic_write_text

AGENTS = ("distillery-ppo", "sb3-ppo", "distillery-sac", "sb3-sac")
# on request only: our SAC with overlap_updates=false, to measure what the overlap buys in the same run
ABLATIONS = ("distillery-sac-alternating",)
PPO_SHARED = {"num_steps": 64, "minibatch_size": 256, "epochs": 10, "lr": 3e-4, "gamma": 0.99, "gae_lambda": 0.95,
              "clip": 0.2, "max_grad_norm": 0.5, "hidden": [64, 64], "init_log_std": -0.5}
SAC_SHARED = {"hidden": [256, 256], "batch_size": 256, "lr": 3e-4, "gamma": 0.99, "tau": 0.005,
              "init_temperature": 0.1, "learning_starts": 4000}  # learning_starts: transitions


class _Quiet:
    """The logger interface our agents need, printing nothing (the benchmark prints its own table)."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def progress(self, total: int | None, desc: str = "") -> Any:
        from tqdm import tqdm
        return tqdm(total=total, disable=True)


class _SB3Actor:
    """An SB3 model (plus its VecNormalize observation stats) as a rollout actor, deterministic."""

    def __init__(self, model: Any, vecnorm: Any) -> None:
        self.model, self.vecnorm = model, vecnorm

    def __call__(self, obs: dict[str, torch.Tensor], active: torch.Tensor | None = None) -> torch.Tensor:
        x = self.vecnorm.normalize_obs(obs["state"].numpy())
        action, _ = self.model.predict(x, deterministic=True)
        return torch.as_tensor(np.asarray(action, dtype=np.float32))

    def reset(self, mask: torch.Tensor | None = None) -> None:
        pass


def _train_ours(agent_name: str, task: str, env_steps: int, num_envs: int, seed: int, run_dir: Path) -> Any:
    env = make_env(task, num_envs, seed=seed)
    torch.manual_seed(seed)
    if agent_name == "distillery-ppo":
        from distillery.agents.ppo import PPOAgent
        s = PPO_SHARED
        policy = make_policy("gaussian", env.observation_spec, env.action_spec,
                             {"hidden": s["hidden"], "init_log_std": s["init_log_std"]})
        cfg = {k: v for k, v in s.items() if k not in ("hidden", "init_log_std")}
        agent = PPOAgent({**cfg, "env_steps": env_steps, "value_hidden": s["hidden"]}, policy, env, run_dir,
                         _Quiet(), seed=seed)
    else:
        from distillery.agents.sac import SACAgent
        s = SAC_SHARED
        policy = make_policy("gaussian", env.observation_spec, env.action_spec,
                             {"hidden": s["hidden"], "activation": "relu", "squash": True, "state_std": True})
        cfg = {k: v for k, v in s.items() if k != "hidden"}
        agent = SACAgent({**cfg, "env_steps": env_steps, "critic_hidden": s["hidden"],
                          "overlap_updates": agent_name != "distillery-sac-alternating",
                          "checkpoint_every": 10 ** 9, "log_every": 10 ** 9}, policy, env, run_dir, _Quiet(),
                         seed=seed)
    agent.train()
    policy.eval()
    return PolicyActor(policy, "mean", seed)


def _train_sb3(agent_name: str, task: str, env_steps: int, num_envs: int, seed: int, sb3_vec: str) -> Any:
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    if sb3_vec == "dummy":
        from distillery.envs.gym_view import GymTaskEnv
        vec = DummyVecEnv([lambda i=i: GymTaskEnv(task, seed=seed + i) for i in range(num_envs)])
    else:
        from distillery.envs.sb3_vec_env import SB3VecEnv
        vec = SB3VecEnv(make_env(task, num_envs, seed=seed))
    vec.seed(seed)
    if agent_name == "sb3-ppo":
        s = PPO_SHARED
        venv = VecNormalize(vec, norm_obs=True, norm_reward=True, gamma=s["gamma"])
        model = PPO("MlpPolicy", venv, n_steps=s["num_steps"], batch_size=s["minibatch_size"], n_epochs=s["epochs"],
                    learning_rate=s["lr"], gamma=s["gamma"], gae_lambda=s["gae_lambda"], clip_range=s["clip"],
                    max_grad_norm=s["max_grad_norm"], seed=seed, device="cpu",
                    policy_kwargs={"net_arch": s["hidden"], "log_std_init": s["init_log_std"]})
    else:
        s = SAC_SHARED
        venv = VecNormalize(vec, norm_obs=True, norm_reward=False, gamma=s["gamma"])
        model = SAC("MlpPolicy", venv, batch_size=s["batch_size"], learning_rate=s["lr"], gamma=s["gamma"],
                    tau=s["tau"], ent_coef=f"auto_{s['init_temperature']}", train_freq=1, gradient_steps=1,
                    learning_starts=s["learning_starts"], buffer_size=max(env_steps, 1000), seed=seed,
                    device="cpu", policy_kwargs={"net_arch": s["hidden"]})
    model.learn(env_steps)
    venv.training = False
    return _SB3Actor(model, venv)


def run_one(agent_name: str, task: str, env_steps: int, num_envs: int, eval_episodes: int, seed: int,
            sb3_vec: str = "dummy") -> dict:
    """Train ``agent_name`` for ``env_steps`` transitions, then evaluate its deterministic policy. ``sb3_vec``:
    the vec env SB3 trains through, ``dummy`` (its DummyVecEnv of single envs) or ``batched`` (our adapter)."""
    t0 = time.perf_counter()
    with TemporaryDirectory() as tmp:
        if agent_name.startswith("distillery"):
            actor = _train_ours(agent_name, task, env_steps, num_envs, seed, Path(tmp))
        else:
            actor = _train_sb3(agent_name, task, env_steps, num_envs, seed, sb3_vec)
    train_s = time.perf_counter() - t0
    eval_env = make_env(task, min(num_envs, eval_episodes), seed=seed + 1)
    episodes = [ep for wave in run_waves(eval_env, actor, eval_episodes, seed=1000 + seed) for ep in wave]
    summary = summarize(episodes)
    return {"task": task, "agent": agent_name, "env_steps": env_steps, "num_envs": num_envs,
            "vec_env": "batched" if agent_name.startswith("distillery") else sb3_vec,
            "eval_episodes": summary["episodes"], "success_rate": summary["success_rate"],
            "success_ci95": summary["success_ci95"], "mean_return": summary["mean_return"],
            "env_steps_per_s": env_steps / train_s, "train_s": train_s}


def add_ratios(rows: list[dict]) -> None:
    """On each ``distillery-X`` row: success and speed over ``sb3-X`` as SB3 runs by default (its DummyVecEnv;
    our batched adapter if that is the only SB3 row), and speed over ``sb3-X`` on the adapter as
    ``speed_ratio_vs_sb3_batched`` when that row exists. The success ratio is None when SB3's success is 0."""
    by_agent = {(r["agent"], r["vec_env"]): r for r in rows}
    for r in rows:
        if not r["agent"].startswith("distillery"):
            continue
        algo = r["agent"].split("-")[1]
        batched = by_agent.get((f"sb3-{algo}", "batched"))
        ref = by_agent.get((f"sb3-{algo}", "dummy"), batched)
        if ref is None:
            continue
        r["sb3_reference_vec_env"] = ref["vec_env"]
        r["success_ratio_vs_sb3"] = r["success_rate"] / ref["success_rate"] if ref["success_rate"] > 0 else None
        r["speed_ratio_vs_sb3"] = r["env_steps_per_s"] / ref["env_steps_per_s"]
        r["return_diff_vs_sb3"] = r["mean_return"] - ref["mean_return"]
        if batched is not None and batched is not ref:
            r["speed_ratio_vs_sb3_batched"] = r["env_steps_per_s"] / batched["env_steps_per_s"]


def format_rows(rows: list[dict]) -> str:
    head = (f"{'task':<10} {'agent':<26} {'vec env':<8} {'env steps':>9} {'success':>8} {'95% CI':>13} "
            f"{'return':>8} {'steps/s':>8} {'succ/sb3':>8} {'speed/sb3':>9} {'speed/sb3 batched':>17}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lo, hi = r["success_ci95"]
        sr, sp, sb = (r.get(k) for k in ("success_ratio_vs_sb3", "speed_ratio_vs_sb3", "speed_ratio_vs_sb3_batched"))
        lines.append(f"{r['task']:<10} {r['agent']:<26} {r['vec_env']:<8} {r['env_steps']:>9} "
                     f"{r['success_rate']:>8.3f} {f'[{lo:.2f}, {hi:.2f}]':>13} {r['mean_return']:>8.2f} "
                     f"{r['env_steps_per_s']:>8.0f} {'-' if sr is None else f'{sr:.2f}':>8} "
                     f"{'-' if sp is None else f'{sp:.2f}':>9} {'-' if sb is None else f'{sb:.2f}':>17}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lift_cube", choices=["push_cube", "lift_cube"])
    parser.add_argument("--env-steps", type=int, default=100_000, help="transitions per agent, summed over envs")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--eval-episodes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--agents", default=",".join(AGENTS),
                        help=f"comma-separated subset of {AGENTS + ABLATIONS}")
    parser.add_argument("--sb3-vec", choices=["dummy", "batched", "both"], default="dummy",
                        help="SB3's vec env: its DummyVecEnv of single envs, our batched adapter, or both")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    bad = [a for a in agents if a not in AGENTS + ABLATIONS]
    if bad or min(args.env_steps, args.num_envs, args.eval_episodes) < 1:
        parser.error(f"unknown agents {bad} (choose from {AGENTS + ABLATIONS}); --env-steps, --num-envs and "
                     f"--eval-episodes must be >= 1")
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        parser.error("stable-baselines3 is not installed: pip install 'stable-baselines3>=2.3' (or '.[dev]')")
    if any("sac" in a for a in agents):
        try:
            from distillery.agents.sac import SACAgent  # noqa: F401
        except ImportError as e:
            print(f"skipping the SAC rows: distillery.agents.sac is not available ({e})")
            agents = [a for a in agents if "sac" not in a]
    torch.set_num_threads(1)
    # Import what both sides use before any clock starts, so the first agent does not pay for it (the first Adam
    # imports torch._dynamo: ~1.3 s here).
    import stable_baselines3.common.vec_env  # noqa: F401
    from stable_baselines3 import PPO, SAC  # noqa: F401

    import distillery.envs.gym_view  # noqa: F401
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    sb3_vecs = ["dummy", "batched"] if args.sb3_vec == "both" else [args.sb3_vec]
    runs = [(name, vec) for name in agents for vec in (sb3_vecs if name.startswith("sb3") else ["batched"])]
    rows = []
    for name, vec in runs:
        rows.append(run_one(name, args.task, args.env_steps, args.num_envs, args.eval_episodes, args.seed, vec))
        print(f"done {name} ({vec}): success {rows[-1]['success_rate']:.3f}, return {rows[-1]['mean_return']:.2f}, "
              f"{rows[-1]['env_steps_per_s']:.0f} steps/s", flush=True)
    add_ratios(rows)
    print(format_rows(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps({"benchmark": "sb3_comparison", "seed": args.seed,
                                                "argv": argv if argv is not None else sys.argv[1:], "rows": rows},
                                                indent=2))
    return rows


if __name__ == "__main__":
    main()
