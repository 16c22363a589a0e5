"""A stand-in rollout worker whose engine can die (vLLM's EngineDeadError, by name), for the fault tests;
here so Ray's workers can import it."""

from __future__ import annotations

import uuid

import ray

from piplay_ray.fault import dies_with_engine


class EngineDeadError(RuntimeError):
    """Named like vLLM's: what its engine client raises once the engine core or a worker process died."""


@ray.remote(num_cpus=0, max_restarts=1, max_task_retries=0)
class Worker:
    def __init__(self):
        self.incarnation = uuid.uuid4().hex

    def identity(self) -> str:
        return self.incarnation

    @dies_with_engine
    async def generate(self, engine_alive: bool) -> str:
        if not engine_alive:
            raise EngineDeadError("EngineCore encountered an issue")
        return "tokens"

    @dies_with_engine
    async def bad_request(self) -> None:
        raise ValueError("a bug in the call, not a dead engine")
