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


class FakeLearner:
    def __init__(self):
        self.saved = None

    def save(self, path, driver_state, extra):
        for name, write in extra.items():
            (path / name).mkdir(parents=True, exist_ok=True)
            write(path / name)
        self.saved = driver_state


class FakeTeacherClient:
    restarts = 0

    def __init__(self):
        self.saved = []

    async def save(self, folder):
        self.saved.append(folder)
        return folder


def test_a_checkpoint_holds_counters_candidates_and_the_metrics_position_and_going_back_forgets_the_rest(tmp_path):
    """What was recorded after the checkpoint is forgotten on the way back (metrics lines, sample files,
    candidates of re-made examiner steps); the fault counters never go back."""
    import asyncio

    from piplay_ray.monitor.metrics import MetricsSink

    cfg = load_config("configs/tiny.yaml", ["replay.spill=false"])
    teacher = FakeTeacherClient()
    teacher.restarts = 1
    actors = Actors(search=None, pools={"student": SimpleNamespace(retried=2)}, teacher=None, teacher_client=teacher,
                    learner=FakeLearner(), replay=None)
    sink = MetricsSink(tmp_path, None)
    book = RunBook(cfg, RunDir(tmp_path), sink, actors, docs=[])
    book.write_accounting = lambda: None
    st = book.state
    st.global_step, st.versions = 3, {"examiner": 2, "student": 1}
    st.candidates = {"0": [{"id": "a"}], "1": [{"id": "b"}]}
    book.log({"x": 1}, "student")
    sink.write_samples("student", 0, [{"a": 1}])
    book.restarts, book.learner_restarts = {"search-0": 2}, 1
    asyncio.run(book.checkpoint())

    saved = actors.learner.saved
    assert len(teacher.saved) == 1 and teacher.saved[0].endswith("teacher")  # through the client
    assert saved["counters"] == {"restarts": {"search-0": 2}, "learner_restarts": 1, "probes": {"sent": 0, "failed": 0},
                                 "rollout_retries": {"student": 2}, "teacher_restores": 1}
    lines = (tmp_path / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert b"checkpoint/seconds" in lines[1] and saved["metrics_position"] == len(lines[0])
    st.accounting["late"] = {"changed": True}  # the live state goes on: the saved copy does not
    assert "late" not in saved["accounting"]

    # past the checkpoint: another examiner step's candidates, metrics and samples, then a restart seen
    st.candidates["2"] = [{"id": "c"}]
    book.log({"y": 2}, "student")
    sink.write_samples("student", 1, [{"b": 2}])
    book.restarts["search-0"] = 3
    book.learner_restarts = 2

    book.state = type(st).from_dict(json.loads(json.dumps(saved)))
    book.went_back()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("x") for r in rows] == [1]  # the line after the checkpoint is gone
    book.log({"z": 3}, "student")  # appends go on at the cut
    assert [json.loads(line).get("z") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [None, 3]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["student-step-000000.jsonl"]
    assert book.state.candidates == {"0": [{"id": "a"}], "1": [{"id": "b"}]}  # step 2 will be made again
    assert book.restarts == {"search-0": 3} and book.learner_restarts == 2  # counters never go back

    new_actors = Actors(search=None, pools={"student": SimpleNamespace(retried=0)}, teacher=None,
                        teacher_client=FakeTeacherClient(), learner=None, replay=None)
    fresh = RunBook(cfg, RunDir(tmp_path), sink, new_actors, docs=[])  # a resumed driver starts from the saved
    fresh.state = type(st).from_dict(json.loads(json.dumps(saved)))
    fresh.went_back()
    assert fresh.restarts == {"search-0": 2} and fresh.learner_restarts == 1
    assert new_actors.pools["student"].retried == 2 and new_actors.teacher_client.restarts == 1
    sink.close()


class FakeReplay:
    """The replay store's calls the checkpoint makes, on an in-process buffer: `spill.remote()` takes the
    buffer's content when it is called, as the actor does when the call reaches it."""

    def __init__(self, buffer):
        self.buffer = buffer

        async def spilled(data):
            return data

        self.spill = SimpleNamespace(remote=lambda: spilled(self.buffer.spill()))


def test_the_spill_and_the_loop_state_are_one_cut_and_a_restore_keeps_what_the_store_held(tmp_path):
    """A step made while the checkpoint is being written is in neither the spill nor the saved state; a step
    the store held at the cut keeps its sample file and its examiner candidates when the run goes back (it
    is not made again), every later one loses them, and every rollout pool must reload."""
    import asyncio

    from piplay_ray.actors.replay_buffer import ReplayBuffer
    from piplay_ray.monitor.metrics import MetricsSink
    from piplay_ray.records import group_id

    buffer = ReplayBuffer(16, 1)
    teacher, sink = FakeTeacherClient(), MetricsSink(tmp_path, None)
    actors = Actors(search=None, pools={}, teacher=None, teacher_client=teacher, learner=FakeLearner(),
                    replay=FakeReplay(buffer))
    pools = {role: SimpleNamespace(pool_version=3, publish=lambda: None) for role in ("examiner", "student")}
    book = RunBook(load_config("configs/tiny.yaml"), RunDir(tmp_path), sink, actors, docs=[], policies=pools)
    book.write_accounting = lambda: None
    st = book.state
    st.versions = {"examiner": 2, "student": 0}

    def produce(role, step):  # what the producer does for a step: its records, then its groups in the store
        if role == "examiner":
            st.candidates[str(step)] = [{"id": f"c{step}"}]
        sink.write_samples(role, step, [{"step": step}])
        assert buffer.add_step([group(group_id(role, step, 0, "t"), role, "t")]) == "ok"

    produce("examiner", 2)  # held at the cut, one step ahead of the learner
    produce("student", 0)

    async def late_save(folder):  # the producer goes on while the teacher's EMA is written
        produce("examiner", 3)
        return folder

    teacher.save = late_save
    asyncio.run(book.checkpoint())
    saved = actors.learner.saved
    (spill_file,) = list(tmp_path.rglob("replay.parquet"))
    back = ReplayBuffer.restore(spill_file, 16, 1)
    assert back.held_steps() == {"examiner": [2], "student": [0]}  # not step 3: it came after the cut
    assert sorted(saved["candidates"]) == ["2"]  # nor is it in the saved state

    book.state = type(st).from_dict(json.loads(json.dumps(saved)))
    book.went_back(back.held_steps())
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "examiner-step-000002.jsonl", "student-step-000000.jsonl"]  # held: kept; step 3: made again
    assert book.state.candidates == {"2": [{"id": "c2"}]}
    assert all(p.pool_version == -1 for p in pools.values())  # every pool reloads the checkpoint's weights
    sink.close()
