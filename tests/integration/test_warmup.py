"""The warm start on SmolLM2 (slow): a few SFT steps through the DeepSpeed learner raise the protocol answer rate."""

from __future__ import annotations

import asyncio

import pytest
from helpers.search import Search

from piplay_ray import assets
from piplay_ray.config import load_config
from piplay_ray.engines.base import SamplingSpec
from piplay_ray.evolution import warmup
from piplay_ray.method.agent import run_agent
from piplay_ray.method.qa import builtin_eval_set

pytestmark = pytest.mark.slow


RAY_CPUS = 8


def answer_rate(model_dir: str, questions: list[str], cfg) -> tuple[float, float]:
    """(share of greedy trajectories that end in a well-formed answer, searches per question)."""
    from piplay_ray.engines.transformers_engine import TransformersEngine
    from piplay_ray.method import protocol

    engine = TransformersEngine(model_dir, dtype="float32")
    search = Search(warmup._search_fn(cfg.search))
    spec = SamplingSpec(max_tokens=cfg.rollout.turn_tokens, temperature=0.0)

    async def one(q):
        return await run_agent(engine, search, engine.tokenizer, protocol.student_prompt_ids(engine.tokenizer, q),
                               spec, cfg.student.max_turns, max_response_tokens=cfg.rollout.max_response_tokens)

    trajs = [asyncio.run(one(q)) for q in questions]
    return (sum(t.finish_reason == "answer" for t in trajs) / len(trajs),
            sum(t.num_searches for t in trajs) / len(trajs))


def test_warm_start_raises_the_answer_rate(ray_local, tmp_path, monkeypatch, corpus_path):

    cfg = load_config("configs/local.yaml", ["eval.rule_size=20"])
    monkeypatch.setitem(warmup.RECIPES, "smollm2-few", assets.Recipe(
        "builtin:smollm2", student_demos=24, examiner_demos=8, student_hops=(7, 3), examiner_hops=(1,), lr=5e-5,
        batch=8))
    held = warmup.held_out_ids(cfg, corpus_path)
    meta = warmup._train("smollm2-few", cfg, corpus_path, set(held), tmp_path)
    assert meta["demos"] == {"student": 24, "examiner": 8}
    assert meta["nll"]["student"][-1] < meta["nll"]["student"][0]
    questions = [ex.question for ex in builtin_eval_set(corpus_path, 20, cfg.run.seed)][:12]
    before, _ = answer_rate(assets.smollm2_path().as_posix(), questions, cfg)
    after, searches = answer_rate(str(tmp_path / "student"), questions, cfg)
    print(f"answer rate before {before:.2f}, after {after:.2f}; searches per question after {searches:.2f}")
    assert after > before and after >= 0.5 and searches >= 0.5
