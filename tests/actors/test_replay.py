"""Replay store: group and step atomicity, staleness refusal, backpressure, spill and reload."""

from __future__ import annotations

import asyncio

import pytest
import ray

from piplay_ray.actors.replay import ReplayStore, ReplayStoreImpl
from piplay_ray.actors.replay_buffer import ReplayBuffer
from piplay_ray.records import Experience

RAY_CPUS = 1


def group(gid: str, version: int, role: str = "student", size: int = 3) -> list[Experience]:
    return [Experience(group_id=gid, role=role, prompt_ids=[1, 2], response_ids=[3, 4 + i], mask=[1, 1],
                       logprobs=[-0.5, -0.25], reward=float(i % 2), advantage=0.5 - i, version=version,
                       teacher_ids=[[3, 5], [4, 6]], teacher_logprobs=[[-0.1, -2.0], [-0.3, -1.5]],
                       teacher_tail=[-3.0, -2.5], info={"i": i}) for i in range(size)]


def test_groups_are_never_split():
    buf = ReplayBuffer(capacity_groups=10, max_staleness=1)
    for g in range(4):
        assert buf.add(group(f"g{g}", 0)) == "ok"
    out = [buf.sample("student") for _ in range(3)]
    assert [[len(g) for g in step] for step in out] == [[3], [3], [3]]
    assert [step[0][0].group_id for step in out] == ["g0", "g1", "g2"]  # FIFO
    with pytest.raises(ValueError):
        buf.add(group("a", 0) + group("b", 0))


def step_groups(role: str, step: int, n: int, version: int = 0) -> list[list[Experience]]:
    from piplay_ray.records import group_id

    return [group(group_id(role, step, i, f"t{i}"), version, role) for i in range(n)]


def test_a_step_goes_in_and_out_whole():
    """The groups of one learner step enter together (a full store takes none of them) and the learner gets
    them together: never part of a step, never parts of two."""
    buf = ReplayBuffer(capacity_groups=5, max_staleness=1)
    assert buf.add_step(step_groups("student", 0, 3)) == "ok"
    assert buf.add_step(step_groups("student", 1, 3)) == "full" and buf.size("student") == 3  # none of step 1
    assert not buf.produced("student", 1) and buf.held_steps() == {"student": [0]}
    assert [g[0].group_id for g in buf.sample("student")] == [f"student-0-{i}-t{i}" for i in range(3)]
    assert buf.add_step(step_groups("student", 1, 3)) == "ok" and buf.add_step(step_groups("student", 2, 2)) == "ok"
    assert [len(buf.sample("student")) for _ in range(3)] == [3, 2, 0]
    assert buf.add_step(step_groups("student", 1, 3)) == "duplicate"
    buf.set_version("student", 3)
    assert buf.add_step(step_groups("student", 3, 2, version=3)[:1] + step_groups("student", 3, 2)[1:]) == "stale"
    assert not buf.produced("student", 3)  # a step with one stale group is refused whole: made again
    with pytest.raises(ValueError, match="one role"):
        buf.add_step(step_groups("student", 4, 1) + step_groups("examiner", 4, 1))
    big = ReplayBuffer(capacity_groups=2, max_staleness=0)
    assert big.add_step(step_groups("student", 0, 3)) == "ok"  # larger than the store: alone in an empty one


def test_staleness_refusal_and_eviction_are_counted():
    buf = ReplayBuffer(capacity_groups=10, max_staleness=1)
    buf.set_version("student", 3)
    assert buf.add(group("old", 1)) == "stale"  # 3 - 1 = 2 > 1
    assert buf.add(group("ok2", 2)) == "ok"  # 3 - 2 = 1
    assert buf.add(group("ok3", 3)) == "ok"
    assert buf.set_version("student", 4) == 1  # ok2 is now 2 behind
    assert [g[0].group_id for g in buf.sample("student")] == ["ok3"] and buf.sample("student") == []
    s = buf.stats()
    assert s["refused_stale/student"] == 1 and s["evicted_stale/student"] == 1


def test_an_evicted_group_can_be_produced_again():
    buf = ReplayBuffer(capacity_groups=10, max_staleness=0)
    assert buf.add(group("g", 0)) == "ok"
    assert buf.add(group("g", 0)) == "duplicate"
    assert buf.set_version("student", 1) == 1  # evicted, never trained
    assert buf.add(group("g", 1)) == "ok"  # the same step's group, made again with the new weights
    assert [g[0].version for g in buf.sample("student")] == [1]


def test_a_step_counts_as_produced_while_its_groups_are_held_or_trained():
    from piplay_ray.records import group_id, group_step

    assert group_step(group_id("student", 12, 0, "it0-rule-7")) == ("student", 12)
    assert group_step("examiner-3") == ("examiner", 3) and group_step("warmup-student-1") is None
    buf = ReplayBuffer(capacity_groups=10, max_staleness=0)
    buf.add(group(group_id("student", 0, 0, "t"), 0))
    assert buf.produced("student", 0) and not buf.produced("student", 1) and not buf.produced("examiner", 0)
    buf.sample("student")
    assert buf.produced("student", 0)  # trained: still produced
    buf.add(group(group_id("student", 1, 0, "t"), 0))
    buf.set_version("student", 1)  # evicted as stale: to be made again
    assert not buf.produced("student", 1)


