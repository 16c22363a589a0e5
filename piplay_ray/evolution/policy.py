"""A policy handle: one trained role as the loop sees it.

It ties the learner's role to the rollout pool that serves it: the version the learner has reached (kept in
the loop state, so it is checkpointed), the version and weights published for the pool, the version the
pool holds, and the producer's staleness gate. The student's handle also drives the teacher, whose EMA
follows every student step.

Weights move one of two ways (`weight_sync.transport`): the object store, where `publish` fetches a bundle
from the learner and `sync_pool` pushes it to the pool; or a collective group per role, where nothing moves
at `publish` and `sync_pool` runs one broadcast from learner rank 0 to the pool (and, for the student, the
teacher). With `learner.lora` and engines that serve LoRA, what moves to the pool is the adapter alone
(`form` "adapter"); the teacher's EMA is then over the adapter too (its `form`, teacher/adapter.py), so it gets
the adapter alone, in the broadcast when the pool's form is its own, else through the object store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from piplay_ray.actors.replay_buffer import within_bound
from piplay_ray.teacher import TeacherHandle
from piplay_ray.weight_sync.coordinator import pool_form


class Policy:
    """`state()` returns the loop state (its `versions[role]` = learner steps done for the role); `log(values,
    phase)` writes metrics; `sync` is the role's collective group, None for the object store."""

    def __init__(self, role: str, pool, learner, state: Callable, log: Callable, sync=None):
        self.role, self.pool, self.learner, self.sync = role, pool, learner, sync
        self._state, self._log = state, log
        self.published: tuple[int, object] | None = None  # (version, weights bundle or None when collective)
        self.pool_version = 0  # what the rollout pool holds; -1 after a rollback (it must reload)
        self.changed = asyncio.Event()  # set on every publish (and on a stop request)
        self._form: str | None = None
        self._syncing = asyncio.Lock()  # the learner (in flight) and the producer's rounds both bring the pool up
        if sync is not None:  # a pool whose worker restarted rejoins the group and resyncs through it
            pool.resync = sync.resync

    @property
    def version(self) -> int:
        """Learner steps done for this role (the version of its newest weights)."""
        return self._state().versions[self.role]

    @property
    def form(self) -> str:
        """What the pool takes: "adapter" (LoRA matrices only) or "full" weights; asked once."""
        if self._form is None:
            self._form = pool_form(self.pool)
        return self._form

    def publish(self) -> None:
        """Publish the learner's current weights for the pool (the producer's `sync_pool` loads them)."""
        weights = None if self.sync else self.learner.weights(self.role, form=self.form)
        self.published = (self.version, weights)
        self.changed.set()

    def rebind(self, learner) -> None:
        """A rebuilt learner group: publish from it, and the pool must reload whatever version it held."""
        self.learner, self.pool_version = learner, -1
        if self.sync is not None:
            self.sync.reset(learner)

    async def sync_pool(self) -> None:
        """Bring the pool to the published version (nothing to do when it already holds it)."""
        async with self._syncing:
            await self._sync_pool()

    async def _sync_pool(self) -> None:
        if self.published is None or self.pool_version >= self.published[0]:
            return
        version, bundle = self.published
        t = time.monotonic()
        if self.sync:  # the learner may have moved past `version` meanwhile: the pool takes what it holds
            version = (await self.sync.sync(None, minimum=version))["version"]
        else:
            await self.pool.aupdate_weights(version, bundle)
        self.pool_version = version
        self._log({"weight_sync/seconds": time.monotonic() - t, "weight_sync/version": version}, self.role)

    def may_produce(self, step: int, max_staleness: int) -> bool:
        """May the rollouts of learner step `step` start now? They use the newest weights (this handle's
        version), and the replay store keeps them only within the staleness bound (`replay.within_bound`)."""
        return within_bound(step, self.version, max_staleness)

    async def wait_to_produce(self, step: int, max_staleness: int, stopping: Callable[[], bool]) -> None:
        while not self.may_produce(step, max_staleness) and not stopping():
            self.changed.clear()
            await self.changed.wait()

    def distill_weight(self, iteration: int) -> float:
        """λ of the learner's distillation term in `iteration` (no teacher, no term)."""
        return 0.0

    async def after_step(self) -> None:
        """Called after each learner step of this role, once the new weights are published."""

    @property
    def detached_after_step(self) -> bool:
        """May `after_step` and the pool's push run beside the next learner step? Only where they read
        nothing but the published bundle: a collective sync reads the learner's weights as they are then."""
        return self.sync is None


