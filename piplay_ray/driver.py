"""The evolution loop (paper Algorithm 1) as a streaming actor-learner program.

For each iteration: an examiner phase (W learner steps on the difficulty reward), the examiner writes the
student's task set, then a student phase (W learner steps on exact match plus λ·distillation from the
QCP-conditioned EMA teacher). Within a phase a producer makes the groups of learner step j with rollout
weights of version ≥ j − max_staleness while the learner trains on step j − 1, so generation and training
overlap by up to `replay.max_staleness` versions (0 makes the loop synchronous).

State that a resumed run needs — iteration, phase, steps done in the phase, policy versions — is saved with
every checkpoint; re-running the same command resumes from the newest complete checkpoint.

Faults (see :mod:`piplay_ray.fault`): rollout pools re-issue work lost with a dead worker, the teacher
client restores the EMA of a restarted teacher, a failed learner group is rebuilt from the newest
checkpoint (up to `fault.learner_restarts` times), and a retriever outage only fails tool calls. Every
task of a task set ends up trained on or reported as dropped with its reason in `accounting.json`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm import tqdm

from piplay_ray import assets, console, summary, warmup
from piplay_ray.config import Config
from piplay_ray.fault import TaskLedger, actor_state, describe, is_actor_failure
from piplay_ray.records import Experience, Hop, Task
from piplay_ray.resources import check_cluster
from piplay_ray.rundir import RunDir, sample_row

ROLES = ("examiner", "student")


class LearnerFailure(RuntimeError):
    """A learner rank died during a step (or another actor failed past its retries); the loop rebuilds the
    learner group and rolls everything back to the newest checkpoint."""


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint as the driver state."""

    iteration: int = 0
    phase: str = "examiner"  # examiner -> tasks -> student -> (next iteration) ; "done" at the end
    phase_steps: int = 0  # learner steps done in the current phase
    versions: dict[str, int] = field(default_factory=lambda: {r: 0 for r in ROLES})
    global_step: int = 0
    accounting: dict[str, dict] = field(default_factory=dict)  # per task set: issued/trained/dropped

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        return cls(**d)


def rule_tasks(corpus, n: int, iteration: int, seed: int, eval_size: int) -> list[Task]:
    """Up to `n` corpus tasks built by the evaluation set's rule, none of them a held-out eval question.

    They top up a task set when the examiner wrote too few gate-passing tasks (a small base model often
    writes none early on); the QCP is the one search that leads from the clue to the answer's article.
    Every such task is counted as `tasks/rule_built`. A corpus without titles and descriptions (e.g.
    wiki-18) has no such rule: then the task set holds only what the examiner wrote.
    """
    from piplay_ray.evaluation import builtin_eval_set

    try:
        held_out = {ex.id for ex in builtin_eval_set(corpus.path, eval_size, seed)}
        pool = builtin_eval_set(corpus.path, n + len(held_out), seed=seed * 1000 + iteration + 1)
    except ValueError:
        return []
    picked = [ex for ex in pool if ex.id not in held_out][:n]
    wanted = {ex.id.removeprefix("builtin-") for ex in picked}
    docs = {d.id: d for d in (corpus[i] for i in range(len(corpus))) if d.id in wanted}
    return [Task(id=f"it{iteration}-rule-{doc.id}", question=ex.question, answer=ex.golden_answers[0], hops=1,
                 source=doc, qcp=[Hop(query=ex.question, docs=[doc])], flags={"rule_built": True},
                 iteration=iteration)
            for ex in picked if (doc := docs.get(ex.id.removeprefix("builtin-")))]


