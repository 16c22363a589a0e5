"""Integration: the tiny run (conftest's `tiny_run`) syncs by weight_sync.transport=collective with two rollout
workers per role: every sync is a gloo broadcast from learner rank 0 to four vLLM CPU engines' workers
(two per role) and, for the student, the teacher; no weight bundle goes through the object store. A student
rollout worker killed between syncs rejoins on a new generation and the run completes.
"""

from __future__ import annotations

import json

from helpers.runs import metrics


def test_collective_run_syncs_both_roles_and_the_teacher(tiny_run):
    run_dir = tiny_run.dir
    rows = metrics(run_dir)
    synced = {(r["phase"], int(r["weight_sync/version"])) for r in rows if "weight_sync/version" in r}
    # the student syncs at every step (pool and teacher EMA in one broadcast), with its rate measured
    student = [r for r in rows if r.get("phase") == "student" and "weight_sync/gb_per_s" in r]
    assert [int(r["weight_sync/version"]) for r in student] == [1, 2]
    assert all(r["weight_sync/gb_per_s"] > 0 for r in student)
    # examiner weights reached its pool before the task set was written (version 2 after two steps)
    assert ("examiner", 2) in synced
    assert (run_dir / "checkpoints").is_dir()


def test_a_rollout_worker_killed_between_syncs_rejoins_and_the_run_goes_on(tiny_run):
    loop, killed = tiny_run.loop, tiny_run.killed
    assert killed, "the student pool never reached version 1"
    assert loop.state.versions == {"examiner": 2, "student": 2} and loop.state.phase == "done"
    assert loop.actors.syncs["student"].generation > killed[0]  # the restarted worker met the others on a new one
    assert loop.actors.syncs["student"].last["version"] == 2
    acct = json.loads((tiny_run.dir / "accounting.json").read_text())
    assert acct["restarts"]["rollout-student-0"] >= 1
