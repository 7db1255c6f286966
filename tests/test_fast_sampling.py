"""Fast samplers: RTI warm start, consistency sampling, and the streaming buffer's invariants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.policies import make_policy
from distillery.policies.consistency import chain_levels
from distillery.policies.schedule import SamplerSpec
from distillery.specs import TensorSpec

OBS = {"state": TensorSpec((3,))}
ACT = TensorSpec((2,), low=-1, high=1)
SMALL = {"down_dims": [8, 16], "step_embed_dim": 8, "n_groups": 4, "pred_horizon": 8, "action_horizon": 2,
         "encoder": {"type": "mlp", "hidden": [16], "out_dim": 8}}


def build(name: str, **cfg):
    torch.manual_seed(0)
    p = make_policy(name, OBS, ACT, {**SMALL, **cfg})
    p.set_normalizer({"state": {"min": -np.ones(3), "max": np.ones(3), "mean": np.zeros(3), "std": np.ones(3)},
                      "action": {"min": -np.ones(2), "max": np.ones(2), "mean": np.zeros(2), "std": np.ones(2)}})
    return p.eval()


def history(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"state": torch.randn(b, 2, 3, generator=torch.Generator().manual_seed(seed))}


# ------------------------------------------------------------------------------------------------ RTI
def test_rti_with_the_full_chain_equals_plain_ddim():
    p = build("diffusion")
    obs = history(4)
    carry: dict[str, torch.Tensor] = {}
    for step in range(3):  # the first call is cold, later ones have a previous plan and still run the full chain
        a = p.predict_sequence(obs, "rti:5:of=5", torch.Generator().manual_seed(step), carry=carry)
        b = p.predict_sequence(obs, "ddim:5", torch.Generator().manual_seed(step))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bool(carry["valid"].all())


def test_rti_warm_start_reuses_the_shifted_plan_and_cold_rows_run_the_full_chain():
    p = build("diffusion")
    obs = history(3)
    nobs = p.normalizer.normalize_dict(obs)
    cond = p.encode_obs(nobs)
    prev = torch.rand(3, 8, 2) * 2 - 1
    carry = {"valid": torch.tensor([True, False, True]), "prev": prev.clone()}
    with torch.no_grad():
        got = p.sample_normalized(nobs, "rti:2:of=10", torch.Generator().manual_seed(5), carry=carry)
        # by hand, drawing in the sampler's order: x_T for all rows, then the re-noising noise of the warm rows
        g = torch.Generator().manual_seed(5)
        x_T = torch.randn(3, 8, 2, generator=g)
        z = torch.randn(2, 8, 2, generator=g)
        ta, warm = p.action_horizon, torch.tensor([0, 2])
        guess = torch.cat([prev[warm, ta:], prev[warm, -1:].expand(-1, ta, -1)], 1)
        x = p.schedule.q_sample(guess, torch.full((2,), 10), z)  # ddim:10 grid: last 2 steps are t = 10, 0
        for t, t_prev in [(10, 0), (0, -10)]:
            x, _, _ = p.schedule.ddim_step(x, p.eps(x, torch.full((2,), t), cond[warm]), t, t_prev, 0.0)
        cold = p.schedule.sample(lambda xx, t: p.eps(xx, t, cond[1:2]), (1, 8, 2), SamplerSpec("ddim", 10),
                                 x_T=x_T[1:2])
    torch.testing.assert_close(got[warm], x)
    torch.testing.assert_close(got[1:2], cold)
    assert carry["prev"] is got  # the new plan is what the next call warm-starts from


def test_rti_in_act_restarts_reset_envs():
    p = build("diffusion", sampler="rti:2")
    obs = {"state": torch.zeros(2, 3)}
    p.act(obs)
    assert bool(p._carry["valid"].all())
    p.reset(torch.tensor([True, False]))
    assert p._carry["valid"].tolist() == [False, True]


def test_bad_samplers_name_the_valid_forms():
    p = build("diffusion")
    with pytest.raises(ValueError, match="rti:K"):
        p.parse_sampler("rti:5:of=3")
    with pytest.raises(ValueError, match="sampler kinds"):
        p.parse_sampler("consistency:1")
    with pytest.raises(ValueError, match="sampler kinds"):
        build("consistency").parse_sampler("ddim:10")


# ------------------------------------------------------------------------------------------------ consistency
def test_consistency_sampling_chain():
    assert chain_levels(100, 1) == [99]
    assert chain_levels(100, 3) == [99, 66, 32]
    p = build("consistency")
    obs = history(2)
    nobs = p.normalizer.normalize_dict(obs)
    noise = torch.randn(2, 8, 2)
    with torch.no_grad():
        one = p.sample_normalized(nobs, "consistency:1", None, noise=noise)
        cond = p.encode_obs(nobs)
        x0 = p.unet(noise, torch.full((2,), 99), cond).clamp(-1, 1)
    torch.testing.assert_close(one, x0)
    assert p.is_deterministic("consistency:1") and not p.is_deterministic("consistency:3")
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        three = p.sample_normalized(nobs, "consistency:3", g1)
        x = torch.randn(2, 8, 2, generator=g2)
        for i, level in enumerate([99, 66, 32]):
            if i:
                x = p.schedule.q_sample(x0, torch.full((2,), level), torch.randn(2, 8, 2, generator=g2))
            x0 = p.consistency_fn(x, torch.full((2,), level), cond).clamp(-1, 1)
    torch.testing.assert_close(three, x0)


def test_consistency_policy_is_not_trained_by_bc():
    with pytest.raises(RuntimeError, match="distillery distill"):
        build("consistency").loss({})


# ------------------------------------------------------------------------------------------------ streaming
def test_streaming_levels():
    p = build("streaming", stream_steps=2)  # To 2, Tp 8, Ta 2 -> 3 chunks [0,3) [3,5) [5,8), 6 grid levels
    assert p.num_chunks == 3 and p.chunk_of.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert p.grid.tolist() == [16, 32, 49, 66, 82, 99]
    before, after = p.level_index("before"), p.level_index("after")
    assert before.tolist() == [1, 1, 1, 3, 3, 5, 5, 5] and after.tolist() == [-1, -1, -1, 1, 1, 3, 3, 3]
    assert bool((before.diff() >= 0).all()) and bool((after.diff() >= 0).all())  # monotone along the chunk
    assert bool((before - after == p.stream_steps).all())


def test_streaming_buffer_invariants_through_act():
    p = build("streaming", stream_steps=2)
    env_obs = torch.randn(3, 3)
    executed, ta, start = [], p.action_horizon, p.obs_horizon - 1
    g = torch.Generator().manual_seed(0)
    calls = {"shift": 0}
    shift = p.shift

    def counting_shift(buffer, generator=None):
        calls["shift"] += 1
        out = shift(buffer, generator)
        # shift: kept positions move Ta to the left; positions already at their new level are not re-noised
        kept = (torch.cat([p.level_index("after")[ta:], p.level_index("before")[-ta:]]) == p.level_index("before"))
        kept[-ta:] = False
        torch.testing.assert_close(out[:, kept], buffer[:, ta:][:, kept[:-ta]])
        return out

    p.shift = counting_shift  # type: ignore[method-assign]
    for step in range(8):
        a = p.act({"state": env_obs}, generator=g)
        buffer = p._carry["buffer"]
        # chunk 0 of the buffer is clean: it is what gets executed
        clean = p.normalizer.unnormalize("action", buffer[:, start:start + ta]).clamp(-1, 1)
        torch.testing.assert_close(p._queue, clean)
        executed.append(a)
        env_obs = env_obs + 0.1
    assert calls["shift"] == 3  # plans at steps 0 (cold fill), 2, 4, 6 -> three warm plans


def test_streaming_reset_refills_only_that_env():
    p = build("streaming")
    obs = {"state": torch.randn(2, 3)}
    seen = []
    fill = p.fill
    p.fill = lambda noise, cond, generator=None: (seen.append(noise.shape[0]), fill(noise, cond, generator))[1]
    for _ in range(2):
        p.act(obs)
    p.reset(torch.tensor([False, True]))
    p.act(obs)
    assert seen == [2, 1]  # both envs filled at the start; after the reset only env 1 refills


def test_streaming_loss_uses_chunkwise_levels(monkeypatch):
    p = build("streaming", constant_level_prob=0.0)
    seen = []
    eps = p.eps
    monkeypatch.setattr(p, "eps", lambda x, t, cond: (seen.append(t.clone()), eps(x, t, cond))[1])
    p.train()
    p.loss({"obs": history(64), "action": torch.rand(64, 8, 2) * 2 - 1})
    t = seen[0]
    assert t.shape == (64, 8) and bool((t.diff(dim=1) >= 0).all())
    offsets = {tuple(row.tolist()) for row in t}
    expected = {tuple(p.grid[p.level_index("before") - j].tolist()) for j in range(p.stream_steps)}
    assert offsets == expected


def test_eval_runs_a_fine_tuned_checkpoint_s_own_chain_first():
    """`distillery eval` without `sampler=`: the checkpoint's own sampler (an RL policy's ddim:5:eta=1) and then
    the class defaults, each once; `sampler=` replaces both."""
    from distillery import config as config_mod

    cfg = config_mod.compose(["policy=diffusion"])
    assert config_mod.samplers(cfg, "diffusion", "ddim:5:eta=1") == ["ddim:5:eta=1", "ddpm", "ddim:10"]
    assert config_mod.samplers(cfg, "diffusion", "ddim:10") == ["ddim:10", "ddpm"]
    assert config_mod.samplers(cfg, "diffusion") == ["ddpm", "ddim:10"]
    cfg = config_mod.compose(["policy=diffusion", "sampler=ddim:3"])
    assert config_mod.samplers(cfg, "diffusion", "ddim:5:eta=1") == ["ddim:3"]
