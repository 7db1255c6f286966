"""Episode storage (zarr writer/reader, crash safety) and the SequenceDataset window sampler."""
from __future__ import annotations

import inspect
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from distillery.data import EpisodeDataset, EpisodeWriter, SequenceDataset
from distillery.specs import TensorSpec

OBS_SPEC = {"state": TensorSpec((3,)), "image": TensorSpec((4, 4, 3), dtype="uint8")}
ACT_SPEC = TensorSpec((2,), low=-1.0, high=1.0)
META = {"task": "push_cube", "expert_noise": 0.1, "seed": 7}


def make_episode(i: int, length: int | None = None) -> dict:
    """Deterministic episode ``i`` (content derived from ``i`` only, so a verifier can regenerate it)."""
    rng = np.random.default_rng(1000 + i)
    t = int(length if length is not None else rng.integers(1, 300))
    terminated = np.zeros(t, bool)
    truncated = np.zeros(t, bool)
    if t:
        (terminated if i % 2 else truncated)[-1] = True
    return {
        "obs": {"state": rng.standard_normal((t, 3)).astype(np.float32),
                "image": rng.integers(0, 256, (t, 4, 4, 3), dtype=np.uint8)},
        "action": rng.uniform(-1, 1, (t, 2)).astype(np.float32),
        "reward": rng.standard_normal(t).astype(np.float32),
        "terminated": terminated,
        "truncated": truncated,
    }


def assert_episode_equal(got: dict, want: dict) -> None:
    for k in OBS_SPEC:
        assert got["obs"][k].dtype == want["obs"][k].dtype
        np.testing.assert_array_equal(got["obs"][k], want["obs"][k])
    for k in ("action", "reward", "terminated", "truncated"):
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k])


def write(path: Path, episodes: list[dict], **kw) -> None:
    with EpisodeWriter(path, META, OBS_SPEC, ACT_SPEC, **kw) as w:
        for ep in episodes:
            w.append(**ep)


# ----------------------------------------------------------------------------- writer / reader
def test_round_trip_layout_and_meta(tmp_path):
    eps = [make_episode(i) for i in range(6)]
    path = tmp_path / "d.zarr"
    write(path, eps)
    ds = EpisodeDataset(path)
    lengths = [len(e["action"]) for e in eps]
    assert ds.num_episodes == len(ds) == 6 and ds.num_steps == sum(lengths)
    np.testing.assert_array_equal(ds.episode_ends, np.cumsum(lengths))
    assert ds.episode_ends.dtype == np.int64
    for i, ep in enumerate(eps):
        assert_episode_equal(ds.episode(i), ep)
    assert_episode_equal(ds.episode(-1), eps[-1])
    np.testing.assert_array_equal(ds.obs["state"], np.concatenate([e["obs"]["state"] for e in eps]))
    for k, v in META.items():
        assert ds.meta[k] == v
    assert ds.meta["obs_spec"]["image"]["dtype"] == "uint8" and ds.obs_spec == OBS_SPEC
    assert ds.action_spec == ACT_SPEC
    assert "created" in ds.meta and "distillery_version" in ds.meta
    # After close() plain zarr readers (Diffusion Policy style) see exact shapes, no preallocated tail.
    root = zarr.open_group(path, mode="r")
    assert root["data/action"].shape == (ds.num_steps, 2)
    assert root["data/obs/image"].shape == (ds.num_steps, 4, 4, 3)
    np.testing.assert_array_equal(root["meta/episode_ends"][:], np.cumsum(lengths))
    with pytest.raises(IndexError):
        ds.episode(6)


def test_torch_inputs_accepted(tmp_path):
    ep = make_episode(0, length=5)
    as_torch = {"obs": {k: torch.from_numpy(v) for k, v in ep["obs"].items()},
                **{k: torch.from_numpy(ep[k]) for k in ("action", "reward", "terminated", "truncated")}}
    write(tmp_path / "d.zarr", [as_torch], durable=True)
    assert_episode_equal(EpisodeDataset(tmp_path / "d.zarr").episode(0), ep)