def test_on_policy_means_same_version_only():
    buf = ReplayBuffer(capacity_groups=10, max_staleness=0)
    buf.set_version("examiner", 2)
    assert buf.add(group("a", 1, "examiner")) == "stale"
    assert buf.add(group("b", 2, "examiner")) == "ok"
    assert buf.size("student") == 0 and buf.size("examiner") == 1


def test_duplicate_group_ids_are_refused_even_after_sampling():
    buf = ReplayBuffer(capacity_groups=10, max_staleness=1)
    assert buf.add(group("g", 0)) == "ok"
    buf.sample("student")
    assert buf.add(group("g", 0)) == "duplicate"


def test_spill_and_restore_roundtrip(tmp_path):
    buf = ReplayBuffer(capacity_groups=10, max_staleness=2)
    buf.set_version("student", 1)
    buf.add(group("s1", 1))
    buf.add(group("e1", 0, role="examiner", size=2))
    buf.add_step(step_groups("student", 0, 2))
    buf.sample("student")  # s1 consumed: must not come back, but stays "seen"
    path = tmp_path / "replay.parquet"
    path.write_bytes(buf.spill())
    back = ReplayBuffer.restore(path, 10, 2)
    assert back.stats()["per_role"] == {"student": 2, "examiner": 1} and len(back) == 3
    assert back.add(group("s1", 1)) == "duplicate"
    assert back.held_steps() == {"student": [0], "examiner": []}  # "e1" names no learner step
    assert back.sample("student") == step_groups("student", 0, 2)  # the step comes back whole
    assert back.sample("examiner")[0] == group("e1", 0, role="examiner", size=2)
    assert back.learner_version["student"] == 1


def test_backpressure_blocks_until_the_learner_samples():
    async def scenario():
        store = ReplayStoreImpl(capacity_groups=2, max_staleness=1)
        assert await store.put([group("a", 0)]) == "ok"
        assert await store.put([group("b", 0)]) == "ok"
        assert await store.put([group("c", 0)], timeout=0.2) == "timeout"  # full
        blocked = asyncio.create_task(store.put([group("d", 0)]))
        await asyncio.sleep(0.1)
        assert not blocked.done()
        assert [g[0].group_id for g in await store.sample("student")] == ["a"]
        assert await asyncio.wait_for(blocked, 2) == "ok"
        assert [g[0].group_id for g in await store.sample("student")] == ["b"]
        assert [g[0].group_id for g in await store.sample("student")] == ["d"]
        waiter = asyncio.create_task(store.sample("student", timeout=5))
        await asyncio.sleep(0.1)
        assert not waiter.done()  # nothing held: it waits for a whole step
        assert await store.put(step_groups("student", 7, 2)) == "ok"
        assert [g[0].group_id for g in await waiter] == ["student-7-0-t0", "student-7-1-t1"]
        assert await store.sample("student", timeout=0.2) == []  # nothing within the timeout: no part of a step
        assert store.stats()["backpressure_wait_s"] > 0.1

    asyncio.run(scenario())


def test_replay_store_as_a_ray_actor(ray_local, tmp_path):
    spill = tmp_path / "r.parquet"
    store = ReplayStore.remote(4, 1)
    assert ray.get([store.put.remote([group(f"g{i}", 0)]) for i in range(3)]) == ["ok"] * 3
    assert ray.get(store.set_version.remote("student", 2)) == 3  # all now stale
    assert ray.get(store.put.remote([group("new", 2)])) == "ok"
    spill.write_bytes(ray.get(store.spill.remote()))
    ray.kill(store)
    again = ReplayStore.remote(4, 1, str(spill))  # a restarted store recovers from its spill
    got = ray.get(again.sample.remote("student", 5))
    assert [g[0].group_id for g in got] == ["new"]


def test_a_restore_without_a_spill_still_gives_the_store_the_learner_versions(ray_local, tmp_path):
    """replay.spill=false: nothing comes back from the checkpoint, but the store must still know how far the
    learner is, or it takes rollouts older than the staleness bound."""
    from types import SimpleNamespace

    from piplay_ray.config import load_config
    from piplay_ray.evolution.actors import Actors
    from piplay_ray.evolution.book import RunBook
    from piplay_ray.evolution.state import LoopState
    from piplay_ray.monitor.metrics import MetricsSink
    from piplay_ray.rundir import RunDir

    class Learner:
        def load(self, ckpt):
            return LoopState(versions={"examiner": 3, "student": 1}).__dict__

    store = ReplayStore.remote(8, 0)
    actors = Actors(search=None, pools={}, teacher=None, teacher_client=SimpleNamespace(restarts=0),
                    learner=Learner(), replay=store)
    sink = MetricsSink(tmp_path, None)
    book = RunBook(load_config("configs/tiny.yaml", ["replay.spill=false"]), RunDir(tmp_path), sink, actors, docs=[])
    book.restore(tmp_path / "checkpoints" / "step-000004")
    sink.close()
    assert ray.get(store.stats.remote())["versions"] == {"examiner": 3, "student": 1}
    assert ray.get(store.put.remote([group("student-1-0-t", 0)])) == "stale"  # base weights, learner at 1
