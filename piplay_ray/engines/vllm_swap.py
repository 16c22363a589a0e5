"""How new weights reach a running vLLM engine, and how an idle one sleeps (the engine's mixin).

Between requests (the default): new requests wait, the running ones finish on the old weights, every worker
loads, the prefix cache is dropped. In flight (`rollout.inflight_updates`): vLLM's scheduler pauses with the
running requests frozen (`pause_generation(mode="keep")`), every worker loads, the engine takes the new version,
and generation resumes: the same requests continue on the new weights, so a sync never waits for the slowest
trajectory. `inflight_kv` says what continues: "recompute" clears the caches while paused, which preempts the
frozen requests, so vLLM recomputes their KV (prompt and tokens so far) under the new weights; "keep" keeps
the KV cache the old weights computed (and the prefix cache, which cannot be reset while requests run): faster,
not exact. Tokens stream out as they are made and take the version the engine holds when they arrive; the
version changes while generation is paused, after the pause has flushed what came before (the workers' load
takes far longer than the output handler's last hop), so a token is never tagged older than it is.
"""

from __future__ import annotations

from collections.abc import Callable


class WeightSwap:
    """Mixin of `VLLMEngine`: it provides `llm`, `version`, `inflight`, `recompute`, `can_sleep` and the request
    gate (`_ready`, `_idle`, `_inflight`, `_waking`, `_asleep`)."""

    async def _swap(self, path: str, version: int):
        return await self._swap_rpc("piplay_reload", path, lambda _: setattr(self, "version", version))

    async def _swap_rpc(self, method: str, arg, settle: Callable[[list], None]):
        """Run a loading method on every worker, between requests or in flight (see the module docstring);
        `settle(outputs)` takes the new version before any token is made with the new weights."""
        if self.inflight:
            return await self._swap_inflight(method, arg, settle)
        self._ready.clear()  # new requests wait; requests already running finish on the old weights
        async with self._idle:
            await self._idle.wait_for(lambda: self._inflight == 0)
        try:
            await self._awake()
            out = await self.llm.collective_rpc(method, args=(arg,))
            if not await self.llm.reset_prefix_cache():  # refuses while requests run; none do here
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
            settle(out)
            return out
        finally:
            self._ready.set()

    async def _swap_inflight(self, method: str, arg, settle: Callable[[list], None]):
        await self._awake()
        await self.llm.pause_generation(mode="keep", clear_cache=self.recompute)
        try:
            out = await self.llm.collective_rpc(method, args=(arg,))
            settle(out)
            return out
        finally:
            await self.llm.resume_generation()

    # ------------------------------------------------------------------------------------- sleep

    async def asleep(self) -> None:
        """vLLM's sleep mode, level 1 (`rollout.sleep_when_idle`, on a GPU): weights to host memory, the KV
        cache dropped, the device memory free for the learner until the next request or weight load."""
        if self.can_sleep:
            await self._on_engine(self._sleep())

    async def _sleep(self) -> None:
        self._ready.clear()
        async with self._idle:
            await self._idle.wait_for(lambda: self._inflight == 0)
        try:
            async with self._waking:
                if not self._asleep:
                    await self.llm.sleep(level=1)
                    self._asleep = True
        finally:
            self._ready.set()

    async def _awake(self) -> None:
        """Back from `asleep` before anything touches the engine; one waker, the others wait for it."""
        async with self._waking:
            if self._asleep:
                await self.llm.wake_up()
                await self.llm.reset_prefix_cache()  # what the dropped cache held is gone
                self._asleep = False
