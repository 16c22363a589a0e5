"""Whole-process faults on configs/tiny.yaml, each driving `piplay train` as a subprocess:

- the driver is SIGKILLed during student step 2; the same command resumes from the checkpoint and ends
  with as many student steps as an uninterrupted run;
- the HTTP retriever server is stopped (SIGSTOP) for a few seconds mid-run; the run completes and the
  tool failures show in the metrics. The tiny model is first taught to search (test_rollout's
  `agent_model`), so its trajectories really call the retriever during the outage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_retrieval_http import serve_on_any_port
from test_rollout import agent_model  # noqa: F401  (fixture: the tiny model taught to search)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "piplay_ray", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"run.dir={run_dir}", "checkpoint.every=1", "checkpoint.keep=5", *overrides]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A process in its own session, so that its Ray daemons can be cleaned up with it."""
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def learner_rows(run_dir: Path) -> list[tuple[str, int]]:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [(r["phase"], r["step"]) for r in rows if "learner/version" in r]


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_driver_killed_during_student_step_2_resumes(tmp_path, tiny_model, corpus_path):
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    log = run_dir / "test-driver.log"
    proc = start(train_cmd(run_dir), log)
    step3 = run_dir / "checkpoints" / "step-000003" / "COMPLETE"  # student step 1 done and saved
    try:
        wait_for(step3.is_file, proc, 900, "the checkpoint of student step 1")
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a preemption would
        proc.wait(timeout=60)
        assert not (run_dir / "checkpoints" / "step-000004").exists(), "killed too late: step 2 had finished"
    finally:
        kill_group(proc)  # its local Ray cluster and actors
    assert proc.returncode == -signal.SIGKILL
    before = learner_rows(run_dir)
    assert before[-1] == ("student", 3)

    again = subprocess.run(train_cmd(run_dir), capture_output=True, text=True, timeout=900, cwd=ROOT,
                           start_new_session=True)
    log.write_text(log.read_text(errors="replace") + again.stdout + again.stderr)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stderr and "step-000003" in again.stderr
    # exactly once: the lines the killed driver wrote after its checkpoint were rewound, the step re-done
    assert learner_rows(run_dir) == [("examiner", 1), ("examiner", 2), ("student", 3), ("student", 4)]
    final = json.loads((run_dir / "checkpoints" / "step-000004" / "driver_state.json").read_text())
    assert final["phase"] == "done" and final["versions"]["student"] == 2 and final["global_step"] == 4
    tasks = json.loads((run_dir / "accounting.json").read_text())["tasks"]["iter-0-tasks"]
    task_ids = [json.loads(line)["id"] for line in open(run_dir / "tasks" / "iter-0.jsonl")]
    assert tasks["n_dropped"] == 0 and tasks["trained"] == {t: 1 for t in task_ids}


def test_retriever_outage_is_scored_not_crashed(tmp_path, agent_model, corpus_path):  # noqa: F811
    server, url = serve_on_any_port(ROOT / "configs" / "tiny.yaml", timeout=300)  # it binds the port itself
    run_dir = tmp_path / "outage"
    run_dir.mkdir()
    proc = None
    try:
        proc = start(train_cmd(run_dir, f"model.base={agent_model}", "search.retriever=http", f"search.url={url}",
                               "search.retries=1", "search.backoff_s=0.2", "search.timeout_s=2",
                               "rollout.max_tokens_per_turn=48", "rollout.max_response_tokens=320"),
                     run_dir / "test-driver.log")
        tasks = run_dir / "tasks" / "iter-0.jsonl"
        wait_for(tasks.is_file, proc, 900, "the student task set (the student phase starts)")
        os.kill(server.pid, signal.SIGSTOP)  # the server stops answering: connections hang, calls time out
        time.sleep(8)
        os.kill(server.pid, signal.SIGCONT)
        assert proc.wait(timeout=900) == 0, (run_dir / "test-driver.log").read_text(errors="replace")[-4000:]
    finally:
        if proc is not None:
            kill_group(proc)
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait(timeout=60)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert learner_rows(run_dir) == [("examiner", 1), ("examiner", 2), ("student", 3), ("student", 4)]
    searched = sum(r.get("rollout/searches_per_traj", 0) for r in rows)
    failures = sum(r.get("search/tool_failures", 0) for r in rows)
    probes = max(r.get("search/probe_failures", 0) for r in rows)
    assert searched > 0, "the taught model did not search"
    assert failures > 0 or probes > 0, "the outage left no trace in the metrics"
    assert failures > 0


