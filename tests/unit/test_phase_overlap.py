"""The producer with in-flight updates: rounds of consecutive learner steps overlap (up to max_staleness + 1
at once), still reach the replay store in step order, and never start beyond the staleness bound; without
them (and in the synchronous loop) one round runs at a time, as before. Fakes for the loop's actors."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from piplay_ray.evolution.phase import Phase


class FakePolicy:
    def __init__(self):
        self.version, self.changed = 0, asyncio.Event()

    async def wait_to_produce(self, step, bound, stopping):
        while step - self.version > bound:
            self.changed.clear()
            await self.changed.wait()

    async def sync_pool(self):
        pass


class FakeLoop:
    """Round j takes `lengths[j]` seconds (the slowest trajectory sets it); the learner trains each step in
    `train_s` once its round is in the store."""

    def __init__(self, bound, inflight, lengths, train_s=0.05):
        self.cfg = SimpleNamespace(replay=SimpleNamespace(max_staleness=bound),
                                   rollout=SimpleNamespace(inflight_updates=inflight))
        self.policies = {"student": FakePolicy()}
        self.lengths, self.train_s, self.stopping = lengths, train_s, False
        self.running, self.most, self.started_at, self.puts = 0, 0, {}, []
        self.stored = asyncio.Queue()
        produced = SimpleNamespace(remote=self._produced)
        put = SimpleNamespace(remote=self._put)
        self.actors = SimpleNamespace(replay=SimpleNamespace(produced=produced, put=put))
        self.book = SimpleNamespace(log=lambda *a, **k: None)

    async def _produced(self, role, j):
        return False

    async def _put(self, groups):
        step = groups[0][0].step
        self.puts.append(step)
        await self.stored.put(step)
        return "ok"

    async def step_groups(self, role, j):
        self.started_at[j] = self.policies["student"].version
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(self.lengths[j])
        self.running -= 1
        return [[SimpleNamespace(step=j, mask=[1, 1])]]

    async def learn(self, steps):
        policy = self.policies["student"]
        for j in range(steps):
            assert await self.stored.get() == j  # the learner takes the steps in order
            await asyncio.sleep(self.train_s)
            policy.version += 1
            policy.changed.set()


def run(bound, inflight, lengths):
    async def go():
        loop = FakeLoop(bound, inflight, lengths)
        phase = Phase(loop, "student")
        t0 = time.monotonic()
        await asyncio.gather(phase.produce(0, len(lengths)), loop.learn(len(lengths)))
        return loop, time.monotonic() - t0

    return asyncio.run(go())


LENGTHS = [0.3, 0.05, 0.3, 0.05, 0.3, 0.05]  # a slow round, a quick one: searches vary


@pytest.mark.parametrize("bound,inflight,most", [(0, False, 1), (1, False, 1), (1, True, 2), (2, True, 3),
                                                  (0, True, 1)])
def test_rounds_overlap_only_in_flight_and_within_the_bound(bound, inflight, most):
    loop, _ = run(bound, inflight, LENGTHS)
    assert loop.puts == list(range(len(LENGTHS)))
    assert loop.most == most
    assert all(j - v <= bound for j, v in loop.started_at.items())  # never started beyond the bound


def test_a_failed_round_fails_the_producer():
    async def go():
        loop = FakeLoop(1, True, LENGTHS)

        async def broken(role, j):
            if j == 2:
                raise RuntimeError("round 2 broke")
            return [[SimpleNamespace(step=j, mask=[1])]]

        loop.step_groups = broken
        phase = Phase(loop, "student")
        learner = asyncio.create_task(loop.learn(2))
        with pytest.raises(RuntimeError, match="round 2 broke"):
            await phase.produce(0, len(LENGTHS))
        await learner

    asyncio.run(go())
