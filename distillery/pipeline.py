"""The stages behind the CLI: ``collect``, ``train``, ``eval`` and the ``demo`` that chains them.

Each stage takes a validated config (:func:`distillery.config.compose`), writes one run directory
(``config.yaml``, ``metrics.jsonl``, checkpoints, ``report.json``) and returns what the next stage needs.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distillery import config as config_mod
from distillery.envs import BatchedEnv, make_env, make_expert

RUNS_DIR = Path("runs")


# ----------------------------------------------------------------------------------------------- helpers
def make_run_dir(cfg: DictConfig, command: str) -> Path:
    """``cfg.run_dir`` or ``runs/<date>_<time>_<command>_<task>``; writes the resolved ``config.yaml`` into it."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run_dir = RUNS_DIR / f"{stamp}_{command}_{cfg.task.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    from distillery.runtime import atomic_write_text

    atomic_write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg))
    return run_dir


def env_from_config(task: Any, num_envs: int, seed: int) -> BatchedEnv:
    """Batched env from a ``task`` config section (a DictConfig or the plain dict stored in checkpoints)."""
    kwargs: dict[str, Any] = dict(task["kwargs"])
    for key in ("max_episode_steps", "decimation"):
        if task[key] is not None:
            kwargs[key] = int(task[key])
    return make_env(task["name"], num_envs=num_envs, seed=seed, **kwargs)


def dataset_path(cfg: DictConfig) -> Path:
    return Path(cfg.dataset) if cfg.dataset else Path("data") / f"{cfg.task.name}.zarr"


def make_logger(cfg: DictConfig, run_dir: Path, name: str):
    from distillery.runtime import Logger

    return Logger(run_dir, OmegaConf.to_container(cfg, resolve=True), wandb=bool(cfg.logger.wandb),
                  project=cfg.logger.project, name=name)


# ----------------------------------------------------------------------------------------------- collect
def collect(cfg: DictConfig) -> Path:
    """Roll out the task's scripted expert and append ``cfg.episodes`` episodes to the dataset.

    Appending resumes: a dataset that already holds some episodes (e.g. from a killed run) is continued
    up to ``cfg.episodes``, with wave seeds continuing where it stopped.
    """
    from distillery.data import EpisodeWriter
    from distillery.rollout import run_waves, summarize

    path = dataset_path(cfg)
    num_envs = min(int(cfg.collect.num_envs), int(cfg.episodes))
    env = env_from_config(cfg.task, num_envs, cfg.seed)
    expert = make_expert(cfg.task.name, num_envs, noise=float(cfg.expert_noise), seed=int(cfg.seed),
                         mistakes=float(cfg.expert_mistakes))
    meta = {"task": cfg.task.name, "expert_noise": float(cfg.expert_noise),
            "expert_mistakes": float(cfg.expert_mistakes), "seed": int(cfg.seed),
            "control_dt": env.control_dt, "max_episode_steps": env.max_episode_steps,
            "collect_num_envs": num_envs, "action_noise": float(cfg.collect.action_noise)}
    played = []
    with EpisodeWriter(path, meta, env.observation_spec, env.action_spec) as writer:
        have = writer.num_episodes  # committed episodes of a dataset being resumed
        todo = int(cfg.episodes) - have
        if todo > 0:
            bar = _progress(todo, f"collect {cfg.task.name}")
            # a resumed collection draws its resets from another stream, so it does not replay earlier episodes
            first_wave = have // num_envs
            seed = int(cfg.seed) + 7919 * first_wave
            for wave in run_waves(env, expert, todo, seed, record=True,
                                  action_noise=float(cfg.collect.action_noise)):
                for ep in wave:
                    writer.append(ep.obs, ep.action, ep.reward, ep.terminated, ep.truncated)
                played.extend(wave)
                bar.update(len(wave))
            bar.close()
    env.close()
    if played:
        s = summarize(played)
        print(f"collected {len(played)} episodes -> {path}  (expert success {s['success_rate']:.3f}, "
              f"mean length {s['mean_length']:.1f})")
    else:
        print(f"{path} already holds {have} >= {cfg.episodes} episodes; nothing to collect")
    return path


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, mininterval=1.0, disable=None)


# ----------------------------------------------------------------------------------------------- train
def _run_agent(agent: Any, ckpt: Path | None, logger: Any, run_dir: Path) -> Path:
    """Resume ``agent`` from ``ckpt`` if given, train it to its last step, close the logger."""
    if ckpt is not None:
        agent.load(ckpt)
        progress = next(getattr(agent, a) for a in ("step", "env_steps", "env_step", "round") if hasattr(agent, a))
        print(f"resumed from {ckpt} at step {progress}")
    agent.train()
    logger.close()
    return run_dir


