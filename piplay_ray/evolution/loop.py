"""The evolution loop (paper Algorithm 1) as a streaming actor-learner program.

For each iteration: an examiner phase (W learner steps on the difficulty reward), the examiner writes the
student's task set, then a student phase (W learner steps on exact match plus λ·distillation from the
QCP-conditioned EMA teacher, whose EMA follows each step). Within a phase a producer makes the groups of
learner step j while the learner trains on step j − 1, as far ahead as the staleness rule allows
(`replay.within_bound`; `replay.max_staleness = 0` makes the loop synchronous).

The loop's actors come in through the constructor (`evolution.actors.start_actors` in a run, fakes in
tests). A phase's producer and learner steps are in `phase.py`, the step recipes in `steps.py`, the policy
handles in `policy.py`, the run's records and recovery in `book.py` (docs/architecture.md). Faults (see
:mod:`piplay_ray.fault`): pools re-issue lost work, the teacher client restores the EMA of a restarted
teacher, a failed learner group is rebuilt from the newest checkpoint, and a retriever outage only fails tool
calls.
"""

from __future__ import annotations

import asyncio
import random

from piplay_ray import assets
from piplay_ray.evolution.book import RunBook
from piplay_ray.evolution.evaluation import evaluate_pool
from piplay_ray.evolution.phase import LearnerFailure, Phase
from piplay_ray.evolution.policy import Policy, StudentPolicy
from piplay_ray.evolution.steps import examiner_step, step_tasks, student_step
from piplay_ray.evolution.taskset import write_task_set
from piplay_ray.fault import describe, is_actor_failure
from piplay_ray.method import privileged
from piplay_ray.method.examiner import ExaminerSampler, gate_failures, load_tasks, save_tasks
from piplay_ray.monitor.console import say, shown
from piplay_ray.monitor.metrics import MetricsSink
from piplay_ray.records import Task, to_dict
from piplay_ray.retrieval.corpus import Corpus
from piplay_ray.rundir import attempts_path, eval_dir, task_set_path


