"""Whole-process faults on configs/tiny.yaml, driving `piplay train` as a subprocess, in one run (so that
`make test` can afford it):

- the HTTP retriever server is stopped (SIGSTOP) for a few seconds as the student phase starts; the run goes
  on and the tool failures show in the metrics. The tiny model is first taught to search (test_rollout's
  `agent_model`) and the student trains on the questions it was taught on (a task set given as an experiment
  arm is given one, `examiner.task_sets_from`), so its trajectories really call the retriever in the outage;
- the driver is SIGKILLed during student step 2; the same command resumes from the checkpoint and ends with
  every step's record exactly once and every task trained exactly once; a third start is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.rollout import QUESTIONS
from helpers.runs import ROOT
from helpers.search import serve_on_any_port

from piplay_ray.method.examiner import save_tasks
from piplay_ray.records import Doc, Hop, Task
from piplay_ray.rundir import task_set_path


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    """The run under test: the faults are the retriever's and the driver's, so the rollout engine is
    transformers (a vLLM engine's start-up, paid twice here, would double the test's time)."""
    return [sys.executable, "-m", "piplay_ray", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"run.dir={run_dir}", "checkpoint.every=1", "checkpoint.keep=5", "rollout.engine=transformers", *overrides]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A process in its own session, so that its Ray daemons can be cleaned up with it."""
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def learner_rows(run_dir: Path) -> dict[tuple[str, int], dict]:
    """(phase, step) -> its learner record, in file order."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {(r["phase"], r["step"]): r for r in rows if "learner/version" in r}


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def taught_task_set(folder: Path) -> Path:
    """A task set of the questions the agent model was taught to search on, as an experiment's tasks run
    would leave it."""
    tasks = [Task(id=f"taught-{i}", question=q, answer="yes", hops=1, source=Doc(str(i), "T", "yes."),
                  qcp=[Hop(query=q, docs=[Doc(str(i), "T", "yes.")])]) for i, q in enumerate(QUESTIONS[:4])]
    save_tasks(task_set_path(folder, 0), tasks)
    return folder


def test_retriever_outage_then_driver_kill_resumes_exactly_once(tmp_path, agent_model, corpus_path):  # noqa: F811
    server, url = serve_on_any_port(ROOT / "configs" / "tiny.yaml", timeout=300)  # it binds the port itself
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = run_dir / "test-driver.log"
    cmd = train_cmd(run_dir, f"model.base={agent_model}", "search.retriever=http", f"search.url={url}",
                    "search.retries=1", "search.backoff_s=0.2", "search.timeout_s=2", "rollout.max_tokens_per_turn=48",
                    "rollout.max_response_tokens=320", f"examiner.task_sets_from={taught_task_set(tmp_path / 'given')}")
    proc = None
    try:
        proc = start(cmd, log)
        wait_for(task_set_path(run_dir, 0).is_file, proc, 900, "the student task set (the student phase starts)")
        os.kill(server.pid, signal.SIGSTOP)  # the server stops answering: connections hang, calls time out
        time.sleep(8)
        os.kill(server.pid, signal.SIGCONT)
        step3 = run_dir / "checkpoints" / "step-000003" / "COMPLETE"  # student step 1 done and saved
        wait_for(step3.is_file, proc, 900, "the checkpoint of student step 1")
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a preemption would
        proc.wait(timeout=60)
        assert not (run_dir / "checkpoints" / "step-000004").exists(), "killed too late: step 2 had finished"
        kill_group(proc)  # its local Ray cluster and actors
        assert proc.returncode == -signal.SIGKILL
        stopped = {k: r["time"] for k, r in learner_rows(run_dir).items()}
        assert list(stopped)[-1] == ("student", 3)

        again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, start_new_session=True)
        log.write_text(log.read_text(errors="replace") + again.stdout + again.stderr)
        assert again.returncode == 0, again.stderr[-4000:]
        assert "resumed from" in again.stderr and "step-000003" in again.stderr
    finally:
        if proc is not None:
            kill_group(proc)
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait(timeout=60)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    # the outage: the taught student searched, and calls that timed out were scored, not crashed
    assert sum(r.get("rollout/searches_per_traj", 0) for r in rows) > 0, "the taught model did not search"
    assert sum(r.get("search/tool_failures", 0) for r in rows) > 0, "the outage left no trace in the metrics"
    # exactly once: the lines the killed driver wrote after its checkpoint were rewound, step 4 made again
    resumed = learner_rows(run_dir)
    assert len(resumed) == len([r for r in rows if "learner/version" in r])  # one record a step
    assert list(resumed) == [("examiner", 1), ("examiner", 2), ("student", 3), ("student", 4)]
    assert {k: r["time"] for k, r in resumed.items() if k != ("student", 4)} == stopped
    final = json.loads((run_dir / "checkpoints" / "step-000004" / "driver_state.json").read_text())
    assert final["phase"] == "done" and final["versions"]["student"] == 2 and final["global_step"] == 4
    tasks = json.loads((run_dir / "accounting.json").read_text())["tasks"]["iter-0-tasks"]
    task_ids = [json.loads(line)["id"] for line in open(task_set_path(run_dir, 0))]
    assert tasks["n_dropped"] == 0 and tasks["trained"] == {t: 1 for t in task_ids}
    # a finished run is not silently re-trained for zero steps: refused from the checkpoint, before any actor
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, start_new_session=True)
    assert third.returncode != 0 and "already complete" in third.stderr
    assert "starting actors" not in third.stderr
