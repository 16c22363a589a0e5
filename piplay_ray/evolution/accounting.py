"""What the loop records about a run as it goes: per-step accounting, fault counters and health.

Every task of a task set ends up trained exactly once or reported as dropped with its reason in
`accounting.json` (the task ledger, `fault.TaskLedger`); each learner step records the groups it consumed,
and the learner keeps its own record of the groups it trained, to check that against. After each step the
actors are pinged and the retriever probed (`health.json`); restart counters only grow.
"""

from __future__ import annotations

import asyncio
import json
import time

import ray

from piplay_ray.evolution.state import LoopState
from piplay_ray.fault import TaskLedger, actor_state, describe
from piplay_ray.monitor.console import say
from piplay_ray.records import Task
from piplay_ray.rundir import RunDir, write_atomic


class Accounting:
    """The run's records in `run`; `actors` is the loop's evolution.actors.Actors, `docs` the corpus (the
    retriever probe searches its titles) and `policies` the role -> Policy handles."""

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

    # ------------------------------------------------------------------------------------------ counters

    def counters(self) -> dict:
        a = self.actors
        return {"restarts": dict(self.restarts), "learner_restarts": self.learner_restarts,
                "probes": dict(self.probes), "rollout_retries": {r: p.retried for r, p in a.pools.items()},
                "teacher_restores": a.teacher_client.restarts}

    def restore_counters(self, saved: dict) -> None:
        """Counters only grow: a rollback keeps what this driver saw, a resumed driver starts from the saved."""
        a = self.actors
        for name, n in saved.get("restarts", {}).items():
            self.restarts[name] = max(self.restarts.get(name, 0), n)
        self.learner_restarts = max(self.learner_restarts, saved.get("learner_restarts", 0))
        for name, n in saved.get("probes", {}).items():
            self.probes[name] = max(self.probes.get(name, 0), n)
        for role, n in saved.get("rollout_retries", {}).items():
            if role in a.pools:
                a.pools[role].retried = max(a.pools[role].retried, n)
        a.teacher_client.restarts = max(a.teacher_client.restarts, saved.get("teacher_restores", 0))