def _fill_missing(stored: DictConfig, defaults: DictConfig) -> None:
    """Give a run written before a config key or section existed that key's default, at any depth (not inside
    ``policy``, whose stored keys describe the saved network and are completed by the policy class)."""
    for key in defaults:
        if key not in stored:
            stored[key] = defaults[key]
        elif key != "policy" and isinstance(stored[key], DictConfig) and isinstance(defaults[key], DictConfig):
            _fill_missing(stored[key], defaults[key])


def _start_run(cfg: DictConfig, resume: str | Path | None, command: str) -> tuple[DictConfig, Path, Path | None]:
    """``(cfg, run_dir, checkpoint to resume or None)``: a resumed run takes its config from its run dir."""
    from distillery.runtime import resolve_checkpoint

    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there; pass the run directory that "
                                    f"`distillery {command}` created (runs/<...>_{command}_<task>)")
        stored = OmegaConf.load(run_dir / "config.yaml")
        defaults = config_mod.compose([f"agent={stored.agent.name}"]) if "agent" in stored else config_mod.compose()
        _fill_missing(stored, defaults)
        return config_mod.validate(stored), run_dir, resolve_checkpoint(run_dir)
    if cfg.run_dir and (Path(cfg.run_dir) / "checkpoints").exists():
        raise ValueError(f"run_dir={cfg.run_dir} already holds checkpoints; continue it with "
                         f"`distillery {command} --resume {cfg.run_dir}` or choose another run_dir")
    return cfg, make_run_dir(cfg, command), None


def train(cfg: DictConfig, resume: str | Path | None = None) -> Path:
    """Imitation of the dataset with ``cfg.policy`` (agent=bc), or an RL agent (:func:`_train_rl`); returns the run
    directory (checkpoints inside)."""
    import torch

    cfg, run_dir, ckpt = _start_run(cfg, resume, "train")  # a resumed run's agent is the one it was started with
    if cfg.agent.name in config_mod.RL_AGENTS:
        return _train_rl(cfg, run_dir, ckpt)

    from distillery.agents import BCAgent
    from distillery.data import EpisodeDataset, SequenceDataset
    from distillery.policies import make_policy

    torch.manual_seed(int(cfg.seed))
    path = dataset_path(cfg)
    episodes = EpisodeDataset(path)
    if episodes.meta.get("task") != cfg.task.name:
        raise ValueError(f"dataset {path} holds task {episodes.meta.get('task')!r} but task={cfg.task.name!r}; "
                         f"pass dataset=<path of a {cfg.task.name} dataset> or collect one")
    policy = make_policy(cfg.policy.name, episodes.obs_spec, episodes.action_spec,
                         OmegaConf.to_container(cfg.policy))
    policy.set_normalizer(episodes.stats(list(policy.obs_keys) + ["action"]))
    data = SequenceDataset(episodes, policy.obs_keys, policy.obs_horizon, policy.pred_horizon,
                           _episode_weights(cfg, episodes))
    logger = make_logger(cfg, run_dir, run_dir.name)
    print(f"train {cfg.policy.name} ({policy.num_params() / 1e6:.2f}M params) on {episodes.num_episodes} episodes "
          f"/ {episodes.num_steps} steps of {path} -> {run_dir}")

    periodic_eval = None
    if cfg.agent.eval_every:
        from distillery.evaluate import evaluate_policy

        eval_env = env_from_config(cfg.task, min(int(cfg.eval.num_envs), int(cfg.agent.eval_episodes)), cfg.seed + 1)

        def periodic_eval(p):
            return {k: v for k, v in evaluate_policy(p, eval_env, int(cfg.agent.eval_episodes), cfg.seed + 1,
                                                     None)[0].items() if isinstance(v, float)}

    agent = BCAgent(cfg.agent, policy, data, run_dir, logger, seed=int(cfg.seed), evaluate=periodic_eval,
                    meta={"task": cfg.task.name, "dataset": str(path), "config": OmegaConf.to_container(cfg)})
    return _run_agent(agent, ckpt, logger, run_dir)


def _episode_weights(cfg: DictConfig, episodes: Any) -> Any:
    """``agent.episode_sampling``: None (step: every dataset step equally likely) or the balanced episode weights."""
    from distillery.data import SequenceDataset

    return SequenceDataset.balanced_episode_weights(episodes) if cfg.agent.episode_sampling == "episode" else None


