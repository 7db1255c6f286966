"""Critics: expectile loss against its closed form, IQL values on an MDP with known answers, FQE ranking,
and the chunk transitions built from a real dataset."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillery.agents.critics import FQE, IQL, StateValue, TwinQ, expectile_loss, polyak_update


def sample_expectile(x: np.ndarray, tau: float) -> float:
    """Exact tau-expectile of a sample: the root e of tau*sum_{x>e}(x-e) = (1-tau)*sum_{x<e}(e-x).

    Between consecutive sorted points the equation is linear in e, so with k points <= e
    e = (tau * S_up + (1 - tau) * S_low) / (tau * (n - k) + (1 - tau) * k); pick the k whose e lies inside.
    """
    xs = np.sort(np.asarray(x, np.float64))
    n = len(xs)
    csum = np.concatenate([[0.0], np.cumsum(xs)])
    for k in range(1, n):
        s_low, s_up = csum[k], csum[n] - csum[k]
        e = (tau * s_up + (1 - tau) * s_low) / (tau * (n - k) + (1 - tau) * k)
        if xs[k - 1] <= e <= xs[k]:
            return float(e)
    raise AssertionError("no root found")


def bisect_expectile(x: np.ndarray, tau: float, iters: int = 200) -> float:
    """The same root by bisection on the decreasing function f(e) = tau*E[(x-e)+] - (1-tau)*E[(e-x)+]."""
    lo, hi = float(x.min()), float(x.max())
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f = tau * np.clip(x - mid, 0, None).sum() - (1 - tau) * np.clip(mid - x, 0, None).sum()
        lo, hi = (mid, hi) if f > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def uniform_expectile(tau: float) -> float:
    """tau-expectile of U(-1, 1): tau (1-e)^2 = (1-tau) (1+e)^2."""
    a, b = math.sqrt(tau), math.sqrt(1 - tau)
    return (a - b) / (a + b)


# ------------------------------------------------------------------------------------------- expectile loss
def test_expectile_loss_hand_example():
    diff = torch.tensor([-2.0, 1.0, 3.0])
    # weights 0.3, 0.7, 0.7 on squares 4, 1, 9: (1.2 + 0.7 + 6.3) / 3
    assert expectile_loss(diff, 0.7).item() == pytest.approx(8.2 / 3, rel=1e-6)
    assert expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (4 + 1 + 9) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="expectile"):
        expectile_loss(diff, 1.0)


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9])
def test_expectile_loss_minimiser_is_the_expectile(tau):
    x = np.random.default_rng(0).exponential(size=400)
    exact = sample_expectile(x, tau)
    assert exact == pytest.approx(bisect_expectile(x, tau), abs=1e-9)
    if tau == 0.5:
        assert exact == pytest.approx(x.mean(), abs=1e-12)
    xt = torch.as_tensor(x)
    m = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([m], lr=1.0, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expectile_loss(xt - m, tau)
        loss.backward()
        return loss

    opt.step(closure)
    assert m.item() == pytest.approx(exact, abs=1e-6)


# ------------------------------------------------------------------------------------------- networks
def test_twin_q_shapes_min_and_errors():
    q = TwinQ(3, 2, hidden=(8,), layer_norm=True)
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    q1, q2 = q(obs, act)
    assert q1.shape == q2.shape == (5,)
    assert torch.equal(q.min(obs, act), torch.minimum(q1, q2))
    assert not torch.equal(q1, q2)  # independent heads
    assert any(isinstance(m, torch.nn.LayerNorm) for m in q.modules())
    assert StateValue(3, hidden=(8,))(obs).shape == (5,)
    with pytest.raises(ValueError, match=r"act must be \(B, 2\)"):
        q(obs, torch.randn(5, 3))


def test_polyak_update_closed_form():
    src, tgt = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in tgt.parameters()]
    polyak_update(tgt, src, 0.25)
    for b, p_t, p in zip(before, tgt.parameters(), src.parameters()):
        assert torch.allclose(p_t, 0.75 * b + 0.25 * p)


# ------------------------------------------------------------------------------------------- IQL
def two_state_mdp(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A -> B -> end. In A every action gives 0 and leads to B with chunk discount 0.5 (far from the critic's
    default gamma_chunk, so ignoring the column fails); in B the action a ~ U(-1, 1) gives reward a and ends
    the episode. So Q(B, a) = a, V(B) = tau-expectile of the dataset's B actions, Q(A, .) = V(A) = 0.5 V(B)."""
    a_obs, b_obs = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = n // 2
    act = torch.rand(n, 1, generator=gen) * 2 - 1
    in_b = torch.arange(n) >= half
    obs = torch.where(in_b[:, None], b_obs, a_obs)
    return {"obs": obs, "action": act, "reward": torch.where(in_b, act[:, 0], 0.0),
            "next_obs": b_obs.expand(n, 2).clone(), "done": in_b.float(),
            "discount": torch.where(in_b, 0.81, 0.5)}


