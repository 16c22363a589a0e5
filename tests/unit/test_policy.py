"""Policy handles without Ray: the producer's staleness gate, publishing and loading weights into a pool,
and the teacher's EMA step that follows each student step."""

from __future__ import annotations

import asyncio

import pytest

from piplay_ray.evolution.policy import Policy, StudentPolicy
from piplay_ray.evolution.state import LoopState


class Learner:
    def weights(self, role, form="full"):
        return f"{role}-weights"


class Pool:
    def __init__(self):
        self.pushed = []

    async def aupdate_weights(self, version, bundle):
        self.pushed.append((version, bundle))


class Teacher:
    def __init__(self, form="full"):
        self.calls, self.form, self.version = [], form, 0

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
    p, state, _ = handle("student")
    state.versions["student"] = 1
    p.publish()
    asyncio.run(p.after_step())
    assert p.teacher.calls == [("ema", 1, "student-weights")]
    assert (p.distill_weight(0), p.distill_weight(1)) == (0.03, 0.003)
    asyncio.run(p.reset_teacher())
    assert p.teacher.calls[-1] == ("load", 1, "student-weights")
    off, state, _ = handle("student", teach=False)
    off.publish()
    asyncio.run(off.after_step())
    assert off.teacher.calls == [] and off.distill_weight(0) == 0.0


class AdapterLearner:
    """Says which form it was asked for (a LoRA learner publishes the adapter or the merged model)."""

    def __init__(self):
        self.asked = []

    def weights(self, role, transport=None, form="full"):
        self.asked.append((transport, form))
        return f"{role}-{form}"


class AdapterPool(Pool):
    def weight_form(self):
        return "adapter"


class Sync:
    def __init__(self, teacher="actor"):
        self.modes, self.teacher = [], teacher  # GroupSync.teacher: None when the teacher is not in the group

    async def sync(self, version, teacher_mode="skip", minimum=None):
        self.modes.append((version, teacher_mode))
        return {"version": version, "seconds": 1.0, "bytes": 10}

    async def resync(self):
        pass


class SyncTeacher(Teacher):
    async def ensure(self):
        return 0

    async def updated(self, version):
        self.calls.append(("updated", version, None))


class FullPool(Pool):
    def weight_form(self):
        return "full"


@pytest.mark.parametrize("pool_form", ["adapter", "full"])
@pytest.mark.parametrize("wire", ["object_store", "collective", "collective-shared"])
def test_under_lora_the_teacher_gets_the_adapter(pool_form, wire):
    """learner.lora: the teacher's EMA is over the adapter. It takes the published adapter when the pool takes
    one, or the broadcast itself when it is in the group; otherwise (engines that take merged weights, or a
    shared teacher outside the group) the adapter comes from the object store."""
    state, learner, teacher = LoopState(), AdapterLearner(), SyncTeacher(form="adapter")
    sync = Sync(teacher=None if wire == "collective-shared" else "actor") if wire != "object_store" else None
    pool = AdapterPool() if pool_form == "adapter" else FullPool()
    p = StudentPolicy(pool, learner, lambda: state, lambda *a: None, teacher, True, lambda it: 0.0, sync=sync)
    state.versions["student"] = 1
    p.publish()
    assert p.form == pool_form
    if sync is None:
        asyncio.run(p.sync_pool())
        assert p.pool.pushed == [(1, f"student-{pool_form}")] and learner.asked == [(None, pool_form)]
    asyncio.run(p.after_step())
    # beside the next learner step only if the EMA step read nothing but the published bundle
    assert p.detached_after_step == (sync is None and learner.asked == [(None, pool_form)])
    asyncio.run(p.reset_teacher())
    in_group = wire == "collective" and pool_form == "adapter"
    if in_group:  # the broadcast carries the adapter, which the teacher blends (then loads) itself
        assert sync.modes == [(1, "ema"), (1, "load")] and teacher.calls == [("updated", 1, None)] * 2
        assert learner.asked == []
        return
    assert teacher.calls == [("ema", 1, "student-adapter"), ("load", 1, "student-adapter")]
    fetched = [a for a in learner.asked if a[0] == "object_store"]
    assert fetched == ([] if (pool_form, wire) == ("adapter", "object_store") else [("object_store", "adapter")] * 2)
    if sync is not None:
        assert sync.modes == [(1, "skip"), (1, "skip")]  # another form on the wire, or no teacher in the group


@pytest.mark.parametrize("init", ["once", "iteration"])
def test_an_adapter_ema_starts_from_the_students_adapter(init):
    """At a student phase's start: teacher.init=iteration always loads the student; an adapter EMA that has not
    started (version 0) loads it too, once; a full-weight teacher with init=once keeps its own start."""
    state = LoopState()  # the student at version 0
    for form, version, loads in [("adapter", 0, True), ("adapter", 3, init == "iteration"),
                                 ("full", 0, init == "iteration")]:
        teacher = Teacher(form=form)
        teacher.version = version
        p = StudentPolicy(AdapterPool(), AdapterLearner(), lambda: state, lambda *a: None, teacher, True,
                          lambda it: 0.0)
        p.publish()
        asyncio.run(p.start_phase(init))
        assert teacher.calls == ([("load", 0, f"student-{form}")] if loads else []), (form, version)