def _initial_policy(cfg: DictConfig, env: BatchedEnv | None = None) -> tuple[Any, dict[str, Any]]:
    """``cfg.init``'s policy (checked against the task) or a fresh ``cfg.policy`` for ``env``'s specs."""
    from distillery.evaluate import load_policy
    from distillery.policies import make_policy

    if cfg.init:
        policy, meta = load_policy(cfg.init)
        trained_on = meta.get("config", {}).get("task", {}).get("name", meta.get("task"))
        if trained_on != cfg.task.name:
            raise ValueError(f"init={cfg.init} was trained on task {trained_on!r}, not task={cfg.task.name!r}")
        return policy, {"checkpoint": meta["checkpoint_path"], "sha256": meta["checkpoint_sha256"],
                        "dataset": meta.get("dataset")}
    if env is None:
        raise ValueError(f"agent={cfg.agent.name} fine-tunes a trained policy: pass init=<a BC run dir or checkpoint>")
    return make_policy(cfg.policy.name, env.observation_spec, env.action_spec,
                       OmegaConf.to_container(cfg.policy)), {}


def _train_rl(cfg: DictConfig, run_dir: Path, ckpt: Path | None) -> Path:
    """``agent=ppo|sac`` (online, batched envs; from ``init`` or a fresh ``policy``), ``agent=offline`` (RL-100's
    offline stage from ``init``, a BC run, on ``dataset`` or the one ``init`` was trained on) or ``agent=ofql``
    (one-step flow Q-learning on ``dataset``), into ``run_dir``, resumed from ``ckpt`` if given."""
    import torch

    torch.manual_seed(int(cfg.seed))
    name = cfg.agent.name
    agent_cfg = OmegaConf.to_container(cfg.agent)
    num_envs = int(agent_cfg.pop("num_envs", 1))
    logger = make_logger(cfg, run_dir, run_dir.name)
    meta: dict[str, Any] = {"task": cfg.task.name, "config": OmegaConf.to_container(cfg)}
    if name == "offline":
        from distillery.agents.offline import OfflineRLAgent

        policy, meta["init"] = _initial_policy(cfg)
        path = Path(cfg.dataset) if cfg.dataset else Path(meta["init"]["dataset"] or dataset_path(cfg))
        if int(agent_cfg.get("collect_episodes", 0)) > 0:  # rollouts go into the run's own copy, not the source
            meta["source_dataset"], path = str(path), _own_copy(path, run_dir / "data.zarr")
        meta["dataset"] = str(path)

        def collect_more(p: Any, episodes: int, round_: int) -> None:
            _append_rollouts(cfg, p, path, episodes, int(cfg.seed) + 1000 * (round_ + 1))

        agent: Any = OfflineRLAgent(agent_cfg, policy, path, run_dir, logger, seed=int(cfg.seed), meta=meta,
                                    collect=collect_more)
    elif name == "ofql":
        agent = _ofql_agent(cfg, agent_cfg, run_dir, logger, meta)
        print(f"train ofql ({sum(p.numel() for p in agent.actor.parameters()) / 1e6:.2f}M actor params) on "
              f"{len(agent.data['obs'])} chunk transitions of {meta['dataset']} -> {run_dir}")
        return _run_agent(agent, ckpt, logger, run_dir)
    else:
        env = env_from_config(cfg.task, num_envs, int(cfg.seed))
        policy, meta["init"] = _initial_policy(cfg, env)
        cls = config_mod.rl_agent_class(name)
        agent = cls(agent_cfg, policy, env, run_dir, logger, seed=int(cfg.seed), meta=meta)
    print(f"train {name} ({policy.name}, {policy.num_params() / 1e6:.2f}M params"
          + (f", from {cfg.init}" if cfg.init else "") + f") -> {run_dir}")
    return _run_agent(agent, ckpt, logger, run_dir)


def _ofql_agent(cfg: DictConfig, agent_cfg: dict[str, Any], run_dir: Path, logger: Any,
                meta: dict[str, Any]) -> Any:
    """``agent=ofql``: one-step flow Q-learning on the chunk transitions of ``cfg.dataset`` (no ``init``: it learns
    its policy from the data alone)."""
    from distillery.agents.ofql import OFQLAgent
    from distillery.data import EpisodeDataset
    from distillery.data.transitions import chunk_transitions

    if cfg.init:
        raise ValueError(f"agent=ofql learns its own one-step policy from the dataset; drop init={cfg.init}")
    path = dataset_path(cfg)
    episodes = EpisodeDataset(path)
    if episodes.meta.get("task") != cfg.task.name:
        raise ValueError(f"dataset {path} holds task {episodes.meta.get('task')!r} but task={cfg.task.name!r}; "
                         f"pass dataset=<path of a {cfg.task.name} dataset> or collect one")
    key, chunk = str(agent_cfg["obs_key"]), int(agent_cfg["chunk"])
    if key not in episodes.obs or episodes.obs[key].ndim != 2:
        raise ValueError(f"agent.obs_key={key!r} must be a flat observation group of {path}; groups: "
                         f"{sorted(episodes.obs)}")
    transitions = chunk_transitions(episodes, key, chunk, float(agent_cfg["gamma"]))
    meta["dataset"] = str(path)
    return OFQLAgent(agent_cfg, transitions["obs"].shape[1], transitions["action"].shape[1], transitions, run_dir,
                     logger, seed=int(cfg.seed), meta=meta)


