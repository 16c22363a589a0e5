"""Run bookkeeping: the run's records (`accounting.Accounting`) plus checkpoints, resume and recovery.

State that a resumed run needs — iteration, phase, steps done in the phase, policy versions, the task
accounting, the examiner's candidate tasks, the fault counters and how far metrics.jsonl was written — is
saved with every checkpoint; re-running the same command resumes from the newest complete checkpoint. A
failed learner group is rebuilt and everything rolled back to that checkpoint (up to `fault.learner_restarts`
times); a failed replay store is replaced and everything rolled back with the learner as it is. Going back
to a checkpoint also rewinds the metrics and samples written since, so every learner step has one record.
"""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path

import ray

from piplay_ray.evolution.accounting import Accounting
from piplay_ray.evolution.state import LoopState
from piplay_ray.fault import actor_state
from piplay_ray.learner.checkpoint import checkpoint_dir, latest_checkpoint
from piplay_ray.method.examiner import load_tasks
from piplay_ray.monitor.console import say, shown
from piplay_ray.roles import TRAINED
from piplay_ray.rundir import REPLAY_SPILL, write_atomic


class RunBook(Accounting):
    """What the loop records about a run, and how it goes back to a checkpoint (constructed as `Accounting`)."""

    async def checkpoint(self) -> None:
        t, a, loop = time.monotonic(), self.actors, asyncio.get_running_loop()
        path = checkpoint_dir(self.run.path, self.state.global_step)
        # one cut: the replay's held steps are asked for and the loop state, counters and metrics position
        # copied with nothing in between on this event loop (the producer goes on changing the live state)
        held = a.replay.spill.remote() if self.cfg.replay.spill else None
        state = copy.deepcopy(self.state.__dict__) | {"counters": self.counters(),
                                                      "metrics_position": self.metrics.position()}
        # through the client, which restores a restarted teacher's EMA and checks the version it saved
        extra = {"teacher": lambda d: asyncio.run_coroutine_threadsafe(a.teacher_client.save(str(d)), loop).result()}
        if held is not None:
            spilled = await held
            extra["replay"] = lambda d: write_atomic(d / REPLAY_SPILL, spilled)
        await asyncio.to_thread(a.learner.save, path, driver_state=state, extra=extra)
        self.write_accounting()
        self.log({"checkpoint/seconds": time.monotonic() - t}, "system")

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.run.path) if self.cfg.run.resume else None
        if ckpt is None:
            return False
        self.restore(ckpt)
        asyncio.run(self.actors.teacher_client.load_checkpoint(str(Path(ckpt) / "teacher")))
        st = self.state
        say(f"resumed from {shown(ckpt)}: iteration {st.iteration}, phase {st.phase}, {st.phase_steps} steps done in "
            f"it, versions {st.versions}")
        return True

    def restore(self, ckpt: Path) -> None:
        """Learner, loop state, counters, replay content and run records as of checkpoint `ckpt` (the caller
        restores the teacher)."""
        self.state, replay = LoopState.from_dict(self.actors.learner.load(ckpt)), self.actors.replay
        ray.get(replay.restore.remote(str(Path(ckpt) / "replay" / REPLAY_SPILL)))
        ray.get([replay.set_version.remote(role, v) for role, v in self.state.versions.items()])
        self.went_back(ray.get(replay.held_steps.remote()))
        if self.state.phase == "student":
            self.task_set = load_tasks(self.run.task_set(self.state.iteration))

    def went_back(self, held: dict[str, list[int]] | None = None) -> None:
        """After the state was set back (to a checkpoint or the start): what was made past it is forgotten,
        but for the steps the replay store `held` at the checkpoint (their samples and candidates stay, since
        they are not made again), and every rollout pool reloads the checkpoint's weights."""
        st, held = self.state, held or {}
        self.restore_counters(st.counters)
        self.metrics.rewind(st.metrics_position, st.versions, keep=held)
        st.candidates = {k: v for k, v in st.candidates.items()
                         if int(k) < st.versions["examiner"] or int(k) in held.get("examiner", ())}
        for policy in self.policies.values():
            policy.pool_version = -1  # it may hold weights past the checkpoint: it must reload
            policy.publish()

    async def recover(self, error: str) -> None:
        """After an actor failure that calls could not retry: everything back to the newest checkpoint. A replay
        store that died while every learner rank lives is replaced alone (the learner loads the checkpoint;
        counted as the store's restart, up to `fault.max_actor_restarts`); anything else rebuilds the learner."""
        a, ckpt = self.actors, latest_checkpoint(self.run.path)
        if (ckpt is None or actor_state(a.replay)[0] != "DEAD"
                or any(actor_state(w)[0] != "ALIVE" for w in a.learner.workers)):
            return await self.rebuild_learner(error)
        n = self.restarts["replay"] = self.restarts.get("replay", 0) + 1
        self.last_errors["replay"] = error
        limit = self.cfg.fault.max_actor_restarts
        if n > limit:
            self.write_accounting()
            raise SystemExit(f"piplay: the replay store failed {n} times (fault.max_actor_restarts={limit}); last "
                             f"error: {error}. Stopping. Rerun the same command to resume from {ckpt}.")
        say(f"replay store failed ({error}); a new one, and everything back to {shown(ckpt)} ({n}/{limit})")
        await self.roll_back(ckpt)

    async def roll_back(self, ckpt: Path) -> None:
        """A new replay store and the learner, loop state and teacher as of checkpoint `ckpt`."""
        a = self.actors
        ray.kill(a.replay)  # its dedup set must match the state we roll back to
        a.replay = a.new_replay(str(Path(ckpt) / "replay" / REPLAY_SPILL))
        self.restore(ckpt)
        await a.teacher_client.load_checkpoint(str(ckpt / "teacher"))

    async def rebuild_learner(self, error: str) -> None:
        """After a learner failure: a new learner group, then everything back to the newest checkpoint
        (or to the start when there is none); past `fault.learner_restarts`, stop with a clear message."""
        a = self.actors
        self.learner_restarts += 1
        self.last_errors["learner-0"] = error
        ckpt = latest_checkpoint(self.run.path)
        limit = self.cfg.fault.learner_restarts
        if self.learner_restarts > limit:
            self.write_accounting()
            raise SystemExit(f"piplay: the learner failed {self.learner_restarts} times (fault.learner_restarts="
                             f"{limit}); last error: {error}. Stopping. "
                             + (f"Rerun the same command to resume from {ckpt}." if ckpt else
                                "No checkpoint was written yet; rerunning starts over."))
        say(f"learner failed ({error}); rebuilding it ({self.learner_restarts}/{limit}) from "
            f"{ckpt or 'the initial weights'}")
        await asyncio.to_thread(a.learner.shutdown)
        a.learner = await asyncio.to_thread(a.new_learner)
        for policy in self.policies.values():
            policy.rebind(a.learner)  # the pools get the rolled-back weights
        if ckpt is not None:
            return await self.roll_back(ckpt)
        ray.kill(a.replay)  # back to the start: the failed attempt's buffer, accounting and records go too
        a.replay = a.new_replay(None)
        self.state = LoopState()
        self.went_back()
        if a.teacher is not None:  # (a shared teacher's EMA is reset below)
            ray.kill(a.teacher, no_restart=False)  # back to its initial weights
        a.teacher_client.reset()
        for role in TRAINED:
            await a.replay.set_version.remote(role, self.state.versions[role])
