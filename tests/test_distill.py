"""Distillation of a diffusion teacher into a one-step consistency student."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ListLogger

from distillery.agents import BCAgent, DistillAgent
from distillery.data import EpisodeDataset, EpisodeWriter, SequenceDataset
from distillery.policies import make_policy
from distillery.policies.schedule import SamplerSpec
from distillery.specs import TensorSpec

NET = {"down_dims": [16, 32], "step_embed_dim": 16, "n_groups": 4, "pred_horizon": 8, "action_horizon": 2,
       "encoder": {"type": "mlp", "hidden": [32], "out_dim": 16}}
BC = {"steps": 150, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-6, "betas": [0.95, 0.999], "warmup_steps": 10,
      "grad_clip": 1.0, "ema": False, "ema_power": 0.75, "ema_max_decay": 0.9999, "log_every": 1, "eval_every": 0,
      "eval_episodes": 1, "checkpoint_every": 10_000}
DISTILL = {**BC, "objective": "output", "teacher_sampler": "ddim:5", "multistep_prob": 0.3, "ode_steps": 10,
           "distance": "l2", "dsm_weight": 0.0, "target_ema": 0.9, "init_from_teacher": True, "student": None,
           "teacher_noise": "fresh"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Bimodal toy demonstrations: the action chunk is +-tanh(state) depending on a hidden coin."""
    path = tmp_path_factory.mktemp("distill") / "toy.zarr"
    rng = np.random.default_rng(0)
    with EpisodeWriter(path, {"task": "toy"}, {"state": TensorSpec((3,))}, TensorSpec((2,), low=-1, high=1)) as w:
        for _ in range(16):
            T = 20
            obs = rng.normal(size=(T, 3)).astype(np.float32)
            sign = rng.choice([-1.0, 1.0])
            w.append({"state": obs}, (0.8 * sign * np.tanh(obs[:, :2])).astype(np.float32), np.zeros(T, np.float32),
                     np.eye(1, T, T - 1, dtype=bool)[0], np.zeros(T, bool))
    return SequenceDataset(EpisodeDataset(path), ["state"], 2, 8)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    torch.manual_seed(0)
    policy = make_policy("diffusion", data.dataset.obs_spec, data.dataset.action_spec, NET)
    policy.set_normalizer(data.dataset.stats(["state", "action"]))
    BCAgent(BC, policy, data, tmp_path_factory.mktemp("teacher"), ListLogger(), seed=0).train()
    return policy.eval()


def make_student(teacher):
    student = make_policy("consistency", teacher.obs_spec, teacher.action_spec, {**teacher.cfg, "sampler":
                                                                                   "consistency:1"})
    student.normalizer.load_state_dict(teacher.normalizer.state_dict())
    student.load_state_dict(teacher.state_dict())
    return student


def gap_to_teacher(student, teacher, data, level: int | None = None) -> float:
    """Mean squared gap (normalised units) between the student and the teacher's ddim:5 sample from held-out z:
    ``consistency:1`` from z itself (``level=None``), or one student step from the sample re-noised to ``level``
    (what each later step of ``consistency:N`` does)."""
    batch = data.random_batch(128, generator=torch.Generator().manual_seed(123))
    nobs, _ = teacher.normalized_batch(batch)
    z = torch.randn(128, 8, 2, generator=torch.Generator().manual_seed(456))
    with torch.no_grad():
        cond = teacher.encode_obs(nobs)
        want = teacher.schedule.sample(lambda x, t: teacher.eps(x, t, cond), z.shape, SamplerSpec("ddim", 5), x_T=z)
        if level is None:
            got = student.eval().sample_normalized(nobs, "consistency:1", None, noise=z)
        else:
            t = torch.full((128,), level)
            got = student.eval().consistency_fn(teacher.schedule.q_sample(want, t, z), t, student.encode_obs(nobs))
    return float((got - want).pow(2).mean())


def test_output_distillation_approaches_the_teacher_on_held_out_noise(data, teacher, tmp_path):
    student = make_student(teacher)
    before = gap_to_teacher(student, teacher, data)
    before_mid = [gap_to_teacher(student, teacher, data, level) for level in (66, 32)]
    logger = ListLogger()
    torch.manual_seed(1)
    DistillAgent({**DISTILL, "ema": False}, student, teacher, data, tmp_path, logger, seed=1).train()
    after = gap_to_teacher(student, teacher, data)
    after_mid = [gap_to_teacher(student, teacher, data, level) for level in (66, 32)]
    for b, a in zip(before_mid, after_mid):  # the levels consistency:3 re-noises to were trained (multistep_prob)
        assert a < 0.25 * b and a < 0.05, (before_mid, after_mid)
    losses = [m["train/loss"] for _, m in logger.rows]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert after < 0.25 * before, (before, after)
    assert after < 0.05  # the teacher's samples span ~0.6 in these units (two modes at +-0.8 tanh)


def test_consistency_distillation_loss_decreases_and_target_follows(data, teacher, tmp_path):
    student = make_student(teacher)
    agent = DistillAgent({**DISTILL, "objective": "consistency", "distance": "huber", "dsm_weight": 0.1,
                          "steps": 120}, student, teacher, data, tmp_path, ListLogger(), seed=2)
    before = {k: v.clone() for k, v in agent.target.state_dict().items()}
    agent.train()
    losses = [m["train/cd"] for _, m in agent.logger.rows]
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    moved = [k for k, v in agent.target.state_dict().items() if v.dtype.is_floating_point
             and not torch.equal(v, before[k])]
    assert moved  # the EMA target moved towards the student
    w = next(k for k in moved if k.endswith("weight"))
    t, s, b = agent.target.state_dict()[w], student.state_dict()[w], before[w]
    assert float((t - s).norm()) < float((b - s).norm())


