"""Compose and validate the Hydra config tree before any work starts.

Values live in the YAML tree under ``configs/`` (shipped in the package); this module adds the
schema: types of every top-level section (checked by OmegaConf), the valid names of tasks,
policies and agents, and cross-field checks (horizons, samplers). Every failure is a
:class:`ConfigError` whose message names the key and lists the valid choices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
if not (CONFIG_DIR / "config.yaml").is_file():  # installed wheel: configs ship as distillery.configs
    import distillery.configs as _configs_pkg

    CONFIG_DIR = Path(_configs_pkg.__file__).resolve().parent


class ConfigError(ValueError):
    """A bad config key or value; the message says which and how to fix it."""


# ----------------------------------------------------------------------------------- schemas (types only;
# values live in the YAML files, so there is one place to read and change a default)
@dataclass
class TaskSchema:
    name: str = MISSING
    max_episode_steps: Optional[int] = MISSING
    decimation: Optional[int] = MISSING
    kwargs: dict[str, Any] = MISSING


@dataclass
class BCSchema:
    name: str = MISSING
    steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    warmup_steps: int = MISSING
    grad_clip: float = MISSING
    ema: bool = MISSING
    ema_power: float = MISSING
    ema_max_decay: float = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    eval_episodes: int = MISSING
    checkpoint_every: int = MISSING
    episode_sampling: str = "step"


@dataclass
class DistillSchema(BCSchema):
    objective: str = MISSING
    teacher_sampler: Optional[str] = MISSING
    teacher_noise: str = MISSING
    multistep_prob: float = MISSING
    ode_steps: int = MISSING
    distance: str = MISSING
    dsm_weight: float = MISSING
    target_ema: float = MISSING
    init_from_teacher: bool = MISSING
    student: Optional[dict[str, Any]] = MISSING


AGENT_SCHEMAS: dict[str, type] = {"bc": BCSchema, "distill": DistillSchema}
# RL agents: the agent class's DEFAULTS are the schema (every key, with its default); ``num_envs`` is read by the
# train command that builds the envs. (module, class, extra keys)
RL_AGENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ppo": ("distillery.agents.ppo", "PPOAgent", ("num_envs",)),
    "sac": ("distillery.agents.sac", "SACAgent", ("num_envs",)),
    "offline": ("distillery.agents.offline", "OfflineRLAgent", ()),
    "ofql": ("distillery.agents.ofql", "OFQLAgent", ()),
}


def rl_agent_class(name: str) -> type:
    import importlib

    module, cls, _ = RL_AGENTS[name]
    return getattr(importlib.import_module(module), cls)


@dataclass
class EvalSchema:
    num_envs: int = MISSING
    sampler_episodes: dict[str, int] = MISSING
    latency_calls: int = MISSING
    video_episodes: int = MISSING
    deploy_episodes: int = MISSING


@dataclass
class CollectSchema:
    num_envs: int = MISSING
    action_noise: float = MISSING


@dataclass
class ExportSchema:
    format: str = MISSING
    out_dir: Optional[str] = MISSING
    parity_tol: float = MISSING
    parity_batches: list[int] = MISSING
    opset: Optional[int] = MISSING


@dataclass
class LoggerSchema:
    wandb: bool = MISSING
    project: str = MISSING


# The pipeline stages that take `distillery train` / `distill` overrides (`pipeline.<stage>`).
PIPELINE_STAGES = ("bc", "offline", "online", "distill")


@dataclass
class PipelineSchema:
    root: Optional[str] = MISSING
    expert_noise: dict[str, float] = MISSING
    expert_mistakes: dict[str, float] = MISSING
    dart_noise: dict[str, float] = MISSING
    episodes: int = MISSING
    eval_episodes: int = MISSING
    bc: list[str] = MISSING
    offline: list[str] = MISSING
    online: list[str] = MISSING
    distill: list[str] = MISSING
    distill_rollouts: int = MISSING
    distill_dagger_rounds: dict[str, int] = MISSING
    task_overrides: dict[str, dict[str, list[str]]] = MISSING


@dataclass
class RootSchema:
    seed: int = MISSING
    device: str = MISSING
    run_dir: Optional[str] = MISSING
    dataset: Optional[str] = MISSING
    episodes: int = MISSING
    expert_noise: float = MISSING
    expert_mistakes: float = MISSING
    checkpoint: Optional[str] = MISSING
    teacher: Optional[str] = MISSING
    init: Optional[str] = MISSING
    sampler: Optional[str] = MISSING
    task: TaskSchema = field(default_factory=TaskSchema)
    policy: dict[str, Any] = MISSING  # validated by the policy class itself (its DEFAULTS list every key)
    agent: Any = MISSING  # typed by AGENT_SCHEMAS[agent.name] in validate()
    eval: EvalSchema = field(default_factory=EvalSchema)
    collect: CollectSchema = field(default_factory=CollectSchema)
    export: ExportSchema = field(default_factory=ExportSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    pipeline: PipelineSchema = field(default_factory=PipelineSchema)


_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")


def _in_open_map(dotted: str) -> bool:
    """Whether ``dotted`` lies inside a schema field typed ``dict[...]`` (e.g. ``pipeline.task_overrides``): a map
    whose keys are the user's to add, which Hydra only takes with a ``++`` prefix."""
    node: Any = RootSchema
    for part in dotted.split("."):
        if not hasattr(node, "__dataclass_fields__"):
            return False
        node = get_type_hints(node).get(part)
        if get_origin(node) is dict:
            return True
    return False