def _own_copy(source: Path, dest: Path) -> Path:
    """``dest``, a copy of the dataset ``source`` made once (into a temporary name, then renamed: a crash never
    leaves a half copy at ``dest``); a resumed run finds it and keeps what was appended to it."""
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        os.replace(tmp, dest)
    return dest


def _append_rollouts(cfg: DictConfig, policy: Any, path: Path, episodes: int, seed: int,
                     meta: dict[str, Any] | None = None) -> None:
    """Roll out ``policy`` (its default sampler) and append the episodes to the dataset at ``path``, which is
    created with ``meta`` if it does not exist."""
    from distillery.data import EpisodeDataset, EpisodeWriter
    from distillery.evaluate import PolicyActor
    from distillery.rollout import run_waves

    meta = EpisodeDataset(path).meta if meta is None else meta
    env = env_from_config(cfg.task, min(int(cfg.collect.num_envs), episodes), seed)
    with EpisodeWriter(path, meta, env.observation_spec, env.action_spec) as writer:
        for wave in run_waves(env, PolicyActor(policy, None, seed), episodes, seed, record=True):
            for ep in wave:
                writer.append(ep.obs, ep.action, ep.reward, ep.terminated, ep.truncated)
    env.close()


# ----------------------------------------------------------------------------------------------- distill
def distill(cfg: DictConfig, resume: str | Path | None = None) -> Path:
    """Distil the diffusion checkpoint ``cfg.teacher`` into a ConsistencyPolicy; returns the run directory.

    The student takes the teacher's policy config (horizons, network) overlaid with ``agent.student``, the
    teacher's normaliser, and by default its weights; the dataset is the teacher's unless ``dataset=`` is given.
    """
    import torch

    from distillery.agents import DistillAgent
    from distillery.agents.distill import make_student
    from distillery.data import EpisodeDataset, SequenceDataset
    from distillery.evaluate import load_policy
    from distillery.policies import DiffusionPolicy

    if resume is None and not cfg.teacher:
        raise ValueError("distill needs teacher=<diffusion checkpoint: run dir, checkpoints/last or a step dir>")
    cfg, run_dir, ckpt = _start_run(cfg, resume, "distill")
    teacher, tmeta = load_policy(cfg.teacher)
    if not isinstance(teacher, DiffusionPolicy) or teacher.name != "diffusion":
        raise ValueError(f"teacher={cfg.teacher} holds a {teacher.name!r} policy; distillation needs a diffusion "
                         f"policy checkpoint (written by `distillery train policy=diffusion`)")
    task_cfg = tmeta["config"]["task"]
    path = Path(cfg.dataset) if cfg.dataset else Path(tmeta["dataset"])
    episodes = EpisodeDataset(path)
    if episodes.meta.get("task") != task_cfg["name"]:
        raise ValueError(f"dataset {path} holds task {episodes.meta.get('task')!r} but the teacher was trained on "
                         f"{task_cfg['name']!r}; pass dataset=<a {task_cfg['name']} dataset>")
    agent_cfg = OmegaConf.to_container(cfg.agent)
    student = make_student(teacher, agent_cfg["student"], bool(agent_cfg["init_from_teacher"]), verbose=True)
    torch.manual_seed(int(cfg.seed))
    data = SequenceDataset(episodes, student.obs_keys, student.obs_horizon, student.pred_horizon,
                           _episode_weights(cfg, episodes))
    logger = make_logger(cfg, run_dir, run_dir.name)
    print(f"distill {cfg.teacher} ({teacher.num_params() / 1e6:.2f}M) -> consistency student "
          f"({student.num_params() / 1e6:.2f}M), objective {cfg.agent.objective}, -> {run_dir}")
    full_cfg = {**OmegaConf.to_container(cfg), "task": task_cfg}
    agent = DistillAgent(agent_cfg, student, teacher, data, run_dir, logger, seed=int(cfg.seed),
                         meta={"task": task_cfg["name"], "dataset": str(path), "config": full_cfg,
                               "teacher": {"checkpoint": tmeta["checkpoint_path"],
                                           "sha256": tmeta["checkpoint_sha256"]}})
    return _run_agent(agent, ckpt, logger, run_dir)


