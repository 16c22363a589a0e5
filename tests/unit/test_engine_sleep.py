"""Sleeping through an idle phase (`rollout.sleep_when_idle`): the vLLM engine's sleep and wake around requests
and weight loads, against a stand-in for vLLM's AsyncLLM (sleep mode needs a GPU: vLLM on CPU has none), and
the loop's hint to the idle actors, which never fails a run."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from piplay_ray.engines.vllm_engine import VLLMEngine
from piplay_ray.evolution.actors import Actors


class FakeLLM:
    """AsyncLLM's calls the engine makes, recorded in order; a generation waits for `release` when asked."""

    def __init__(self):
        self.calls, self.release = [], None

    async def sleep(self, level: int = 1):
        self.calls.append(f"sleep{level}")

    async def wake_up(self, tags=None):
        await asyncio.sleep(0.01)  # long enough for concurrent requests to pile up behind the waker
        self.calls.append("wake")
        return True

    async def reset_prefix_cache(self):
        self.calls.append("reset")
        return True

    async def collective_rpc(self, method, args=()):
        self.calls.append(method)
        return [[1, 0]]

    async def generate(self, prompt, params, request_id=None, lora_request=None, priority=0):
        if self.release is not None:
            await self.release.wait()
        self.calls.append("generate")
        yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[], logprobs=[])])


@pytest.fixture
def engine():
    eng = VLLMEngine.__new__(VLLMEngine)  # no vLLM engine: the sleep logic around it
    eng.can_sleep, eng._asleep, eng._inflight, eng._lora_request = True, False, 0, None
    eng.inflight, eng.recompute, eng.version = False, True, 0
    eng._loop = asyncio.new_event_loop()
    import threading

    eng._thread = threading.Thread(target=eng._loop.run_forever, daemon=True)
    eng._thread.start()

    async def primitives():
        eng._ready, eng._idle, eng._waking = asyncio.Event(), asyncio.Condition(), asyncio.Lock()
        eng._ready.set()

    eng._call(primitives())
    eng.llm = FakeLLM()
    yield eng
    eng._loop.call_soon_threadsafe(eng._loop.stop)
    eng._thread.join(timeout=5)


async def _requests(eng, n: int):
    return await asyncio.gather(*[eng._on_engine(eng._request([1, 2], None)) for _ in range(n)])


def test_an_asleep_engine_wakes_once_for_many_requests_and_drops_its_cache(engine):
    asyncio.run(engine.asleep())
    assert engine.llm.calls == ["sleep1"] and engine._asleep
    asyncio.run(_requests(engine, 3))
    assert engine.llm.calls == ["sleep1", "wake", "reset", "generate", "generate", "generate"]
    assert not engine._asleep


def test_a_weight_load_wakes_it_first(engine):
    asyncio.run(engine.asleep())
    asyncio.run(engine._on_engine(engine._swap_rpc("piplay_receive", {}, lambda out: None)))
    assert engine.llm.calls == ["sleep1", "wake", "reset", "piplay_receive", "reset"]


def test_sleep_waits_for_the_requests_already_running(engine):
    async def scenario():
        engine.llm.release = asyncio.Event()
        running = asyncio.ensure_future(_requests(engine, 2))
        await asyncio.sleep(0.05)
        sleeping = asyncio.ensure_future(engine.asleep())
        await asyncio.sleep(0.05)
        assert engine.llm.calls == []  # it waits: the running requests would lose their KV cache
        engine._loop.call_soon_threadsafe(engine.llm.release.set)
        await asyncio.gather(running, sleeping)

    asyncio.run(scenario())
    assert engine.llm.calls == ["generate", "generate", "sleep1"]


def test_an_engine_that_cannot_sleep_ignores_the_hint(engine):
    engine.can_sleep = False
    asyncio.run(engine.asleep())
    asyncio.run(_requests(engine, 1))
    assert engine.llm.calls == ["generate"]


class Handle:
    def __init__(self, name, log, fail=False):
        self.name, self.log, self.fail = name, log, fail
        self.asleep = SimpleNamespace(remote=self._asleep)

    async def _asleep(self):
        if self.fail:
            raise RuntimeError(f"{self.name} is gone")
        self.log.append(self.name)


def test_the_loop_hint_reaches_the_idle_actors_and_a_failure_is_only_logged(caplog):
    slept = []
    pools = {"examiner": SimpleNamespace(workers=[Handle("ex-0", slept), Handle("ex-1", slept, fail=True)]),
             "student": SimpleNamespace(workers=[Handle("st-0", slept)])}
    actors = Actors(search=None, pools=pools, teacher=Handle("teacher", slept), teacher_client=None, learner=None,
                    replay=None)
    with caplog.at_level(logging.WARNING):
        asyncio.run(actors.sleep("examiner"))
        asyncio.run(actors.sleep("teacher"))
    assert slept == ["ex-0", "teacher"]
    assert "ex-1 is gone" in caplog.text
    actors.teacher = None  # teacher.backend=shared: no teacher actor of its own
    asyncio.run(actors.sleep("teacher"))
    assert slept == ["ex-0", "teacher"]
