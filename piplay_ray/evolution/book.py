"""Run bookkeeping: the loop state, health, accounting, checkpoints, resume, and the learner rebuild.

State that a resumed run needs — iteration, phase, steps done in the phase, policy versions, the task
accounting, the examiner's candidate tasks, the fault counters and how far metrics.jsonl was written — is
saved with every checkpoint; re-running the same command resumes from the newest complete checkpoint. A
failed learner group is rebuilt and everything rolled back to that checkpoint (up to `fault.learner_restarts`
times); a failed replay store is replaced and everything rolled back with the learner as it is. Going back to a checkpoint also rewinds the metrics and samples written since, so every learner step
has one record. Every task of a task set ends up trained exactly once or reported as dropped with its reason
in `accounting.json`; the learner keeps its own record of the groups it trained, to check that against.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from piplay_ray.console import say
from piplay_ray.examiner import load_tasks
from piplay_ray.fault import TaskLedger, actor_state, describe
from piplay_ray.learner.checkpoint import checkpoint_dir, latest_checkpoint
from piplay_ray.records import Task
from piplay_ray.roles import TRAINED
from piplay_ray.rundir import RunDir, write_atomic


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint as the driver state."""

    iteration: int = 0
    phase: str = "examiner"  # examiner -> tasks -> student -> (next iteration) ; "done" at the end
    phase_steps: int = 0  # learner steps done in the current phase
    versions: dict[str, int] = field(default_factory=lambda: {r: 0 for r in TRAINED})
    global_step: int = 0
    accounting: dict[str, dict] = field(default_factory=dict)  # per task set: issued/trained/dropped
    candidates: dict[str, list[dict]] = field(default_factory=dict)  # examiner step -> its gate-passing tasks
    counters: dict[str, dict | int] = field(default_factory=dict)  # fault counters (RunBook.counters)
    metrics_position: int = 0  # bytes of metrics.jsonl written when the state was saved

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        return cls(**d)


