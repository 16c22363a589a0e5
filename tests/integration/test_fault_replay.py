"""The replay store killed mid-phase, in both phases, with `checkpoint.every=2`, examiner-written tasks and the
spill on (configs/tiny.yaml, the transformers engine): each kill comes one learner step after a checkpoint
whose spill holds the next step, so the run goes back a step while its rollout pools hold newer weights.

The run must end with every learner step recorded once, never train an experience made by weights newer than
the learner's (the pools reload the checkpoint's weights), keep the examiner candidates and the sample file of
the step the spill held (it is not made again), and train every issued task exactly once — checked against the
learner's own record of the groups it trained.
"""

from __future__ import annotations

import json
import time

import ray
import torch
from helpers.inprocess import train_watched
from helpers.runs import ROOT

from piplay_ray.actors.replay_buffer import ReplayBuffer
from piplay_ray.config import load_config
from piplay_ray.learner.checkpoint import checkpoint_dir, is_complete, read_driver_state
from piplay_ray.rundir import REPLAY_SPILL


def kill_after_a_held_checkpoint(loop, stop, log: list, candidates: list) -> None:
    """In each phase: at the first checkpoint whose spill holds a step of the phase's role not yet trained,
    wait for one more learner step, then kill the replay store for good (the driver replaces it and goes back)."""
    write = loop.write_task_set

    async def recording():  # the examiner candidates as the task set is written
        candidates.append(sorted(loop.state.candidates, key=int))
        await write()

    loop.write_task_set = recording
    for role in ("examiner", "student"):
        while not stop.is_set():
            step = loop.state.global_step
            ckpt = checkpoint_dir(loop.run.path, step)
            if loop.state.phase == role and step and is_complete(ckpt) and (ckpt / "replay" / REPLAY_SPILL).is_file():
                state = read_driver_state(ckpt)
                held = ReplayBuffer.restore(ckpt / "replay" / REPLAY_SPILL, 1000, 1).held_steps().get(role, [])
                if state["phase"] == role and any(s >= state["versions"][role] for s in held):
                    policy, deadline = loop.policies[role], time.monotonic() + 60
                    while not stop.is_set() and time.monotonic() < deadline and (
                            loop.state.global_step == step or policy.pool_version <= state["versions"][role]):
                        time.sleep(0.005)  # a step past the checkpoint, and the pool synced to its weights
                    at = loop.state.global_step
                    ahead = policy.pool_version  # the pool holds weights past the checkpoint's
                    ray.kill(loop.actors.replay)
                    seen, deadline = [], time.monotonic() + 60
                    while not stop.is_set() and time.monotonic() < deadline and loop.state.global_step != step:
                        time.sleep(0.005)  # until the run is back at the checkpoint
                    while not stop.is_set() and time.monotonic() < deadline and loop.state.global_step == step:
                        seen.append(policy.pool_version)  # what the pool holds before the re-done step ends
                        time.sleep(0.005)
                    log.append({"role": role, "checkpoint": step, "held": held, "at": at, "pool_ahead": ahead,
                                "pool_back": min(seen, default=None), "version": state["versions"][role]})
                    break
            time.sleep(0.01)


def test_a_replay_store_lost_mid_phase_loses_no_step_record_or_task(tmp_path, tiny_model, corpus_path):
    run_dir = tmp_path / "run"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        f"run.dir={run_dir}", "rollout.engine=transformers", "schedule.examiner_steps=6",
        "schedule.student_steps=6", "checkpoint.every=2", "checkpoint.keep=10", "examiner.task_set_fallback=true"])
    log, candidates = [], []
    train_watched(cfg, lambda loop, stop: kill_after_a_held_checkpoint(loop, stop, log, candidates))

    assert [k["role"] for k in log] == ["examiner", "student"], log
    assert all(k["at"] == k["checkpoint"] + 1 for k in log), log  # one step past the checkpoint: it goes back
    # the pool held newer weights when the store died, and reloaded the checkpoint's before training went on
    assert all(k["pool_ahead"] > k["version"] and k["pool_back"] is not None and k["pool_back"] <= k["version"]
               for k in log), repr(log)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    learner = [r for r in rows if "learner/version" in r]
    assert [(r["phase"], r["step"]) for r in learner] == [("examiner", s) for s in range(1, 7)] + \
        [("student", s) for s in range(7, 13)]  # every step once, the re-done ones replacing the lost
    for r in learner:  # no rollout of weights the learner had not reached (the pools reloaded)
        assert r["learner/max_experience_version"] <= r["learner/version"] - 1, r
    assert candidates == [[str(s) for s in range(6)]]  # the held step's candidates survived the rollback
    samples = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert samples == [f"student-step-{s:06d}.jsonl" for s in range(6)]  # the held step's file too

    acct = json.loads((run_dir / "accounting.json").read_text())
    assert acct["restarts"]["replay"] == 2 and acct["learner_restarts"] == 0
    tasks = acct["tasks"]["iter-0-tasks"]
    task_ids = [json.loads(line)["id"] for line in open(run_dir / "tasks" / "iter-0.jsonl")]
    assert tasks["issued"] == len(task_ids) == 12 and tasks["trained"] == {t: 1 for t in task_ids}
    final = checkpoint_dir(run_dir, 12)
    for role, n in (("examiner", 6), ("student", 6)):  # the ledger against the learner's own record
        state = torch.load(final / role / "train_state" / "state" / "mp_rank_00_model_states.pt",
                           map_location="cpu", weights_only=False)
        ledger = [g for ids in acct["phases"][f"iter-0-{role}"]["steps"].values() for g in ids]
        assert state["trained"] == ledger and len({g.split("-")[1] for g in ledger}) == n, role