class StudentPolicy(Policy):
    """The student's handle: its teacher (an EMA of the student, ψ ← (1−τ)ψ + τθ) follows every step, and
    its loss distils from the teacher with weight `lam(iteration)` (`schedule.lam`) unless `teach` is off."""

    def __init__(self, pool, learner, state: Callable, log: Callable, teacher, teach: bool,
                 lam: Callable[[int], float], sync=None):
        super().__init__("student", pool, learner, state, log, sync)
        self.teacher: TeacherHandle = teacher
        self.teach = teach  # False with teacher.privileged = none: nothing reads the teacher
        self.lam = lam

    def distill_weight(self, iteration: int) -> float:
        return self.lam(iteration) if self.teach else 0.0

    async def after_step(self) -> None:
        version, bundle = self.published
        if self.sync:  # the pool and the teacher in one broadcast
            await self._broadcast(version, "ema")
        elif self.teach:
            await self.teacher.ema_update(version, await self._for_teacher(bundle))

    @property
    def detached_after_step(self) -> bool:  # a teacher of another form than the pool's fetches its own
        return self.sync is None and (not self.teach or self._teacher_takes_published)

    @property
    def _teacher_takes_published(self) -> bool:
        """The teacher's EMA blends what the pool takes (the same form), else it fetches its own form."""
        return self.teacher.form == self.form

    async def _for_teacher(self, bundle):
        """What the teacher's EMA takes (its `form`: the adapter under learner.lora, else full weights): the
        published bundle when the pool takes the same, else fetched by the object store."""
        if self._teacher_takes_published and bundle is not None:
            return bundle
        return await asyncio.to_thread(self.learner.weights, self.role, "object_store", self.teacher.form)

    async def start_phase(self, init: str) -> None:
        """At a student phase's start: with teacher.init = iteration the teacher becomes a copy of the current
        student; an adapter EMA that has not started yet (version 0: the zero adapter) starts from the
        student's adapter, so the EMA starts where the student does."""
        if init == "iteration" or (self.teach and self.teacher.form == "adapter" and self.teacher.version == 0):
            await self.reset_teacher()

    async def reset_teacher(self) -> None:
        """The teacher becomes a copy of the current student (teacher.init = iteration)."""
        if self.sync:
            await self._broadcast(self.version, "load")
        else:
            await self.teacher.load(self.version, await self._for_teacher((self.published or (0, None))[1]))

    async def _broadcast(self, version: int, teacher_mode: str) -> None:
        """Collective: one broadcast to the student pool and the teacher (`ema` or `load` of `version`); when
        the wire carries another form than the teacher's EMA takes (or it is a shared teacher, outside the
        group), the teacher's update goes by the object store."""
        await self.teacher.ensure()  # a restarted teacher gets its EMA back before it blends
        t = time.monotonic()
        apart = self.teacher.form != self.form or self.sync.teacher is None
        done = await self.sync.sync(version, "skip" if apart else teacher_mode)
        if apart:
            await (self.teacher.load if teacher_mode == "load" else self.teacher.ema_update)(
                version, await self._for_teacher(None))
        else:
            await self.teacher.updated(version)
        self.pool_version = version
        self._log({"weight_sync/seconds": time.monotonic() - t, "weight_sync/version": version,
                   "weight_sync/gb_per_s": done["bytes"] / max(done["seconds"], 1e-9) / 1e9}, "student")
