"""The step recipes: the groups of one examiner or one student learner step (no Ray, no logging).

A recipe asks rollout pools (anything with `examiner_rollouts` / `student_rollouts`), scores what comes
back and returns a :class:`StepResult`; the loop logs its metrics, records its failures and puts its groups
in the replay store. A pool that lost some shares after its retries raises `fault.RolloutFailed` carrying
the shares that succeeded: the recipe goes on with those and reports the rest as failures.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from piplay_ray.config import Config
from piplay_ray.fault import partial
from piplay_ray.method import privileged
from piplay_ray.method.diagnostics import StepDiagnostics, sample_row
from piplay_ray.method.examiner import ExaminerSampler, build_task, examiner_rewards, gate_failures
from piplay_ray.method.rewards import exact_match, f1, group_advantages
from piplay_ray.records import Experience, Task, group_id
from piplay_ray.registry import REWARDS


@dataclass
class StepResult:
    groups: list[list[Experience]]
    metrics: dict
    failures: list[tuple[str, str]] = field(default_factory=list)  # (task id, why its group was lost)
    samples: list[dict] = field(default_factory=list)  # dashboard rows of sampled trajectories
    candidates: list[Task] = field(default_factory=list)  # gate-passing examiner tasks of this step


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


async def examiner_step(step: int, cfg: Config, iteration: int, sampler: ExaminerSampler, examiner_pool,
                        student_pool, student_ready: Callable[[], Awaitable[None]]) -> StepResult:
    """One examiner step: `examiner.tasks_per_step` attempts, `examiner.attempts` student tries per task that
    passes the integrity gate (r_f > 0, Dr. Zero's rule; after `student_ready()` brought the student pool to the
    newest weights), difficulty rewards, one group; the tasks passing the full gate are the step's candidates."""
    ecfg = cfg.examiner
    docs, hops = sampler.sample(ecfg.tasks_per_step)
    trajs, reason = await partial(examiner_pool.examiner_rollouts(docs, hops, priority=step))
    keep = [i for i, t in enumerate(trajs) if t is not None]
    if not keep:
        raise RuntimeError(f"examiner step {step}: no rollout could be produced: {reason}")
    trajs, docs, hops = [trajs[i] for i in keep], [docs[i] for i in keep], [hops[i] for i in keep]
    tasks = [build_task(t, d, h, ecfg, iteration) for t, d, h in zip(trajs, docs, hops, strict=True)]
    tried = [i for i, t in enumerate(tasks) if t.format_reward > 0]  # Dr. Zero: the integrity gate, not the full one
    correct: list[int | None] = [None] * len(tasks)
    n, failures = ecfg.attempts, []
    if tried:
        await student_ready()  # r_d from the newest student, never a stale one
        attempts, reason = await partial(student_pool.student_rollouts([tasks[i].question for i in tried], n,
                                                                           priority=step))
        lost = {i for i, group in zip(tried, attempts, strict=True) if group is None}
        for i, group in zip(tried, attempts, strict=True):
            if group is not None:
                correct[i] = int(sum(exact_match(t.answer, tasks[i].answer) for t in group))
        if lost:  # no difficulty signal without attempts: those tasks leave this step's group, reported
            failures = [(tasks[i].id, reason) for i in sorted(lost)]
            kept = [i for i in range(len(tasks)) if i not in lost]
            trajs, tasks = [trajs[i] for i in kept], [tasks[i] for i in kept]
            correct = [correct[i] for i in kept]
    valid = [i for i, t in enumerate(tasks) if t.valid]  # the full gate: what may enter the student's task set
    rewards, advantages = examiner_rewards(tasks, correct, n, ecfg.format_weight,
                                           std_normalize=cfg.learner.loss.std_normalize)
    by_hop = {h: [t.valid for t in tasks if t.hops == h] for h in range(1, len(ecfg.hop_weights) + 1)}
    metrics = {
        "examiner/difficulty_reward": mean(rewards),
        "examiner/format_reward": mean([t.format_reward for t in tasks]),
        "examiner/gate_pass_rate": len(valid) / len(tasks),
        "examiner/attempted_rate": mean([k is not None for k in correct]),  # tasks the student tried (integrity)
        "examiner/attempts": len(tasks),
        **{f"examiner/gate_fail/{k}": v for k, v in gate_failures(tasks).items()},
        **{f"examiner/gate_pass_rate_h{h}": mean(v) for h, v in by_hop.items() if v},
        "examiner/solve_rate_hist": [k / n for k in correct if k is not None],
        **_rollout_metrics(trajs),
    }
    group = [Experience(group_id=group_id("examiner", step), role="examiner", prompt_ids=t.prompt_ids,
                        response_ids=t.response_ids, mask=t.mask, logprobs=t.logprobs, reward=r,
                        advantage=a, version=t.version, info={"task": task.id, "hops": task.hops},
                        versions=t.versions or None)
             for t, task, r, a in zip(trajs, tasks, rewards, advantages, strict=True)]
    return StepResult([group], metrics, failures, candidates=[tasks[i] for i in valid])