class RunBook:
    """What the loop records about a run in `run`; `actors` is the loop's evolution.actors.Actors, `docs`
    the corpus (the retriever probe searches its titles) and `policies` the role -> Policy handles."""

    def __init__(self, cfg, run: RunDir, metrics, actors, docs, policies: dict | None = None):
        self.cfg, self.run, self.metrics, self.actors, self.docs = cfg, run, metrics, actors, docs
        self.policies = policies or {}
        self.state = LoopState()
        self.task_set: list[Task] = []
        self.restarts: dict[str, int] = {}
        self.last_errors: dict[str, str] = {}
        self.learner_restarts = 0
        self.probes = {"sent": 0, "failed": 0}

    def log(self, values: dict, phase: str) -> None:
        self.metrics.log(values, iteration=self.state.iteration, phase=phase, step=self.state.global_step)

    def ledger(self, iteration: int | None = None) -> TaskLedger:
        it = self.state.iteration if iteration is None else iteration
        return TaskLedger(self.state.accounting.setdefault(f"iter-{it}-tasks", {}))

    def record_step(self, role: str, groups: list) -> None:
        """Accounting of one learner step: the groups it consumed (and, for the student, their tasks)."""
        st = self.state
        if role == "student":
            self.ledger().trained(g[0].info["task"] for g in groups)
        acct = st.accounting.setdefault(f"iter-{st.iteration}-{role}", {"groups_trained": 0})
        acct["groups_trained"] += len(groups)
        acct.setdefault("steps", {})[str(st.global_step)] = [g[0].group_id for g in groups]

    def record_failures(self, role: str, step: int, failures: list[tuple[str, str]]) -> None:
        """Groups a step could not produce: per task for the student (its task may still be trained in another
        step), per step for the examiner (those tasks left its group)."""
        if not failures:
            return
        if role == "student":
            for task_id, reason in failures:
                self.ledger().failed(task_id, reason)
        else:
            self.state.accounting.setdefault(f"iter-{self.state.iteration}-examiner", {}).setdefault(
                "failures", []).append({"step": step, "tasks": len(failures), "reason": failures[0][1]})
        say(f"{role} rollouts: {failures[0][1]}")

    # ------------------------------------------------------------------------------------------ health

    def write_health(self, timeout_s: float = 10.0) -> dict[str, dict]:
        """Ping every actor and probe the retriever; write health.json for the dashboard (alive, restarts,
        last error). Restarts are the most of what the driver, the pools and Ray's actor table saw."""
        a = self.actors
        actors = a.named()
        refs = {name: h.__ray_ready__.remote() for name, h in actors.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        seen = {name: h for pool in a.pools.values() for name, h in pool.health().items()}
        seen["teacher"] = {"restarts": a.teacher_client.restarts, "last_error": a.teacher_client.last_error}
        health = {}
        for name, ref in refs.items():
            error = self.last_errors.get(name) or seen.get(name, {}).get("last_error")
            alive = ref in ready
            if alive:
                try:
                    ray.get(ref)
                except Exception as e:  # the actor is dead
                    alive, error = False, describe(e)
            gcs = actor_state(actors[name])[1] or 0
            self.restarts[name] = max(self.restarts.get(name, 0), seen.get(name, {}).get("restarts", 0), gcs)
            health[name] = {"alive": alive, "restarts": self.restarts[name], "last_error": error}
        ok, error = self.probe_search()
        if error:
            self.last_errors["retriever"] = error
        health["retriever"] = {"alive": ok, "restarts": 0, "last_error": self.last_errors.get("retriever")}
        self.metrics.write_health(health)
        return health

    def probe_search(self) -> tuple[bool, str | None]:
        """One real, uncached query through the search env: an outage shows even when no agent searches."""
        n = self.probes["sent"] = self.probes["sent"] + 1
        (res,) = self.actors.search.search([f"{self.docs[n % len(self.docs)].title} {n}"])
        self.probes["failed"] += not res.ok
        return res.ok, res.error

    def write_accounting(self) -> dict:
        """accounting.json: per task set issued/trained/dropped (with reasons), per phase the groups each
        learner step consumed, restarts per actor, learner rebuilds and retriever probes."""
        acct, a = self.state.accounting, self.actors
        doc = {"tasks": {k: v for k, v in acct.items() if k.endswith("-tasks")},
               "phases": {k: v for k, v in acct.items() if not k.endswith("-tasks")},
               "restarts": dict(self.restarts), "learner_restarts": self.learner_restarts,
               "rollout_retries": {r: p.retried for r, p in a.pools.items()},
               "teacher_restores": a.teacher_client.restarts,
               "search_probes": dict(self.probes), "updated": time.time()}
        write_atomic(self.run.accounting, json.dumps(doc, indent=1, default=str))
        return doc

    async def after_step(self) -> None:
        """Health (its pings in a thread), fault counters and accounting after each learner step."""
        health = await asyncio.to_thread(self.write_health)
        self.log({"search/probe_failures": self.probes["failed"],
                  "search/retriever_up": int(health["retriever"]["alive"]),
                  "fault/restarts": sum(self.restarts.values()), "fault/learner_restarts": self.learner_restarts},
                 "system")
        self.write_accounting()

    # ------------------------------------------------------------------------------------------ checkpoints

    def counters(self) -> dict:
        return {"restarts": dict(self.restarts), "learner_restarts": self.learner_restarts,
                "probes": dict(self.probes)}

    def restore_counters(self, saved: dict) -> None:
        """Counters only grow: a rollback keeps what this driver saw, a resumed driver starts from the saved."""
        for name, n in saved.get("restarts", {}).items():
            self.restarts[name] = max(self.restarts.get(name, 0), n)
        self.learner_restarts = max(self.learner_restarts, saved.get("learner_restarts", 0))
        for name, n in saved.get("probes", {}).items():
            self.probes[name] = max(self.probes.get(name, 0), n)

    async def checkpoint(self) -> None:
        t, a, loop = time.monotonic(), self.actors, asyncio.get_running_loop()
        path = checkpoint_dir(self.run.path, self.state.global_step)
        # as of now (the producer goes on changing the live state), with the counters and the metrics position
        state = copy.deepcopy(self.state.__dict__) | {"counters": self.counters(),
                                                      "metrics_position": self.metrics.position()}
        # through the client, which restores a restarted teacher's EMA and checks the version it saved
        extra = {"teacher": lambda d: asyncio.run_coroutine_threadsafe(a.teacher_client.save(str(d)), loop).result()}
        if self.cfg.replay.spill:  # buffered groups are part of the checkpoint, consistent with its versions
            extra["replay"] = lambda d: ray.get(a.replay.spill.remote(str(d / "replay.parquet")))
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
        say(f"resumed from {ckpt}: iteration {st.iteration}, phase {st.phase}, {st.phase_steps} steps done in "
            f"it, versions {st.versions}")
        return True

    def restore(self, ckpt: Path) -> None:
        """Learner, loop state, counters, replay content and run records as of checkpoint `ckpt` (the caller
        restores the teacher)."""
        self.state = LoopState.from_dict(self.actors.learner.load(ckpt))
        ray.get(self.actors.replay.restore.remote(str(Path(ckpt) / "replay" / "replay.parquet")))
        self.went_back()
        if self.state.phase == "student":
            self.task_set = load_tasks(self.run.task_set(self.state.iteration))

    def went_back(self) -> None:
        """After the state was set back (to a checkpoint or the start): what was made past it is forgotten."""
        st = self.state
        self.restore_counters(st.counters)
        self.metrics.rewind(st.metrics_position, st.versions)
        st.candidates = {k: v for k, v in st.candidates.items() if int(k) < st.versions["examiner"]}
        for policy in self.policies.values():
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
        if n > self.cfg.fault.max_actor_restarts:
            self.write_accounting()
            raise SystemExit(f"piplay: the replay store failed {n} times (fault.max_actor_restarts="
                             f"{self.cfg.fault.max_actor_restarts}); last error: {error}. Stopping. Rerun the same "
                             f"command to resume from {ckpt}.")
        say(f"replay store failed ({error}); a new one, and everything back to {ckpt} ({n}/"
            f"{self.cfg.fault.max_actor_restarts})")
        await self.roll_back(ckpt)

    async def roll_back(self, ckpt: Path) -> None:
        """A new replay store and the learner, loop state and teacher as of checkpoint `ckpt`."""
        a = self.actors
        ray.kill(a.replay)  # its dedup set must match the state we roll back to
        a.replay = a.new_replay(str(Path(ckpt) / "replay" / "replay.parquet"))
        self.restore(ckpt)
        await a.teacher_client.load_checkpoint(str(ckpt / "teacher"))
        for role in TRAINED:
            await a.replay.set_version.remote(role, self.state.versions[role])

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
        ray.kill(a.teacher, no_restart=False)  # back to its initial weights
        a.teacher_client.reset()
        for role in TRAINED:
            await a.replay.set_version.remote(role, self.state.versions[role])
