"""Integration: `piplay train` on configs/tiny.yaml with weight_sync.transport=collective and two rollout
workers per role: every sync is a gloo broadcast from learner rank 0 to four vLLM CPU engines' workers
(two per role) and, for the student, the teacher; no weight bundle goes through the object store."""

from __future__ import annotations

import json

import pytest
from test_train_tiny import metrics, train


@pytest.fixture(scope="module")
def collective_run(tmp_path_factory, tiny_model, corpus_path):
    run_dir = tmp_path_factory.mktemp("runs") / "collective"
    proc = train(run_dir, "weight_sync.transport=collective", "rollout.workers_per_role=2",
                 "weight_sync.timeout_s=300", "ray.num_cpus=8")
    assert proc.returncode == 0, proc.stderr[-6000:]
    return run_dir


def test_collective_run_syncs_both_roles_and_the_teacher(collective_run):
    rows = metrics(collective_run)
    synced = {(r["phase"], int(r["weight_sync/version"])) for r in rows if "weight_sync/version" in r}
    # the student syncs at every step (pool and teacher EMA in one broadcast), with its rate measured
    student = [r for r in rows if r.get("phase") == "student" and "weight_sync/gb_per_s" in r]
    assert [int(r["weight_sync/version"]) for r in student] == [1, 2]
    assert all(r["weight_sync/gb_per_s"] > 0 for r in student)
    # examiner weights reached its pool before the task set was written (version 2 after two steps)
    assert ("examiner", 2) in synced
    assert (collective_run / "checkpoints").is_dir()


def test_a_rollout_worker_killed_between_syncs_rejoins_and_the_run_goes_on(tmp_path, tiny_model, corpus_path):
    """The driver runs in-process (see inprocess.py); once the student pool holds version 1, its worker is
    killed (Ray restarts it with the base weights). It must rejoin the student group on a new generation and
    the run complete."""
    import time

    import ray
    from inprocess import train_watched
    from test_train_tiny import ROOT

    from piplay_ray.config import load_config

    run_dir = tmp_path / "rejoin"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      [f"run.dir={run_dir}", "weight_sync.transport=collective", "weight_sync.timeout_s=300"])
    killed = []

    def kill_between_syncs(loop, stop):
        while not stop.is_set() and loop.policies["student"].pool_version < 1:
            time.sleep(0.05)
        if not stop.is_set():
            killed.append(loop.actors.syncs["student"].generation)
            ray.kill(loop.actors.pools["student"].workers[0], no_restart=False)

    loop = train_watched(cfg, kill_between_syncs)
    assert killed, "the student pool never reached version 1"
    assert loop.state.versions == {"examiner": 2, "student": 2} and loop.state.phase == "done"
    assert loop.actors.syncs["student"].generation > killed[0]  # the restarted worker met the others on a new one
    assert loop.actors.syncs["student"].last["version"] == 2
    acct = json.loads((run_dir / "accounting.json").read_text())
    assert acct["restarts"]["rollout-student-0"] >= 1
