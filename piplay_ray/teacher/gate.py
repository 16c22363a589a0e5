"""Who may use the teacher's weights at once: any number of scoring calls, or one EMA update alone.

With one lock for both, an update (a weight sync) waited behind every scoring call queued before it: a whole
step's worth of teacher requests. Here an update that arrives stops new scoring calls from starting, so it
waits only for the calls already running; the calls that came after it run on the new weights.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class UpdateGate:
    """A readers-writer lock for one event loop that prefers writers (the EMA updates)."""

    def __init__(self):
        self._cond = asyncio.Condition()
        self._scoring = 0  # calls running
        self._waiting = 0  # updates waiting
        self._updating = False

    @contextlib.asynccontextmanager
    async def scoring(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._updating and not self._waiting)
            self._scoring += 1
        try:
            yield
        finally:
            async with self._cond:
                self._scoring -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def updating(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._updating and not self._scoring)
            finally:
                self._waiting -= 1
            self._updating = True
        try:
            yield
        finally:
            async with self._cond:
                self._updating = False
                self._cond.notify_all()
