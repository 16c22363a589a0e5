"""The teacher client under concurrency, on a real Ray actor that stands in for the teacher (a version and
one small tensor, with slow calls): scoring beside EMA updates neither restores an old EMA nor counts a
restart that did not happen, the snapshot is a file in the run's folder, and a save made while the teacher
restarts is made again on the EMA restored from it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import ray
import torch

from piplay_ray.teacher.client import TeacherClient
from piplay_ray.teacher.ema import read_ema, save_ema, saved_version


@ray.remote(max_restarts=-1, max_task_retries=0)
class SlowTeacher:
    """EMA of one tensor; `ema_update` takes the new version at once, then works a while (as a real one
    blends bucket by bucket); `load` and `save` are recorded."""

    def __init__(self):
        self.version, self.w, self.loads, self.saves = 0, torch.zeros(3), 0, []

    async def ema_update(self, version, weights):
        self.version = version
        await asyncio.sleep(0.2)
        self.w = 0.5 * self.w + 0.5 * weights
        return True

    async def score(self, trajectories, tasks, with_stats):
        await asyncio.sleep(0.05)
        return float(self.w.sum())

    def state(self):
        return {"w": self.w.clone()}

    def load_checkpoint(self, folder):
        self.version, ((_, w),) = read_ema(folder)
        self.w, self.loads = w.clone(), self.loads + 1
        return self.version

    def get_version(self):
        return self.version

    def save(self, folder):
        self.saves.append((folder, self.version))
        return save_ema(folder, {"w": self.w}, self.version)

    def stats(self):
        return self.loads, self.saves, self.w


RAY_CPUS = 1


def test_scores_beside_updates_never_rewind_the_ema(ray_local, tmp_path):
    actor = SlowTeacher.remote()
    client = TeacherClient(actor, retries=2, snapshot_dir=tmp_path / "snapshot")

    async def run():
        async def updates():
            for v in range(1, 5):
                await client.ema_update(v, torch.full((3,), float(v)))

        async def scores():
            out = []
            for _ in range(20):
                out.append(await client.score([], [], True))
            return out

        _, got = await asyncio.gather(updates(), scores())
        return got

    asyncio.run(run())
    loads, _, w = ray.get(actor.stats.remote())
    want = torch.zeros(3)
    for v in range(1, 5):
        want = 0.5 * want + 0.5 * v
    assert loads == 0 and client.restarts == 0  # no restart happened, none was "repaired"
    torch.testing.assert_close(w, want)  # every update applied once, in order, nothing rewound
    assert client.version == 4
    # the snapshot is the EMA of version 4 in a file of the run's folder, the only one kept
    assert [p.name for p in (tmp_path / "snapshot").iterdir()] == ["v000004"]


def test_a_save_during_a_restart_is_made_again_on_the_restored_ema(ray_local, tmp_path):
    actor = SlowTeacher.remote()
    client = TeacherClient(actor, retries=3, snapshot_dir=tmp_path / "snapshot")
    ckpt = str(tmp_path / "ckpt" / "teacher")

    async def run():
        await client.ema_update(1, torch.ones(3))
        calls = {"n": 0}
        real = actor.save

        class Restarting:  # the first save lands on a freshly restarted teacher (base weights, version 0)
            def remote(self, folder):
                calls["n"] += 1
                if calls["n"] == 1:
                    ray.kill(actor, no_restart=False)
                    while True:  # until the restarted instance serves (base weights, version 0)
                        try:
                            if ray.get(actor.get_version.remote()) == 0:
                                break
                        except ray.exceptions.RayActorError:
                            time.sleep(0.1)
                return real.remote(folder)

        client.actor = type("A", (), {"save": Restarting(), "__getattr__": lambda s, n: getattr(actor, n)})()
        return await client.save(ckpt)

    asyncio.run(run())
    loads, saves, w = ray.get(actor.stats.remote())
    assert saves[-1] == (ckpt, 1) and loads == 1  # saved again after the EMA was restored
    torch.testing.assert_close(w, torch.full((3,), 0.5))


def test_a_save_is_checked_by_the_version_in_its_file(ray_local, tmp_path):
    """The save lands on a restarted teacher (base weights, version 0), and before the client checks it, a
    concurrent call has restored the EMA (version 1): the teacher's version says 1, the file says 0. The check
    reads the file, so the save is made again on the restored EMA."""
    actor = SlowTeacher.remote()
    client = TeacherClient(actor, retries=3, snapshot_dir=tmp_path / "snapshot")
    ckpt = str(tmp_path / "ckpt" / "teacher")

    async def run():
        await client.ema_update(1, torch.ones(3))
        snapshot = next((tmp_path / "snapshot").iterdir())
        calls = {"n": 0}
        real = actor.save

        class RestartedThenRestored:
            def remote(self, folder):
                calls["n"] += 1
                if calls["n"] > 1:
                    return real.remote(folder)
                ray.kill(actor, no_restart=False)
                while True:
                    try:
                        if ray.get(actor.get_version.remote()) == 0:
                            break
                    except ray.exceptions.RayActorError:
                        time.sleep(0.1)
                ray.get(real.remote(folder))  # the base weights' file
                ray.get(actor.load_checkpoint.remote(str(snapshot)))  # a score's restore, before the check

                async def written():
                    return str(Path(folder) / "teacher.safetensors")
                return written()

        client.actor = type("A", (), {"save": RestartedThenRestored(), "__getattr__": lambda s, n: getattr(actor, n)})()
        return await client.save(ckpt)

    asyncio.run(run())
    _, saves, _ = ray.get(actor.stats.remote())
    assert saved_version(ckpt) == 1 and saves[-1] == (ckpt, 1)