# ----------------------------------------------------------------------------------------------- eval
def evaluate(cfg: DictConfig, checkpoints: dict[str, str | Path] | None = None,
             run_dir: Path | None = None) -> Path:
    """Evaluate one checkpoint (``cfg.checkpoint``) or several (``{label: path}``) with each sampler.

    Prints the results table and writes ``report.json`` in the run directory; returns its path.
    """
    from distillery.evaluate import evaluate_policy, format_table, load_policy, measure_latency, save_video
    from distillery.evaluate import write_report
    from distillery.runtime import load_checkpoint_meta, resolve_checkpoint

    if checkpoints is None:
        if not cfg.checkpoint:
            raise ValueError("eval needs checkpoint=<run dir | checkpoints/last | step dir>")
        checkpoints = {"": cfg.checkpoint}
    run_dir = run_dir or make_run_dir(cfg, "eval")
    results = []
    tasks = set()
    for label, ckpt in checkpoints.items():
        if load_checkpoint_meta(resolve_checkpoint(ckpt)).get("kind") == "ofql":
            row, task_cfg = evaluate_ofql_run(ckpt, int(cfg.eval.sampler_episodes.get("one_step", cfg.episodes)),
                                              int(cfg.seed), int(cfg.eval.num_envs), int(cfg.eval.latency_calls),
                                              label)
            results.append(row)
            tasks.add(str(task_cfg["name"]))
            continue
        policy, meta = load_policy(ckpt)
        # evaluate on the task (and episode settings) the policy was trained for
        task_cfg = meta["config"]["task"]
        tasks.add(task_cfg["name"])
        latency_env = env_from_config(task_cfg, 1, cfg.seed)
        for sampler in config_mod.samplers(cfg, policy.name, policy.cfg.get("sampler")):
            s = None if sampler == "direct" else sampler
            episodes = int(cfg.eval.sampler_episodes.get(sampler, cfg.episodes))
            env = env_from_config(task_cfg, min(int(cfg.eval.num_envs), episodes), cfg.seed)
            t0 = time.perf_counter()
            bar = _progress(episodes, f"eval {label or policy.name} {sampler}")
            summary, played = evaluate_policy(policy, env, episodes, int(cfg.seed), s, bar,
                                              int(cfg.eval.video_episodes))
            bar.close()
            latency = measure_latency(policy, latency_env, s, int(cfg.eval.latency_calls))
            row = {"policy": label or policy.name, "sampler": sampler, "runtime": "torch", **summary,
                   "latency_ms_p50": latency,
                   "params": policy.num_params(), "checkpoint": meta["checkpoint_path"],
                   "eval_wall_s": time.perf_counter() - t0}
            results.append(row)
            for i, ep in enumerate(e for e in played if e.frames):
                save_video(ep.frames, run_dir / f"video_{row['policy']}_{sampler.replace(':', '-')}_{i}.gif",
                           fps=1.0 / env.control_dt)
            env.close()
        latency_env.close()
    path = write_report(run_dir, ",".join(sorted(tasks)), int(cfg.episodes), int(cfg.seed), results)
    print(format_table(results))
    return path


