"""The step recipes on fake pools and a fake teacher (no Ray): what one examiner or student learner step
hands the learner, with rewards and advantages recomputed here from the paper's formulas."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from piplay_ray.config import load_config
from piplay_ray.evolution.steps import examiner_step, step_tasks, student_step
from piplay_ray.fault import RolloutFailed
from piplay_ray.method.examiner import ExaminerSampler
from piplay_ray.records import Doc, Hop, Task, Trajectory

DOCS = [Doc(str(i), f"Town{i}", f"Town{i} lies on the river R{i}.") for i in range(40)]


def cfg_with(*overrides):
    return load_config("configs/tiny.yaml", ["examiner.hop_weights=[1]", *overrides])


def traj(answer, version=0, role="student", response=(2, 3), **kw) -> Trajectory:
    return Trajectory(prompt_ids=[1], response_ids=list(response), mask=[1] * len(response),
                      logprobs=[-1.0] * len(response), answer=answer, finish_reason=kw.pop("finish", "answer"),
                      turns=1, version=version, role=role, **kw)


class ExaminerPool:
    """Asks which river flows through the document's town; every `invalid_every`-th answer is not in the
    document (that task fails the full gate, not the integrity gate); every `leak_every`-th question gives its
    answer away (it fails the integrity gate)."""

    def __init__(self, invalid_every=0, version=4, leak_every=0):
        self.invalid_every, self.leak_every, self.version, self.n = invalid_every, leak_every, version, 0
        self.priorities: list[int] = []

    async def examiner_rollouts(self, docs, hops, priority=0):
        self.priorities.append(priority)
        out = []
        for d in docs:
            self.n += 1
            bad = self.invalid_every and self.n % self.invalid_every == 0
            leak = f" (R{d.id})" if self.leak_every and self.n % self.leak_every == 0 else ""
            out.append(traj("nowhere at all" if bad else f"R{d.id}", self.version, "examiner", finish="question",
                            text="ok</think><question>q</question>",
                            extra={"question": f"Which river flows through {d.title}?{leak}"}))
        return out


class StudentPool:
    """`right(question)` of the `n` attempts are correct; questions in `lose` are lost after retries."""

    def __init__(self, right, lose=(), version=3):
        self.right, self.lose, self.version = right, set(lose), version
        self.asked: list[list[str]] = []
        self.priorities: list[int] = []
        self.ready = False

    async def student_rollouts(self, questions, n, priority=0):
        assert self.ready, "attempts asked before the student pool was brought to the newest weights"
        self.asked.append(list(questions))
        self.priorities.append(priority)
        out = []
        for q in questions:
            gold = "R" + q.removeprefix("Which river flows through Town").rstrip("?")
            k = self.right(q)
            out.append(None if q in self.lose else
                       [traj(gold if j < k else "no idea", self.version) for j in range(n)])
        if any(g is None for g in out):
            raise RolloutFailed("1 of 2 shares lost after 3 retries: ActorDiedError", out)
        return out


def examiner_run(cfg, student, examiner=None):
    async def ready():
        student.ready = True

    sampler = ExaminerSampler(DOCS, cfg.examiner.hop_weights, seed=0)
    return asyncio.run(examiner_step(7, cfg, 0, sampler, examiner or ExaminerPool(invalid_every=4), student, ready))


def test_examiner_step_rewards_difficulty_within_hop_groups():
    cfg = cfg_with("examiner.tasks_per_step=4", "examiner.attempts=4", "examiner.format_weight=0")
    k_of = lambda q: int(q.removeprefix("Which river flows through Town").rstrip("?")) % 5  # noqa: E731
    student, examiner = StudentPool(lambda q: min(k_of(q), 4)), ExaminerPool(invalid_every=4)
    res = examiner_run(cfg, student, examiner)
    assert examiner.priorities == student.priorities == [7]  # the step's turns ordered by its index

    (group,) = res.groups
    assert len(group) == 4 and {e.group_id for e in group} == {"examiner-7"} and not res.failures
    assert all(e.role == "examiner" and e.version == 4 for e in group)
    # Dr. Zero: every task through the integrity gate is attempted, the one whose answer is not in its documents
    # too (its r_d counts); only the 3 through the full gate are candidates for the student's task set
    (asked,) = student.asked
    assert len(asked) == 4 and len(res.candidates) == 3 and set(t.question for t in res.candidates) < set(asked)
    n = 4  # r_d = 1(0 < k < n)(n - k)/(n - 1) (w_f = 0)
    honest = {t.question for t in res.candidates}  # the other one's answer ("nowhere at all") no attempt gives
    hard = {q: (n - k) / (n - 1) if 0 < (k := min(k_of(q), 4) if q in honest else 0) < n else 0.0 for q in asked}
    rewards = [e.reward for e in group]
    questions = {e.info["task"]: q for e, q in zip(group, asked, strict=True)}
    assert rewards == pytest.approx([hard[questions[e.info["task"]]] for e in group])
    mu, sd = statistics.mean(rewards), statistics.stdev(rewards)
    want_adv = [0.0] * 4 if sd == 0 else [(r - mu) / (sd + 1e-6) for r in rewards]
    assert [e.advantage for e in group] == pytest.approx(want_adv, abs=1e-5)
    assert res.metrics["examiner/gate_pass_rate"] == 0.75
    assert res.metrics["examiner/difficulty_reward"] == pytest.approx(statistics.mean(rewards))


def test_a_task_failing_the_integrity_gate_gets_no_attempts_and_no_reward():
    cfg = cfg_with("examiner.tasks_per_step=4", "examiner.attempts=2", "examiner.format_weight=0.5")
    student = StudentPool(lambda q: 1)  # 1 of 2 right: r_d = (2 - 1) / (2 - 1) = 1 for every attempted task
    res = examiner_run(cfg, student, ExaminerPool(leak_every=2))
    (asked,) = student.asked
    (group,) = res.groups
    assert len(asked) == 2 and all("(R" not in q for q in asked)  # the 2 leaking questions were not tried
    # r_f (Dr. Zero) of an honest task: (1 + think share 1 + tool 1 (1 hop) + answer 1 (in its source)) / 4 = 1
    assert sorted(e.reward for e in group) == pytest.approx([0.0, 0.0, 1 + 0.5 * 1.0, 1 + 0.5 * 1.0])
    assert res.metrics["examiner/attempted_rate"] == 0.5 and res.metrics["examiner/gate_pass_rate"] == 0.5


def test_examiner_step_reports_why_tasks_fail_the_gate():
    res = examiner_run(cfg_with("examiner.tasks_per_step=8"), StudentPool(right=lambda q: 1))
    fails = {k.removeprefix("examiner/gate_fail/"): v for k, v in res.metrics.items() if "gate_fail" in k}
    assert fails["answer_supported"] == 0.25 and fails["has_question"] == 0.0  # every 4th answer is made up
    assert res.metrics["examiner/gate_pass_rate"] == 1 - 0.25


def test_examiner_step_drops_tasks_whose_attempts_were_lost():
    cfg = cfg_with("examiner.tasks_per_step=4", "examiner.attempts=2")
    sampler = ExaminerSampler(DOCS, [1], seed=0)
    docs, _ = sampler.sample(4)
    lost = f"Which river flows through {docs[1].title}?"
    res = examiner_run(cfg, StudentPool(lambda q: 1, lose={lost}), ExaminerPool())
    (group,) = res.groups
    assert len(group) == 3 and len(res.failures) == 1
    task_id, reason = res.failures[0]
    assert task_id not in {e.info["task"] for e in group} and "ActorDiedError" in reason
    assert all(t.question != lost for t in res.candidates)


def test_examiner_step_without_any_rollout_raises():
    class Dead:
        async def examiner_rollouts(self, docs, hops, priority=0):
            raise RolloutFailed("every share lost", [None] * len(docs))

    with pytest.raises(RuntimeError, match="no rollout could be produced: every share lost"):
        examiner_run(cfg_with(), StudentPool(lambda q: 0), Dead())


TASKS = [Task(id=f"t{i}", question=f"Which river flows through Town{i}?", answer=f"R{i}", hops=1, source=DOCS[i],
              qcp=[Hop(f"Town{i}", [DOCS[i]])]) for i in range(3)]


class Teacher:
    """Top-2 over each response token: the sampled token first at logprob -0.5, a tail of -3."""

    def __init__(self):
        self.calls = 0

    async def score(self, trajs, tasks, with_stats=False):
        self.calls += 1
        rows = [([[t, 99] for t in tr.response_ids], [[-0.5, -2.0] for _ in tr.response_ids],
                 [-3.0] * len(tr.response_ids)) for tr in trajs]
        return rows, {"context_tokens": 12.0}


class Tokenizer:
    def convert_ids_to_tokens(self, ids):
        return [f"w{i}" for i in ids]

    def convert_tokens_to_string(self, tokens):
        return " ".join(tokens)


class Pool:
    """Student rollouts where the first `right` of the `n` answers to each question are correct."""

    def __init__(self, right=2, lose=()):
        self.right, self.lose, self.asked, self.priorities = right, set(lose), [], []

    async def student_rollouts(self, questions, n, priority=0):
        self.asked.append(list(questions))
        self.priorities.append(priority)
        gold = {t.question: t.answer for t in TASKS}
        out = [None if q in self.lose else [traj(gold[q] if j < self.right else "x", 5) for j in range(n)]
               for q in questions]
        if any(g is None for g in out):
            raise RolloutFailed("lost after retries", out)
        return out


def test_student_step_cycles_the_task_set_and_carries_the_teacher():
    cfg = cfg_with("student.tasks_per_step=2", "student.group_size=4", "logging.sample_trajectories=3")
    pool, teacher = Pool(right=2), Teacher()
    res = asyncio.run(student_step(1, cfg, TASKS, pool, teacher, Tokenizer()))
    assert [t.id for t in step_tasks(TASKS, 1, 2)] == ["t2", "t0"]
    assert pool.asked == [[TASKS[2].question, TASKS[0].question]] and teacher.calls == 1
    assert pool.priorities == [1]  # the engines serve an older step's turns first (SamplingSpec.priority)
    assert [[e.group_id for e in g][0] for g in res.groups] == ["student-1-0-t2", "student-1-1-t0"]
    for g in res.groups:
        assert [e.reward for e in g] == [1.0, 1.0, 0.0, 0.0]
        sd = statistics.stdev([1, 1, 0, 0])
        assert [e.advantage for e in g] == pytest.approx([0.5 / (sd + 1e-6)] * 2 + [-0.5 / (sd + 1e-6)] * 2)
        assert all(e.teacher_ids == [[2, 99], [3, 99]] and e.teacher_tail == [-3.0, -3.0] and e.version == 5
                   for e in g)
    assert res.metrics["student/reward"] == 0.5 and res.metrics["student/groups_with_signal"] == 1.0
    assert res.metrics["teacher/context_tokens"] == 12.0
    assert res.metrics["diag/teacher_top1_agreement"] == 1.0
    assert len(res.samples) == 3 and res.samples[0]["tokens"] == ["w2", "w3"]
    assert res.samples[0]["token_kl"] == [-0.5, -0.5]  # log p_student(-1) - log p_teacher(-0.5)
    assert not res.failures


def test_student_step_times_its_rollouts_and_its_scoring_apart():
    class SlowPool(Pool):
        async def student_rollouts(self, questions, n, priority=0):
            await asyncio.sleep(0.2)
            return await super().student_rollouts(questions, n, priority)

    class SlowTeacher(Teacher):
        async def score(self, trajs, tasks, with_stats=False):
            await asyncio.sleep(0.4)
            return await super().score(trajs, tasks, with_stats)

    cfg = cfg_with("student.tasks_per_step=1", "student.group_size=2")
    m = asyncio.run(student_step(0, cfg, TASKS, SlowPool(), SlowTeacher(), Tokenizer())).metrics
    assert 0.2 <= m["rollout/generate_seconds"] < 0.4 <= m["teacher/score_seconds"] < 0.6
    cfg = cfg_with("student.tasks_per_step=1", "student.group_size=2", "teacher.privileged=none")
    assert "teacher/score_seconds" not in asyncio.run(student_step(0, cfg, TASKS, Pool(), Teacher(), Tokenizer())).metrics


def test_a_task_used_twice_in_a_step_makes_two_groups():
    cfg = cfg_with(f"student.tasks_per_step={len(TASKS) + 1}", "student.group_size=2", "teacher.privileged=none")
    res = asyncio.run(student_step(0, cfg, TASKS, Pool(right=1), Teacher(), Tokenizer()))
    ids = [g[0].group_id for g in res.groups]
    assert len(ids) == len(TASKS) + 1 == len(set(ids)) and ids[0].endswith("-t0") and ids[-1].endswith("-t0")


def test_student_step_reports_a_lost_group_and_trains_the_rest():
    cfg = cfg_with("student.tasks_per_step=2", "student.group_size=2", "teacher.privileged=none")
    teacher = Teacher()
    res = asyncio.run(student_step(0, cfg, TASKS, Pool(right=1, lose={TASKS[1].question}), teacher, Tokenizer()))
    assert res.failures == [("t1", "lost after retries")]
    (group,) = res.groups
    assert [e.info["task"] for e in group] == ["t0", "t0"] and teacher.calls == 0  # privileged=none: no teacher
    assert all(e.teacher_ids is None for e in group)
    with pytest.raises(RuntimeError, match="no group could be produced"):
        asyncio.run(student_step(0, cfg, TASKS, Pool(lose={t.question for t in TASKS}), teacher, Tokenizer()))


def test_examiner_attempts_lost_after_retries_are_no_attempts():
    """Writing the task set: the pool lost some attempts (RolloutFailed); the rest become tasks, no crash."""
    from piplay_ray.method.examiner import write_tasks

    class Losing(ExaminerPool):
        async def examiner_rollouts(self, docs, hops, priority=0):
            out = await super().examiner_rollouts(docs, hops, priority)
            raise RolloutFailed("worker died", [None if i % 2 else t for i, t in enumerate(out)])

    cfg = cfg_with()
    tasks = asyncio.run(write_tasks(Losing(), ExaminerSampler(DOCS, [1], seed=0), 6, cfg.examiner))
    assert len(tasks) == 3 and all(t.valid for t in tasks)