def test_resume_appends_and_checks_specs(tmp_path):
    path = tmp_path / "d.zarr"
    eps = [make_episode(i) for i in range(5)]
    write(path, eps[:3])
    with EpisodeWriter(path, {**META, "seed": 8}, OBS_SPEC, ACT_SPEC) as w:  # mode "a" resumes
        assert w.num_episodes == 3
        for ep in eps[3:]:
            w.append(**ep)
    ds = EpisodeDataset(path)
    assert ds.num_episodes == 5
    for i, ep in enumerate(eps):
        assert_episode_equal(ds.episode(i), ep)
    assert ds.meta["seed"] == 7  # original kept, the change is recorded
    assert ds.meta["resumes"][0]["at_episode"] == 3 and ds.meta["resumes"][0]["meta"] == {"seed": 8}
    # a dataset's own meta is a valid writer meta: appending with it records no change
    with EpisodeWriter(path, ds.meta, OBS_SPEC, ACT_SPEC) as w:
        w.append(**make_episode(5))
    appended = EpisodeDataset(path)
    assert appended.num_episodes == 6 and appended.meta["resumes"] == ds.meta["resumes"]
    assert_episode_equal(appended.episode(5), make_episode(5))

    with pytest.raises(ValueError, match="cannot resume.*obs_spec"):
        EpisodeWriter(path, META, {"state": TensorSpec((4,))}, ACT_SPEC)
    with pytest.raises(ValueError, match="cannot resume.*task"):
        EpisodeWriter(path, {**META, "task": "lift_cube"}, OBS_SPEC, ACT_SPEC)
    with pytest.raises(FileExistsError, match="mode='a'"):
        EpisodeWriter(path, META, OBS_SPEC, ACT_SPEC, mode="w-")
    write(path, eps[:1], mode="w")
    assert EpisodeDataset(path).num_episodes == 1


def test_single_writer_lock(tmp_path):
    path = tmp_path / "d.zarr"
    with EpisodeWriter(path, META, OBS_SPEC, ACT_SPEC):
        with pytest.raises(RuntimeError, match="another EpisodeWriter"):
            EpisodeWriter(path, META, OBS_SPEC, ACT_SPEC)
    EpisodeWriter(path, META, OBS_SPEC, ACT_SPEC).close()  # released on close


@pytest.mark.parametrize("mutate, error, match", [
    (lambda e: e["obs"].pop("image"), ValueError, "obs groups"),
    (lambda e: e["obs"].__setitem__("extra", e["obs"]["state"]), ValueError, "obs groups"),
    (lambda e: e["obs"].__setitem__("state", e["obs"]["state"][:, :2]), ValueError, r"obs\['state'\].*\(T, 3\)"),
    (lambda e: e["obs"].__setitem__("state", e["obs"]["state"].astype(np.float64)), TypeError, "astype"),
    (lambda e: e.__setitem__("action", e["action"][:, None]), ValueError, "action has shape"),
    (lambda e: e.__setitem__("action", e["action"][:-1]), ValueError, "different lengths"),
    (lambda e: e.__setitem__("terminated", e["terminated"].astype(np.int64)), TypeError, "terminated.*bool"),
    (lambda e: e["truncated"].__setitem__(2, True), ValueError, "only end at its last step"),
    (lambda e: e["action"].__setitem__((1, 1), np.nan), ValueError, "NaN"),
    (lambda e: e.__setitem__("reward", np.array(["a"] * len(e["reward"]))), TypeError, "reward"),
])
def test_append_rejects_bad_episodes(tmp_path, mutate, error, match):
    path = tmp_path / "d.zarr"
    with EpisodeWriter(path, META, OBS_SPEC, ACT_SPEC) as w:
        w.append(**make_episode(0, length=6))
        bad = make_episode(1, length=6)
        mutate(bad)
        with pytest.raises(error, match=match):
            w.append(**bad)
    assert EpisodeDataset(path).num_episodes == 1  # nothing half-written became visible


