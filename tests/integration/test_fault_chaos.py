"""Chaos on configs/tiny.yaml: during the student phase a rollout worker, a search-env replica and the
teacher are each killed once (`ray.kill(..., no_restart=False)`, seeded random moments; the teacher after
its first EMA step, so that it has an EMA to lose), and the learner rank is killed for good (the driver
rebuilds the learner group from the newest checkpoint); in the last student step the replay store is killed
for good (the driver replaces it and rolls back to the newest checkpoint, keeping the learner). The run must complete with every learner step recorded
once, train every task exactly once (every actor came back, so nothing is dropped) — checked against the
learner's own record of the groups it trained — count the restarts, and end with the teacher's EMA exactly as
if it had never died (recomputed here from the student checkpoints).

The driver runs in-process (`driver.train` with the loop handed in, see inprocess.py) so a thread can hold
the real actor handles.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import ray
import torch
from helpers.inprocess import train_watched
from helpers.runs import ROOT
from safetensors.torch import load_file

from piplay_ray.config import load_config

SEED = 12


def chaos(loop, stop: threading.Event, log: list) -> None:
    """Wait for the student phase, then kill each target once, in a seeded order at seeded moments."""
    rng = random.Random(SEED)
    while not stop.is_set() and loop.state.phase != "student":
        time.sleep(0.05)
    if stop.is_set():
        return
    a = loop.actors
    targets = {"rollout-student-0": a.pools["student"].workers[0], "search-0": a.search.actors[0],
               "teacher": a.teacher, "learner-0": a.learner.workers[0]}
    order = list(targets)
    rng.shuffle(order)
    for name in order:
        if name == "teacher":  # once it holds an EMA (student step 1 applied)
            while a.teacher_client.version < 1 and not stop.is_set():
                time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        phase, step = loop.state.phase, loop.state.global_step
        ray.kill(targets[name], no_restart=name == "learner-0")
        log.append({"actor": name, "phase": phase, "step": step})
    # then, the learner rebuilt, the replay store (it has no restarts of its own) in the last student step
    saved = loop.run.path / "checkpoints" / "step-000003" / "COMPLETE"
    while not stop.is_set() and not (loop.book.learner_restarts and loop.state.global_step == 3 and saved.is_file()):
        time.sleep(0.01)
    if not stop.is_set():
        ray.kill(loop.actors.replay)
        log.append({"actor": "replay", "phase": loop.state.phase, "step": loop.state.global_step})


def test_chaos_run_completes_and_accounts_for_every_task(tmp_path, tiny_model, corpus_path):
    run_dir = tmp_path / "chaos"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"run.dir={run_dir}", "checkpoint.every=1", "checkpoint.keep=10"])
    log = []
    train_watched(cfg, lambda loop, stop: chaos(loop, stop, log))

    assert sorted(k["actor"] for k in log) == ["learner-0", "replay", "rollout-student-0", "search-0", "teacher"]
    assert all(k["phase"] == "student" for k in log), log
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    learner = [(r["phase"], r["step"]) for r in rows if "learner/version" in r]
    # the step the rebuilt learner re-did after the rollback replaced the lost attempt's record
    assert learner == [("examiner", 1), ("examiner", 2), ("student", 3), ("student", 4)]
    final = json.loads((run_dir / "checkpoints" / "step-000004" / "driver_state.json").read_text())
    assert final["phase"] == "done" and final["versions"] == {"examiner": 2, "student": 2}

    acct = json.loads((run_dir / "accounting.json").read_text())
    tasks = acct["tasks"]["iter-0-tasks"]
    task_ids = [json.loads(line)["id"] for line in open(run_dir / "tasks" / "iter-0.jsonl")]
    assert tasks["issued"] == len(task_ids) == tasks["n_trained"] + tasks["n_dropped"]
    assert tasks["n_dropped"] == 0 and tasks["trained"] == {t: 1 for t in task_ids}  # exactly once each
    consumed = [g for phase in acct["phases"].values() for ids in phase.get("steps", {}).values() for g in ids]
    assert consumed and len(consumed) == len(set(consumed)), "a group reached the learner twice"
    for role in ("examiner", "student"):  # the ledger against the learner's own record (its checkpoint)
        state = torch.load(run_dir / "checkpoints" / "step-000004" / role / "train_state" / "state" /
                           "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        ledger = [g for ids in acct["phases"][f"iter-0-{role}"]["steps"].values() for g in ids]
        assert state["trained"] == ledger, role
    assert sum(len(v) for v in acct["phases"]["iter-0-student"]["steps"].values()) == \
        acct["phases"]["iter-0-student"]["groups_trained"]
    for name in ("rollout-student-0", "search-0", "teacher"):
        assert acct["restarts"][name] >= 1, acct["restarts"]
    assert acct["learner_restarts"] == 1  # the replay store's death rolled back without a new learner
    assert acct["restarts"]["replay"] == 1
    health = json.loads((run_dir / "health.json").read_text())["actors"]
    assert health["teacher"]["alive"] and health["rollout-student-0"]["restarts"] >= 1
    assert acct["rollout_retries"]["student"] >= 1 and acct["teacher_restores"] >= 1

    # the teacher's EMA survived its restart: psi_2 = lerp(lerp(psi_0, theta_1, tau), theta_2, tau)
    ckpts = run_dir / "checkpoints"
    tau = cfg.teacher.ema_tau
    psi = load_file(str(Path(tiny_model) / "model.safetensors"))
    theta1 = load_file(str(ckpts / "step-000003" / "student" / "model.safetensors"))
    theta2 = load_file(str(ckpts / "step-000004" / "student" / "model.safetensors"))
    teacher = load_file(str(ckpts / "step-000004" / "teacher" / "teacher.safetensors"))
    assert set(teacher) <= set(psi) and set(teacher) <= set(theta2)
    for name, got in teacher.items():
        want = psi[name].float().lerp(theta1[name].float(), tau).lerp(theta2[name].float(), tau)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
