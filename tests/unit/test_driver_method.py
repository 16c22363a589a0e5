"""Driver method fidelity with fake pools (no Ray): the task set is written by the final examiner, and the
student that answers the examiner's tasks (r_d) carries the newest student weights."""

from __future__ import annotations

import asyncio
import json

import pytest

from piplay_ray.config import load_config
from piplay_ray.evolution import taskset
from piplay_ray.evolution.actors import Actors
from piplay_ray.evolution.loop import EvolutionLoop
from piplay_ray.records import Doc, Hop, Task, Trajectory, to_dict
from piplay_ray.rundir import RunDir, attempts_path, task_set_path

DOCS = [Doc(str(i), f"Town{i}", f"Town{i} lies on the river R{i}.") for i in range(40)]


class FakePool:
    """Rollouts stamped with the weights version the pool holds when asked; records each call's version."""

    def __init__(self, invalid_every: int = 0):
        self.version, self.calls, self.invalid_every, self.n = 0, [], invalid_every, 0

    async def aupdate_weights(self, version, bundle):
        self.version = version

    async def examiner_rollouts(self, docs, hops, priority=0):
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

    async def student_rollouts(self, questions, n, priority=0):
        self.calls.append(("student", self.version))
        return [[Trajectory(prompt_ids=[1], response_ids=[2], mask=[1], logprobs=[-1.0], answer="no idea",
                            finish_reason="answer", version=self.version) for _ in range(n)] for _ in questions]


class Sink:
    def __init__(self):
        self.rows = []

    def log(self, values, **kw):
        self.rows.append(values)


def _loop(tmp_path, *overrides, examiner=None):
    """The loop on fake pools (object-store transport: no collective groups), handed in by its constructor."""
    cfg = load_config("configs/tiny.yaml", ["examiner.hop_weights=[1]", *overrides])
    actors = Actors(search=None, pools={"examiner": examiner or FakePool(), "student": FakePool()}, teacher=None,
                    teacher_client=None, learner=None, replay=None)
    return EvolutionLoop(cfg, RunDir(tmp_path), actors, metrics=Sink(), docs=DOCS, tokenizer=object())


def _published(loop, **versions):
    """The learner reached `versions` and published them (the pools load them when asked)."""
    for role, v in versions.items():
        loop.state.versions[role] = v
        loop.policies[role].published = (v, object())


def test_examiner_step_asks_the_newest_student(tmp_path):
    loop = _loop(tmp_path)
    _published(loop, examiner=1, student=3)
    for role in ("examiner", "student"):  # the student pool still holds version 1
        loop.policies[role].pool_version = loop.actors.pools[role].version = 1
    (group,) = asyncio.run(loop.step_groups("examiner", step=1))
    assert loop.actors.pools["student"].calls == [("student", 3)]  # attempts came from the newest student
    assert len(group) == loop.cfg.examiner.tasks_per_step and loop.policies["student"].pool_version == 3


@pytest.mark.parametrize("fallback", [False, True])
def test_task_set_comes_from_the_final_examiner(tmp_path, monkeypatch, fallback):
    loop = _loop(tmp_path, f"examiner.task_set_fallback={str(fallback).lower()}", "examiner.task_set_size=4",
                 "examiner.task_set_rounds=1",
                 examiner=FakePool(invalid_every=4))  # every 4th attempt fails the gate: 3 of 4 valid
    final = 5
    _published(loop, examiner=final)
    loop.policies["examiner"].pool_version = 2  # the pool lags until the task set is written
    candidate = Task(id="cand", question="Which river flows through Old Town?", answer="R0", hops=1,
                     source=DOCS[0], flags={"ok": True}, version=1)
    loop.state.candidates = {"1": [to_dict(candidate)]}
    rule = Task(id="rule", question="Rule question?", answer="x", hops=1, source=DOCS[1],
                qcp=[Hop("q", [DOCS[1]])], flags={"rule_built": True})
    monkeypatch.setattr(taskset, "rule_tasks", lambda docs, n, *a: [rule][:n])
    asyncio.run(loop.write_task_set())
    records = [json.loads(line) for line in open(task_set_path(tmp_path, 0))]
    assert len(records) == 4
    by_source = {r["id"]: r for r in records}
    written = [r for r in records if r["id"] not in ("cand", "rule")]
    assert len(written) == 3 and all(r["version"] == final for r in written)  # the final examiner wrote them
    assert loop.actors.pools["examiner"].calls == [("examiner", final)]
    assert ("cand" in by_source) is fallback and ("rule" in by_source) is not fallback
    acct = loop.state.accounting["iter-0-tasks"]
    assert acct["examiner_written"] == 3 and acct["examiner_version"] == final
    assert acct["training_candidates"] == int(fallback) and acct["rule_built"] == int(not fallback)


def test_final_examiner_writes_in_rounds_until_the_set_is_full(tmp_path):
    loop = _loop(tmp_path, "examiner.task_set_size=4", "examiner.task_set_rounds=3",
                 examiner=FakePool(invalid_every=4))  # 3 of every 4 attempts pass: a second round fills it
    _published(loop, examiner=5)
    asyncio.run(loop.write_task_set())
    records = [json.loads(line) for line in open(task_set_path(tmp_path, 0))]
    assert len(records) == 4 and all(r["version"] == 5 for r in records)
    assert loop.state.accounting["iter-0-tasks"]["rule_built"] == 0
    assert loop.metrics.rows[-2]["tasks/examiner_attempts"] == 8  # two rounds of 4, then full
    assert loop.metrics.rows[-2]["tasks/gate_fail/answer_supported"] == 0.25
    attempts = [json.loads(line) for line in open(attempts_path(tmp_path, 0))]  # all 8 kept, with their flags
    assert len(attempts) == 8 and sum(all(a["flags"].values()) for a in attempts) == 6
