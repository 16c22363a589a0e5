"""Round trip: learner step -> object-store bundle -> a vLLM RolloutWorker (issue 4) -> its sampling logprobs
equal transformers holding the learner's weights. Slow: it starts a vLLM CPU engine and a DeepSpeed group."""

from __future__ import annotations

import pytest
import ray
import torch
from helpers.learner_vllm import sampled_logprobs, student_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from piplay_ray.config import load_config
from piplay_ray.learner.learner import LearnerGroup

pytestmark = pytest.mark.slow


RAY_CPUS = 4


def test_rollout_worker_matches_transformers_after_a_learner_step(ray_local, tiny_model):
    from piplay_ray.actors.rollout import RolloutWorker, turn_limits
    from piplay_ray.method import protocol

    cfg = load_config("configs/tiny.yaml", [f"model.base={tiny_model}", "learner.lr=0.01", "rollout.engine=vllm"])
    class NoSearch:  # defined here so Ray ships it by value; the round trip needs no retrieval
        async def search(self, query: str, topk: int | None = None):
            from piplay_ray.records import Hop

            return Hop(query=query, ok=False, error="no search in this test"), "no results"

    worker = RolloutWorker.options(num_cpus=1).remote("student", tiny_model, cfg.rollout, NoSearch(),
                                                      max_turns=turn_limits(cfg), dtype=cfg.model.dtype)
    group = LearnerGroup(cfg, roles=("student",))
    for _ in range(2):
        group.train_step("student", student_batch(seed=3))
    bundle = group.weights("student")
    assert ray.get(worker.update_weights.remote(bundle.version, bundle)) == 2
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = protocol.student_prompt_ids(tok, "Which river flows through Paris?")
    trajs = ray.get(worker.rollouts.remote([prompt, prompt]))
    trained = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    trained.load_state_dict(group.state_dict("student"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for t in trajs:
        assert t.version == 2 and sum(t.mask) > 0
        got = torch.tensor([lp for lp, m in zip(t.logprobs, t.mask, strict=True) if m])
        want = sampled_logprobs(trained, t)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
        assert (want - sampled_logprobs(base, t)).abs().max() > 0.05  # the step really moved it
    ray.get(worker.shutdown.remote())
    group.shutdown()
