"""The replay store actor: the ReplayBuffer policy behind an async Ray actor with backpressure.

Producers `await put(groups)` with the groups of one learner step; when the store is full the call waits
(backpressure) until the learner samples. The learner `await sample(role)`, which waits for a whole step.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import ray

from piplay_ray.actors.replay_buffer import Group, ReplayBuffer


class ReplayStoreImpl:
    def __init__(self, capacity_groups: int, max_staleness: int, spill_path: str | None = None):
        self.capacity, self.max_staleness = capacity_groups, max_staleness
        self.buffer = ReplayBuffer(capacity_groups, max_staleness)
        if spill_path:
            self.restore(spill_path)
        self._changed: asyncio.Condition | None = None
        self.waited_s = 0.0  # total producer time spent blocked by backpressure

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def put(self, groups: list[Group], timeout: float | None = None) -> str:
        """Add the groups of one learner step, all or none, waiting while the store is full. Returns the
        buffer's verdict (`ReplayBuffer.add_step`) or "timeout"."""
        start = time.monotonic()
        async with self.changed:
            while True:
                verdict = self.buffer.add_step(groups)
                if verdict != "full":
                    self.changed.notify_all()
                    return verdict
                remaining = None if timeout is None else timeout - (time.monotonic() - start)
                if remaining is not None and remaining <= 0:
                    return "timeout"
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except TimeoutError:
                    return "timeout"
                finally:
                    self.waited_s += time.monotonic() - start

    async def sample(self, role: str, timeout: float | None = None) -> list[Group]:
        """Wait for a whole learner step of `role` and pop it; [] when none came within `timeout`."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.buffer.size(role) > 0), timeout)
            except TimeoutError:
                return []
            out = self.buffer.sample(role)
            self.changed.notify_all()
            return out

    async def set_version(self, role: str, version: int) -> int:
        async with self.changed:
            evicted = self.buffer.set_version(role, version)
            self.changed.notify_all()
            return evicted

    def produced(self, role: str, step: int) -> bool:
        return self.buffer.produced(role, step)

    def held_steps(self) -> dict[str, list[int]]:
        return self.buffer.held_steps()

    def stats(self) -> dict:
        return self.buffer.stats() | {"backpressure_wait_s": self.waited_s}

    def spill(self) -> bytes:
        """The held steps as Parquet bytes: the driver asks at the instant it copies the loop state and writes
        them inside the checkpoint, so the two agree."""
        return self.buffer.spill()

    def restore(self, path: str) -> bool:
        """Replace the content with a spill, if `path` exists (a resumed run keeps what was buffered)."""
        if not Path(path).is_file():
            return False
        self.buffer = ReplayBuffer.restore(path, self.capacity, self.max_staleness)
        return True


ReplayStore = ray.remote(num_cpus=0)(ReplayStoreImpl)