def evaluate_ofql_run(ckpt: str | Path, episodes: int, seed: int, num_envs: int, latency_calls: int = 20,
                      label: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """One report row for an ``agent=ofql`` run (its one-step sampler, the only one it has) over ``episodes``
    seeded episodes of the task it was trained on, and that task's config section."""
    from distillery.evaluate import evaluate_actor, load_ofql_actor, measure_actor_latency

    actor, meta = load_ofql_actor(ckpt, seed)
    task_cfg = meta["config"]["task"]
    env = env_from_config(task_cfg, min(num_envs, episodes), seed)
    t0 = time.perf_counter()
    bar = _progress(episodes, f"eval {label or 'ofql'} one_step")
    summary, _ = evaluate_actor(actor, env, episodes, seed, bar)
    bar.close()
    env.close()
    latency_env = env_from_config(task_cfg, 1, seed)
    latency = measure_actor_latency(actor, latency_env, latency_calls)
    latency_env.close()
    row = {"policy": label or "ofql", "sampler": "one_step", "runtime": "torch", **summary,
           "latency_ms_p50": latency, "params": meta["params"], "checkpoint": meta["checkpoint_path"],
           "eval_wall_s": time.perf_counter() - t0}
    return row, task_cfg


# ----------------------------------------------------------------------------------------------- demo
def demo(overrides: list[str]) -> Path:
    """collect -> train diffusion and the MLP baseline on the same data -> distil the diffusion teacher into a
    one-step consistency student -> evaluate all three -> export the student to ONNX -> run the export in closed
    loop through the torch-free deploy runtime -> one report.json with every row."""
    from distillery.deploy.export import export as export_stage
    from distillery.evaluate import evaluate_deployed, format_table, write_report

    t0 = time.perf_counter()
    base = config_mod.compose(["experiment=demo", *overrides])
    root = Path(base.run_dir) if base.run_dir else RUNS_DIR / f"{dt.datetime.now():%Y%m%d-%H%M%S}_demo"
    data = root / "data" / f"{base.task.name}.zarr"
    common = [f"dataset={data}", *overrides]
    collect(config_mod.compose(["experiment=demo", *common, f"run_dir={root / 'collect'}"]))
    runs = {}
    for policy in ("diffusion", "mlp"):
        cfg = config_mod.compose(["experiment=demo", f"policy={policy}", *common,
                                  f"run_dir={root / ('train_' + policy)}"])
        runs[policy] = train(cfg)
    runs["consistency"] = distill(config_mod.compose(["experiment=demo", "agent=distill", *common,
                                                      f"teacher={runs['diffusion']}", f"run_dir={root / 'distill'}"]))
    eval_cfg = config_mod.compose(["experiment=demo", *common, f"run_dir={root}"])
    root.mkdir(parents=True, exist_ok=True)
    report = evaluate(eval_cfg, {k: runs[k] for k in ("diffusion", "consistency", "mlp")}, run_dir=root)
    export_dir = export_stage(config_mod.compose(["experiment=demo", *common, f"checkpoint={runs['consistency']}",
                                                  "sampler=consistency:1", f"export.out_dir={root / 'export'}"]))
    deployed = evaluate_deployed(export_dir, int(eval_cfg.eval.deploy_episodes), int(eval_cfg.seed))
    results = json.loads(report.read_text())["results"] + [deployed]
    report = write_report(root, base.task.name, int(eval_cfg.episodes), int(eval_cfg.seed), results)
    print(format_table(results))
    print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min")
    return report


# ----------------------------------------------------------------------------------------------- RL pipeline
RL_STAGES = ("expert", "bc", "offline", "online", "one_step")


def _teacher_rollouts(cfg: DictConfig, teacher: Path, path: Path, episodes: int) -> Path:
    """A dataset of ``episodes`` rollouts of the policy run ``teacher`` (its default sampler) at ``path``."""
    from distillery.evaluate import load_policy

    policy, tmeta = load_policy(teacher)
    if path.exists():  # a killed run's partial rollouts: the seeded rollouts are replayed from the start
        shutil.rmtree(path)
    seed = int(cfg.seed) + 2000  # reset seeds apart from collection (seed) and evaluation (seed + 12345)
    _append_rollouts(cfg, policy, path, episodes, seed,
                     {"task": cfg.task.name, "seed": seed, "source": tmeta["checkpoint_path"],
                      "sampler": str(policy.cfg.get("sampler"))})
    return path


def _student_rollouts(cfg: DictConfig, student: Path, source: Path, path: Path, episodes: int, seed: int) -> Path:
    """A DAgger round's data at ``path``: the dataset ``source`` plus ``episodes`` rollouts of ``student`` (its
    default sampler, ``consistency:1``). Built under a temporary name and renamed, so a crash leaves no half."""
    from distillery.evaluate import load_policy

    policy, _ = load_policy(student)
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    _append_rollouts(cfg, policy, tmp, episodes, seed)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def run_stage(root: Path, name: str, run: Any, source: str | None = None) -> dict[str, Any]:
    """Run ``run() -> path`` unless ``root/<name>/stage.json`` says it finished (from the same ``source``, when one
    is given: the checkpoint a stage is made from); returns that record (``path``, ``wall_s`` of the run that
    finished it, ``resumed``, ``source``)."""
    from distillery.runtime import atomic_write_text

    marker = root / name / "stage.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if source is None or record.get("source") == source:
            print(f"pipeline: stage {name} finished earlier ({record['path']}); skipped")
            return record
        print(f"pipeline: stage {name} was made from {record.get('source')}, now from {source}; redone")
        marker.unlink()  # no longer true; and an export refuses a directory holding other files
    resumed = (root / name).exists()
    before = _logged_seconds(root / name)  # an interrupted earlier run of this stage counts too
    t0 = time.perf_counter()
    path = run()
    record = {"stage": name, "path": str(path), "wall_s": before + time.perf_counter() - t0, "resumed": resumed,
              **({"source": source} if source is not None else {})}
    (root / name).mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(record, indent=1))
    return record


