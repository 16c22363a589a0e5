"""GroupSync's membership logic with stand-in actors: ranks per engine worker (tensor-parallel engines take
consecutive ranks, the teacher the last), a new generation only when a member restarted, a resync that is
already satisfied does nothing, and a member failure retries on a new generation."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError

from piplay_ray.weight_sync.coordinator import GroupSync


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()


class FakeMember:
    def __init__(self, ranks: int):
        self.incarnation, self.ranks, self.version, self.tickets, self.fail_next = "a", ranks, 0, [], False
        self.sync_member = _Method(lambda: (self.incarnation, self.ranks, self.version))
        self.receive_weights = _Method(self._receive)

    def _receive(self, ticket, mode="skip"):
        if self.fail_next:
            self.fail_next = False
            raise ActorDiedError()
        self.tickets.append((ticket, mode))
        self.version = ticket["version"] if ticket["version"] is not None else 7
        return self.version


class FakeLearner:
    def __init__(self):
        self.opened, self.sent = [], 0

    def open_sync_group(self, role, world, generation, transport=None):
        self.opened.append((world, generation))
        return {"host": "h", "port": 1000 + generation, "world": world, "generation": generation, "timeout_s": 5.0}

    def weights(self, role, kind, form="full"):
        assert kind == "collective"
        self.sent += 1
        return SimpleNamespace(version=7, nbytes=100, meta={})


def _setup():
    engines = [FakeMember(2), FakeMember(1)]  # a TP-2 engine and a TP-1 engine
    teacher = FakeMember(1)
    pool = SimpleNamespace(workers=engines, version=0)
    learner = FakeLearner()
    return GroupSync("student", learner, pool, teacher, retries=2), learner, engines, teacher, pool


def test_ranks_generations_and_skipped_resync():
    sync, learner, engines, teacher, pool = _setup()
    done = asyncio.run(sync.sync(7, "ema"))
    assert done["generation"] == 1 and learner.opened == [(1 + 2 + 1 + 1, 1)]
    assert [e.tickets[-1][0]["rank"] for e in engines] == [1, 3] and teacher.tickets[-1][0]["rank"] == 4
    assert teacher.tickets[-1][1] == "ema" and pool.version == 7
    asyncio.run(sync.resync())  # everyone already holds 7 and nobody restarted: nothing is sent
    assert learner.sent == 1
    engines[1].incarnation, engines[1].version = "b", 0  # a restart between syncs
    asyncio.run(sync.resync())
    assert learner.sent == 2 and learner.opened[-1] == (5, 2) and engines[1].version == 7
    assert engines[1].tickets[-1][0]["port"] == 1002 and teacher.tickets[-1][1] == "skip"


def test_member_failure_retries_on_a_new_generation():
    sync, learner, engines, teacher, pool = _setup()
    engines[0].fail_next = True
    done = asyncio.run(sync.sync(7))
    assert done["generation"] == 2 and learner.sent == 2 and engines[0].version == 7


def test_a_non_actor_error_is_raised():
    sync, learner, engines, teacher, pool = _setup()
    teacher.receive_weights = _Method(lambda ticket, mode: (_ for _ in ()).throw(ValueError("bad weights")))
    with pytest.raises(ValueError, match="bad weights"):
        asyncio.run(sync.sync(7))


def test_a_pool_behind_the_minimum_is_synced_even_when_consistent():
    sync, learner, engines, teacher, pool = _setup()
    asyncio.run(sync.sync(None))  # everyone at 7, the learner's version
    assert learner.sent == 1
    asyncio.run(sync.sync(None, minimum=7))
    assert learner.sent == 1  # nothing to do
    asyncio.run(sync.sync(None, minimum=8))  # the producer wants 8: the learner sends what it holds
    assert learner.sent == 2
