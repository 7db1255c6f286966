"""``distillery <command> [key=value ...]``: the command-line entry point.

Commands compose the Hydra config tree in ``configs/`` with the given overrides, validate it before
any work, and write one run directory each. ``distillery show [overrides]`` prints the composed
config (every valid key).
"""
from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "collect": "roll out the scripted expert -> zarr dataset (episodes=, expert_noise=, expert_mistakes=, dataset=)",
    "train": "imitation (agent=bc) or RL (agent=offline|ppo|sac, init=CKPT) -> checkpoints; --resume RUN_DIR continues",
    "distill": "diffusion teacher -> one-step consistency policy (teacher=CKPT, agent.objective=output|consistency)",
    "eval": "evaluate a checkpoint -> results table + report.json (checkpoint=, episodes=, sampler=)",
    "export": "checkpoint -> policy.onnx + manifest.json for the torch-free runtime (checkpoint=, sampler=, export.*)",
    "pipeline": "noisy expert -> bc -> offline RL -> online RL -> one-step distill -> eval -> export (task=, pipeline.*)",
    "demo": "collect -> train diffusion + MLP -> distill -> evaluate -> export -> deploy check (about 40 min)",
    "show": "print the composed config",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distillery", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Diffusion policies for robots: collect, train, evaluate.",
        epilog="commands:\n" + "\n".join(f"  {k:<8} {v}" for k, v in COMMANDS.items()) +
               "\n\nexamples:\n  distillery collect task=push_cube episodes=200\n"
               "  distillery train experiment=push_cube_diffusion\n"
               "  distillery pipeline task=lift_cube\n"
               "  distillery eval checkpoint=runs/<run>/checkpoints/last episodes=200 sampler=ddim:10")
    p.add_argument("command", choices=list(COMMANDS), metavar="command", help=" | ".join(COMMANDS))
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value, e.g. task=lift_cube agent.steps=2000")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="(train, distill) continue the run in RUN_DIR exactly from its last checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from distillery import config as config_mod
    from distillery import pipeline

    try:
        if args.resume is not None and args.command not in ("train", "distill"):
            raise config_mod.ConfigError("--resume only applies to `distillery train` and `distillery distill`")
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise config_mod.ConfigError(f"arguments {bad} are not key=value overrides; e.g. task=push_cube")
        if args.command == "demo":
            report = pipeline.demo(args.overrides)
        elif args.command == "pipeline":
            report = pipeline.rl_pipeline(args.overrides)
        else:
            agent = ["agent=distill"] if args.command == "distill" else []
            cfg = config_mod.compose(agent + args.overrides)
            if args.command == "show":
                print(config_mod.to_yaml(cfg), end="")
                return 0
            if args.command == "collect":
                report = pipeline.collect(cfg)
            elif args.command == "train":
                report = pipeline.train(cfg, resume=args.resume)
            elif args.command == "distill":
                report = pipeline.distill(cfg, resume=args.resume)
            elif args.command == "export":
                from distillery.deploy.export import export

                report = export(cfg)
            else:
                report = pipeline.evaluate(cfg)
    except (config_mod.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"distillery {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(report)  # last line: the path of the artefact (dataset, run dir or report.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