def test_distill_resume_is_exact(data, teacher, tmp_path):
    cfg = {**DISTILL, "objective": "consistency", "steps": 8, "checkpoint_every": 4, "ema": True}
    straight = DistillAgent(cfg, make_student(teacher), teacher, data, tmp_path / "a", ListLogger(), seed=5)
    straight.train()
    first = DistillAgent({**cfg, "steps": 4}, make_student(teacher), teacher, data, tmp_path / "b", ListLogger(),
                         seed=5)
    first.train()
    resumed = DistillAgent(cfg, make_student(teacher), teacher, data, tmp_path / "b", ListLogger(), seed=99)
    resumed.load(tmp_path / "b" / "checkpoints" / "last")
    resumed.train()
    for (k, v), v2 in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        torch.testing.assert_close(v, v2, rtol=0, atol=0, msg=k)
    for v, v2 in zip(straight.target.state_dict().values(), resumed.target.state_dict().values()):
        torch.testing.assert_close(v, v2, rtol=0, atol=0)


def test_distill_rejects_bad_settings(data, teacher, tmp_path):
    with pytest.raises(ValueError, match="objective"):
        DistillAgent({**DISTILL, "objective": "magic"}, make_student(teacher), teacher, data, tmp_path, ListLogger())
    with pytest.raises(ValueError, match="DDIM chain"):
        DistillAgent({**DISTILL, "teacher_sampler": "ddpm"}, make_student(teacher), teacher, data, tmp_path,
                     ListLogger())


def test_output_distillation_defaults_to_the_teachers_own_stochastic_chain(data, teacher, tmp_path):
    """An RL fine-tuned teacher samples the ddim:K:eta=E chain it was trained on; teacher_sampler=None distils that
    chain, whose fresh noise after z makes the target random given z (the student regresses its mean)."""
    import copy

    tuned = copy.deepcopy(teacher)
    tuned.set_sampler("ddim:3:eta=1")
    agent = DistillAgent({**DISTILL, "teacher_sampler": None}, make_student(tuned), tuned, data, tmp_path,
                         ListLogger())
    assert (agent.teacher_sampler.steps, agent.teacher_sampler.eta) == (3, 1.0)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=8)))
    nobs, _ = agent.policy.normalized_batch(batch)
    z = torch.randn(8, tuned.pred_horizon, tuned.action_dim)
    cond = tuned.encode_obs(nobs)
    draws = [tuned.schedule.sample(lambda x, t: tuned.eps(x, t, cond), tuple(z.shape), agent.teacher_sampler, x_T=z)
             for _ in range(2)]
    assert not torch.allclose(draws[0], draws[1])  # same z, different samples: eta > 0 is honoured
    loss, _ = agent.compute_loss(batch)
    assert torch.isfinite(loss)


def test_shared_teacher_noise_reuses_z_at_every_step(teacher):
    """teacher_noise=shared: the eta > 0 chain's every step takes z as its noise, so the target is a function of z
    (a hand-rolled DDIM chain with noise z at each step gives the same sample)."""
    spec = SamplerSpec("ddim", 3, 1.0)
    z = torch.randn(4, teacher.pred_horizon, teacher.action_dim, generator=torch.Generator().manual_seed(7))
    cond = teacher.encode_obs({"state": torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(8))})

    def eps_fn(x, t):
        return teacher.eps(x, t, cond)

    with torch.no_grad():
        got = teacher.schedule.sample(eps_fn, tuple(z.shape), spec, x_T=z, step_noise=z)
        x = z
        for t, t_prev in teacher.schedule.timesteps(spec):
            x, _, _ = teacher.schedule.ddim_step(x, eps_fn(x, torch.full((4,), t)), t, t_prev, 1.0, noise=z)
        fresh = teacher.schedule.sample(eps_fn, tuple(z.shape), spec, x_T=z)
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    assert not torch.allclose(got, fresh)  # the default still draws fresh noise after z


def test_shared_teacher_noise_student_keeps_the_teachers_modes(data, teacher, tmp_path):
    """On bimodal demonstrations an eta=1 teacher picks its mode with noise drawn after z; with fresh noise the
    student can only learn the mean of both modes from z, with shared noise it learns the sample itself."""
    import copy

    tuned = copy.deepcopy(teacher)
    tuned.set_sampler("ddim:5:eta=1")
    batch = data.random_batch(128, generator=torch.Generator().manual_seed(123))
    nobs, _ = tuned.normalized_batch(batch)
    z = torch.randn(128, 8, 2, generator=torch.Generator().manual_seed(456))
    with torch.no_grad():
        cond = tuned.encode_obs(nobs)
        want = tuned.schedule.sample(lambda x, t: tuned.eps(x, t, cond), tuple(z.shape), tuned.default_sampler,
                                     x_T=z, step_noise=z)
    gaps = {}
    for noise in ("fresh", "shared"):
        student = make_student(tuned)
        torch.manual_seed(1)
        DistillAgent({**DISTILL, "teacher_sampler": None, "teacher_noise": noise, "ema": False}, student, tuned, data,
                     tmp_path / noise, ListLogger(), seed=1).train()
        with torch.no_grad():
            got = student.eval().sample_normalized(nobs, "consistency:1", None, noise=z)
        gaps[noise] = float((got - want).pow(2).mean())
    assert gaps["shared"] < 0.5 * gaps["fresh"], gaps
