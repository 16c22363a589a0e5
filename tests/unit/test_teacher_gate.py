"""The teacher's update gate: scoring calls run together, an EMA update runs alone and waits only for the calls
already running, not for the ones that arrived after it."""

from __future__ import annotations

import asyncio

from piplay_ray.teacher.gate import UpdateGate


def test_an_update_waits_only_for_the_scoring_already_running():
    async def run() -> list[str]:
        gate, log = UpdateGate(), []

        async def score(name: str, seconds: float):
            async with gate.scoring():
                log.append(f"{name} start")
                await asyncio.sleep(seconds)
                log.append(f"{name} end")

        async def update():
            async with gate.updating():
                log.append("update start")
                await asyncio.sleep(0.05)
                log.append("update end")

        first = asyncio.create_task(score("a", 0.2))
        second = asyncio.create_task(score("b", 0.1))  # runs beside a: scoring calls share the teacher
        await asyncio.sleep(0.02)
        sync = asyncio.create_task(update())
        await asyncio.sleep(0.02)
        later = asyncio.create_task(score("c", 0.01))  # queued after the update: runs on the new weights
        await asyncio.gather(first, second, sync, later)
        return log

    log = asyncio.run(run())
    assert log[:2] == ["a start", "b start"]
    assert log.index("update start") > max(log.index("a end"), log.index("b end"))
    assert log.index("c start") > log.index("update end")


def test_updates_run_one_at_a_time():
    async def run() -> int:
        gate, inside, most = UpdateGate(), 0, 0

        async def update():
            nonlocal inside, most
            async with gate.updating():
                inside += 1
                most = max(most, inside)
                await asyncio.sleep(0.01)
                inside -= 1

        await asyncio.gather(*(update() for _ in range(5)))
        return most

    assert asyncio.run(run()) == 1