class EvolutionLoop:
    def __init__(self, cfg: Config, run: RunDir):
        from transformers import AutoTokenizer

        from piplay_ray.actors.replay import ReplayStore
        from piplay_ray.actors.rollout import RolloutPool
        from piplay_ray.actors.search_env import SearchEnvPool
        from piplay_ray.actors.teacher import TeacherClient, create_teacher
        from piplay_ray.examiner import ExaminerSampler
        from piplay_ray.learner.learner import LearnerGroup
        from piplay_ray.metrics import MetricsSink
        from piplay_ray.retrieval.corpus import Corpus

        self.cfg, self.run = cfg, run
        self.stopping = False
        self.rng = random.Random(cfg.run.seed)
        self.paths = {r: assets.resolve_model(cfg.model.path_for(r)) for r in (*ROLES, "teacher")}
        self.tokenizer = AutoTokenizer.from_pretrained(self.paths["student"])
        self.corpus_path = assets.resolve_corpus(cfg.search.corpus)
        self.docs = Corpus(self.corpus_path)  # memory-mapped: a wiki-18-sized corpus costs no resident memory
        self.sampler = ExaminerSampler(self.docs, cfg.examiner.hop_weights, seed=cfg.run.seed)
        self.metrics = MetricsSink(run.path, cfg.logging, config=cfg.model_dump(mode="json"))
        self.state = LoopState()

        _say("starting actors: search env, rollout pools, teacher, learner, replay store")
        self.search = SearchEnvPool(cfg.search)
        self.pools = {r: RolloutPool(r, self.paths[r], cfg, self.search) for r in ROLES}
        self.teacher = create_teacher(self.paths["teacher"], cfg)
        self.teacher_client = TeacherClient(self.teacher, cfg.fault.max_task_retries, self._teacher_fallback)
        self.learner = LearnerGroup(cfg, ROLES)
        self.syncs = self._collective_groups() if cfg.weight_sync.transport == "collective" else None
        self.replay = ReplayStore.remote(cfg.replay.capacity_groups, cfg.replay.max_staleness)
        self.pool_versions = {r: 0 for r in ROLES}
        self.bundles: dict[str, tuple[int, object]] = {}
        self.task_set: list[Task] = []
        self.version_changed = asyncio.Event()
        self.restarts: dict[str, int] = {}
        self.last_errors: dict[str, str] = {}
        self.learner_restarts = 0
        self.probes = {"sent": 0, "failed": 0}
        self.last_rollout_error = ""

    # ------------------------------------------------------------------------------------------ health

    def actors(self) -> dict[str, object]:
        named = {f"search-{i}": a for i, a in enumerate(self.search.actors)}
        for role, pool in self.pools.items():
            named |= {f"rollout-{role}-{i}": w for i, w in enumerate(pool.workers)}
        named |= {f"learner-{i}": w for i, w in enumerate(self.learner.workers)}
        return named | {"teacher": self.teacher, "replay": self.replay}

    def write_health(self, timeout_s: float = 10.0) -> dict[str, dict]:
        """Ping every actor and probe the retriever; write health.json for the dashboard (alive, restarts,
        last error). Restarts are the most of what the driver, the pools and Ray's actor table saw."""
        actors = self.actors()
        refs = {name: a.__ray_ready__.remote() for name, a in actors.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        seen = {name: h for pool in self.pools.values() for name, h in pool.health().items()}
        seen["teacher"] = {"restarts": self.teacher_client.restarts, "last_error": self.teacher_client.last_error}
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
        (res,) = self.search.search([f"{self.docs[n % len(self.docs)].title} {n}"])
        self.probes["failed"] += not res.ok
        return res.ok, res.error

    def write_accounting(self) -> dict:
        """accounting.json: per task set issued/trained/dropped (with reasons), per phase the groups each
        learner step consumed, restarts per actor, learner rebuilds and retriever probes."""
        doc = {"tasks": {k: v for k, v in self.state.accounting.items() if k.endswith("-tasks")},
               "phases": {k: v for k, v in self.state.accounting.items() if not k.endswith("-tasks")},
               "restarts": dict(self.restarts), "learner_restarts": self.learner_restarts,
               "rollout_retries": {r: p.retried for r, p in self.pools.items()},
               "teacher_restores": self.teacher_client.restarts,
               "search_probes": dict(self.probes), "updated": time.time()}
        tmp = self.run.path / "accounting.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.run.path / "accounting.json")
        return doc

    def ledger(self, iteration: int) -> TaskLedger:
        return TaskLedger(self.state.accounting.setdefault(f"iter-{iteration}-tasks", {}))

    def _teacher_fallback(self) -> Path | None:
        from piplay_ray.learner.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(self.run.path)
        return None if ckpt is None else ckpt / "teacher"

    # ------------------------------------------------------------------------------------------ resume

    def resume(self) -> bool:
        from piplay_ray.learner.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(self.run.path) if self.cfg.run.resume else None
        if ckpt is None:
            return False
        self.restore(ckpt)
        asyncio.run(self.teacher_client.load_checkpoint(str(Path(ckpt) / "teacher")))
        _say(f"resumed from {ckpt}: iteration {self.state.iteration}, phase {self.state.phase}, "
             f"{self.state.phase_steps} steps done in it, versions {self.state.versions}")
        return True

    def restore(self, ckpt: Path) -> None:
        """Learner, loop state and replay content as of checkpoint `ckpt` (the caller restores the teacher)."""
        state = self.learner.load(ckpt)
        self.state = LoopState.from_dict(state)
        ray.get(self.replay.restore.remote(str(Path(ckpt) / "replay" / "replay.parquet")))
        for role in ROLES:
            self.publish(role)
        if self.state.phase == "student":
            from piplay_ray.examiner import load_tasks, task_set_path

            self.task_set = load_tasks(task_set_path(self.run.path, self.state.iteration))

    async def rebuild_learner(self, error: str) -> None:
        """After a learner failure: a new learner group, then everything back to the newest checkpoint
        (or to the start when there is none); past `fault.learner_restarts`, stop with a clear message."""
        from piplay_ray.actors.replay import ReplayStore
        from piplay_ray.learner.checkpoint import latest_checkpoint
        from piplay_ray.learner.learner import LearnerGroup

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
        _say(f"learner failed ({error}); rebuilding it ({self.learner_restarts}/{limit}) from "
             f"{ckpt or 'the initial weights'}")
        await asyncio.to_thread(self.learner.shutdown)
        self.learner = await asyncio.to_thread(LearnerGroup, self.cfg, ROLES)
        for sync in (self.syncs or {}).values():
            sync.reset(self.learner)
        ray.kill(self.replay)  # its dedup set must match the state we roll back to
        spill = str(Path(ckpt) / "replay" / "replay.parquet") if ckpt else None
        self.replay = ReplayStore.remote(self.cfg.replay.capacity_groups, self.cfg.replay.max_staleness, spill)
        self.pool_versions = {r: -1 for r in ROLES}  # the pools get the rolled-back weights
        if ckpt is not None:
            self.restore(ckpt)
            await self.teacher_client.load_checkpoint(str(ckpt / "teacher"))
        else:
            self.state = LoopState(accounting=self.state.accounting)
            for role in ROLES:
                self.publish(role)
            ray.kill(self.teacher, no_restart=False)  # back to its initial weights
            self.teacher_client.reset()
        for role in ROLES:
            await self.replay.set_version.remote(role, self.state.versions[role])

    async def checkpoint(self) -> None:
        from piplay_ray.learner.checkpoint import checkpoint_dir

        t = time.monotonic()
        path = checkpoint_dir(self.run.path, self.state.global_step)
        await self.teacher_client.ensure()  # never save a restarted teacher's base weights as the EMA
        extra = {"teacher": lambda d: ray.get(self.teacher.save.remote(str(d)))}
        if self.cfg.replay.spill:  # buffered groups are part of the checkpoint, consistent with its versions
            extra["replay"] = lambda d: ray.get(self.replay.spill.remote(str(d / "replay.parquet")))
        await asyncio.to_thread(self.learner.save, path, driver_state=self.state.__dict__, extra=extra)
        self.write_accounting()
        self.metrics.log({"checkpoint/seconds": time.monotonic() - t}, iteration=self.state.iteration,
                         phase="system", step=self.state.global_step)

    # ------------------------------------------------------------------------------------------ weights

    def _collective_groups(self) -> dict:
        """weight_sync.transport=collective: one group per role (the student's holds the teacher too); a
        pool whose worker restarted resyncs through it."""
        from piplay_ray.learner.weight_sync.coordinator import GroupSync

        syncs = {r: GroupSync(r, self.learner, self.pools[r], self.teacher if r == "student" else None,
                              self.cfg.fault.max_task_retries) for r in ROLES}
        for role, pool in self.pools.items():
            pool.resync = syncs[role].resync
        return syncs

    def publish(self, role: str) -> None:
        """Publish the learner's current weights of `role` for the rollout pool (loaded by the producer).
        Collective: nothing moves yet; the producer's `sync_pool` (or the step's `sync_student`) broadcasts."""
        weights = None if self.syncs else self.learner.weights(role)
        self.bundles[role] = (self.state.versions[role], weights)
        self.version_changed.set()

    async def sync_pool(self, role: str) -> None:
        version, bundle = self.bundles.get(role, (0, None))
        if (bundle is None and not (self.syncs and role in self.bundles)) or self.pool_versions[role] >= version:
            return
        t = time.monotonic()
        if self.syncs:  # the learner may have moved past `version` meanwhile: the pool takes what it holds
            version = (await self.syncs[role].sync(None, minimum=version))["version"]
        else:
            await self.pools[role].aupdate_weights(version, bundle)
        self.pool_versions[role] = version
        self.metrics.log({"weight_sync/seconds": time.monotonic() - t, "weight_sync/version": version},
                         iteration=self.state.iteration, phase=role, step=self.state.global_step)

    async def sync_student(self, version: int, teacher_mode: str) -> None:
        """Collective: one broadcast to the student pool and the teacher (`ema` or `load` of `version`)."""
        await self.teacher_client.ensure()  # a restarted teacher gets its EMA back before it blends
        t = time.monotonic()
        done = await self.syncs["student"].sync(version, teacher_mode)
        await self.teacher_client.updated(version)
        self.pool_versions["student"] = version
        self.metrics.log({"weight_sync/seconds": time.monotonic() - t, "weight_sync/version": version,
                          "weight_sync/gb_per_s": done["bytes"] / max(done["seconds"], 1e-9) / 1e9},
                         iteration=self.state.iteration, phase="student", step=self.state.global_step)

    async def wait_for_version(self, role: str, minimum: int) -> None:
        while self.state.versions[role] < minimum and not self.stopping:
            self.version_changed.clear()
            await self.version_changed.wait()

    # ------------------------------------------------------------------------------------------ producers

    async def examiner_groups(self, step: int) -> list[list[Experience]]:
        """One examiner learner step: attempts, n student tries per valid task, difficulty rewards."""
        from piplay_ray.examiner import build_task, examiner_rewards
        from piplay_ray.rewards import exact_match

        cfg, it = self.cfg, self.state.iteration
        docs, hops = self.sampler.sample(cfg.examiner.tasks_per_step)
        trajs = await self.rollouts_or_partial("examiner", "examiner_rollouts", docs, hops)
        keep = [i for i, t in enumerate(trajs) if t is not None]
        if not keep:
            raise RuntimeError(f"examiner step {step}: no rollout could be produced: {self.last_rollout_error}")
        trajs, docs, hops = [trajs[i] for i in keep], [docs[i] for i in keep], [hops[i] for i in keep]
        tasks = [build_task(t, d, h, cfg.examiner, it) for t, d, h in zip(trajs, docs, hops, strict=True)]
        valid = [i for i, t in enumerate(tasks) if t.valid]
        correct: list[int | None] = [None] * len(tasks)
        n = cfg.examiner.attempts
        if valid:
            await self.sync_pool("student")  # r_d from the newest student, never a stale one
            attempts = await self.rollouts_or_partial("student", "student_rollouts",
                                                      [tasks[i].question for i in valid], n)
            lost = {i for i, group in zip(valid, attempts, strict=True) if group is None}
            for i, group in zip(valid, attempts, strict=True):
                if group is not None:
                    correct[i] = int(sum(exact_match(t.answer, tasks[i].answer) for t in group))
            if lost:  # no difficulty signal without attempts: those tasks leave this step's group, reported
                self.state.accounting.setdefault(f"iter-{it}-examiner", {}).setdefault("failures", []).append(
                    {"step": step, "tasks": len(lost), "reason": self.last_rollout_error})
                kept = [i for i in range(len(tasks)) if i not in lost]
                trajs, tasks, docs, hops = ([x[i] for i in kept] for x in (trajs, tasks, docs, hops))
                correct = [correct[i] for i in kept]
                valid = [i for i, t in enumerate(tasks) if t.valid]
        rewards, advantages = examiner_rewards(tasks, correct, n, cfg.examiner.format_weight,
                                               std_normalize=cfg.learner.loss.std_normalize)
        if cfg.examiner.task_set_fallback:  # kept only when the task set may fall back on them
            self.examiner_candidates.extend(tasks[i] for i in valid)
        by_hop = {h: [t.valid for t in tasks if t.hops == h] for h in range(1, len(cfg.examiner.hop_weights) + 1)}
        self.metrics.log({
            "examiner/difficulty_reward": _mean(rewards),
            "examiner/format_reward": _mean([t.format_reward for t in tasks]),
            "examiner/gate_pass_rate": len(valid) / len(tasks),
            **{f"examiner/gate_pass_rate_h{h}": _mean(v) for h, v in by_hop.items() if v},
            "examiner/solve_rate_hist": [correct[i] / n for i in valid],
            "rollout/searches_per_traj": _mean([t.num_searches for t in trajs]),
            "search/tool_failures": sum(not h.ok for t in trajs for h in t.hops),
        }, iteration=it, phase="examiner", step=self.state.global_step)
        group = [Experience(group_id=f"examiner-{step}", role="examiner", prompt_ids=t.prompt_ids,
                            response_ids=t.response_ids, mask=t.mask, logprobs=t.logprobs, reward=r,
                            advantage=a, version=t.version, info={"task": task.id, "hops": task.hops})
                 for t, task, r, a in zip(trajs, tasks, rewards, advantages, strict=True)]
        return [group]

    async def student_groups(self, step: int) -> list[list[Experience]]:
        """One student learner step: G rollouts per task, exact match, teacher top-K with the QCP."""
        from piplay_ray import privileged
        from piplay_ray.diagnostics import StepDiagnostics
        from piplay_ray.losses import group_advantages
        from piplay_ray.rewards import exact_match, f1

        cfg, it = self.cfg, self.state.iteration
        k = cfg.student.tasks_per_step
        tasks = [self.task_set[(step * k + i) % len(self.task_set)] for i in range(k)]
        groups = await self.rollouts_or_partial("student", "student_rollouts", [t.question for t in tasks],
                                                cfg.student.group_size)
        ledger = self.ledger(it)
        for task, group in zip(tasks, groups, strict=True):
            if group is None:  # reported, never silent; its task may still be trained in another step
                ledger.failed(task.id, self.last_rollout_error)
        if all(g is None for g in groups):
            raise RuntimeError(f"student step {step}: no group could be produced: {self.last_rollout_error}")
        tasks, groups = zip(*[(t, g) for t, g in zip(tasks, groups, strict=True) if g is not None], strict=True)
        flat = [(task, traj) for task, group in zip(tasks, groups, strict=True) for traj in group]
        rewards = [exact_match(traj.answer, task.answer) for task, traj in flat]
        advantages = group_advantages(rewards, cfg.student.group_size, cfg.learner.loss.std_normalize).tolist()
        tcfg = cfg.teacher
        if tcfg.privileged != "none":
            scores, tstats = await self.teacher_client.score([tr for _, tr in flat], [t for t, _ in flat],
                                                             with_stats=True)
        else:  # no teacher: the learner gets no teacher fields
            scores, tstats = [(None, None, None)] * len(flat), {}
        texts = {t.id: privileged.render(t, tcfg.privileged, tcfg.doc_token_budget, seed=cfg.run.seed) for t in tasks}
        diag = StepDiagnostics()
        exps, rows = [], []
        for i, ((task, traj), r, a, (t_ids, t_lps, t_tail)) in enumerate(
                zip(flat, rewards, advantages, scores, strict=True)):
            exps.append(Experience(group_id=f"student-{step}-{task.id}", role="student", prompt_ids=traj.prompt_ids,
                                   response_ids=traj.response_ids, mask=traj.mask, logprobs=traj.logprobs,
                                   reward=r, advantage=a, version=traj.version, teacher_ids=t_ids,
                                   teacher_logprobs=t_lps, teacher_tail=t_tail, info={"task": task.id}))
            tokens = [self.tokenizer.convert_tokens_to_string([t])
                      for t in self.tokenizer.convert_ids_to_tokens(traj.response_ids)]
            diag.add(traj, tokens, task.answer, task.question, texts[task.id], t_ids, t_lps, t_tail)
            if i < cfg.logging.sample_trajectories:
                rows.append(sample_row(task, traj, r, tokens, t_ids, t_lps, t_tail))
        if rows:
            self.metrics.write_samples("student", step, rows)
        trajs = [tr for _, tr in flat]
        g = cfg.student.group_size
        self.metrics.log({
            "student/reward": _mean(rewards), "student/em": _mean(rewards),
            "student/answer_rate": _mean([t.finish_reason == "answer" for t in trajs]),
            "student/groups_with_signal": _mean([max(rewards[i : i + g]) > min(rewards[i : i + g])
                                                 for i in range(0, len(rewards), g)]),
            "student/f1": _mean([f1(tr.answer, t.answer) for t, tr in flat]),
            "rollout/searches_per_traj": _mean([t.num_searches for t in trajs]),
            "rollout/answer_len": _mean([len((t.answer or "").split()) for t in trajs]),
            "rollout/tokens": sum(sum(t.mask) for t in trajs),
            "search/tool_failures": sum(not h.ok for t in trajs for h in t.hops),
            **diag.metrics(), **{f"teacher/{k}": v for k, v in tstats.items()},
        }, iteration=it, phase="student", step=self.state.global_step)
        return [exps[i : i + g] for i in range(0, len(exps), g)]

    async def rollouts_or_partial(self, pool: str, method: str, *args) -> list:
        """A pool request whose lost shares (after the pool's retries) come back as None items."""
        from piplay_ray.actors.rollout import RolloutFailed

        try:
            return await getattr(self.pools[pool], method)(*args)
        except RolloutFailed as e:
            self.last_rollout_error = e.reason
            _say(f"{pool} rollouts: {e.reason}")
            return e.partial

    async def produce(self, role: str, first: int, last: int) -> None:
        """Fill the replay store for learner steps first..last-1, within the staleness bound."""
        make = self.examiner_groups if role == "examiner" else self.student_groups
        bound = self.cfg.replay.max_staleness
        for j in range(first, last):
            while not self.stopping:
                await self.wait_for_version(role, j - bound)
                await self.sync_pool(role)
                t = time.monotonic()
                groups = await make(j)
                tokens = sum(sum(e.mask) for g in groups for e in g)
                verdicts = [await self.replay.put.remote(g) for g in groups]
                self.metrics.log({"throughput/rollout_tokens_per_s": tokens / max(time.monotonic() - t, 1e-9),
                                  "replay/refused": sum(v == "stale" for v in verdicts)},
                                 iteration=self.state.iteration, phase=role, step=self.state.global_step)
                if all(v in ("ok", "duplicate") for v in verdicts):
                    break  # else some groups went stale while generating: make this step's groups again
            if self.stopping:
                return

    # ------------------------------------------------------------------------------------------ phases

    async def phase(self, role: str, steps: int) -> None:
        cfg, st = self.cfg, self.state
        n_groups = 1 if role == "examiner" else cfg.student.tasks_per_step
        start = st.versions[role]
        first = start - st.phase_steps  # the version this phase started at
        producer = asyncio.create_task(self.produce(role, start, first + steps))
        bar = tqdm(total=steps, initial=st.phase_steps, desc=f"iter {st.iteration} {role}", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
        try:
            while st.phase_steps < steps and not self.stopping:
                t_wait = time.monotonic()
                groups = await self._sample(role, n_groups, producer)
                waited = time.monotonic() - t_wait
                exps = [e for g in groups for e in g]
                oldest = min(e.version for e in exps)
                stale = st.versions[role] - oldest
                teach = cfg.teacher.privileged != "none"
                lam = cfg.schedule.lam(st.iteration) if role == "student" and teach else 0.0
                t = time.monotonic()
                m = await asyncio.to_thread(self.learner.train_step, role, exps, lam)
                step_s = time.monotonic() - t
                st.versions[role] += 1
                st.phase_steps += 1
                st.global_step += 1
                await self.replay.set_version.remote(role, st.versions[role])
                self.publish(role)
                if role == "student":
                    version, bundle = self.bundles["student"]
                    if self.syncs:  # the pool and the teacher in one broadcast
                        await self.sync_student(version, "ema")
                    elif teach:  # with teacher.privileged = none nothing reads the teacher
                        await self.teacher_client.ema_update(version, bundle)
                    self.ledger(st.iteration).trained(g[0].info["task"] for g in groups)
                acct = st.accounting.setdefault(f"iter-{st.iteration}-{role}", {"groups_trained": 0})
                acct["groups_trained"] += len(groups)
                acct.setdefault("steps", {})[str(st.global_step)] = [g[0].group_id for g in groups]
                self.metrics.log({**learner_metrics(m), "schedule/lambda": lam, "replay/staleness": stale,
                                  "learner/step_seconds": step_s, "learner/idle_frac": waited / (waited + step_s),
                                  "learner/groups": len(groups), "learner/version": st.versions[role],
                                  "learner/min_experience_version": oldest},
                                 iteration=st.iteration, phase=role, step=st.global_step)
                health = await asyncio.to_thread(self.write_health)
                self.metrics.log({"search/probe_failures": self.probes["failed"],
                                  "search/retriever_up": int(health["retriever"]["alive"]),
                                  "fault/restarts": sum(self.restarts.values()),
                                  "fault/learner_restarts": self.learner_restarts},
                                 iteration=st.iteration, phase="system", step=st.global_step)
                self.write_accounting()
                bar.update(1)
                bar.set_postfix(reward=f"{_mean([e.reward for e in exps]):.3f}", staleness=stale)
                if cfg.checkpoint.every and st.global_step % cfg.checkpoint.every == 0:
                    await self.checkpoint()
        except Exception as e:  # a dead learner rank (or an actor past its retries): roll back, go on
            if is_actor_failure(e):
                raise LearnerFailure(describe(e)) from e
            raise
        finally:
            bar.close()
            producer.cancel()
            try:
                await producer
            except (asyncio.CancelledError, Exception):
                pass

    async def _sample(self, role: str, n: int, producer: asyncio.Task) -> list[list[Experience]]:
        while True:
            groups = await self.replay.sample.remote(role, n, 5.0)
            if groups:
                return groups
            if producer.done():
                producer.result()  # re-raise a producer failure here
                raise RuntimeError(f"the {role} producer stopped without filling the replay store")

    async def write_task_set(self) -> None:
        """The examiner at its final version writes the student's task set; training-time candidates only
        with `examiner.task_set_fallback`; rule-built tasks top up what is left (counted)."""
        from piplay_ray.examiner import compose_task_set, save_tasks, select_tasks, task_set_path, write_tasks

        cfg, it = self.cfg, self.state.iteration
        await self.sync_pool("examiner")
        size = cfg.examiner.task_set_size
        written: list[Task] = []
        for _ in range(cfg.examiner.task_set_rounds):  # the examiner writes until the set is full (bounded)
            written += await write_tasks(self.pools["examiner"], self.sampler, size, cfg.examiner, it)
            if len(select_tasks(written, size)) >= size:
                break
        self.metrics.log({"tasks/examiner_attempts": len(written),
                          "tasks/examiner_pass_rate": _mean([t.valid for t in written])},
                         iteration=it, phase="examiner", step=self.state.global_step)
        tasks, n_fallback = compose_task_set(written, getattr(self, "examiner_candidates", []), size,
                                             cfg.examiner.task_set_fallback)
        n_examiner = len(tasks)
        if n_examiner < size:  # top up by rule; counted, never silent
            tasks += rule_tasks(self.docs, size - n_examiner, it, cfg.run.seed, cfg.eval.builtin_size)
        if not tasks:
            raise RuntimeError(f"iteration {it}: no student tasks — the examiner wrote none that passed the gate "
                               "and this corpus has no titles/descriptions for rule-built tasks")
        self.rng.shuffle(tasks)
        save_tasks(task_set_path(self.run.path, it), tasks)
        self.task_set = tasks
        self.state.accounting[f"iter-{it}-tasks"] = {"issued": len(tasks),
                                                     "examiner_written": n_examiner - n_fallback,
                                                     "training_candidates": n_fallback,
                                                     "rule_built": len(tasks) - n_examiner,
                                                     "examiner_version": self.pool_versions["examiner"]}
        self.metrics.log({"tasks/size": len(tasks), "tasks/examiner_written": n_examiner - n_fallback,
                          "tasks/training_candidates": n_fallback, "tasks/rule_built": len(tasks) - n_examiner},
                         iteration=it, phase="examiner", step=self.state.global_step)
        _say(f"iteration {it}: task set of {len(tasks)} ({n_examiner - n_fallback} by the final examiner, "
             f"{n_fallback} training candidates) -> "
             f"{task_set_path(self.run.path, it)}")

    async def evaluate(self, name: str) -> None:
        """Greedy evaluation of the student on the configured set (eval/* metrics, eval/NAME/ outputs)."""
        from piplay_ray.evaluation import evaluate_pool

        await self.sync_pool("student")
        scores = await evaluate_pool(self.pools["student"], self.cfg, self.run.path / "eval" / name)
        _say(f"evaluation ({name}): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()
                                                 if k.startswith("overall/")))
        self.metrics.log({f"eval/{k}": v for k, v in scores.items()}, iteration=self.state.iteration,
                         phase="eval", step=self.state.global_step)

    async def run_loop(self) -> None:
        cfg, st = self.cfg, self.state
        sched = cfg.schedule
        self.examiner_candidates: list[Task] = []
        if cfg.eval.every and st.global_step == 0 and st.phase == "examiner":
            await self.evaluate("before-training")
        while st.iteration < sched.iterations and not self.stopping:
            _say(f"iteration {st.iteration + 1}/{sched.iterations}, phase {st.phase}")
            if st.phase == "examiner":
                self.sampler.start_iteration(st.iteration)
                await self.phase("examiner", sched.examiner_steps)
                if self.stopping:
                    break
                st.phase, st.phase_steps = "tasks", 0
            if st.phase == "tasks":
                await self.write_task_set()
                st.phase, st.phase_steps = "student", 0
                if cfg.teacher.init == "iteration" and self.syncs:
                    await self.sync_student(st.versions["student"], "load")
                elif cfg.teacher.init == "iteration":
                    await self.teacher_client.load(st.versions["student"], self.bundles.get("student", (0, None))[1])
            if st.phase == "student":
                await self.phase("student", sched.student_steps)
                if self.stopping:
                    break
                self.close_task_set()
                if cfg.eval.every and (st.iteration + 1) % cfg.eval.every == 0:
                    await self.evaluate(f"iter-{st.iteration}")
                st.iteration, st.phase, st.phase_steps = st.iteration + 1, "examiner", 0
                self.examiner_candidates = []
        if not self.stopping:
            st.phase = "done"
        await asyncio.to_thread(self.write_health)  # restarts seen since the last step reach the accounting
        await self.checkpoint()

    async def run_resilient(self) -> None:
        """run_loop, rebuilt from the newest checkpoint after each learner failure (up to the limit)."""
        while True:
            try:
                return await self.run_loop()
            except Exception as e:  # e.g. a dead learner rank while writing the final checkpoint
                if not isinstance(e, LearnerFailure) and not is_actor_failure(e):
                    raise
                await self.rebuild_learner(str(e) if isinstance(e, LearnerFailure) else describe(e))

    def close_task_set(self) -> None:
        """End of a student phase: every task of the set is trained or dropped with a reason."""
        st, k = self.state, self.cfg.student.tasks_per_step
        first = st.versions["student"] - st.phase_steps
        scheduled = [self.task_set[(j * k + i) % len(self.task_set)].id
                     for j in range(first, st.versions["student"]) for i in range(k)]
        rec = self.ledger(st.iteration).close([t.id for t in self.task_set], scheduled)
        if rec["n_dropped"]:
            _say(f"iteration {st.iteration}: {rec['n_dropped']} of {len(self.task_set)} tasks dropped: "
                 f"{sorted(set(rec['dropped'].values()))}")
        self.metrics.log({"tasks/trained": rec["n_trained"], "tasks/dropped": rec["n_dropped"]},
                         iteration=st.iteration, phase="student", step=st.global_step)
        self.write_accounting()

    def request_stop(self, signum, _frame) -> None:
        if self.stopping:  # a second signal: stop now
            raise KeyboardInterrupt
        _say(f"signal {signum}: finishing the current step, then checkpointing and stopping")
        self.stopping = True
        self.version_changed.set()


LOSS_TERMS = {"loss", "pg_loss", "clip_frac", "policy_kl", "ref_kl", "distill_kl", "teacher_top1_mismatch",
              "entropy", "logp_mismatch_mean", "logp_mismatch_max", "is_weight", "is_truncated_frac"}


def learner_metrics(m: dict) -> dict:
    """Namespace the learner's step metrics the way the dashboard reads them."""
    out = {}
    for k, v in m.items():
        if k == "tokens_per_s":
            out["throughput/learner_tokens_per_s"] = v
        elif k != "version":
            out[("loss/" if k in LOSS_TERMS else "learner/") + k] = v
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _say(msg: str) -> None:
    print(f"[piplay] {msg}", file=sys.stderr, flush=True)


def init_ray(cfg: Config, run_dir: Path) -> None:
    if ray.is_initialized():
        return
    verbose = cfg.logging.verbose
    console.quiet_driver(verbose)
    if cfg.run.mode == "cluster":
        # a submitted job already carries its runtime env (`piplay submit`); actor output stays in Ray's logs
        ray.init(address=cfg.ray.address or os.environ.get("RAY_ADDRESS", "auto"), namespace=cfg.ray.namespace,
                 log_to_driver=verbose)
    else:
        opts = console.ray_init_options(run_dir, verbose)
        opts["runtime_env"]["env_vars"].update({k: v for k in ("PIPLAY_HOME", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE")
                                                if (v := os.environ.get(k))})
        ray.init(num_cpus=cfg.ray.num_cpus, namespace=cfg.ray.namespace, include_dashboard=False, **opts)
        if not verbose:
            _say(console.where(run_dir))


def _refuse_if_complete(cfg: Config, run_path: Path) -> None:
    """A finished run is refused from its newest checkpoint's driver state, before any actor starts."""
    from piplay_ray.learner import checkpoint

    ckpt = checkpoint.latest_checkpoint(run_path) if cfg.run.resume else None
    state = checkpoint.read_driver_state(ckpt) if ckpt is not None else {}
    if state.get("phase") == "done":
        raise SystemExit(f"piplay: the run in {run_path} is already complete ({state.get('global_step')} steps); "
                         "set run.dir to a new folder (or run.resume=false) to start another")


def train(cfg: Config) -> Path:
    """Run (or resume) the evolution loop for `cfg`; returns the run directory."""
    run = RunDir.create(cfg)
    _say(f"run directory: {run.path}")
    _refuse_if_complete(cfg, run.path)
    init_ray(cfg, run.path)
    check_cluster(cfg)  # too few CPUs/GPUs: fail now, naming them, not at a placement-group timeout
    cfg = warmup.prepare(cfg)  # a warm start named by the config: built once, then cached
    loop = EvolutionLoop(cfg, run)
    stop_dashboard = None
    if cfg.dashboard.enabled:
        from piplay_ray.dashboard.server import start_dashboard

        url, stop_dashboard = start_dashboard(run.path, cfg.dashboard.host, cfg.dashboard.port)
        _say(f"dashboard: {url}")
    resumed = loop.resume()
    if loop.state.phase == "done":
        raise SystemExit(f"piplay: the run in {run.path} is already complete ({loop.state.global_step} steps); "
                         "set run.dir to a new folder (or run.resume=false) to start another")
    if not resumed:
        for role in ROLES:
            loop.publish(role)
    previous = {s: signal.signal(s, loop.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(loop.run_resilient())
    except Exception:
        if not cfg.logging.verbose:
            _say(f"the run failed; {console.where(run.path)}")
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        loop.metrics.close()
        if stop_dashboard:
            stop_dashboard()
        if cfg.run.mode == "local":
            ray.shutdown()
    if loop.state.phase == "done":
        _say("run summary (summary.json):\n  " + "\n  ".join(summary.lines(summary.write(run.path))))
    _say(f"done: {loop.state.global_step} learner steps; run directory {run.path}")
    return run.path
