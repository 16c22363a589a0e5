"""Driver side of a pushing transport (collective, ipc): who is in a role's group, and one sync at a time.

A role's group is the learner's rank 0 (rank 0), then every worker process of every rollout engine of that
role (an engine with tensor parallelism takes that many consecutive ranks), then, for the student, the
teacher. Before each sync the coordinator asks every member who it is (an incarnation token that changes
when Ray restarts the actor); when anyone is new, the learner opens a new generation (a new store) and all
join it during the sync, which is how a restarted receiver rejoins. A sync is the learner's broadcast and
every member's receive, run together; a member that dies during it, or a collective cut short (`SyncError`:
every member raises it within the group's `timeout_s`), fails the sync, which is retried on a new generation
up to `fault.max_task_retries` times. A member still busy well past `timeout_s` after the learner's side
ended is stalled: it is killed, so Ray restarts it and it rejoins the retry with the current weights. Under
LoRA with engines that serve it, the broadcast carries only the adapter (`pool_form`), which the teacher's
EMA takes as well (an adapter EMA under LoRA); where the forms differ the teacher only drains it and the
student's policy sends it its form through the object store.
A shared teacher (`teacher.backend: shared`) is no member: it lives on the driver.
"""

from __future__ import annotations

import asyncio
import logging
import time

from piplay_ray.fault import is_actor_failure, wait_alive

from .base import SyncError
from .group import Rendezvous

log = logging.getLogger(__name__)


def retryable(e: BaseException) -> bool:
    """A sync that failed this way is retried on a new generation: a member died, or a peer cut it short."""
    return is_actor_failure(e) or isinstance(e, SyncError)


def pool_form(pool) -> str:
    """What a sync sends the pool: "adapter" (only LoRA matrices) or "full" (`RolloutPool.weight_form`;
    a pool that does not say takes full weights)."""
    ask = getattr(pool, "weight_form", None)
    return ask() if callable(ask) else "full"


class GroupSync:
    def __init__(self, role: str, learner, pool, teacher=None, retries: int = 3, transport: str = "collective"):
        self.role, self.learner, self.pool, self.teacher, self.retries = role, learner, pool, teacher, retries
        self.transport = transport  # a pushing one (layout.sync_transport): collective or ipc
        self.generation = 0
        self.rdv: Rendezvous | None = None
        self._incarnations: list[str] | None = None
        self._lock = asyncio.Lock()
        self.last: dict = {}

    def reset(self, learner) -> None:
        """A rebuilt learner group: the next sync opens a new generation on its rank 0."""
        self.learner, self.rdv = learner, None

    async def _members(self) -> list[tuple[object, str, int, int]]:
        """(handle, incarnation, ranks, version) of every receiver, waiting for restarting actors."""

        handles = list(self.pool.workers) + ([self.teacher] if self.teacher is not None else [])
        states = await asyncio.gather(*[wait_alive(lambda h=h: h.sync_member.remote(), h) for h in handles])
        return [(h, *s) for h, s in zip(handles, states, strict=True)]

    async def _open(self, members) -> None:
        world = 1 + sum(ranks for _, _, ranks, _ in members)
        self.generation += 1
        rdv = await asyncio.to_thread(self.learner.open_sync_group, self.role, world, self.generation, self.transport)
        self.rdv = Rendezvous(**rdv)
        self._incarnations = [inc for _, inc, _, _ in members]

    async def resync(self) -> None:
        """Bring every worker (a restarted one) to the learner's current weights; the teacher only drains."""
        await self.sync(None)

    async def sync(self, version: int | None, teacher_mode: str = "skip", minimum: int | None = None) -> dict:
        """Broadcast the learner's current weights of the role to every member; `version` is what they must
        receive (None: whatever the learner holds, e.g. from a producer while the learner trains on). With
        version None and nothing for the teacher, a sync that would change nothing (every worker at the
        pool's version, at least `minimum`, nobody restarted) is skipped. Returns {version, seconds, bytes,
        generation, buffer_peak (the sender's bucket buffers at most, bytes)}."""

        async with self._lock:
            for attempt in range(self.retries + 1):
                members = await self._members()
                workers = members[: len(self.pool.workers)]
                if (version is None and self.rdv is not None and teacher_mode == "skip"
                        and [m[1] for m in members] == self._incarnations
                        and len({v for *_, v in workers} | {self.pool.version}) == 1
                        and (minimum is None or self.pool.version >= minimum)):
                    return self.last  # a resync that another sync already made unnecessary
                if self.rdv is None or [inc for _, inc, _, _ in members] != self._incarnations:
                    await self._open(members)
                form = await asyncio.to_thread(pool_form, self.pool)
                t0 = time.perf_counter()
                calls, rank = [], 1
                for handle, _, ranks, _ in workers:
                    calls.append(handle.receive_weights.remote(self.rdv.ticket(rank, version)))
                    rank += ranks
                if self.teacher is not None:
                    calls.append(self.teacher.receive_weights.remote(self.rdv.ticket(rank, version), teacher_mode))
                sender = asyncio.to_thread(self.learner.weights, self.role, self.transport, form)
                outs = await self._together(sender, calls, [m[0] for m in members])
                errors = [o for o in outs if isinstance(o, BaseException)]
                if not errors:
                    receipt = outs[0]
                    self.pool.version = receipt.version
                    seconds = time.perf_counter() - t0
                    self.last = {"version": receipt.version, "seconds": seconds, "bytes": receipt.nbytes,
                                 "generation": self.rdv.generation, "buffer_peak": receipt.meta.get("buffer_peak")}
                    return self.last
                self.rdv = None  # whatever went wrong, the next try meets on a new generation
                if attempt == self.retries or not all(retryable(e) for e in errors):
                    raise next((e for e in errors if not retryable(e)), errors[0])
        raise AssertionError("unreachable")

    async def _together(self, sender, calls, handles) -> list:
        """The sender's and every member's outcome (a result or the exception). A member's collective waits at
        most `timeout_s` (its last one began before the sender ended), so one still running `grace_s` after
        the sender ended is stalled: killed (Ray restarts it), so its call fails too."""
        import ray

        tasks = [asyncio.ensure_future(c) for c in (sender, *calls)]
        await asyncio.wait(tasks[:1])
        grace_s = self.rdv.timeout_s + max(5.0, 0.25 * self.rdv.timeout_s)  # + scheduling slack
        _, stalled = await asyncio.wait(tasks[1:], timeout=grace_s)
        for task, handle in zip(tasks[1:], handles, strict=True):
            if task in stalled:
                log.warning("weight sync %s: a member is still busy %g s after the sender; restarting it",
                            self.role, grace_s)
                ray.kill(handle, no_restart=False)
        return list(await asyncio.gather(*tasks, return_exceptions=True))