def step_tasks(task_set: Sequence[Task], step: int, k: int) -> list[Task]:
    """The `k` tasks of student learner step `step`: the task set in order, cycled."""
    return [task_set[(step * k + i) % len(task_set)] for i in range(k)]


async def student_step(step: int, cfg: Config, task_set: Sequence[Task], student_pool, teacher,
                       tokenizer) -> StepResult:
    """One student step: `student.group_size` rollouts per task, the outcome reward (`student.reward`),
    group advantages, and the teacher's top-K over the student's tokens with the privileged context
    (`teacher.privileged`); one group per task. `teacher` needs `score(trajs, tasks, with_stats=True)`; unused
    with an arm that does not teach (`none`)."""
    g, tcfg = cfg.student.group_size, cfg.teacher
    tasks = step_tasks(task_set, step, cfg.student.tasks_per_step)
    start = time.monotonic()
    groups, reason = await partial(student_pool.student_rollouts([t.question for t in tasks], g, priority=step))
    seconds = {"rollout/generate_seconds": time.monotonic() - start}  # with the scoring, most of a round
    failures = [(t.id, reason) for t, group in zip(tasks, groups, strict=True) if group is None]
    if len(failures) == len(tasks):
        raise RuntimeError(f"student step {step}: no group could be produced: {reason}")
    slot, tasks, groups = zip(*[(i, t, gr) for i, (t, gr) in enumerate(zip(tasks, groups, strict=True))
                                if gr is not None], strict=True)  # slot: a task used twice is two groups
    flat = [(task, traj) for task, group in zip(tasks, groups, strict=True) for traj in group]
    reward = REWARDS.load(cfg.student.reward)
    rewards = [float(reward(traj.answer, task.answer)) for task, traj in flat]
    advantages = group_advantages(rewards, g, cfg.learner.loss.std_normalize)
    if privileged.arm(tcfg.privileged).teaches:
        start = time.monotonic()
        scores, tstats = await teacher.score([tr for _, tr in flat], [t for t, _ in flat], with_stats=True)
        seconds["teacher/score_seconds"] = time.monotonic() - start
    else:  # an arm with no teacher: the learner gets no teacher fields
        scores, tstats = [(None, None, None)] * len(flat), {}
    texts = {t.id: privileged.render(t, tcfg.privileged, tcfg.doc_token_budget, seed=cfg.run.seed) for t in tasks}
    diag, exps, rows = StepDiagnostics(), [], []
    for i, ((task, traj), r, a, (t_ids, t_lps, t_tail)) in enumerate(
            zip(flat, rewards, advantages, scores, strict=True)):
        exps.append(Experience(group_id=group_id("student", step, slot[i // g], task.id), role="student",
                               prompt_ids=traj.prompt_ids,
                               response_ids=traj.response_ids, mask=traj.mask, logprobs=traj.logprobs,
                               reward=r, advantage=a, version=traj.version, versions=traj.versions or None,
                               teacher_ids=t_ids,
                               teacher_logprobs=t_lps, teacher_tail=t_tail, info={"task": task.id}))
        tokens = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(traj.response_ids)]
        diag.add(traj, tokens, task.answer, task.question, texts[task.id], t_ids, t_lps, t_tail)
        if i < cfg.logging.sample_trajectories:
            rows.append(sample_row(task, traj, r, tokens, t_ids, t_lps, t_tail))
    trajs = [tr for _, tr in flat]
    metrics = {
        "student/reward": mean(rewards), "student/em": mean([exact_match(tr.answer, t.answer) for t, tr in flat]),
        "student/answer_rate": mean([t.finish_reason == "answer" for t in trajs]),
        "student/groups_with_signal": mean([max(rewards[i : i + g]) > min(rewards[i : i + g])
                                            for i in range(0, len(rewards), g)]),
        "student/f1": mean([f1(tr.answer, t.answer) for t, tr in flat]),
        **_rollout_metrics(trajs),
        "rollout/answer_len": mean([len((t.answer or "").split()) for t in trajs]),
        "rollout/tokens": sum(sum(t.mask) for t in trajs),
        **diag.metrics(), **{f"teacher/{k}": v for k, v in tstats.items()}, **seconds,
    }
    return StepResult([exps[i : i + g] for i in range(0, len(exps), g)], metrics, failures, rows)


def _rollout_metrics(trajs) -> dict:
    """Per role: searches, failed tool calls, and the share of rollouts cut off by a token limit (a turn's or
    the whole response's): they end without an action and earn nothing."""
    return {"rollout/searches_per_traj": mean([t.num_searches for t in trajs]),
            "rollout/ended_by_length": mean([t.finish_reason == "length" for t in trajs]),
            "search/tool_failures": sum(not h.ok for t in trajs for h in t.hops)}
