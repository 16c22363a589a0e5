"""Driver method fidelity with fake pools (no Ray): the task set is written by the final examiner, and the
student that answers the examiner's tasks (r_d) carries the newest student weights."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from piplay_ray import driver
from piplay_ray.config import load_config
from piplay_ray.examiner import ExaminerSampler, task_set_path
from piplay_ray.records import Doc, Hop, Task, Trajectory

DOCS = [Doc(str(i), f"Town{i}", f"Town{i} lies on the river R{i}.") for i in range(40)]


class FakePool:
    """Rollouts stamped with the weights version the pool holds when asked; records each call's version."""

    def __init__(self, invalid_every: int = 0):
        self.version, self.calls, self.invalid_every, self.n = 0, [], invalid_every, 0

    async def aupdate_weights(self, version, bundle):
        self.version = version

    async def examiner_rollouts(self, docs, hops):
        self.calls.append(("examiner", self.version))
        out = []
        for d in docs:
            self.n += 1
            bad = self.invalid_every and self.n % self.invalid_every == 0
            answer = "not in the document" if bad else f"R{d.id}"
            out.append(Trajectory(prompt_ids=[1], response_ids=[2, 3], mask=[1, 1], logprobs=[-1.0, -1.0],
                                  answer=answer, finish_reason="question", turns=1, version=self.version,
                                  role="examiner", text="ok</think><question>q</question>",
                                  extra={"question": f"Which river flows through {d.title}?"}))
        return out

    async def student_rollouts(self, questions, n):
        self.calls.append(("student", self.version))
        return [[Trajectory(prompt_ids=[1], response_ids=[2], mask=[1], logprobs=[-1.0], answer="no idea",
                            finish_reason="answer", version=self.version) for _ in range(n)] for _ in questions]


class Sink:
    def __init__(self):
        self.rows = []

    def log(self, values, **kw):
        self.rows.append(values)


def _loop(tmp_path, *overrides):
    cfg = load_config("configs/tiny.yaml", ["examiner.hop_weights=[1]", *overrides])
    loop = driver.EvolutionLoop.__new__(driver.EvolutionLoop)
    loop.cfg, loop.state, loop.metrics, loop.rng = cfg, driver.LoopState(), Sink(), random.Random(0)
    loop.sampler = ExaminerSampler(DOCS, cfg.examiner.hop_weights, seed=0)
    loop.pools = {"examiner": FakePool(), "student": FakePool()}
    loop.pool_versions = {"examiner": 0, "student": 0}
    loop.bundles, loop.examiner_candidates, loop.last_rollout_error = {}, [], ""
    loop.syncs = {}  # object-store transport: no collective groups
    loop.run = type("Run", (), {"path": tmp_path})()
    return loop


def test_examiner_step_asks_the_newest_student(tmp_path):
    loop = _loop(tmp_path)
    loop.state.versions = {"examiner": 1, "student": 3}
    loop.bundles = {"examiner": (1, object()), "student": (3, object())}
    loop.pool_versions = {"examiner": 1, "student": 1}  # the student pool still holds version 1
    loop.pools["examiner"].version = loop.pools["student"].version = 1
    (group,) = asyncio.run(loop.examiner_groups(step=1))
    assert loop.pools["student"].calls == [("student", 3)]  # attempts came from the newest student
    assert len(group) == loop.cfg.examiner.tasks_per_step and loop.pool_versions["student"] == 3


@pytest.mark.parametrize("fallback", [False, True])
def test_task_set_comes_from_the_final_examiner(tmp_path, monkeypatch, fallback):
    loop = _loop(tmp_path, f"examiner.task_set_fallback={str(fallback).lower()}", "examiner.task_set_size=4",
                 "examiner.task_set_rounds=1")
    final = 5
    loop.state.versions["examiner"] = final
    loop.bundles = {"examiner": (final, object())}
    loop.pool_versions["examiner"] = 2  # the pool lags until the task set is written
    loop.pools["examiner"] = FakePool(invalid_every=4)  # every 4th attempt fails the gate: 3 of 4 valid
    candidate = Task(id="cand", question="Which river flows through Old Town?", answer="R0", hops=1,
                     source=DOCS[0], flags={"ok": True}, version=1)
    loop.examiner_candidates = [candidate]
    rule = Task(id="rule", question="Rule question?", answer="x", hops=1, source=DOCS[1],
                qcp=[Hop("q", [DOCS[1]])], flags={"rule_built": True})
    monkeypatch.setattr(driver, "rule_tasks", lambda docs, n, *a: [rule][:n])
    loop.docs = DOCS
    asyncio.run(loop.write_task_set())
    records = [json.loads(line) for line in open(task_set_path(tmp_path, 0))]
    assert len(records) == 4
    by_source = {r["id"]: r for r in records}
    written = [r for r in records if r["id"] not in ("cand", "rule")]
    assert len(written) == 3 and all(r["version"] == final for r in written)  # the final examiner wrote them
    assert loop.pools["examiner"].calls == [("examiner", final)]
    assert ("cand" in by_source) is fallback and ("rule" in by_source) is not fallback
    acct = loop.state.accounting["iter-0-tasks"]
    assert acct["examiner_written"] == 3 and acct["examiner_version"] == final
    assert acct["training_candidates"] == int(fallback) and acct["rule_built"] == int(not fallback)


def test_final_examiner_writes_in_rounds_until_the_set_is_full(tmp_path):
    loop = _loop(tmp_path, "examiner.task_set_size=4", "examiner.task_set_rounds=3")
    loop.state.versions["examiner"] = 5
    loop.bundles = {"examiner": (5, object())}
    loop.pools["examiner"] = FakePool(invalid_every=4)  # 3 of every 4 attempts pass: a second round fills it
    loop.examiner_candidates, loop.docs = [], DOCS
    asyncio.run(loop.write_task_set())
    records = [json.loads(line) for line in open(task_set_path(tmp_path, 0))]
    assert len(records) == 4 and all(r["version"] == 5 for r in records)
    assert loop.state.accounting["iter-0-tasks"]["rule_built"] == 0
    assert loop.metrics.rows[-2]["tasks/examiner_attempts"] == 8  # two rounds of 4, then full
