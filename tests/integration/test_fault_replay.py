"""The replay store killed mid-phase, in both phases, with `checkpoint.every=2`, examiner-written tasks and the
spill on (configs/tiny.yaml, the transformers engine): each kill comes one learner step after a checkpoint
whose spill holds the next step, so the run goes back a step while its rollout pools hold newer weights.

The run must end with every learner step recorded once, never train an experience made by weights newer than
the learner's (the pools reload the checkpoint's weights), keep the examiner candidates and the sample file of
the step the spill held (it is not made again), and train every issued task exactly once — checked against the
learner's own record of the groups it trained.
"""

from __future__ import annotations

import asyncio
import json
import time

import ray
import torch
from helpers.inprocess import train_hooked
from helpers.runs import ROOT

from piplay_ray.actors.replay_buffer import ReplayBuffer
from piplay_ray.config import load_config
from piplay_ray.learner.checkpoint import checkpoint_dir, read_driver_state
from piplay_ray.rundir import REPLAY_SPILL


def kill_after_a_held_checkpoint(loop, log: list, candidates: list) -> None:
    """In each phase, at exact points of the loop's own coroutines (no watching thread, so no race with a fast
    phase): the first checkpoint of the phase is taken once the replay store holds a step of the role not yet
    trained (its spill holds it); one learner step later, once the pool has synced past the checkpoint's
    weights, the replay store is killed for good (the driver replaces it and goes back to the checkpoint)."""
    write, checkpoint, after_step, armed = loop.write_task_set, loop.book.checkpoint, loop.book.after_step, {}

    async def recording():  # the examiner candidates as the task set is written
        candidates.append(sorted(loop.state.candidates, key=int))
        await write()

    async def held_checkpoint():
        st, role = loop.state, loop.state.phase
        first = role in loop.policies and role not in armed and st.phase_steps > 0  # a checkpoint inside a phase
        if first:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                    s >= st.versions[role] for s in (await loop.actors.replay.held_steps.remote()).get(role, [])):
                await asyncio.sleep(0.01)  # the producer runs ahead (replay.max_staleness 1)
        await checkpoint()
        if first:
            ckpt = checkpoint_dir(loop.run.path, st.global_step)
            held = ReplayBuffer.restore(ckpt / "replay" / REPLAY_SPILL, 1000, 1).held_steps().get(role, [])
            state = read_driver_state(ckpt)
            assert any(s >= state["versions"][role] for s in held), held
            armed[role] = {"role": role, "checkpoint": st.global_step, "held": held,
                           "version": state["versions"][role], "seen": []}

    async def step_then_maybe_kill():
        await after_step()
        role = loop.state.phase
        k, policy = armed.get(role), loop.policies[role]
        if k is not None and k not in log and loop.state.global_step == k["checkpoint"] + 1:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and policy.pool_version <= k["version"]:
                await asyncio.sleep(0.01)  # the producer syncs the pool to the weights just published
            k.update(at=loop.state.global_step, pool_ahead=policy.pool_version)
            ray.kill(loop.actors.replay)
            log.append(k)

    def recording_syncs(policy):
        sync = policy.sync_pool

        async def sync_and_record():
            await sync()
            k = armed.get(policy.role)
            if k in log and loop.state.global_step == k["checkpoint"]:
                k["seen"].append(policy.pool_version)  # back at the checkpoint: what the pool holds
        return sync_and_record

    loop.write_task_set = recording
    loop.book.checkpoint, loop.book.after_step = held_checkpoint, step_then_maybe_kill
    for policy in loop.policies.values():
        policy.sync_pool = recording_syncs(policy)


def test_a_replay_store_lost_mid_phase_loses_no_step_record_or_task(tmp_path, tiny_model, corpus_path):
    run_dir = tmp_path / "run"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        f"run.dir={run_dir}", "rollout.engine=transformers", "schedule.examiner_steps=6",
        "schedule.student_steps=6", "checkpoint.every=2", "checkpoint.keep=10", "examiner.task_set_fallback=true"])
    log, candidates = [], []
    train_hooked(cfg, lambda loop: kill_after_a_held_checkpoint(loop, log, candidates))

    assert [k["role"] for k in log] == ["examiner", "student"], log
    assert all(k["at"] == k["checkpoint"] + 1 for k in log), log  # one step past the checkpoint: it goes back
    # the pool held newer weights when the store died, and reloaded the checkpoint's before training went on
    assert all(k["pool_ahead"] > k["version"] and k["seen"] and min(k["seen"]) <= k["version"]
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
