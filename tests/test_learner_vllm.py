"""Round trip: learner step -> object-store bundle -> a vLLM RolloutWorker (issue 4) -> its sampling logprobs
equal transformers holding the learner's weights. Slow: it starts a vLLM CPU engine and a DeepSpeed group."""

from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from piplay_ray.config import load_config
from piplay_ray.learner.learner import LearnerGroup
from piplay_ray.records import Experience

pytestmark = pytest.mark.slow


def _batch(seed: int) -> list[Experience]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(4):
        prompt, resp = torch.randint(5, 2000, (8,), generator=g), torch.randint(5, 2000, (16 + 3 * i,), generator=g)
        out.append(Experience(group_id=str(i // 2), role="student", prompt_ids=prompt.tolist(),
                              response_ids=resp.tolist(), mask=[1] * len(resp), logprobs=[-7.0] * len(resp),
                              reward=float(i % 2), advantage=1.0 if i % 2 else -1.0, version=0))
    return out


def _sampled_logprobs(model, traj) -> torch.Tensor:
    """Transformers' logprob of every model-generated token of a trajectory."""
    ids = traj.prompt_ids + traj.response_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    p = len(traj.prompt_ids)
    pos = [p + i for i, m in enumerate(traj.mask) if m]
    return lp[[q - 1 for q in pos], [ids[q] for q in pos]]


def test_rollout_worker_matches_transformers_after_a_learner_step(tiny_model):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
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
            group.train_step("student", _batch(seed=3))
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
            want = _sampled_logprobs(trained, t)
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
            assert (want - _sampled_logprobs(base, t)).abs().max() > 0.05  # the step really moved it
        ray.get(worker.shutdown.remote())
        group.shutdown()
    finally:
        ray.shutdown()
