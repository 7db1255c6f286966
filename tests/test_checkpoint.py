"""Atomic safetensors+JSON checkpoints, nested-state flattening and run-dir resolution."""
from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from distillery.runtime import checkpoint as ckpt
from distillery.runtime.checkpoint import (
    flatten_state,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
    unflatten_state,
    update_link,
)


@pytest.fixture
def no_pickle(monkeypatch):
    """Any pickling entry point (pickle module functions, torch.save/torch.load) fails the test."""
    def boom(*a, **k):
        raise AssertionError("pickle used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "save", boom)
    monkeypatch.setattr(torch, "load", boom)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g)
    return {"w": w, "w_tied": w, "w_row": w[1], "w_t": w.t(), "bf16": torch.randn(5, generator=g).bfloat16(),
            "i64": torch.arange(7), "mask": torch.tensor([True, False]), "u8": torch.arange(3, dtype=torch.uint8),
            "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 2)}


def assert_tensors_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def test_round_trip_without_pickle(tmp_path, no_pickle):
    tensors, meta = sample_tensors(), {"step": 12, "cfg": {"lr": 1e-4, "name": "x"}, "list": [1, None, True]}
    out = save_checkpoint(tmp_path / "ck", tensors, meta)
    assert out == tmp_path / "ck"
    assert sorted(os.listdir(out)) == ["meta.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp dirs left behind
    got, got_meta = load_checkpoint(out)
    assert_tensors_equal(got, tensors)
    assert got_meta == meta
    assert ckpt.load_checkpoint_meta(out) == meta  # the same meta without reading the weights
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["step"] == 12 and on_disk["_checkpoint"]["format"] == 1  # readable without distillery


def test_overwrite_is_atomic_swap(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    save_checkpoint(path, {"x": torch.zeros(2)}, {"v": 1})
    save_checkpoint(path, {"x": torch.ones(2)}, {"v": 2})
    t, m = load_checkpoint(path)
    assert m == {"v": 2} and torch.equal(t["x"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["ck"]

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)  # dies while writing the new tensors
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"x": torch.full((2,), 3.0)}, {"v": 3})
    t, m = load_checkpoint(path)
    assert m == {"v": 2} and torch.equal(t["x"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_recovers_swap_interrupted_between_renames(tmp_path):
    """State after a kill between 'rename old aside' and 'rename new in': target missing."""
    path = tmp_path / "ck"
    save_checkpoint(tmp_path / "staging", {"x": torch.ones(1)}, {"v": "new"})
    save_checkpoint(path, {"x": torch.zeros(1)}, {"v": "old"})
    os.replace(path, tmp_path / ".ck.old-abc")
    os.replace(tmp_path / "staging", tmp_path / ".ck.new-abc")
    (tmp_path / ".ck.new-stale").mkdir()  # an unrelated, incomplete temp dir from an older crash
    _, m = load_checkpoint(path)  # read-only fallback picks the complete new dir
    assert m == {"v": "new"}
    save_checkpoint(path, {"x": torch.full((1,), 2.0)}, {"v": "newest"})
    assert load_checkpoint(path)[1] == {"v": "newest"}
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_corrupt_or_missing_files_have_clear_errors(tmp_path):
    path = tmp_path / "ck"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(path)
    save_checkpoint(path, {"x": torch.arange(100.0)}, {"v": 1})
    model = path / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[-5] ^= 0xFF  # flip a data byte: the header still parses, only the checksum can tell
    model.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors is corrupt.*sha256"):
        load_checkpoint(path)
    model.write_bytes(bytes(raw[:20]))
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        load_checkpoint(path, verify=False)
    assert ckpt.load_checkpoint_meta(path) == {"v": 1}  # the meta alone is intact
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        ckpt.load_checkpoint_meta(path)
    (path / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_checkpoint(path)


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="flatten_state"):
        save_checkpoint(tmp_path / "a", {"opt": {"nested": torch.zeros(1)}}, {})
    with pytest.raises(TypeError, match="JSON-compatible"):
        save_checkpoint(tmp_path / "b", {}, {"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c", {}, {"_checkpoint": 1})
    with pytest.raises(TypeError, match="set at a/0"):
        flatten_state({"a": [{1, 2}]})
    with pytest.raises(TypeError, match="object arrays"):
        flatten_state(np.array([None]))


def deep_equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(k2) for k, k2 in zip(a, b)) and \
            all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def test_flatten_round_trip_through_checkpoint(tmp_path, no_pickle):
    state = {
        "int_keys": {0: torch.ones(2), 1: {"step": torch.tensor(3.0)}},
        "mixed": {None: 1, True: "yes", 2.5: [1, 2]},
        "__dunder": {"__tensor__": "not a tag"},
        "tup": (1, "a", (2.0, None), [torch.arange(3)]),
        "floats": [float("nan"), float("inf"), -0.0, 1e-300],
        "big": 2**100,
        "np": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "np_f": np.array([np.nan, 1.5]),
        "np_scalar": np.float32(0.25),
        "np_int": np.int64(-3),
    }
    tensors, skeleton = flatten_state(state, prefix="s/")
    assert all(k.startswith("s/") for k in tensors)
    assert "s/int_keys/0" in tensors and "s/tup/3/0" in tensors
    save_checkpoint(tmp_path / "ck", tensors, {"state": skeleton})
    t, m = load_checkpoint(tmp_path / "ck")
    back = unflatten_state(t, m["state"])
    assert deep_equal(back, state)
    assert isinstance(back["np_scalar"], np.float32)


def _train_steps(model, opt, sched, n: int) -> None:
    for _ in range(n):
        x = torch.randn(8, 4)  # drawn from the global RNG: restoring RNG state matters
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _make(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    return model, opt, sched


def test_resume_training_is_bit_identical(tmp_path, no_pickle):
    model, opt, sched = _make()
    _train_steps(model, opt, sched, 4)
    np.random.seed(5)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
             "numpy_rng": np.random.get_state()}
    st_tensors, skeleton = flatten_state(state, prefix="train/")
    save_checkpoint(tmp_path / step_dir_name(4), {**{f"model/{k}": v for k, v in model.state_dict().items()},
                                                  **st_tensors}, {"train": skeleton, "step": 4})
    _train_steps(model, opt, sched, 5)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_np = np.random.rand(3)

    torch.manual_seed(123)  # scramble everything the restore must bring back
    np.random.seed(123)
    model2, opt2, sched2 = _make(seed=99)
    tensors, meta = load_checkpoint(resolve_checkpoint(tmp_path))
    model2.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    restored = unflatten_state(tensors, meta["train"])
    opt2.load_state_dict(restored["optimizer"])
    sched2.load_state_dict(restored["scheduler"])
    torch.set_rng_state(restored["torch_rng"])
    np.random.set_state(restored["numpy_rng"])
    _train_steps(model2, opt2, sched2, 5)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want[k]), k
    np.testing.assert_array_equal(np.random.rand(3), want_np)


def test_links_and_resolution(tmp_path):
    run = tmp_path / "run"
    cdir = run / "checkpoints"
    for step in (5, 40, 300):
        save_checkpoint(cdir / step_dir_name(step), {"x": torch.tensor(float(step))}, {"step": step})
    # No `last` yet: highest step wins (numeric, not lexicographic order of suffixes).
    assert resolve_checkpoint(run) == cdir / step_dir_name(300)
    update_link(cdir / "last", cdir / step_dir_name(40))
    assert os.readlink(cdir / "last") == step_dir_name(40)  # relative: run dirs stay movable
    for p in (run, cdir, cdir / "last"):
        assert resolve_checkpoint(p) == (cdir / step_dir_name(40)).resolve()
    assert resolve_checkpoint(cdir / step_dir_name(5)) == cdir / step_dir_name(5)
    update_link(cdir / "last", cdir / step_dir_name(5))
    assert load_checkpoint(cdir / "last")[1] == {"step": 5}
    assert sorted(p.name for p in cdir.iterdir()) == ["last"] + [step_dir_name(s) for s in (5, 40, 300)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        update_link(cdir / "last", cdir / "step_missing")