def test_writer_rejects_bad_construction(tmp_path):
    with pytest.raises(TypeError, match="JSON-compatible"):
        EpisodeWriter(tmp_path / "a.zarr", {"x": object()}, OBS_SPEC, ACT_SPEC)
    with pytest.raises(ValueError, match="shape \\(Da,\\)"):
        EpisodeWriter(tmp_path / "b.zarr", META, OBS_SPEC, TensorSpec((2, 2)))
    with pytest.raises(ValueError, match="empty"):
        with EpisodeWriter(tmp_path / "c.zarr", META, OBS_SPEC, ACT_SPEC) as w:
            w.append(**make_episode(0, length=0))
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        EpisodeWriter(tmp_path / "file.zarr", META, OBS_SPEC, ACT_SPEC)
    (tmp_path / "notzarr").mkdir()
    (tmp_path / "notzarr" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a zarr dataset"):
        EpisodeWriter(tmp_path / "notzarr", META, OBS_SPEC, ACT_SPEC)


def test_reader_errors_name_path_and_fix(tmp_path):
    missing = tmp_path / "missing.zarr"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        EpisodeDataset(missing)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a zarr dataset"):
        EpisodeDataset(tmp_path / "plain")
    zarr.open_group(tmp_path / "other.zarr", mode="w", attributes={"foo": 1})
    with pytest.raises(ValueError, match="not a Distillery dataset"):
        EpisodeDataset(tmp_path / "other.zarr")
    path = tmp_path / "d.zarr"
    write(path, [make_episode(0)])
    zarr.open_group(path, mode="r+").attrs.update({"distillery_format": 99})
    with pytest.raises(ValueError, match="format 99.*re-collect"):
        EpisodeDataset(path)


def test_uncommitted_append_is_invisible_and_overwritten(tmp_path, monkeypatch):
    """Simulate death after the data rows were written but before the commit landed."""
    path = tmp_path / "d.zarr"
    eps = [make_episode(i) for i in range(4)]
    w = EpisodeWriter(path, META, OBS_SPEC, ACT_SPEC)
    w.append(**eps[0])

    def die() -> None:
        raise KeyboardInterrupt("killed before commit")

    monkeypatch.setattr(w, "_commit", die)
    with pytest.raises(KeyboardInterrupt):
        w.append(**make_episode(99, length=250))  # garbage rows now sit past the commit
    w._release_lock()
    ds = EpisodeDataset(path)
    assert ds.num_episodes == 1
    assert_episode_equal(ds.episode(0), eps[0])
    write(path, eps[1:])  # resume overwrites the garbage
    ds = EpisodeDataset(path)
    assert ds.num_episodes == 4
    for i, ep in enumerate(eps):
        assert_episode_equal(ds.episode(i), ep)


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from distillery.data import episodes
    from distillery.specs import TensorSpec
    episodes._CHUNK_BYTES = 2048   # small chunks/blocks: appends cross chunk boundaries and resize often
    episodes._ENDS_CHUNK = 8
    OBS_SPEC = {obs_spec!r}
    ACT_SPEC = {act_spec!r}
    META = {meta!r}
""") + textwrap.dedent(inspect.getsource(make_episode)) + textwrap.dedent("""
    w = episodes.EpisodeWriter(sys.argv[1], META, OBS_SPEC, ACT_SPEC)
    i = w.num_episodes
    print("ready", flush=True)
    while True:
        w.append(**make_episode(i))
        i += 1
""")


def test_sigkill_during_collection_keeps_committed_episodes(tmp_path):
    """SIGKILL a collecting process at random moments; every committed episode must read back bit-exact
    and a new writer must resume the same dataset."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("{obs_spec!r}", repr(OBS_SPEC)).replace("{act_spec!r}", repr(ACT_SPEC))
                      .replace("{meta!r}", repr(META)))
    path = tmp_path / "d.zarr"
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(3):
        child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(float(rng.uniform(0.2, 1.2)))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        ds = EpisodeDataset(path)
        assert ds.num_episodes >= seen  # nothing committed is ever lost
        for i in range(ds.num_episodes):
            assert_episode_equal(ds.episode(i), make_episode(i))
        seen = ds.num_episodes
    assert seen > 0, "the child never committed an episode; the test would be vacuous"
    with EpisodeWriter(path, META, OBS_SPEC, ACT_SPEC) as w:
        w.append(**make_episode(seen))
    ds = EpisodeDataset(path)
    assert ds.num_episodes == seen + 1
    for i in range(ds.num_episodes):
        assert_episode_equal(ds.episode(i), make_episode(i))
    assert not list(path.rglob("*.partial"))  # zarr temp files orphaned by kills are cleaned on resume


def test_stats_per_dimension(tmp_path):
    ep = make_episode(0, length=3)
    ep["action"] = np.array([[0.0, 1.0], [2.0, -3.0], [4.0, 5.0]], np.float32)
    write(tmp_path / "d.zarr", [ep])
    st = EpisodeDataset(tmp_path / "d.zarr").stats(["action", "image"])
    np.testing.assert_array_equal(st["action"]["min"], [0.0, -3.0])
    np.testing.assert_array_equal(st["action"]["max"], [4.0, 5.0])
    np.testing.assert_allclose(st["action"]["mean"], [2.0, 1.0])
    np.testing.assert_allclose(st["action"]["std"], [np.sqrt(8 / 3), np.sqrt(32 / 3)], rtol=1e-6)
    assert all(v.dtype == np.float32 for v in st["action"].values())
    assert st["image"]["mean"].shape == (4, 4, 3)
    np.testing.assert_allclose(st["image"]["mean"][0, 0, 0], ep["obs"]["image"][:, 0, 0, 0].mean(), rtol=1e-6)
    with pytest.raises(KeyError, match="unknown stats key"):
        EpisodeDataset(tmp_path / "d.zarr").stats(["reward"])


# ----------------------------------------------------------------------------- SequenceDataset
def tiny_dataset(tmp_path) -> EpisodeDataset:
    """Two episodes, lengths 3 and 1; state = global step index, action = 100 + index (both dims)."""
    spec = {"state": TensorSpec((1,))}
    path = tmp_path / "tiny.zarr"
    with EpisodeWriter(path, META, spec, ACT_SPEC) as w:
        for idx in ([0, 1, 2], [3]):
            x = np.array(idx, np.float32)
            done = np.zeros(len(idx), bool)
            done[-1] = True
            w.append({"state": x[:, None]}, np.stack([100 + x, 100 + x], 1), np.zeros(len(idx), np.float32),
                     done, np.zeros(len(idx), bool))
    return EpisodeDataset(path)


