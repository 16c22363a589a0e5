"""Checkpoint layout: atomic writes, discovery of the newest complete one, retention (no DeepSpeed)."""

import pytest

from piplay_ray.learner import checkpoint as ck


def _save(run, step, fail=False):
    with ck.atomic_dir(ck.checkpoint_dir(run, step)) as tmp:
        (tmp / "weights.bin").write_text(str(step))
        if fail:
            raise RuntimeError("killed mid-write")


def test_latest_is_newest_complete_and_partial_writes_are_invisible(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None
    _save(tmp_path, 3)
    _save(tmp_path, 12)
    with pytest.raises(RuntimeError):
        _save(tmp_path, 20, fail=True)
    assert not ck.checkpoint_dir(tmp_path, 20).exists()
    # a folder renamed by hand without the marker is not complete either
    (ck.checkpoints_root(tmp_path) / "step-000030").mkdir()
    latest = ck.latest_checkpoint(tmp_path)
    assert latest == ck.checkpoint_dir(tmp_path, 12) and (latest / "weights.bin").read_text() == "12"
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 12]


def test_prune_keeps_last_n_and_clears_temporaries(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s)
    (ck.checkpoints_root(tmp_path) / ".tmp-step-000005-dead").mkdir()
    ck.prune(tmp_path, keep=2)
    names = sorted(p.name for p in ck.checkpoints_root(tmp_path).iterdir())
    assert names == ["step-000003", "step-000004"]
    with pytest.raises(ValueError):
        ck.prune(tmp_path, keep=0)


def test_resaving_a_step_replaces_it_whole(tmp_path):
    _save(tmp_path, 7)
    with ck.atomic_dir(ck.checkpoint_dir(tmp_path, 7)) as tmp:
        (tmp / "other.bin").write_text("new")
    d = ck.checkpoint_dir(tmp_path, 7)
    assert (d / "other.bin").read_text() == "new" and not (d / "weights.bin").exists() and ck.is_complete(d)
    assert [p.name for p in ck.checkpoints_root(tmp_path).iterdir()] == ["step-000007"]


def test_rng_state_round_trip():
    import random

    import torch

    state = ck.rng_state()
    a = (random.random(), torch.rand(3))
    ck.set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_checkpoints_folder_and_run_dir_name_the_same_place(tmp_path):
    assert ck.checkpoint_dir(tmp_path, 4) == ck.checkpoint_dir(tmp_path / "checkpoints", 4)
    _save(tmp_path, 4)
    assert ck.latest_checkpoint(tmp_path / "checkpoints") == ck.latest_checkpoint(tmp_path)
    assert ck.is_step_dir(ck.checkpoint_dir(tmp_path, 4)) and not ck.is_step_dir(tmp_path)


def test_a_checkpoint_is_on_disk_before_it_is_called_complete(tmp_path, monkeypatch):
    """Every file and folder of it is fsynced before COMPLETE is written, and its folder after the rename."""
    import os

    synced, real = [], os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        done = any((p / ck.COMPLETE).exists() for p in tmp_path.rglob("*") if p.is_dir())
        synced.append((os.path.relpath(path, tmp_path), done))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    final = tmp_path / "checkpoints" / "step-000001"
    with ck.atomic_dir(final) as d:
        (d / "student").mkdir()
        (d / "student" / "model.safetensors").write_bytes(b"w" * 10)
        (d / "driver_state.json").write_text("{}")
    first = {name.split("/", 2)[-1] for name, done in synced if not done}  # before COMPLETE existed
    assert {"student/model.safetensors", "driver_state.json", "student"} <= first
    assert synced[-1] == ("checkpoints", True) and ck.is_complete(final)  # the rename, once it is complete
