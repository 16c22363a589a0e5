"""Integration: `piplay train` on configs/tiny.yaml with weight_sync.transport=collective and two rollout
workers per role: every sync is a gloo broadcast from learner rank 0 to four vLLM CPU engines' workers
(two per role) and, for the student, the teacher; no weight bundle goes through the object store.

One run serves both tests (a tiny run costs minutes on two cores): the driver runs in-process (`driver.train`,
what `piplay train` calls, with the loop handed in by tests/inprocess.py) so that a thread can kill a student
rollout worker once its pool holds version 1; it must rejoin the student group on a new generation and the
run complete.
"""

from __future__ import annotations

import json

import pytest
from test_train_tiny import ROOT, metrics


@pytest.fixture(scope="module")
def collective_run(tmp_path_factory, tiny_model, corpus_path):
    import time

    import ray
    from inprocess import train_watched

    from piplay_ray.config import load_config

    run_dir = tmp_path_factory.mktemp("runs") / "collective"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      [f"run.dir={run_dir}", "checkpoint.every=1", "checkpoint.keep=3",
                       "weight_sync.transport=collective", "rollout.workers_per_role=2",
                       "weight_sync.timeout_s=300", "ray.num_cpus=8"])
    killed = []

    def kill_between_syncs(loop, stop):
        while not stop.is_set() and loop.policies["student"].pool_version < 1:
            time.sleep(0.05)
        if not stop.is_set():
            killed.append(loop.actors.syncs["student"].generation)
            ray.kill(loop.actors.pools["student"].workers[0], no_restart=False)

    loop = train_watched(cfg, kill_between_syncs)
    return {"dir": run_dir, "loop": loop, "killed": killed}


def test_collective_run_syncs_both_roles_and_the_teacher(collective_run):
    run_dir = collective_run["dir"]
    rows = metrics(run_dir)
    synced = {(r["phase"], int(r["weight_sync/version"])) for r in rows if "weight_sync/version" in r}
    # the student syncs at every step (pool and teacher EMA in one broadcast), with its rate measured
    student = [r for r in rows if r.get("phase") == "student" and "weight_sync/gb_per_s" in r]
    assert [int(r["weight_sync/version"]) for r in student] == [1, 2]
    assert all(r["weight_sync/gb_per_s"] > 0 for r in student)
    # examiner weights reached its pool before the task set was written (version 2 after two steps)
    assert ("examiner", 2) in synced
    assert (run_dir / "checkpoints").is_dir()


def test_a_rollout_worker_killed_between_syncs_rejoins_and_the_run_goes_on(collective_run):
    loop, killed = collective_run["loop"], collective_run["killed"]
    assert killed, "the student pool never reached version 1"
    assert loop.state.versions == {"examiner": 2, "student": 2} and loop.state.phase == "done"
    assert loop.actors.syncs["student"].generation > killed[0]  # the restarted worker met the others on a new one
    assert loop.actors.syncs["student"].last["version"] == 2
    acct = json.loads((collective_run["dir"] / "accounting.json").read_text())
    assert acct["restarts"]["rollout-student-0"] >= 1