def test_sequence_padding_exact(tmp_path):
    ds = SequenceDataset(tiny_dataset(tmp_path), ["state"], obs_horizon=2, pred_horizon=4)
    # Window of step t covers t-1 .. t+2, clamped into its own episode (hand-derived).
    want_steps = [[0, 0, 1, 2], [0, 1, 2, 2], [1, 2, 2, 2], [3, 3, 3, 3]]
    assert len(ds) == 4
    batch = ds.sample_batch(torch.arange(4))
    for t, steps in enumerate(want_steps):
        item = ds[t]
        assert item["obs"]["state"].dtype == torch.float32 and item["obs"]["state"].shape == (2, 1)
        assert item["action"].dtype == torch.float32 and item["action"].shape == (4, 2)
        assert item["obs"]["state"][:, 0].tolist() == steps[:2]
        assert item["action"][:, 0].tolist() == [100 + s for s in steps]
        assert item["action"][1].tolist() == [100 + t] * 2  # action[To-1] is the action executed at t
        torch.testing.assert_close(batch["obs"]["state"][t], item["obs"]["state"], rtol=0, atol=0)
        torch.testing.assert_close(batch["action"][t], item["action"], rtol=0, atol=0)

    ds1 = SequenceDataset(tiny_dataset(tmp_path / "b"), ["state"], obs_horizon=1, pred_horizon=1)
    assert [ds1[t]["action"][0, 0].item() for t in range(4)] == [100, 101, 102, 103]


def test_sequence_matches_reference_on_random_episodes(tmp_path):
    eps = [make_episode(i, length=n) for i, n in enumerate([1, 5, 17, 2])]
    write(tmp_path / "d.zarr", eps)
    to, tp = 3, 8
    ds = SequenceDataset(EpisodeDataset(tmp_path / "d.zarr"), ["state", "image"], to, tp)
    rows = []  # reference: explicit per-episode loop with edge padding by np.pad(mode="edge")
    for ep in eps:
        t_len = len(ep["action"])
        act = np.pad(ep["action"], ((to - 1, tp), (0, 0)), mode="edge")
        img = np.pad(ep["obs"]["image"], ((to - 1, 0), (0, 0), (0, 0), (0, 0)), mode="edge")
        for t in range(t_len):
            rows.append((img[t:t + to], act[t:t + tp]))
    assert len(ds) == len(rows)
    batch = ds.sample_batch(np.arange(len(ds))[::-1].copy())
    for j, (img, act) in enumerate(rows[::-1]):
        np.testing.assert_array_equal(batch["obs"]["image"][j].numpy(), img.astype(np.float32))
        np.testing.assert_array_equal(batch["action"][j].numpy(), act)
    assert batch["obs"]["image"].shape == (len(ds), to, 4, 4, 3) and batch["obs"]["image"].dtype == torch.float32
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False)
    first = next(iter(loader))
    torch.testing.assert_close(first["action"], ds.sample_batch(torch.arange(5))["action"], rtol=0, atol=0)


def test_sequence_weights_and_errors(tmp_path):
    base = tiny_dataset(tmp_path)
    ds = SequenceDataset(base, ["state"], 2, 4, episode_weights=[0.0, 1.0])
    batch = ds.random_batch(64, generator=torch.Generator().manual_seed(0))
    assert (batch["obs"]["state"][:, -1, 0] == 3).all()  # only episode 1 (step 3) can be drawn
    uniform = SequenceDataset(base, ["state"], 2, 4).random_batch(256, generator=torch.Generator().manual_seed(0))
    assert len(torch.unique(uniform["obs"]["state"][:, -1, 0])) == 4
    # balanced: the 1-step episode is drawn as often as the 3-step one (step-uniform: a quarter of the time)
    balanced = SequenceDataset(base, ["state"], 2, 4, episode_weights=SequenceDataset.balanced_episode_weights(base))
    batch = balanced.random_batch(4000, generator=torch.Generator().manual_seed(1))
    assert abs((batch["obs"]["state"][:, -1, 0] == 3).float().mean().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match="one per episode"):
        SequenceDataset(base, ["state"], 2, 4, episode_weights=[1.0])
    with pytest.raises(ValueError, match="pred_horizon"):
        SequenceDataset(base, ["state"], 4, 2)
    with pytest.raises(KeyError, match="not in dataset"):
        SequenceDataset(base, ["rgb"], 2, 4)
    with pytest.raises(TypeError, match="list"):
        SequenceDataset(base, "state", 2, 4)