def _hydra_compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="distillery"):
            return hydra_compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``configs/config.yaml`` with command-line ``overrides`` and validate it."""
    from hydra.errors import HydraException

    try:
        cfg = _hydra_compose(list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e).split("\nConfig search path:")[0].strip()
        m = _UNKNOWN_KEY.search(msg)
        if m:
            parent, _, key = m.group(1).rpartition(".")
            # list the keys of the config the user chose (agent=ppo has other keys than the default agent)
            choices = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0].lstrip("+~")]
            try:
                chosen = _hydra_compose(choices)
            except (HydraException, OmegaConfBaseException):
                chosen = _hydra_compose([])
            node = OmegaConf.select(chosen, parent) if parent else chosen
            valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
            msg = (f"unknown key {m.group(1)!r}"
                   + (f"; valid keys of {parent or 'the root'}: {', '.join(map(str, valid))}" if valid else "")
                   + (f"; {parent} takes new keys: add this one with '++{m.group(1)}=...'"
                      if _in_open_map(m.group(1)) else ""))
        raise ConfigError(f"bad config override: {msg}") from None
    return validate(cfg)


def validate(cfg: DictConfig) -> DictConfig:
    """Type-check ``cfg`` against :class:`RootSchema` and check names and cross-field rules."""
    name = OmegaConf.select(cfg, "agent.name")
    if name not in AGENT_SCHEMAS and name not in RL_AGENTS:
        raise ConfigError(f"agent.name={name!r} is not an agent; valid agents: "
                          f"{', '.join([*AGENT_SCHEMAS, *RL_AGENTS])}")
    if name in RL_AGENTS:
        _check_rl_agent(cfg.agent)
    try:
        schema = AGENT_SCHEMAS[name]() if name in AGENT_SCHEMAS else {}
        typed = OmegaConf.merge(OmegaConf.structured(RootSchema(agent=schema)), cfg)
        OmegaConf.to_container(typed, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {e}".strip()) from None
    _check_choices(typed)
    return typed


def _check_rl_agent(agent: DictConfig) -> None:
    """Every key of an RL agent section must be one of its class's DEFAULTS (or a train-command key)."""
    name = agent.name
    valid = set(rl_agent_class(name).DEFAULTS) | set(RL_AGENTS[name][2]) | {"name"}  # type: ignore[attr-defined]
    unknown = sorted(set(agent.keys()) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {['agent.' + str(k) for k in unknown]} for agent={name}; valid keys: "
                          f"{', '.join(sorted(valid - {'name'}))}")