@pytest.mark.parametrize("tau", [0.7, 0.9])
def test_iql_learns_the_expectile_value_and_bootstraps_with_the_discount_column(tau):
    gen = torch.Generator().manual_seed(0)
    data = two_state_mdp(2048, gen)
    iql = IQL(2, 1, hidden=(64, 64), expectile=tau, lr=2e-3, tau=0.05, seed=0)
    metrics = iql.fit(data, steps=800, batch_size=256, generator=gen)
    assert set(metrics) >= {"v_loss", "q_loss", "adv_mean"}
    v_b_true = sample_expectile(data["action"][1024:, 0].numpy(), tau)
    assert v_b_true == pytest.approx(uniform_expectile(tau), abs=0.05)  # the sample agrees with U(-1, 1)
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = iql.value(states)
    assert v[1].item() == pytest.approx(v_b_true, abs=0.03)  # the mean (MSE instead of expectile) would be ~0
    assert v[0].item() == pytest.approx(0.5 * v_b_true, abs=0.03)
    acts = torch.tensor([[-0.8], [0.0], [0.8]])
    q_b = iql.q_value(states[1].expand(3, 2), acts)
    assert torch.allclose(q_b, acts[:, 0], atol=0.03)  # Q(B, a) = a: done cuts the bootstrap
    adv = iql.advantage(states[1].expand(3, 2), acts)
    assert torch.allclose(adv, acts[:, 0] - v_b_true, atol=0.05)


def test_iql_fit_draws_rows_from_the_weighted_sampler():
    """Only rows with a > 0 are drawn, so V(B) is the expectile of those actions, not of all of them."""
    from distillery.data.weighting import WeightedSampler

    gen = torch.Generator().manual_seed(0)
    data = two_state_mdp(2048, gen)
    data = {k: v[1024:] for k, v in data.items()}  # state B only
    positive = data["action"][:, 0] > 0
    sampler = WeightedSampler(positive.double(), gen)
    iql = IQL(2, 1, hidden=(64, 64), expectile=0.7, lr=2e-3, tau=0.05, seed=0)
    iql.fit(data, steps=600, batch_size=256, sampler=sampler)
    v_b = iql.value(torch.tensor([[0.0, 1.0]])).item()
    assert v_b == pytest.approx(sample_expectile(data["action"][positive, 0].numpy(), 0.7), abs=0.03)


def test_iql_is_seeded_saves_and_rejects_bad_batches():
    a, b = IQL(4, 2, hidden=(16,), seed=3), IQL(4, 2, hidden=(16,), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    gen = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(8, 4), "action": torch.rand(8, 2), "reward": torch.randn(8),
             "next_obs": torch.randn(8, 4), "done": torch.zeros(8)}
    a.fit(batch, steps=3, batch_size=4, generator=gen)
    b.load_state_dict(a.state_dict())
    b.load_train_state(a.train_state())
    obs, act = torch.randn(6, 4), torch.rand(6, 2)
    assert torch.equal(a.advantage(obs, act), b.advantage(obs, act))
    assert a.update(batch).keys() == b.update(batch).keys()
    with pytest.raises(KeyError, match="lacks \\['done'\\]"):
        a.update({k: v for k, v in batch.items() if k != "done"})
    with pytest.raises(ValueError, match=r"batch\['action'\] \(chunk \* Da\) must be \(B, 2\)"):
        a.update(batch | {"action": torch.rand(8, 3)})
    with pytest.raises(ValueError, match="expectile"):
        IQL(4, 2, expectile=1.5)


