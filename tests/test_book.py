"""Run bookkeeping without Ray: what a learner step and a lost group leave in accounting.json, and the
end-of-phase reconciliation (every task trained or dropped with a reason)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from piplay_ray.config import load_config
from piplay_ray.evolution.actors import Actors
from piplay_ray.evolution.book import RunBook
from piplay_ray.records import Experience
from piplay_ray.rundir import RunDir


def group(gid, role, task):
    return [Experience(group_id=gid, role=role, prompt_ids=[1], response_ids=[2], mask=[1], logprobs=[-1.0],
                       reward=1.0, advantage=0.0, version=0, info={"task": task})]


class Sink:
    def __init__(self):
        self.rows = []

    def log(self, values, **where):
        self.rows.append({**where, **values})


def test_accounting_of_steps_and_failures(tmp_path):
    pools = {"examiner": SimpleNamespace(retried=0), "student": SimpleNamespace(retried=2)}
    actors = Actors(search=None, pools=pools, teacher=None, teacher_client=SimpleNamespace(restarts=1),
                    learner=None, replay=None)
    book = RunBook(load_config("configs/tiny.yaml"), RunDir(tmp_path), Sink(), actors, docs=[])
    book.state.global_step = 1
    book.record_step("examiner", [group("examiner-0", "examiner", "e0")])
    book.record_failures("examiner", 1, [("e1", "shares lost"), ("e2", "shares lost")])
    book.record_failures("student", 1, [("t1", "worker died")])
    book.state.global_step = 2
    book.record_step("student", [group("student-0-t0", "student", "t0"), group("student-0-t2", "student", "t2")])
    rec = book.ledger().close(["t0", "t1", "t2", "t3"], scheduled=["t0", "t1", "t2"])
    doc = book.write_accounting()

    assert json.loads((tmp_path / "accounting.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["phases"]["iter-0-examiner"] == {
        "groups_trained": 1, "steps": {"1": ["examiner-0"]},
        "failures": [{"step": 1, "tasks": 2, "reason": "shares lost"}]}
    assert doc["phases"]["iter-0-student"]["steps"] == {"2": ["student-0-t0", "student-0-t2"]}
    assert rec["n_trained"] == 2 and set(rec["dropped"]) == {"t1", "t3"}
    assert "worker died" in rec["dropped"]["t1"] and "not scheduled" in rec["dropped"]["t3"]
    assert doc["rollout_retries"] == {"examiner": 0, "student": 2} and doc["teacher_restores"] == 1
