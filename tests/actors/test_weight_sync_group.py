"""The collective transport end to end on CPU (gloo): learner rank 0, a vLLM rollout worker, a transformers
rollout worker and the teacher in one group. After a sync the vLLM worker's sampling logprobs equal
transformers holding the learner's weights, the teacher's EMA equals the blend computed here, and a worker
killed between syncs rejoins (new generation) at the next one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import ray
import torch
from helpers.learner_vllm import sampled_logprobs, student_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from piplay_ray.config import load_config

RAY_CPUS = 6


def _check_vllm(worker, tiny_model, learner_sd, version):
    from piplay_ray.method import protocol

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = protocol.student_prompt_ids(tok, "Which river flows through Paris?")
    trajs = ray.get(worker.rollouts.remote([prompt, prompt]))
    trained = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    trained.load_state_dict(learner_sd)
    for t in trajs:
        assert t.version == version and sum(t.mask) > 0
        got = torch.tensor([lp for lp, m in zip(t.logprobs, t.mask, strict=True) if m])
        torch.testing.assert_close(got, sampled_logprobs(trained, t), atol=2e-3, rtol=0)


def test_collective_sync_to_vllm_transformers_and_teacher_with_a_restart(ray_local, tiny_model):
    from piplay_ray.actors.rollout import RolloutWorker, turn_limits
    from piplay_ray.learner.learner import LearnerGroup
    from piplay_ray.teacher.actor import create_teacher
    from piplay_ray.weight_sync.coordinator import GroupSync

    class NoSearch:  # defined here so Ray ships it by value; the sync needs no retrieval
        async def search(self, query: str, topk: int | None = None):
            from piplay_ray.records import Hop

            return Hop(query=query, ok=False, error="no search in this test"), "no results"

    cfg = load_config("configs/tiny.yaml", [f"model.base={tiny_model}", "learner.lr=0.01",
                                            "weight_sync.transport=collective", "weight_sync.timeout_s=120",
                                            "teacher.ema_tau=0.5"])
    hf_rollout = cfg.rollout.model_copy(update={"engine": "transformers"})
    kw = {"max_turns": turn_limits(cfg), "dtype": cfg.model.dtype}
    vllm_worker = RolloutWorker.options(num_cpus=1).remote("student", tiny_model, cfg.rollout, NoSearch(), **kw)
    hf_worker = RolloutWorker.options(num_cpus=0, max_restarts=1).remote("student", tiny_model, hf_rollout,
                                                                          NoSearch(), **kw)
    teacher = create_teacher(tiny_model, cfg)
    base = {n: t.clone() for n, t in ray.get(teacher.state.remote()).items()}
    group = LearnerGroup(cfg, roles=("student",))
    pool = SimpleNamespace(workers=[vllm_worker, hf_worker], version=0)
    sync = GroupSync("student", group, pool, teacher, retries=1)

    group.train_step("student", student_batch(seed=3))
    done = asyncio.run(sync.sync(1, "ema"))
    assert done["version"] == 1 and done["generation"] == 1 and done["bytes"] > 0
    sd = group.state_dict("student")
    _check_vllm(vllm_worker, tiny_model, sd, 1)
    assert ray.get(hf_worker.get_version.remote()) == 1
    ema = ray.get(teacher.state.remote())
    for name, psi in ema.items():  # psi = (1 - tau) base + tau theta, theta the learner's weights
        torch.testing.assert_close(psi, 0.5 * base[name] + 0.5 * sd[name], atol=1e-6, rtol=0)

    ray.kill(hf_worker, no_restart=False)  # between syncs: it comes back with the base weights
    group.train_step("student", student_batch(seed=4))
    done = asyncio.run(sync.sync(2, "skip"))
    assert done["generation"] == 2  # a new incarnation re-formed the group
    assert ray.get(hf_worker.get_version.remote()) == 2
    _check_vllm(vllm_worker, tiny_model, group.state_dict("student"), 2)
    assert ray.get(teacher.get_version.remote()) == 1  # skip: drained, EMA untouched
    ray.get(vllm_worker.shutdown.remote())
    group.shutdown()


@pytest.mark.parametrize("version", [None])
def test_rendezvous_ticket_round_trip(version):
    from piplay_ray.weight_sync.group import Rendezvous

    rdv = Rendezvous("10.0.0.1", 1234, 5, 3, 60.0)
    ticket = rdv.ticket(2, version)
    assert Rendezvous.of(ticket) == rdv and ticket["rank"] == 2 and ticket["version"] is None
