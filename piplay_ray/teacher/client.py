"""The driver-side handle on the `Teacher` actor that survives its restarts (see `TeacherClient`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import ray

from piplay_ray.fault import describe, is_actor_failure, wait_alive
from piplay_ray.teacher.ema import saved_version

log = logging.getLogger(__name__)


class TeacherClient:
    """Driver-side handle on the `Teacher` actor that survives its restarts.

    A restarted teacher comes back with the base model's weights, i.e. without its EMA. After every update
    the client has the teacher stream its EMA to a file under `snapshot_dir` (the run's folder: it outlives the
    actor, and no float32 copy of the model passes through the object store each step), checks the teacher's
    version before and after each call, and on a mismatch or an actor error restores the snapshot
    (`load_checkpoint`) and retries the call, up to `fault.max_task_retries` times. Without a snapshot it falls
    back to `fallback_folder()` (the latest checkpoint's teacher folder), if any. Scoring runs beside EMA
    updates; the client's state (version, snapshot) changes and is read only under one lock, so a score never
    restores an EMA an update is replacing.
    """

    def __init__(self, actor, retries: int = 3, fallback_folder=None, form: str = "full",
                 snapshot_dir: str | os.PathLike | None = None):
        """`snapshot_dir`: where the teacher can write and the driver can delete (the run's folder on a cluster's
        shared volume); by default a temporary folder, for one machine."""
        self.actor, self.retries, self.fallback_folder = actor, retries, fallback_folder
        self.form = form  # what its EMA takes: "full" weights, or the student's "adapter" (learner.lora)
        self.version = 0  # the EMA version the teacher must hold
        self.snapshot_dir = Path(snapshot_dir or tempfile.mkdtemp(prefix="piplay-teacher-snapshot-"))
        self._snapshot: tuple[int, Path] | None = None  # (version, the folder holding that EMA)
        self.restarts = 0
        self.last_error: str | None = None
        self._lock = asyncio.Lock()

    async def _take_snapshot(self) -> bool:
        """Snapshot the EMA of `self.version` (a folder of its own: a teacher that restarted meanwhile writes its
        base weights there, never over the good snapshot); False when it restarted (EMA lost)."""
        folder = self.snapshot_dir / f"v{self.version:06d}"
        try:
            await self.actor.save.remote(str(folder))
            held = await self.actor.get_version.remote()  # runs after save(): same caller, in order
        except Exception as e:
            if not is_actor_failure(e):
                raise
            return False
        if held != self.version:
            return False
        self._snapshot = (self.version, folder)
        for old in self.snapshot_dir.glob("v*"):  # one snapshot is kept
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return True

    async def _update(self, method: str, *args) -> int:
        """An EMA-changing call, then a verified snapshot; if the teacher restarted in between, start over
        from the previous snapshot (the call is deterministic given it)."""
        async with self._lock:
            base = (self.version, self._snapshot)
            for _ in range(self.retries + 1):
                self.version, self._snapshot = base
                out = await self._call(method, *args, locked=True)
                self.version = out if method == "load_checkpoint" else args[0]
                if await self._take_snapshot():
                    return self.version
                self.restarts += 1
            raise RuntimeError(f"teacher: {method} kept failing; the teacher restarts faster than it updates")

    async def _restore(self) -> None:
        held = await wait_alive(lambda: self.actor.get_version.remote(), self.actor)
        if held == self.version:
            return
        self.restarts += 1
        if self._snapshot is not None and self._snapshot[0] == self.version:
            got = await self.actor.load_checkpoint.remote(str(self._snapshot[1]))
            if got != self.version:
                raise RuntimeError(f"teacher snapshot {self._snapshot[1]} holds version {got}, not {self.version}")
        elif self.version == 0:
            return  # the base weights are the version-0 teacher
        else:
            folder = self.fallback_folder() if self.fallback_folder else None
            if folder is None:
                raise RuntimeError(f"teacher restarted and its EMA of version {self.version} cannot be recovered")
            self.version = await self.actor.load_checkpoint.remote(str(folder))
            log.warning("teacher: EMA restored from %s (version %d)", folder, self.version)

    async def _call(self, method: str, *args, locked: bool = False):
        """`method` on a teacher that holds `self.version`; a score or a save is checked afterwards to have
        run on that EMA (a restart meanwhile would have put the base weights there). `locked`: the caller
        holds the lock (an update)."""
        guard = contextlib.nullcontext() if locked else self._lock
        for attempt in range(self.retries + 1):
            try:
                async with guard:
                    await self._restore()
                out = await getattr(self.actor, method).remote(*args)
                if method in ("score", "save"):
                    async with guard:  # an update in flight finishes first: it changes the version legitimately
                        held = (saved_version(args[0]) if method == "save"  # what the file holds
                                else await self.actor.get_version.remote())
                        if held != self.version:
                            raise ray.exceptions.ActorUnavailableError(f"teacher restarted during {method}", None)
                return out
            except Exception as e:
                if not is_actor_failure(e) or attempt == self.retries:
                    raise
                self.last_error = describe(e)

    async def score(self, trajectories, tasks, with_stats: bool = False):
        return await self._call("score", list(trajectories), list(tasks), with_stats)

    async def ema_update(self, version: int, weights) -> None:
        await self._update("ema_update", version, weights)

    async def updated(self, version: int) -> None:
        """The teacher took `version` in a collective sync the driver ran: record it and snapshot the EMA."""
        async with self._lock:
            base = self.version
            self.version = version
            if not await self._take_snapshot():  # it restarted meanwhile: the next call restores the old snapshot
                self.version = base
                self.restarts += 1

    async def load(self, version: int, weights) -> None:
        await self._update("load", version, weights)

    async def load_checkpoint(self, folder: str) -> int:
        return await self._update("load_checkpoint", folder)

    async def save(self, folder: str) -> str:
        return await self._call("save", folder)

    async def ensure(self) -> int:
        """Make sure the teacher holds the EMA of `self.version` (restoring it if it restarted)."""
        return await self._call("get_version")

    def reset(self) -> None:
        """Forget the EMA (the teacher was sent back to its initial weights)."""
        self.version, self._snapshot = 0, None