def _logged_seconds(run_dir: Path) -> float:
    """Seconds earlier (interrupted or resumed) runs of this directory logged in ``metrics.jsonl``: each run's
    ``time`` restarts at 0, so the total is the sum of each segment's last time (time after a run's last log
    line is not counted)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    total = last = 0.0
    for line in path.read_text().splitlines():
        try:
            t = float(json.loads(line)["time"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill, or one without a time
        if t < last:  # a new run started logging
            total += last
        last = t
    return total + last


def resume_arg(run_dir: Path) -> Path | None:
    return run_dir if (run_dir / "checkpoints").exists() else None


EVAL_SEED_OFFSET = 12345  # the pipeline evaluates at seed + this: episodes apart from training and collection


def pipeline_root(base: DictConfig) -> Path:
    """``pipeline.root``, or ``runs/pipeline_<task>``."""
    return Path(base.pipeline.root) if base.pipeline.root else RUNS_DIR / f"pipeline_{base.task.name}"


def _demonstrator(base: DictConfig) -> tuple[float, float, float]:
    """The pipeline's demonstrator for ``base.task``: (label noise, share of mistaken episodes, executed-only
    noise)."""
    task, p = base.task.name, base.pipeline
    if task not in p.expert_noise:
        raise config_mod.ConfigError(f"pipeline.expert_noise has no entry for task {task!r}; add "
                                     f"pipeline.expert_noise.{task}=<action noise std>")
    return float(p.expert_noise[task]), float(p.expert_mistakes.get(task, 0.0)), float(p.dart_noise.get(task, 0.0))


def pipeline_demonstrations(overrides: list[str]) -> dict[str, Any]:
    """The pipeline's first stage on its own: the noisy expert's ``pipeline.episodes`` demonstrations in
    ``<root>/data.zarr`` (kept if already collected); returns the stage record (``path``: the collect run)."""
    base = config_mod.compose(overrides)
    root = pipeline_root(base)
    noise, mistakes, dart = _demonstrator(base)
    return run_stage(root, "collect", lambda: collect(config_mod.compose([
        *overrides, f"dataset={root / 'data.zarr'}", f"run_dir={root / 'collect'}", f"expert_noise={noise}",
        f"expert_mistakes={mistakes}", f"collect.action_noise={dart}", f"episodes={int(base.pipeline.episodes)}"])))


def rl_pipeline(overrides: list[str]) -> Path:
    """``distillery pipeline task=T``: demonstrations of a noisy expert -> BC -> RL-100 offline RL -> online PPO
    over the denoising chain -> one-step consistency distillation -> evaluation of every stage over
    ``pipeline.eval_episodes`` seeded episodes -> ONNX export of the one-step policy. Every stage is a normal run
    directory under ``pipeline.root`` (what `distillery train/distill` would write); a rerun skips finished stages
    and resumes an interrupted one from its checkpoints. Writes ``report.json`` (rows: task, stage, success_rate,
    episodes, wall_s, ...) and prints the table; returns the report path."""
    from distillery.deploy.export import export as export_stage
    from distillery.evaluate import evaluate_deployed, evaluate_policy, load_policy
    from distillery.rollout import run_waves, summarize
    from distillery.runtime import atomic_write_text

    t_start = time.perf_counter()
    base = config_mod.compose(overrides)
    task, p = base.task.name, base.pipeline
    root = pipeline_root(base)
    data = root / "data.zarr"
    noise, mistakes, dart = _demonstrator(base)

    task_overrides = p.task_overrides.get(task, {})

    def stage_cfg(stage: str, *extra: str, run_name: str | None = None) -> DictConfig:
        """The config of ``stage``, run in ``root / (run_name or stage)``: the shared stage overrides (collect has
        none), then this task's, then the command line's."""
        stage_overrides = [*OmegaConf.select(p, stage, default=[]), *task_overrides.get(stage, [])]
        return config_mod.compose([*stage_overrides, *overrides, f"dataset={data}",
                                   f"run_dir={root / (run_name or stage)}", *extra])

    records = {"collect": pipeline_demonstrations(overrides)}
    records["bc"] = run_stage(root, "bc", lambda: train(stage_cfg("bc"), resume=resume_arg(root / "bc")))
    records["offline"] = run_stage(root, "offline", lambda: train(
        stage_cfg("offline", f"init={root / 'bc'}"), resume=resume_arg(root / "offline")))
    records["online"] = run_stage(root, "online", lambda: train(
        stage_cfg("online", f"init={root / 'offline'}"), resume=resume_arg(root / "online")))
    # The student copies the teacher where the teacher goes: on the online policy's own rollouts, not on the
    # noisy demonstrations, whose states and actions the fine-tuned policy has left behind.
    distill_data = data
    if int(p.distill_rollouts) > 0:
        records["rollouts"] = run_stage(root, "rollouts", lambda: _teacher_rollouts(
            base, root / "online", root / "rollouts" / "data.zarr", int(p.distill_rollouts)))
        distill_data = Path(records["rollouts"]["path"])
    students = [run_stage(root, "distill", lambda: distill(
        stage_cfg("distill", f"teacher={root / 'online'}", f"dataset={distill_data}"),
        resume=resume_arg(root / "distill")))]
    # DAgger (Ross et al. 2011): the student drifts into states its teacher's rollouts seldom show; each round adds
    # the latest student's rollouts, labelled by the teacher on the fly, and distils a new student on everything.
    for r in range(1, int(p.distill_dagger_rounds.get(task, 0)) + 1):
        name = f"dagger{r}_rollouts"
        records[name] = run_stage(root, name, partial(
            _student_rollouts, base, Path(students[-1]["path"]), Path(distill_data), root / name / "data.zarr",
            int(p.distill_rollouts) or int(p.episodes), int(base.seed) + 3000 + r))
        distill_data = Path(records[name]["path"])
        run_name = f"distill_dagger{r}"
        students.append(run_stage(root, run_name, partial(
            distill, stage_cfg("distill", f"teacher={root / 'online'}", f"dataset={distill_data}", run_name=run_name),
            resume=resume_arg(root / run_name))))
    # the report's one-step row: the last student, its wall time every distillation's
    records["one_step"] = {**students[-1], "wall_s": sum(s["wall_s"] for s in students)}

    # ---- evaluation of every stage on the same seeded episodes (cached per stage)
    episodes, seed = int(p.eval_episodes), int(base.seed) + EVAL_SEED_OFFSET
    rows = []
    for stage in RL_STAGES:
        cache = root / "eval" / f"{stage}.json"
        checkpoint = records["collect" if stage == "expert" else stage]["path"]
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("checkpoint") == checkpoint:
            rows.append(cached)
            continue  # evaluated earlier; a stage whose checkpoint changed (e.g. a DAgger round added) is redone
        env = env_from_config(base.task, min(int(base.eval.num_envs), episodes), seed)
        t0 = time.perf_counter()
        if stage == "expert":
            expert = make_expert(task, env.num_envs, noise=noise, seed=seed, mistakes=mistakes)
            # the demonstrator as it played: label noise plus the executed-only (DART) noise
            summary = summarize([ep for wave in run_waves(env, expert, episodes, seed, action_noise=dart)
                                 for ep in wave])
            sampler, wall = "expert", float(records["collect"]["wall_s"])
        else:
            policy, _ = load_policy(records[stage]["path"])
            sampler = "consistency:1" if stage == "one_step" else None
            if stage == "bc":  # compare BC with the RL stages on the chain they sample (ddim:K of the RL agents)
                sampler = str(load_policy(records["offline"]["path"])[0].cfg["sampler"])
            summary, _ = evaluate_policy(policy, env, episodes, seed, sampler)
            sampler = sampler or str(policy.cfg.get("sampler"))
            wall = float(records[stage]["wall_s"])
        env.close()
        row = {"task": task, "stage": stage, "success_rate": summary["success_rate"], "episodes": episodes,
               "wall_s": wall, "success_ci95": summary["success_ci95"], "mean_return": summary["mean_return"],
               "sampler": sampler, "eval_wall_s": time.perf_counter() - t0,
               "checkpoint": checkpoint}
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(row, indent=1))
        rows.append(row)
        print(f"pipeline eval {stage}: success {row['success_rate']:.3f} over {episodes} episodes")

    # ---- export of the one-step policy, checked in closed loop through the torch-free runtime
    # redone when the one-step policy is another student than the exported one (a DAgger round added or removed)
    records["export"] = run_stage(root, "export", lambda: export_stage(config_mod.compose(
        [*overrides, f"checkpoint={records['one_step']['path']}", "sampler=consistency:1",
         f"export.out_dir={root / 'export'}"])), source=records["one_step"]["path"])
    export_dir = Path(records["export"]["path"])
    deployed = evaluate_deployed(export_dir, int(base.eval.deploy_episodes), seed)
    rows[-1]["onnx_latency_ms_p50"] = deployed.get("latency_ms_p50")
    rows[-1]["onnx_success_rate"] = deployed.get("success_rate")
    report = {"task": task, "root": str(root), "rows": rows,
              "stage_wall_s": {k: v["wall_s"] for k, v in records.items()},
              "eval_wall_s": sum(r["eval_wall_s"] for r in rows),
              # the whole pipeline: every stage's training, the evaluations and the export
              "pipeline_wall_s": sum(v["wall_s"] for v in records.values()) + sum(r["eval_wall_s"] for r in rows),
              "this_invocation_wall_s": time.perf_counter() - t_start}
    path = root / "report.json"
    atomic_write_text(path, json.dumps(report, indent=1))
    print(format_pipeline_table(rows))
    return path


def format_pipeline_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | stage | success | 95% CI | episodes | sampler | stage wall (min) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["success_ci95"]
        lines.append(f"| {r['task']} | {r['stage']} | {r['success_rate']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                     f"{r['episodes']} | {r['sampler']} | {r['wall_s'] / 60:.1f} |")
    return "\n".join(lines)
