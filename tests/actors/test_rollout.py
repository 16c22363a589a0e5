"""Rollout workers on Ray: vLLM + the real BM25 search env end to end, weight pushes, spreading over workers.

The tiny model is first taught (a few seconds of training, in the test) to search once and then answer, so
that its rollouts really are multi-turn with inserted `<information>` tokens. Every trajectory's sampling
logprobs are then recomputed by transformers over the whole token sequence.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch
from helpers.rollout import QUESTIONS
from transformers import AutoModelForCausalLM

from piplay_ray.actors.rollout_pool import RolloutPool, _split, cpu_core_binding, lora_sync_form
from piplay_ray.config import load_config
from piplay_ray.method import protocol as P
from piplay_ray.records import Doc, Hop, Trajectory

TOL = 2e-3


RAY_CPUS = 4


@pytest.fixture(scope="module")
def ray_session(ray_local):
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FakeSearch travels to the workers
    return ray_local


def tiny_cfg(**rollout):
    cfg = load_config("configs/tiny.yaml")
    cfg.rollout.max_tokens_per_turn = 48
    cfg.rollout.max_response_tokens = 320
    cfg.rollout.temperature = 1.0
    for k, v in rollout.items():
        setattr(cfg.rollout, k, v)
    cfg.search.doc_token_budget = 24
    return cfg


class FakeSearch:
    async def search(self, query: str, topk: int | None = None):
        return Hop(query=query, docs=[Doc("0", "T", "text")]), "Doc 1 (Title: T) text"


def test_split():
    assert [list(r) for r in _split(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in _split(1, 3)] == [[0], [], []]


def recompute(model, traj: Trajectory) -> list[float]:
    """Teacher-forced logprobs of the response tokens (all of them; compare where mask is 1)."""
    ids = torch.tensor([traj.prompt_ids + traj.response_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = len(traj.prompt_ids)
    pos = torch.arange(n - 1, n - 1 + len(traj.response_ids))
    return logp[pos, torch.tensor(traj.response_ids)].tolist()


def assert_logprobs_match(model, trajs: list[Trajectory]) -> None:
    for t in trajs:
        assert len(t.response_ids) == len(t.mask) == len(t.logprobs)
        ref = recompute(model, t)
        got = [lp for lp, m in zip(t.logprobs, t.mask, strict=True) if m]
        want = [lp for lp, m in zip(ref, t.mask, strict=True) if m]
        assert got == pytest.approx(want, abs=TOL), t.text
        assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.mask, strict=True) if not m)


def test_vllm_bm25_end_to_end(ray_session, agent_model):
    from piplay_ray.actors.search_env import SearchEnvPool

    cfg = tiny_cfg(engine="vllm", workers_per_role=1)
    search = SearchEnvPool(cfg.search)
    pool = RolloutPool.from_config("student", agent_model, cfg, search)
    try:
        pool.wait_ready()
        groups = asyncio.run(pool.student_rollouts(QUESTIONS[:4], n=3))
        assert [len(g) for g in groups] == [3, 3, 3, 3]
        trajs = [t for g in groups for t in g]
        assert all(t.version == 0 and t.role == "student" for t in trajs)
        searched = [t for t in trajs if t.hops]
        assert len(searched) >= 6, [t.text for t in trajs]  # the taught model searches most of the time
        for t in searched:
            assert t.hops[0].ok and t.turns >= 2 and 0 in t.mask and P.INFO_OPEN in t.text
        with_docs = [t for t in searched if t.hops[0].docs]  # a garbled sampled query may find nothing
        assert len(with_docs) >= len(searched) // 2
        assert all(t.hops[0].docs[0].title in t.text for t in with_docs)  # real BM25 documents came back
        hf = AutoModelForCausalLM.from_pretrained(agent_model, dtype=torch.float32).eval()
        assert_logprobs_match(hf, trajs)

        # push perturbed weights through the pool (object store); new rollouts match the new weights
        g = torch.Generator().manual_seed(2)
        new = {n: p.detach() + 0.03 * p.detach().std() * torch.randn(p.shape, generator=g)
               for n, p in hf.named_parameters()}
        pool.update_weights(1, list(new.items()))
        trajs = [t for grp in asyncio.run(pool.student_rollouts(QUESTIONS[:2], n=2)) for t in grp]
        assert all(t.version == 1 for t in trajs)
        hf.load_state_dict(new)
        assert_logprobs_match(hf, trajs)

        ex = asyncio.run(pool.examiner_rollouts([Doc("5", "Nile", '"Nile"\nThe Nile is a river.')] * 2, [1, 3]))
        assert [t.extra["hop_target"] for t in ex] == [1, 3] and all(t.role == "examiner" for t in ex)
        assert pool.metrics()["generated_tokens"] > 0
    finally:
        pool.shutdown()
        search.shutdown()


def test_transformers_workers_spread(ray_session, tiny_model):
    cfg = tiny_cfg(engine="transformers", workers_per_role=2, max_tokens_per_turn=8, max_response_tokens=16)
    pool = RolloutPool.from_config("examiner", tiny_model, cfg, FakeSearch())
    try:
        docs = [Doc(str(i), f"D{i}", f"text {i}") for i in range(5)]
        trajs = asyncio.run(pool.examiner_rollouts(docs, [1, 2, 3, 4, 1]))
        assert [t.extra["source_id"] for t in trajs] == [d.id for d in docs]  # order kept across workers
        assert all(t.role == "examiner" and len(t.response_ids) > 0 for t in trajs)
        per = pool.metrics()["workers"]
        assert [m["trajectories"] for m in per] == [3, 2]
        with pytest.raises(ValueError):
            asyncio.run(pool.examiner_rollouts(docs, [1]))
    finally:
        pool.shutdown()


@pytest.mark.parametrize("cores,workers,cpus,expected", [
    ({}, 1, 2, {"examiner": ["0"], "student": ["1"]}),  # one core each, spread
    ({"student": 2}, 1, 2, {"examiner": ["0"], "student": ["0-1"]}),  # the student's engine on both
    ({"examiner": 2, "student": 2}, 1, 2, {"examiner": ["0-1"], "student": ["0-1"]}),  # each on both (local.yaml)
    ({}, 2, 4, {"examiner": ["0", "1"], "student": ["2", "3"]}),
    ({"student": 2}, 2, 4, {"examiner": ["0", "1"], "student": ["2-3", "0-1"]}),  # 3 + 2 > 4 cores: from 0
    ({}, 2, 2, {"examiner": ["0", "1"], "student": ["0", "1"]}),  # more engines than cores: they wrap
])
def test_cpu_core_binding(monkeypatch, cores, workers, cpus, expected):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    r = load_config("configs/local.yaml", [f"rollout.workers_per_role={workers}"]).rollout
    r.local_engine_cores = cores
    got = {role: [cpu_core_binding(r, True, role, i)["VLLM_CPU_OMP_THREADS_BIND"] for i in range(workers)]
           for role in expected}
    assert got == expected
    assert cpu_core_binding(r, False, "student", 0) == {}  # a cluster: each engine has its own machine's cores
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "7")
    assert cpu_core_binding(r, True, "student", 0) == {}  # the user's own binding wins


def test_lora_sync_form_is_adapter_only_when_every_engine_serves_it():
    form, line = lora_sync_form("student", [("adapter", None), ("adapter", None)])
    assert form == "adapter" and "adapter-only sync" in line and "student" in line
    why = "vLLM cannot serve LoRA here (ValueError: rank)"
    form, line = lora_sync_form("examiner", [("adapter", None), ("full", why)])
    assert form == "full" and line == f"learner.lora: {why}; the examiner engines get merged full weights"
