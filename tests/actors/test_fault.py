"""Fault-tolerance pieces without a training run: the task ledger's invariant (pure), and a real rollout
pool whose worker is killed mid-request (Ray actors, the transformers engine on the tiny model).
"""

from __future__ import annotations

import asyncio
import threading
import time

import ray
import torch

from piplay_ray.fault import TaskLedger, describe, is_actor_failure


def test_ledger_every_task_trained_or_dropped_with_reason():
    rec = {"issued": 4}
    led = TaskLedger(rec)
    led.trained(["a", "b", "a"])
    led.failed("c", "ActorDiedError: gone")
    led.failed("b", "ActorUnavailableError: once")  # b was trained in another step: not dropped
    out = led.close(["a", "b", "c", "d", "e"], scheduled=["a", "b", "c", "d", "a"])
    assert out["trained"] == {"a": 2, "b": 1}
    assert out["n_trained"] == 2 and out["n_dropped"] == 3
    assert out["dropped"]["c"].startswith("rollout failed after retries: ActorDiedError")
    assert "not consumed" in out["dropped"]["d"]
    assert "not scheduled" in out["dropped"]["e"]
    # the record is the dict it was given (it lives in the checkpointed driver accounting)
    assert rec is out and rec["issued"] == 4


def test_actor_failure_classification():
    assert is_actor_failure(ray.exceptions.ActorUnavailableError("restarting", None))
    assert is_actor_failure(ray.exceptions.ActorDiedError())
    assert is_actor_failure(ray.exceptions.OwnerDiedError("00" * 28, "", ""))
    assert not is_actor_failure(ValueError("bad input"))
    assert describe(ValueError("first line\nsecond")) == "ValueError: first line"


RAY_CPUS = 3


def test_killed_worker_gets_weights_and_its_share_is_reissued(ray_local, tiny_model):
    """Kill the only worker while a request is in flight: the request still returns every trajectory, made
    by the restarted worker holding the pool's latest weights (version 1), and the restart is counted."""
    from transformers import AutoModelForCausalLM

    from piplay_ray.actors.rollout_pool import RolloutPool
    from piplay_ray.config import load_config

    cfg = load_config("configs/tiny.yaml")
    cfg.rollout.engine, cfg.rollout.workers_per_role = "transformers", 1
    cfg.rollout.max_tokens_per_turn, cfg.rollout.max_response_tokens = 16, 48
    cfg.student.max_turns = 2
    pool = RolloutPool.from_config("student", tiny_model, cfg, search_pool=None)
    try:
        pool.wait_ready()
        hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        new = [(n, p.detach() + 0.01) for n, p in hf.named_parameters()]
        asyncio.run(pool.aupdate_weights(1, new))
        worker = pool.workers[0]

        def kill_mid_request():
            while ray.get(worker.metrics.remote())["inflight"] == 0:  # the request below is running
                time.sleep(0.02)
            ray.kill(worker, no_restart=False)

        killer = threading.Thread(target=kill_mid_request, daemon=True)
        killer.start()
        groups = asyncio.run(pool.student_rollouts(["q one", "q two", "q three"], n=3))
        killer.join(timeout=5)
        assert [len(g) for g in groups] == [3] * 3
        assert {t.version for g in groups for t in g} == {1}  # nothing produced with the base weights
        assert ray.get(worker.get_version.remote()) == 1
        health = pool.health()["rollout-student-0"]
        assert health["alive"] and health["restarts"] == 1 and health["last_error"]
        assert pool.retried >= 1
    finally:
        pool.shutdown()
