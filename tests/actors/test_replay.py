"""Replay store: group atomicity, staleness refusal, backpressure, spill and reload."""

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
    out = buf.sample("student", 3)
    assert [len(g) for g in out] == [3, 3, 3]
    assert all(len({e.group_id for e in g}) == 1 for g in out)
    assert [g[0].group_id for g in out] == ["g0", "g1", "g2"]  # FIFO
    with pytest.raises(ValueError):
        buf.add(group("a", 0) + group("b", 0))


def test_staleness_refusal_and_eviction_are_counted():
    buf = ReplayBuffer(capacity_groups=10, max_staleness=1)
    buf.set_version("student", 3)
    assert buf.add(group("old", 1)) == "stale"  # 3 - 1 = 2 > 1
    assert buf.add(group("ok2", 2)) == "ok"  # 3 - 2 = 1
    assert buf.add(group("ok3", 3)) == "ok"
    assert buf.set_version("student", 4) == 1  # ok2 is now 2 behind
    assert [g[0].group_id for g in buf.sample("student", 5)] == ["ok3"]
    s = buf.stats()
    assert s["refused_stale/student"] == 1 and s["evicted_stale/student"] == 1


def test_an_evicted_group_can_be_produced_again():
    buf = ReplayBuffer(capacity_groups=10, max_staleness=0)
    assert buf.add(group("g", 0)) == "ok"
    assert buf.add(group("g", 0)) == "duplicate"
    assert buf.set_version("student", 1) == 1  # evicted, never trained
    assert buf.add(group("g", 1)) == "ok"  # the same step's group, made again with the new weights
    assert [g[0].version for g in buf.sample("student", 2)] == [1]


def test_a_step_counts_as_produced_while_its_groups_are_held_or_trained():
    from piplay_ray.records import group_id, group_step

    assert group_step(group_id("student", 12, 0, "it0-rule-7")) == ("student", 12)
    assert group_step("examiner-3") == ("examiner", 3) and group_step("warmup-student-1") is None
    buf = ReplayBuffer(capacity_groups=10, max_staleness=0)
    buf.add(group(group_id("student", 0, 0, "t"), 0))
    assert buf.produced("student", 0) and not buf.produced("student", 1) and not buf.produced("examiner", 0)
    buf.sample("student", 1)
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
    buf.sample("student", 1)
    assert buf.add(group("g", 0)) == "duplicate"


def test_spill_and_restore_roundtrip(tmp_path):
    buf = ReplayBuffer(capacity_groups=10, max_staleness=2)
    buf.set_version("student", 1)
    buf.add(group("s1", 1))
    buf.add(group("e1", 0, role="examiner", size=2))
    buf.add(group("s0", 0))
    buf.sample("student", 1)  # s1 consumed: must not come back, but stays "seen"
    path = tmp_path / "replay.parquet"
    assert buf.spill(path) == 2 + 3  # e1 and s0; s1 was consumed
    back = ReplayBuffer.restore(path, 10, 2)
    assert back.stats()["per_role"] == {"student": 1, "examiner": 1}
    assert back.add(group("s1", 1)) == "duplicate"
    assert back.sample("student", 1)[0] == group("s0", 0)
    assert back.sample("examiner", 1)[0] == group("e1", 0, role="examiner", size=2)
    assert back.learner_version["student"] == 1


def test_backpressure_blocks_until_the_learner_samples():
    async def scenario():
        store = ReplayStoreImpl(capacity_groups=2, max_staleness=1)
        assert await store.put(group("a", 0)) == "ok"
        assert await store.put(group("b", 0)) == "ok"
        assert await store.put(group("c", 0), timeout=0.2) == "timeout"  # full
        blocked = asyncio.create_task(store.put(group("d", 0)))
        await asyncio.sleep(0.1)
        assert not blocked.done()
        got = await store.sample("student", 1)
        assert [g[0].group_id for g in got] == ["a"]
        assert await asyncio.wait_for(blocked, 2) == "ok"
        assert [g[0].group_id for g in await store.sample("student", 1)] == ["b"]
        waiter = asyncio.create_task(store.sample("student", 2, timeout=5))
        await asyncio.sleep(0.1)
        assert not waiter.done()  # only d buffered
        assert await store.put(group("e", 0)) == "ok"
        assert [g[0].group_id for g in await waiter] == ["d", "e"]
        # asking for more than the capacity returns what a full store holds instead of waiting forever
        await store.put(group("f", 0))
        await store.put(group("g", 0))
        assert [g[0].group_id for g in await asyncio.wait_for(store.sample("student", 5), 2)] == ["f", "g"]
        assert store.stats()["backpressure_wait_s"] > 0.1

    asyncio.run(scenario())


def test_replay_store_as_a_ray_actor(ray_local, tmp_path):
    spill = str(tmp_path / "r.parquet")
    store = ReplayStore.remote(4, 1)
    assert ray.get([store.put.remote(group(f"g{i}", 0)) for i in range(3)]) == ["ok"] * 3
    assert ray.get(store.set_version.remote("student", 2)) == 3  # all now stale
    assert ray.get(store.put.remote(group("new", 2))) == "ok"
    assert ray.get(store.spill.remote(spill)) == 3
    ray.kill(store)
    again = ReplayStore.remote(4, 1, spill)  # a restarted store recovers from its spill
    got = ray.get(again.sample.remote("student", 1, 5))
    assert [g[0].group_id for g in got] == ["new"]