def _check_choices(cfg: DictConfig) -> None:
    from distillery.envs import TASKS
    from distillery.policies import POLICIES

    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not a task; valid tasks: {', '.join(TASKS)}")
    name = cfg.policy.get("name")
    if name not in POLICIES:
        raise ConfigError(f"policy.name={name!r} is not a policy; valid policies: {', '.join(sorted(POLICIES))}")
    _check_policy(cfg)
    if cfg.agent.name == "distill":
        from distillery.agents.distill import check_distill_config

        try:
            check_distill_config(cfg.agent)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    bc_like = cfg.agent.name in AGENT_SCHEMAS
    agent_positive = {"agent.steps": cfg.agent.steps, "agent.batch_size": cfg.agent.batch_size,
                      "agent.checkpoint_every": cfg.agent.checkpoint_every,
                      "agent.log_every": cfg.agent.log_every} if bc_like else {}
    if "num_envs" in cfg.agent:
        agent_positive["agent.num_envs"] = cfg.agent.num_envs
    positive = {"episodes": cfg.episodes, **agent_positive, "eval.num_envs": cfg.eval.num_envs,
                "collect.num_envs": cfg.collect.num_envs,
                "eval.latency_calls": cfg.eval.latency_calls, "eval.deploy_episodes": cfg.eval.deploy_episodes,
                **{f"eval.sampler_episodes.{k}": v for k, v in cfg.eval.sampler_episodes.items()}}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    per_task = [f"pipeline.{group}.{task}" for group in ("expert_noise", "expert_mistakes", "dart_noise",
                                                         "distill_dagger_rounds")
                for task in cfg.pipeline[group]]
    nonneg = ["expert_noise", "expert_mistakes", "collect.action_noise", "eval.video_episodes",
              "pipeline.distill_rollouts", *per_task]
    if bc_like:
        nonneg += ["agent.lr", "agent.weight_decay", "agent.warmup_steps", "agent.eval_every"]
        if cfg.agent.episode_sampling not in ("step", "episode"):
            raise ConfigError(f"agent.episode_sampling={cfg.agent.episode_sampling!r}; use 'step' (every dataset step "
                              f"equally likely) or 'episode' (every episode equally likely)")
    for key in nonneg:
        value = OmegaConf.select(cfg, key)
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for task, stages in cfg.pipeline.task_overrides.items():
        unknown = sorted(set(stages) - set(PIPELINE_STAGES))
        if unknown:
            raise ConfigError(f"pipeline.task_overrides.{task} has unknown stages {unknown}; the stages with "
                              f"overrides are {list(PIPELINE_STAGES)}")
    for key in ["expert_mistakes", *(f"pipeline.expert_mistakes.{t}" for t in cfg.pipeline.expert_mistakes)]:
        value = OmegaConf.select(cfg, key)
        if value > 1:
            raise ConfigError(f"{key} is a share of episodes: it must be in [0, 1], got {value}")
    if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device={cfg.device!r}; use 'cpu' or 'cuda[:N]'")
    if cfg.sampler is not None:  # syntax only: which kinds apply depends on the checkpoint's policy (eval, export)
        from distillery.policies import parse_sampler

        for s in str(cfg.sampler).split(","):
            try:
                parse_sampler(s.strip(), 100)
            except ValueError as e:
                raise ConfigError(f"sampler={s.strip()!r}: {e}") from None


def _check_policy(cfg: DictConfig) -> None:
    """Build the policy for the task's specs on the meta device (no memory, no weights) so that every
    policy key, horizon, sampler and observation group is checked before any work starts."""
    import torch

    from distillery.envs import make_env
    from distillery.policies import make_policy

    env = make_env(cfg.task.name, num_envs=1)
    try:
        with torch.device("meta"):
            make_policy(cfg.policy.name, env.observation_spec, env.action_spec, OmegaConf.to_container(cfg.policy))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"invalid policy config for task {cfg.task.name}: {e}") from None
    finally:
        env.close()


def samplers(cfg: DictConfig, policy_name: str | None = None, own: str | None = None) -> list[str]:
    """The samplers ``eval`` runs: ``cfg.sampler`` (comma-separated), or the checkpoint's own sampler ``own``
    followed by the policy class's defaults (an RL fine-tuned policy's own chain, e.g. ``ddim:5:eta=1``, is the
    policy it was trained as; the class defaults alone would skip it)."""
    from distillery.policies import POLICIES, parse_sampler

    name = policy_name or cfg.policy.name
    fixed = getattr(POLICIES[name], "SAMPLERS", None)
    if fixed is not None:  # a policy with its own fixed samplers (the MLP's "direct") ignores `sampler`
        return list(fixed)
    if cfg.sampler is None:
        defaults = list(POLICIES[name].EVAL_SAMPLERS)  # type: ignore[attr-defined]
        return list(dict.fromkeys([own, *defaults] if own else defaults))
    out = [s.strip() for s in str(cfg.sampler).split(",") if s.strip()]
    kinds = getattr(POLICIES[name], "SAMPLER_KINDS", ())
    for s in out:
        try:
            spec = parse_sampler(s, 100)
            if spec.kind not in kinds:
                raise ValueError(f"the {name} policy's sampler kinds are {list(kinds)}")
        except ValueError as e:
            raise ConfigError(f"sampler={s!r}: {e}") from None
    return out


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
