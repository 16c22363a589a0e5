"""Integration: `piplay train` on configs/tiny.yaml with weight_sync.transport=collective and two rollout
workers per role: every sync is a gloo broadcast from learner rank 0 to four vLLM CPU engines' workers
(two per role) and, for the student, the teacher; no weight bundle goes through the object store."""

from __future__ import annotations

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
