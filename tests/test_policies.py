"""Policy contract, U-Net, normaliser, closed-loop act() bookkeeping, rebuild from metadata, and a tiny
multimodality learning test (diffusion keeps both modes; MLP regression collapses to the mean)."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from distillery.policies import (
    DiffusionPolicy, MLPPolicy, Normalizer, Policy, make_policy, policy_from_description,
)
from distillery.policies.networks import ConditionalUnet1D
from distillery.specs import TensorSpec

OBS = {"state": TensorSpec((10,)), "privileged": TensorSpec((12,))}
ACT = TensorSpec((2,), low=-1.0, high=1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny networks: intra-op threading only adds synchronisation (and stalls badly on a shared 2-core box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = {"down_dims": [16, 32], "step_embed_dim": 16, "encoder": {"type": "mlp", "hidden": [32], "out_dim": 16}}


def stats(obs_dim: int = 10, act_dim: int = 2, lo: float = -1.0, hi: float = 1.0) -> dict[str, Any]:
    return {"state": {"min": np.full(obs_dim, lo), "max": np.full(obs_dim, hi),
                      "mean": np.zeros(obs_dim), "std": np.ones(obs_dim)},
            "action": {"min": np.full(act_dim, lo), "max": np.full(act_dim, hi)}}


# --------------------------------------------------------------------------------------------- U-Net

@pytest.mark.parametrize("tp,da,down", [(16, 2, [16, 32, 64]), (8, 7, [16, 32]), (32, 1, [16, 32, 64]),
                                        (12, 3, [16, 32, 64]), (5, 2, [16])])
def test_unet_output_shape(tp: int, da: int, down: list[int]) -> None:
    net = ConditionalUnet1D(da, 6, down, step_embed_dim=8, kernel_size=3, n_groups=8)
    out = net(torch.randn(3, tp, da), torch.tensor([0, 50, 99]), torch.randn(3, 6))
    assert out.shape == (3, tp, da)


def test_unet_rejects_horizon_not_divisible_by_downsampling() -> None:
    net = ConditionalUnet1D(2, 4, [16, 32, 64], step_embed_dim=8)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(len\\(down_dims\\)-1\\)=4"):
        net(torch.randn(1, 10, 2), torch.tensor([1]), torch.randn(1, 4))
    with pytest.raises(ValueError, match="pred_horizon=10"):
        DiffusionPolicy(OBS, ACT, {"pred_horizon": 10, "down_dims": [16, 32, 64]})
    with pytest.raises(ValueError, match="n_groups"):
        ConditionalUnet1D(2, 4, [12, 24], n_groups=8)


def test_film_conditioning_changes_output() -> None:
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, 4, [16, 32], step_embed_dim=8)
    x, t = torch.randn(2, 16, 2), torch.tensor([10, 10])
    c1, c2 = torch.randn(1, 4).expand(2, 4), torch.randn(1, 4).expand(2, 4)
    assert (net(x, t, c1) - net(x, t, c2)).abs().max() > 1e-3
    assert (net(x, t, c1) - net(x, t + 40, c1)).abs().max() > 1e-3  # the step embedding enters via FiLM too
    # with every FiLM projection zeroed, the condition (obs and step) can no longer reach the output
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "cond_encoder"):
                m.cond_encoder[1].weight.zero_()
                m.cond_encoder[1].bias.zero_()
    torch.testing.assert_close(net(x, t, c1), net(x, t + 40, c2))


def test_paper_config_param_count() -> None:
    # Diffusion Policy state config: obs 20-dim x To=2 as global cond, Da=2 -> 65.8M parameters
    p = DiffusionPolicy({"state": TensorSpec((20,))}, ACT, {"down_dims": [256, 512, 1024], "step_embed_dim": 256,
                                                           "encoder": {"type": "identity"}})
    assert p.encoder.out_dim == 40
    assert abs(p.num_params() - 65.8e6) / 65.8e6 < 0.03


# --------------------------------------------------------------------------------------------- normaliser

def test_normalizer_limits_gaussian_roundtrip_and_state_dict() -> None:
    specs = {"state": TensorSpec((3,)), "action": TensorSpec((2,))}
    n = Normalizer(specs, {"state": "gaussian", "action": "limits"})
    st = {"state": {"mean": np.array([1.0, -2.0, 0.0]), "std": np.array([2.0, 0.5, 0.0])},   # std 0 guarded
          "action": {"min": np.array([-3.0, 0.5]), "max": np.array([1.0, 0.5])}}             # range 0 guarded
    n.set_stats(st)
    a = torch.tensor([[-3.0, 0.5], [1.0, 0.5], [-1.0, 0.5]])
    torch.testing.assert_close(n.normalize("action", a)[:, 0], torch.tensor([-1.0, 1.0, 0.0]))
    torch.testing.assert_close(n.normalize("action", a)[:, 1], torch.zeros(3))  # constant dim -> 0, finite
    s = torch.tensor([[3.0, -1.5, 7.0]])
    torch.testing.assert_close(n.normalize("state", s), torch.tensor([[1.0, 1.0, 7.0]]))
    x = torch.randn(5, 3)
    torch.testing.assert_close(n.unnormalize("state", n.normalize("state", x)), x)
    y = torch.randn(5, 2)
    torch.testing.assert_close(n.unnormalize("action", n.normalize("action", y)), y)
    fresh = Normalizer(specs, {"state": "gaussian", "action": "limits"})
    assert not bool(fresh.fitted)
    fresh.load_state_dict(n.state_dict())
    assert bool(fresh.fitted)
    torch.testing.assert_close(fresh.normalize("state", x), n.normalize("state", x))


def test_normalizer_errors() -> None:
    n = Normalizer({"state": TensorSpec((3,))}, {"state": "limits"})
    with pytest.raises(ValueError, match="missing key 'state'"):
        n.set_stats({})
    with pytest.raises(ValueError, match="lack 'max'"):
        n.set_stats({"state": {"min": np.zeros(3)}})
    with pytest.raises(ValueError, match="not broadcastable"):
        n.set_stats({"state": {"min": np.zeros(4), "max": np.ones(4)}})
    with pytest.raises(ValueError, match="mode"):
        Normalizer({"state": TensorSpec((3,))}, {"state": "minmax"})


# --------------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize("name", ["diffusion", "mlp"])
def test_contract_shapes_loss_and_bounds(name: str) -> None:
    torch.manual_seed(0)
    p = make_policy(name, OBS, ACT, SMALL if name == "diffusion" else {})
    assert (p.obs_horizon, p.pred_horizon, p.action_horizon, p.obs_keys) == (2, 16, 2, ["state"])
    with pytest.raises(RuntimeError, match="set_normalizer"):
        p.loss({"obs": {"state": torch.randn(4, 2, 10)}, "action": torch.zeros(4, 16, 2)})
    p.set_normalizer(stats(lo=-0.5, hi=0.5))
    loss, metrics = p.loss({"obs": {"state": torch.randn(4, 2, 10)}, "action": torch.rand(4, 16, 2) - 0.5})
    assert loss.dim() == 0 and loss.requires_grad and set(metrics) == {"loss"}
    loss.backward()
    assert all(q.grad is not None for q in p.parameters() if q.requires_grad)
    chunk = p.predict_chunk({"state": torch.randn(3, 2, 10) * 5, "privileged": torch.randn(3, 2, 12)})
    assert chunk.shape == (3, 2, 2) and float(chunk.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="expected \\(B, 2, 10\\)"):
        p.predict_chunk({"state": torch.randn(3, 10)})
    with pytest.raises(ValueError, match="Tp=16"):
        p.loss({"obs": {"state": torch.randn(4, 2, 10)}, "action": torch.zeros(4, 8, 2)})


def test_config_errors_are_actionable() -> None:
    with pytest.raises(ValueError, match="unknown config keys \\['down_dim'\\]"):
        make_policy("diffusion", OBS, ACT, {"down_dim": [8]})
    with pytest.raises(ValueError, match="unknown policy 'transformer'"):
        make_policy("transformer", OBS, ACT, {})
    with pytest.raises(ValueError, match="Valid forms"):
        make_policy("diffusion", OBS, ACT, {**SMALL, "sampler": "ddim-10"})
    with pytest.raises(ValueError, match="not in the observation spec"):
        make_policy("mlp", OBS, ACT, {"obs_keys": ["image"]})
    with pytest.raises(ValueError, match="exceeds pred_horizon"):
        make_policy("mlp", OBS, ACT, {"action_horizon": 16})
    with pytest.raises(ValueError, match="unknown keys \\['hidden'\\] for encoder type 'identity'"):
        make_policy("mlp", OBS, ACT, {"encoder": {"type": "identity", "hidden": [3]}})
    with pytest.raises(ValueError, match="deterministic"):
        make_policy("mlp", OBS, ACT, {}).predict_chunk({"state": torch.zeros(1, 2, 10)}, sampler="ddim:10")


def test_diffusion_sampler_selection_and_generator_determinism() -> None:
    torch.manual_seed(0)
    p = make_policy("diffusion", OBS, ACT, SMALL)
    p.set_normalizer(stats())
    obs = {"state": torch.randn(2, 2, 10)}
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = p.predict_chunk(obs, generator=g())
    torch.testing.assert_close(a, p.predict_chunk(obs, sampler="ddim:10", generator=g()))  # cfg default
    assert (a - p.predict_chunk(obs, sampler="ddim:5", generator=g())).abs().max() > 1e-4
    assert (a - p.predict_chunk(obs, sampler="ddim:10", generator=torch.Generator().manual_seed(4))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="Valid forms"):
        p.predict_chunk(obs, sampler="ddim")


@pytest.mark.parametrize("name", ["diffusion", "mlp"])
def test_rebuild_from_description_and_state_dict(name: str) -> None:
    torch.manual_seed(0)
    p = make_policy(name, OBS, ACT, {**(SMALL if name == "diffusion" else {}), "obs_norm": "gaussian"})
    p.set_normalizer(stats())
    desc = json.loads(json.dumps(p.describe()))  # must survive JSON
    assert desc["name"] == name and desc["params"] == p.num_params() and desc["pred_horizon"] == 16
    q = policy_from_description(desc)
    q.load_state_dict(p.state_dict())
    obs = {"state": torch.randn(2, 2, 10)}
    torch.testing.assert_close(p.predict_chunk(obs, generator=torch.Generator().manual_seed(0)),
                               q.predict_chunk(obs, generator=torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------------------------- act()

class _ProbePolicy(Policy):
    """Returns chunk[b, j] = (j, latest obs[b, 0]) and records every history it was asked to plan for."""

    name = "probe"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__({"state": TensorSpec((1,))}, TensorSpec((2,)), {**cfg, "obs_norm": "identity"})
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.normalizer.set_stats({"action": {"min": np.full(2, -1.0), "max": np.full(2, 1.0)}})  # identity
        self.calls: list[torch.Tensor] = []

    def sample_normalized(self, nobs, sampler, generator, noise=None, carry=None):  # type: ignore[override]
        hist = nobs["state"][..., 0]  # (B, To)
        self.calls.append(hist.clone())
        j = torch.arange(self.pred_horizon, dtype=torch.float32).expand(hist.shape[0], -1)
        return torch.stack([j, hist[:, -1:].expand_as(j)], dim=-1)


def test_predict_chunk_is_executed_slice() -> None:
    p = _ProbePolicy({"obs_horizon": 3, "pred_horizon": 16, "action_horizon": 5})
    chunk = p.predict_chunk({"state": torch.zeros(2, 3, 1)})
    torch.testing.assert_close(chunk[0, :, 0], torch.arange(2, 7, dtype=torch.float32))


def test_act_replans_every_ta_steps_with_padded_history() -> None:
    to, ta = 2, 3
    p = _ProbePolicy({"obs_horizon": to, "pred_horizon": 8, "action_horizon": ta})
    b = 2
    for step in range(7):
        obs = {"state": torch.full((b, 1), float(step)) + torch.tensor([[0.0], [100.0]])}
        a = p.act(obs)
        assert a.shape == (b, 2)
        # the queue index cycles through the executed slice [To-1, To-1+Ta)
        assert a[:, 0].tolist() == [float(to - 1 + step % ta)] * b
        # actions come from the plan made at the last replanning step
        assert a[0, 1].item() == float(step - step % ta)
    assert len(p.calls) == 3  # steps 0, 3, 6
    # first plan: history padded by repeating the first obs; later: the real last two observations
    torch.testing.assert_close(p.calls[0], torch.tensor([[0.0, 0.0], [100.0, 100.0]]))
    torch.testing.assert_close(p.calls[1], torch.tensor([[2.0, 3.0], [102.0, 103.0]]))


def test_reset_mask_clears_only_masked_envs() -> None:
    p = _ProbePolicy({"obs_horizon": 2, "pred_horizon": 8, "action_horizon": 4})
    env_offset = torch.tensor([[0.0], [100.0], [200.0]])
    for step in range(2):
        p.act({"state": float(step) + env_offset})
    p.reset(torch.tensor([False, True, False]))
    a = p.act({"state": 2.0 + env_offset})
    # only env 1 replans, alone, with its history refilled by its new first observation
    assert len(p.calls) == 2 and p.calls[1].shape == (1, 2)
    torch.testing.assert_close(p.calls[1], torch.tensor([[102.0, 102.0]]))
    assert a[:, 0].tolist() == [3.0, 1.0, 3.0]  # envs 0 and 2 continue their queue (index 2 -> action 1+2)
    assert a[:, 1].tolist() == [0.0, 102.0, 200.0]
    # env 0 and 2 histories kept rolling through the reset: next plan (step 4) sees obs 3, 4
    p.act({"state": 3.0 + env_offset})
    p.act({"state": 4.0 + env_offset})
    torch.testing.assert_close(p.calls[2], torch.tensor([[3.0, 4.0], [203.0, 204.0]]))
    with pytest.raises(ValueError, match="reset mask"):
        p.reset(torch.tensor([True, False]))
    p.reset()
    p.act({"state": 9.0 + env_offset})
    torch.testing.assert_close(p.calls[-1], torch.tensor([[9.0, 9.0], [109.0, 109.0], [209.0, 209.0]]))


def test_act_mask_skips_planning_for_inactive_envs() -> None:
    p = _ProbePolicy({"obs_horizon": 2, "pred_horizon": 8, "action_horizon": 2})
    env_offset = torch.tensor([[0.0], [100.0]])
    inactive = torch.tensor([True, False])
    for step in range(5):
        a = p.act({"state": float(step) + env_offset}, mask=inactive)
        assert a[0, 1].item() == float(step - step % 2)  # env 0 plans every Ta=2 steps as usual
    # env 1 planned only with everyone at the first step, then never again: only env 0's rows went through
    assert [c.shape[0] for c in p.calls] == [1, 1, 1]
    a = p.act({"state": 5.0 + env_offset})  # unmasked again: env 1 re-plans from its rolled history
    assert p.calls[-1].shape[0] == 1 and p.calls[-1].tolist() == [[104.0, 105.0]]


# --------------------------------------------------------------------------------------------- learning

def _bimodal_batch(n: int, g: torch.Generator, tp: int) -> dict[str, Any]:
    """obs 0 -> the whole chunk is +0.8 or -0.8 (equally likely); obs 1 -> 0.3 (unimodal)."""
    obs = (torch.rand(n, generator=g) < 0.5).float()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    a = torch.where(obs > 0, torch.full((n,), 0.3), 0.8 * sign)
    return {"obs": {"state": obs.view(n, 1, 1)}, "action": a.view(n, 1, 1).expand(n, tp, 1).clone()}


def _fit(name: str, cfg: dict[str, Any], steps: int) -> Policy:
    torch.manual_seed(0)
    base = {"obs_horizon": 1, "pred_horizon": 4, "action_horizon": 2}
    p = make_policy(name, {"state": TensorSpec((1,))}, TensorSpec((1,), low=-1, high=1), {**base, **cfg})
    p.set_normalizer({"state": {"min": np.zeros(1), "max": np.ones(1)},
                      "action": {"min": -np.ones(1), "max": np.ones(1)}})
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = p.loss(_bimodal_batch(128, g, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return p


def test_diffusion_keeps_both_modes_mlp_collapses_to_mean() -> None:
    n = 400
    dp = _fit("diffusion", {"down_dims": [16, 32], "step_embed_dim": 16,
                            "encoder": {"type": "mlp", "hidden": [32], "out_dim": 16}}, steps=300)
    a0 = dp.predict_chunk({"state": torch.zeros(n, 1, 1)}, generator=torch.Generator().manual_seed(1))[:, 0, 0]
    assert (a0 > 0.6).float().mean() > 0.3 and (a0 < -0.6).float().mean() > 0.3  # both modes present
    assert (a0.abs() < 0.4).float().mean() < 0.1                                 # little mass at the mean
    a1 = dp.predict_chunk({"state": torch.ones(n, 1, 1)}, generator=torch.Generator().manual_seed(1))[:, 0, 0]
    assert ((a1 - 0.3).abs() < 0.15).float().mean() > 0.7                        # conditioning works

    mlp = _fit("mlp", {"encoder": {"type": "mlp", "hidden": [32], "out_dim": 32}, "hidden": [64]}, steps=300)
    m0 = mlp.predict_chunk({"state": torch.zeros(n, 1, 1)})[:, 0, 0]
    m1 = mlp.predict_chunk({"state": torch.ones(1, 1, 1)})[:, 0, 0]
    assert abs(m0.mean().item()) < 0.2 and m0.abs().max() < 0.4                  # regression to the mean (0)
    assert abs(m1.item() - 0.3) < 0.1
    assert isinstance(dp, DiffusionPolicy) and isinstance(mlp, MLPPolicy)
