"""A learner step's after-work: with in-flight updates, the teacher's EMA step and the push into the engines
run beside the next learner step (it waits for them only before it publishes), in step order, and a failure
among them surfaces at the next step; without in-flight updates, or where they read the learner's current
weights (a collective sync), the next step waits for them. Fakes for the loop's actors."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from piplay_ray.evolution.phase import Phase


class FakePolicy:
    def __init__(self, state, detached, ema_s, fail_at=None):
        self.state, self.detached_after_step, self.ema_s, self.fail_at = state, detached, ema_s, fail_at
        self.events: list[tuple[str, int, float]] = []
        self.published = None

    @property
    def version(self):
        return self.state.versions["student"]

    def distill_weight(self, iteration):
        return 0.0

    def publish(self):
        self.published = self.version
        self.events.append(("publish", self.version, time.monotonic()))

    async def after_step(self):
        version = self.published
        self.events.append(("ema start", version, time.monotonic()))
        await asyncio.sleep(self.ema_s)
        if version == self.fail_at:
            raise RuntimeError(f"teacher EMA of version {version} failed")
        self.events.append(("ema end", version, time.monotonic()))

    async def sync_pool(self):
        self.events.append(("push", self.published, time.monotonic()))


class FakeLoop:
    def __init__(self, inflight, detached, train_s=0.05, ema_s=0.2, fail_at=None):
        self.cfg = SimpleNamespace(rollout=SimpleNamespace(inflight_updates=inflight),
                                   learner=SimpleNamespace(optimizer_restart="never"),
                                   checkpoint=SimpleNamespace(every=0))
        self.state = SimpleNamespace(versions={"student": 0}, phase_steps=0, global_step=0, iteration=0)
        self.policies = {"student": FakePolicy(self.state, detached, ema_s, fail_at)}
        self.train_s, self.logged = train_s, []
        exp = SimpleNamespace(version=0, reward=0.0, token_staleness=lambda v: [0])
        self.actors = SimpleNamespace(
            learner=SimpleNamespace(train_step=self._train),
            replay=SimpleNamespace(sample=SimpleNamespace(remote=self._sample(exp)),
                                   set_version=SimpleNamespace(remote=self._noop)))
        self.book = SimpleNamespace(record_step=lambda *a: None, log=lambda m, role: self.logged.append(m),
                                    after_step=self._noop)

    def _train(self, role, exps, lam, restart_optimizer):
        events = self.policies["student"].events
        events.append(("train start", self.state.versions["student"] + 1, time.monotonic()))
        time.sleep(self.train_s)
        events.append(("train end", self.state.versions["student"] + 1, time.monotonic()))
        return {}

    def _sample(self, exp):
        async def sample(role, timeout):
            return [[exp]]
        return sample

    async def _noop(self, *a):
        return None


def steps(loop, n):
    async def go():
        phase = Phase(loop, "student")
        producer = asyncio.create_task(asyncio.sleep(60))
        bar = SimpleNamespace(update=lambda n: None, set_postfix=lambda **k: None)
        try:
            for _ in range(n):
                await phase.learner_step(producer, bar)
            await phase.settle()
        finally:
            producer.cancel()

    asyncio.run(go())
    return loop.policies["student"].events


def at(events, kind, version):
    return next(t for k, v, t in events if k == kind and v == version)


def test_in_flight_the_teachers_ema_and_the_push_run_beside_the_next_step_in_order():
    loop = FakeLoop(inflight=True, detached=True, train_s=0.3, ema_s=0.2)
    events = steps(loop, 3)
    for v in (1, 2):
        assert at(events, "train start", v + 1) < at(events, "ema end", v)  # the learner did not wait
        assert at(events, "ema end", v) < at(events, "publish", v + 1)  # but the EMA steps stay in order
        assert at(events, "ema end", v) < at(events, "push", v)  # the push follows its EMA step
    assert [v for k, v, _ in events if k == "ema end"] == [1, 2, 3]  # the last one settled too
    # the learner trained ~0.3 s of every step's window; the EMA (0.2 s) no longer counts against it
    assert all(m["learner/idle_frac"] < 0.25 for m in loop.logged[1:])


@pytest.mark.parametrize("inflight,detached", [(False, True), (True, False)])
def test_otherwise_the_next_step_waits_for_the_teachers_ema(inflight, detached):
    loop = FakeLoop(inflight=inflight, detached=detached, train_s=0.05, ema_s=0.2)
    events = steps(loop, 3)
    for v in (1, 2):
        assert at(events, "ema end", v) < at(events, "train start", v + 1)
    assert any(k == "push" for k, _, _ in events) == inflight
    assert all(m["learner/idle_frac"] > 0.5 for m in loop.logged[1:])  # it waited 0.2 s for 0.05 s of training


def test_a_failed_teacher_ema_surfaces_at_the_next_step():
    loop = FakeLoop(inflight=True, detached=True, train_s=0.05, ema_s=0.1, fail_at=1)
    with pytest.raises(RuntimeError, match="EMA of version 1 failed"):
        steps(loop, 3)
    assert not any(k == "publish" and v == 2 for k, v, _ in loop.policies["student"].events)