# ------------------------------------------------------------------------------------------- FQE
def quadratic_bandit_chain(n: int, gen: torch.Generator, gamma: float) -> dict[str, torch.Tensor]:
    """s ~ U(-1, 1), reward -(a - s)^2, next state a fresh U(-1, 1) draw, never done; behaviour a ~ U(-1, 1).

    The value of a policy pi from any start is E_s[-(pi(s) - s)^2] / (1 - gamma) (the next state does not
    depend on the action), so pi(s) = s is worth 0, pi = 0 is worth -1/3 / (1 - gamma) and pi(s) = -s is
    worth -4/3 / (1 - gamma).
    """
    s = torch.rand(n, 1, generator=gen) * 2 - 1
    a = torch.rand(n, 1, generator=gen) * 2 - 1
    return {"obs": s, "action": a, "reward": -(a - s)[:, 0] ** 2, "next_obs": torch.rand(n, 1, generator=gen) * 2 - 1,
            "done": torch.zeros(n), "discount": torch.full((n,), gamma)}


def test_fqe_recovers_known_values_and_ranks_policies():
    gamma = 0.5
    gen = torch.Generator().manual_seed(0)
    data = quadratic_bandit_chain(4096, gen, gamma)
    starts = torch.linspace(-1, 1, 201)[:, None]
    policies = {"optimal": lambda s: s.clone(), "zero": lambda s: torch.zeros_like(s), "anti": lambda s: -s}
    truth = {"optimal": 0.0, "zero": -(1 / 3) / (1 - gamma), "anti": -(4 / 3) / (1 - gamma)}
    est = {}
    for name, pi in policies.items():
        fqe = FQE(1, 1, hidden=(64, 64), gamma_chunk=gamma, lr=3e-3, tau=0.1, seed=0)
        fqe.fit(data, pi, steps=600, batch_size=256, generator=gen)
        est[name] = fqe.estimate(starts, pi)
    for name in policies:
        assert est[name] == pytest.approx(truth[name], abs=0.1), est
    assert est["optimal"] > est["zero"] > est["anti"]


def test_fqe_checks_the_policy_output():
    fqe = FQE(3, 4, hidden=(8,))
    data = {"obs": torch.randn(5, 3), "action": torch.rand(5, 4), "reward": torch.zeros(5),
            "next_obs": torch.randn(5, 3), "done": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"policy_fn returned shape \(5, 2\) for 5 observations"):
        fqe.fit(data, lambda s: torch.zeros(len(s), 2), steps=1)


# ------------------------------------------------------------------------------------------- chunk transitions
def write_toy_dataset(path):
    """Episode 0: 5 steps, ends in success; episode 1: 3 steps, time limit. obs["privileged"][t] = (100 e + t,
    0), action[t] = (10 e + t, -(10 e + t)), reward[t] = t + 1 (episode 0) or 10 (t + 1) (episode 1)."""
    from distillery.data import EpisodeDataset, EpisodeWriter
    from distillery.specs import TensorSpec

    spec = {"privileged": TensorSpec((2,)), "state": TensorSpec((1,))}
    with EpisodeWriter(path, {"task": "toy"}, spec, TensorSpec((2,), low=-100, high=100)) as w:
        for e, (T, success) in enumerate([(5, True), (3, False)]):
            t = np.arange(T, dtype=np.float32)
            w.append({"privileged": np.stack([100 * e + t, 0 * t], 1), "state": t[:, None]},
                     np.stack([10 * e + t, -(10 * e + t)], 1), (t + 1) * (10 if e else 1),
                     np.arange(T) == T - 1 if success else np.zeros(T, bool),
                     np.zeros(T, bool) if success else np.arange(T) == T - 1)
    return EpisodeDataset(path)


