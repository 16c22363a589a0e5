"""Policy handles without Ray: the producer's staleness gate, publishing and loading weights into a pool,
and the teacher's EMA step that follows each student step."""

from __future__ import annotations

import asyncio

import pytest

from piplay_ray.evolution.book import LoopState
from piplay_ray.evolution.policy import Policy, StudentPolicy


class Learner:
    def weights(self, role, form="full"):
        return f"{role}-weights"


class Pool:
    def __init__(self):
        self.pushed = []

    async def aupdate_weights(self, version, bundle):
        self.pushed.append((version, bundle))


class Teacher:
    def __init__(self):
        self.calls = []

    async def ema_update(self, version, weights):
        self.calls.append(("ema", version, weights))

    async def load(self, version, weights):
        self.calls.append(("load", version, weights))


def handle(role="examiner", **kw):
    state, logged = LoopState(), []
    log = lambda values, phase: logged.append((phase, values))  # noqa: E731
    if role == "student":
        p = StudentPolicy(Pool(), Learner(), lambda: state, log, kw.pop("teacher", Teacher()),
                          kw.pop("teach", True), lambda it: [0.03, 0.003][it], **kw)
    else:
        p = Policy(role, Pool(), Learner(), lambda: state, log, **kw)
    return p, state, logged


@pytest.mark.parametrize("bound", [0, 1, 2])
def test_staleness_gate_is_the_replay_rule(bound):
    p, state, _ = handle()
    state.versions["examiner"] = 3
    # the groups of learner step j are made with the newest weights (v = 3) and consumed at version j
    assert [p.may_produce(j, bound) for j in range(3, 7)] == [j - 3 <= bound for j in range(3, 7)]


def test_producer_waits_for_the_publish_that_lets_it_run():
    p, state, _ = handle()

    async def scenario():
        waiter = asyncio.create_task(p.wait_to_produce(2, 0, lambda: False))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # step 2 needs version 2, the learner is at 0
        state.versions["examiner"] = 1
        p.publish()
        await asyncio.sleep(0.01)
        assert not waiter.done()
        state.versions["examiner"] = 2
        p.publish()
        await asyncio.wait_for(waiter, 1)

    asyncio.run(scenario())


def test_sync_pool_loads_each_published_version_once():
    p, state, logged = handle()
    asyncio.run(p.sync_pool())
    assert p.pool.pushed == []  # nothing published yet
    state.versions["examiner"] = 1
    p.publish()
    asyncio.run(p.sync_pool())
    asyncio.run(p.sync_pool())
    assert p.pool.pushed == [(1, "examiner-weights")] and p.pool_version == 1
    assert [v["weight_sync/version"] for _, v in logged] == [1]
    p.rebind(Learner())  # a rebuilt learner: the pool reloads even the version it holds
    asyncio.run(p.sync_pool())
    assert p.pool.pushed[-1] == (1, "examiner-weights")


def test_student_step_moves_the_teacher_ema_unless_nothing_reads_it():
    p, state, _ = handle("student", groups_per_step=2)
    state.versions["student"] = 1
    p.publish()
    asyncio.run(p.after_step())
    assert p.teacher.calls == [("ema", 1, "student-weights")]
    assert (p.distill_weight(0), p.distill_weight(1), p.groups_per_step) == (0.03, 0.003, 2)
    asyncio.run(p.reset_teacher())
    assert p.teacher.calls[-1] == ("load", 1, "student-weights")
    off, state, _ = handle("student", teach=False)
    off.publish()
    asyncio.run(off.after_step())
    assert off.teacher.calls == [] and off.distill_weight(0) == 0.0
