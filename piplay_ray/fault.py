"""Fault-tolerance helpers: what counts as an actor failure, a rollout request that lost shares, waiting for
a restarted actor, and the task ledger that proves every task of a task set was trained on or reported as
dropped.

The ledger is pure bookkeeping (no Ray) so its invariant — issued = trained + dropped, with a reason for
each drop — is unit-testable; the Ray helpers are thin and only used by the rollout pool, the teacher
client, the weight-sync coordinator and the loop's run book.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable

from ray.exceptions import (  # ActorDied/ActorUnavailable derive from the latter
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
)

log = logging.getLogger(__name__)
ENGINE_DEAD = ("EngineDeadError",)  # vLLM: its engine core or a worker process died; the engine cannot recover


class RolloutFailed(RuntimeError):
    """Some shares of a rollout request failed after every retry. `partial[i]` is the i-th item's result, or
    None where it was lost; `reason` says why."""

    def __init__(self, reason: str, partial: list):
        super().__init__(reason)
        self.reason, self.partial = reason, partial


async def partial(request: Awaitable[list]) -> tuple[list, str | None]:
    """A pool request whose lost shares come back as None items, with the reason they were lost."""
    try:
        return await request, None
    except RolloutFailed as e:
        return e.partial, e.reason


def is_actor_failure(e: BaseException) -> bool:
    """An error that means "an actor died or is restarting" (retry, or roll back), not a bug in the call:
    also an object lost with it, e.g. weights owned by a dead learner rank (OwnerDiedError, which Ray
    raises wrapped in a RayTaskError that is an instance of it too), or a worker Ray's memory monitor killed
    (OutOfMemoryError: the actor restarts like after any other death)."""
    return isinstance(e, (RayActorError, ObjectLostError, OutOfMemoryError)) or engine_dead(e)


def engine_dead(e: BaseException) -> bool:
    """An engine whose worker died (vLLM's `EngineDeadError`, named, not imported: no vLLM needed here),
    raised here or inside a remote call (Ray's `cause`)."""
    return any(type(x).__name__ in ENGINE_DEAD for x in (e, e.__cause__, getattr(e, "cause", None)) if x is not None)


def dies_with_engine(method: Callable) -> Callable:
    """For an async actor method that uses its engine: when the engine is dead, end the actor's process, so Ray
    restarts it with a fresh engine (its callers see an actor failure and retry, a weight sync rejoins it);
    otherwise a live actor would answer every call with the same dead engine's error for the rest of the run."""

    @functools.wraps(method)
    async def guarded(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except BaseException as e:
            if engine_dead(e):
                log.error("%s: the engine died (%s); exiting so the actor restarts", method.__qualname__, describe(e))
                os._exit(70)
            raise
    return guarded


def describe(e: BaseException, limit: int = 300) -> str:
    """A one-line `Type: message` for health.json and the accounting."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}"


def actor_state(actor) -> tuple[str | None, int | None]:
    """(state, restarts) of `actor` from the GCS actor table — state is ALIVE, RESTARTING, DEAD, ... —
    or (None, None) when it cannot be read (a private Ray API; health reporting degrades, nothing else)."""
    try:
        from ray._private import state

        info = state.actors(actor._actor_id.hex())
        return info["State"], int(info["NumRestarts"])
    except Exception:
        return None, None


async def wait_alive(ping, actor=None, timeout_s: float = 900.0, interval_s: float = 1.0):
    """Await `ping()` (a callable returning an awaitable actor call) until it answers; returns the answer.

    A restarting actor fails the call (ActorUnavailableError) or queues it until its constructor has run;
    either way this returns once it serves calls again. It raises the actor error when `actor` is DEAD for
    good (out of restarts) or after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await ping()
        except Exception as e:
            if not is_actor_failure(e) or time.monotonic() > deadline:
                raise
            if actor is not None and actor_state(actor)[0] == "DEAD":
                raise
            await asyncio.sleep(interval_s)


class TaskLedger:
    """Per task set: which tasks were scheduled, trained on (group consumed by the learner) or failed.

    Stored as plain dicts inside the loop state's accounting (checkpointed with it; evolution/book.py).
    """

    def __init__(self, record: dict):
        self.r = record
        self.r.setdefault("trained", {})  # task id -> groups consumed by the learner
        self.r.setdefault("failures", {})  # task id -> last reason a group of it could not be produced

    def failed(self, task_id: str, reason: str) -> None:
        self.r["failures"][task_id] = reason

    def trained(self, task_ids: Iterable[str]) -> None:
        for t in task_ids:
            self.r["trained"][t] = self.r["trained"].get(t, 0) + 1

    def close(self, task_ids: Iterable[str], scheduled: Iterable[str]) -> dict:
        """Reconcile at the end of the phase: every task of the set is trained or dropped with a reason."""
        task_ids, scheduled = list(task_ids), set(scheduled)
        dropped = {}
        for t in task_ids:
            if self.r["trained"].get(t):
                continue
            if t in self.r["failures"]:
                dropped[t] = f"rollout failed after retries: {self.r['failures'][t]}"
            elif t not in scheduled:
                dropped[t] = "not scheduled: the phase has fewer task slots than the task set"
            else:
                dropped[t] = "group produced but not consumed (evicted as stale or left in the replay store)"
        self.r["dropped"] = dropped
        self.r["n_trained"] = sum(1 for t in task_ids if self.r["trained"].get(t))
        self.r["n_dropped"] = len(dropped)
        return self.r