def test_chunk_transitions_hand_computed(tmp_path):
    from distillery.data.transitions import chunk_transitions, episode_returns

    ds = write_toy_dataset(tmp_path / "toy.zarr")
    g = 0.5
    tr = chunk_transitions(ds, chunk=2, gamma=g)
    assert tr["t"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert tr["episode"].tolist() == [0] * 5 + [1] * 3
    assert tr["obs"][:, 0].tolist() == [0, 1, 2, 3, 4, 100, 101, 102]
    # next obs = obs[t + 2], or the episode's last stored obs for its last chunks
    assert tr["next_obs"][:, 0].tolist() == [2, 3, 4, 4, 4, 102, 102, 102]
    # actions a_t, a_{t+1} flattened; past the end the last action repeats
    assert tr["action"][3].tolist() == [3, -3, 4, -4]
    assert tr["action"][4].tolist() == [4, -4, 4, -4]
    assert tr["action"][7].tolist() == [12, -12, 12, -12]
    expect_r = [1 + g * 2, 2 + g * 3, 3 + g * 4, 4 + g * 5, 5, 10 + g * 20, 20 + g * 30, 30]
    assert torch.allclose(tr["reward"], torch.tensor(expect_r))
    # success ends episode 0 inside its last two chunks; the time limit of episode 1 is not done
    assert tr["done"].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert torch.allclose(tr["discount"], torch.tensor([g ** 2] * 4 + [g] + [g ** 2] * 2 + [g]))
    assert tr["obs"].dtype == torch.float32 and tr["t"].dtype == torch.int64

    strided = chunk_transitions(ds, obs_key="state", chunk=3, gamma=1.0, stride=2)
    assert strided["t"].tolist() == [0, 2, 4, 0, 2]
    assert strided["reward"].tolist() == [6, 12, 5, 60, 30]
    assert strided["obs"].shape == (5, 1) and strided["action"].shape == (5, 6)
    assert strided["done"].tolist() == [0, 1, 1, 0, 0]

    assert np.allclose(episode_returns(ds), [15, 60])
    assert np.allclose(episode_returns(ds, gamma=g), [1 + g * 2 + g**2 * 3 + g**3 * 4 + g**4 * 5,
                                                      10 + g * 20 + g**2 * 30])

    # the columns plug into the critics and the return-weighted sampler as they are
    from distillery.data.weighting import WeightedSampler, transition_sampling_probs
    sampler = WeightedSampler(transition_sampling_probs(tr["episode"], episode_returns(ds)))
    assert "q_loss" in IQL(2, 4, hidden=(8,)).fit(tr, steps=2, batch_size=4, sampler=sampler)
    with pytest.raises(ValueError, match="sampler draws from 8 rows but the transitions have 5"):
        IQL(2, 4, hidden=(8,)).fit({k: v[:5] for k, v in tr.items()}, steps=1, sampler=sampler)

    with pytest.raises(KeyError, match="choose from \\['privileged', 'state'\\]"):
        chunk_transitions(ds, obs_key="image")
    with pytest.raises(ValueError, match="chunk and stride must be >= 1"):
        chunk_transitions(ds, chunk=0)
    with pytest.raises(ValueError, match="gamma must be in"):
        episode_returns(ds, gamma=1.5)


@pytest.mark.slow
def test_fqe_ranks_the_expert_above_zero_and_random_actions_on_real_push_cube_data(tmp_path):
    """48 episodes of a noisy (0.3) push_cube expert; FQE of the clean expert (its action held for the chunk)
    against holding still and uniform random chunks. About 80 s on one core."""
    from distillery.data import EpisodeDataset, EpisodeWriter
    from distillery.data.transitions import chunk_transitions
    from distillery.envs import make_env, make_expert
    from distillery.rollout import run_waves

    env = make_env("push_cube", num_envs=16, seed=0)
    behaviour = make_expert("push_cube", 16, noise=0.3, seed=0)
    with EpisodeWriter(tmp_path / "push.zarr", {"task": "push_cube"}, env.observation_spec, env.action_spec) as w:
        for wave in run_waves(env, behaviour, 48, seed=0, record=True):
            for ep in wave:
                w.append(ep.obs, ep.action, ep.reward, ep.terminated, ep.truncated)
    env.close()
    tr = chunk_transitions(EpisodeDataset(tmp_path / "push.zarr"), obs_key="privileged", chunk=2, gamma=0.99)
    starts = tr["obs"][tr["t"] == 0]

    def expert(obs):
        a = make_expert("push_cube", len(obs))({"privileged": obs})  # fresh: no state from other batches
        return torch.cat([a, a], dim=1)

    policies = {"expert": expert, "zero": lambda obs: torch.zeros(len(obs), 4),
                "random": lambda obs: torch.rand(len(obs), 4, generator=torch.Generator().manual_seed(1)) * 2 - 1}
    gen = torch.Generator().manual_seed(0)
    est = {}
    for name, pi in policies.items():
        fqe = FQE(16, 4, hidden=(128, 128), gamma_chunk=0.99 ** 2, lr=1e-3, tau=0.05, layer_norm=True, seed=0)
        fqe.fit(tr, pi, steps=4000, batch_size=256, generator=gen)
        est[name] = fqe.estimate(starts, pi)
    # measured: expert -32, random -53, zero -73 (Monte Carlo return of the noisy behaviour: -13)
    assert est["expert"] > est["random"] + 5 and est["expert"] > est["zero"] + 5, est