class EvolutionLoop:
    def __init__(self, cfg, run, actors, *, metrics=None, docs=None, tokenizer=None):
        """`actors`: evolution.actors.Actors. `metrics`, `docs` (the corpus) and `tokenizer` (the student's)
        default to the run's MetricsSink and the config's corpus and student model."""
        from transformers import AutoTokenizer  # heavy: only when no tokenizer is handed in

        self.cfg, self.run, self.actors = cfg, run, actors
        self.docs = docs if docs is not None else Corpus(assets.resolve_corpus(cfg.search.corpus))  # memory-mapped
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(assets.resolve_model(cfg.model.path_for("student")))
        self.metrics = metrics or MetricsSink(run.path, cfg.logging, config=cfg.model_dump(mode="json"))
        self.book = RunBook(cfg, run, self.metrics, actors, self.docs)
        state, log, syncs = (lambda: self.book.state), self.book.log, actors.syncs or {}
        teach = privileged.arm(cfg.teacher.privileged).teaches  # an arm that does not teach: nothing reads the teacher
        self.policies = {
            "examiner": Policy("examiner", actors.pools["examiner"], actors.learner, state, log, syncs.get("examiner")),
            "student": StudentPolicy(actors.pools["student"], actors.learner, state, log, actors.teacher_client,
                                     teach, cfg.schedule.lam, syncs.get("student"))}
        self.book.policies = self.policies
        self.sampler = ExaminerSampler(self.docs, cfg.examiner.hop_weights, seed=cfg.run.seed)
        self.rng = random.Random(cfg.run.seed)
        self.stopping = False

    @property
    def state(self):
        return self.book.state

    # ------------------------------------------------------------------------------------------ Algorithm 1

    async def run_loop(self) -> None:
        cfg, st = self.cfg, self.state
        sched = cfg.schedule
        if (cfg.eval.before_training and (cfg.eval.every or cfg.eval.every_student_steps)
                and st.global_step == 0 and st.phase == "examiner"):
            await self.evaluate("before-training")
        while st.iteration < sched.iterations and not self.stopping:
            say(f"iteration {st.iteration + 1}/{sched.iterations}, phase {st.phase}")
            if st.phase == "examiner":  # examiner: W steps on the difficulty reward
                if cfg.rollout.sleep_when_idle:
                    await self.actors.sleep("teacher")
                self.sampler.start_iteration(st.iteration)
                await Phase(self, "examiner").run(sched.examiner_steps)
                if self.stopping:
                    break
                st.phase, st.phase_steps = "tasks", 0
            if st.phase == "tasks":  # the final examiner writes the student's task set
                await self.write_task_set()
                if cfg.rollout.sleep_when_idle:
                    await self.actors.sleep("examiner")
                st.phase, st.phase_steps = "student", 0
                await self.policies["student"].start_phase(cfg.teacher.init)
            if st.phase == "student":  # student: W steps on EM + λ·KL to the EMA teacher
                await Phase(self, "student", eval_every=cfg.eval.every_student_steps).run(sched.student_steps)
                if self.stopping:
                    break
                self.close_task_set()
                if cfg.eval.every and (st.iteration + 1) % cfg.eval.every == 0:
                    await self.evaluate(f"iter-{st.iteration}")
                st.iteration, st.phase, st.phase_steps, st.candidates = st.iteration + 1, "examiner", 0, {}
        if not self.stopping:
            st.phase = "done"
        await asyncio.to_thread(self.book.write_health)  # restarts seen since the last step reach the accounting
        await self.book.checkpoint()

    async def run_resilient(self) -> None:
        """run_loop, back from the newest checkpoint after each failure the calls could not retry (a learner
        rank, the replay store; up to their limits)."""
        while True:
            try:
                return await self.run_loop()
            except Exception as e:  # e.g. a dead learner rank while writing the final checkpoint
                if not isinstance(e, LearnerFailure) and not is_actor_failure(e):
                    raise
                await self.book.recover(str(e) if isinstance(e, LearnerFailure) else describe(e))

    def publish_all(self) -> None:
        for policy in self.policies.values():
            policy.publish()

    async def step_groups(self, role: str, step: int) -> list:
        """The groups of learner step `step` from the role's recipe; its metrics logged, failures recorded."""
        cfg, pools = self.cfg, self.actors.pools
        if role == "examiner":
            res = await examiner_step(step, cfg, self.state.iteration, self.sampler, pools["examiner"],
                                      pools["student"], self.policies["student"].sync_pool)
            if cfg.examiner.task_set_fallback:  # kept (checkpointed) only when the task set may fall back on them
                self.state.candidates[str(step)] = [to_dict(t) for t in res.candidates]  # a re-made step replaces
        else:
            res = await student_step(step, cfg, self.book.task_set, pools["student"], self.actors.teacher_client,
                                     self.tokenizer)
            if res.samples:
                self.metrics.write_samples("student", step, res.samples)
        self.book.record_failures(role, step, res.failures)
        self.book.log(res.metrics, role)
        return res.groups

    # ------------------------------------------------------------------------------------------ between phases

    async def write_task_set(self) -> None:
        """The examiner at its final version writes the student's task set (saved, logged, accounted for)."""
        it, examiner = self.state.iteration, self.policies["examiner"]
        shared = self.cfg.examiner.task_sets_from
        if shared:  # an experiment's arm: the task set another run's examiner wrote
            self.book.task_set = load_tasks(task_set_path(shared, it))
            save_tasks(self.run.task_set(it), self.book.task_set)
            self.state.accounting[f"iter-{it}-tasks"] = {"issued": len(self.book.task_set), "from": str(shared)}
            say(f"iteration {it}: task set of {len(self.book.task_set)} from {shown(task_set_path(shared, it))}")
            return
        await examiner.sync_pool()
        found = self.state.candidates  # examiner step -> its gate-passing tasks, oldest step first
        candidates = [Task.from_dict(t) for step in sorted(found, key=int) for t in found[step]]
        ts = await write_task_set(self.cfg, it, self.actors.pools["examiner"], self.sampler, candidates, self.docs,
                                  self.rng)
        self.book.log({"tasks/examiner_attempts": len(ts.attempts), "tasks/examiner_pass_rate": ts.pass_rate,
                       **{f"tasks/gate_fail/{k}": v for k, v in gate_failures(ts.attempts).items()}}, "examiner")
        path = save_tasks(self.run.task_set(it), ts.tasks)
        save_tasks(attempts_path(self.run.path, it), ts.attempts)  # every attempt with its gate flags, to read
        self.book.task_set = ts.tasks
        self.state.accounting[f"iter-{it}-tasks"] = {
            "issued": len(ts.tasks), "examiner_written": ts.examiner_written,
            "training_candidates": ts.training_candidates, "rule_built": ts.rule_built,
            "examiner_version": examiner.pool_version}
        self.book.log({"tasks/size": len(ts.tasks), "tasks/examiner_written": ts.examiner_written,
                       "tasks/training_candidates": ts.training_candidates, "tasks/rule_built": ts.rule_built},
                      "examiner")
        say(f"iteration {it}: task set of {len(ts.tasks)} ({ts.examiner_written} by the final examiner, "
            f"{ts.training_candidates} training candidates) -> {shown(path)}")

    def close_task_set(self) -> None:
        """End of a student phase: every task of the set is trained or dropped with a reason."""
        st, tasks, k = self.state, self.book.task_set, self.cfg.student.tasks_per_step
        version = self.policies["student"].version
        scheduled = [t.id for j in range(version - st.phase_steps, version) for t in step_tasks(tasks, j, k)]
        rec = self.book.ledger().close([t.id for t in tasks], scheduled)
        if rec["n_dropped"]:
            say(f"iteration {st.iteration}: {rec['n_dropped']} of {len(tasks)} tasks dropped: "
                f"{sorted(set(rec['dropped'].values()))}")
        self.book.log({"tasks/trained": rec["n_trained"], "tasks/dropped": rec["n_dropped"]}, "student")
        self.book.write_accounting()

    async def evaluate(self, name: str) -> None:
        """Greedy evaluation of the student on the configured set (eval/* metrics, eval/NAME/ outputs)."""
        await self.policies["student"].sync_pool()
        step = self.policies["student"].version
        scores = await evaluate_pool(self.actors.pools["student"], self.cfg, eval_dir(self.run.path, name),
                                     {"student_step": step})
        say(f"evaluation ({name}): " + ", ".join(f"{k} {v:.3f} (n={scores[k[:-2] + 'n']:.0f})" for k, v in scores.items()
                                                if k.endswith("/em") and k.count("/") == 1))
        self.book.log({f"eval/{k}": v for k, v in scores.items()} | {"student_step": step}, "eval")

    def request_stop(self, signum, _frame) -> None:
        if self.stopping:  # a second signal: stop now
            raise KeyboardInterrupt
        say(f"signal {signum}: finishing the current step, then checkpointing and stopping")
        self.stopping = True
        for policy in self.policies.values():
            policy.changed.set()
