"""Warm-start demonstrations: the agent loop's exact token layout, RL masking, and no held-out leak."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from helpers.search import Search
from transformers import AutoTokenizer

from piplay_ray.config import load_config
from piplay_ray.engines.base import Engine, Generation, SamplingSpec, TopK
from piplay_ray.evolution import warmup
from piplay_ray.method import demos, protocol
from piplay_ray.method.agent import run_agent
from piplay_ray.method.qa import builtin_eval_set, natural_set
from piplay_ray.method.rewards import exact_match, format_reward


class Replay(Engine):
    """Plays back a demonstration's model turns, so the real agent loop rebuilds the rest."""

    def __init__(self, turns: list[list[int]]):
        self.turns = iter(turns)

    async def generate(self, prompt_ids, spec):
        ids = next(self.turns)
        return Generation(ids, [0.0] * len(ids), "stop")

    async def prompt_topk(self, token_ids, start, k):
        return TopK([], [])

    def update_weights(self, version, weights):
        pass


def _segments(mask: list[int], ids: list[int]) -> list[tuple[int, list[int]]]:
    out, i = [], 0
    for m, group in itertools.groupby(mask):
        n = len(list(group))
        out.append((m, ids[i : i + n]))
        i += n
    return out


@pytest.fixture(scope="module")
def setup(tiny_model, corpus_path):
    cfg = load_config("configs/tiny.yaml", ["eval.rule_size=200"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    held = set(warmup.held_out_ids(cfg, corpus_path))
    search = warmup._search_fn(cfg.search)
    articles = demos.load_articles(corpus_path)
    built = {role: demos.build_demos(articles, search, tok, role, 12, (1, 1, 1), held, 0, cfg.search.doc_token_budget)
             for role in ("student", "examiner")}
    return cfg, tok, held, search, built


def test_demos_replay_through_the_agent_loop_with_rl_masks(setup):
    cfg, tok, _, search, built = setup
    for role, ds in built.items():
        assert len(ds) == 12, role
        assert {len(d.chain) for d in ds} >= {1, 2}, "multi-hop chains are built"
        for d in ds:
            segs = _segments(d.mask, d.response_ids)
            model_turns = [ids for m, ids in segs if m == 1]
            infos = [tok.decode(ids) for m, ids in segs if m == 0]
            searches = len(d.chain) if role == "student" else len(d.chain) - 1
            assert len(infos) == searches and len(model_turns) == searches + 1
            assert all(t.strip().startswith(protocol.INFO_OPEN) and t.strip().endswith(protocol.INFO_CLOSE)
                       for t in infos)  # every inserted token is an information block, mask 0
            assert not any(protocol.INFO_OPEN in tok.decode(t) for t in model_turns)
            # the real agent loop, replaying the model turns against the same search, rebuilds it exactly
            traj = asyncio.run(run_agent(Replay(model_turns), Search(search), tok, d.prompt_ids,
                                         SamplingSpec(max_tokens=4096), max_turns=len(model_turns), role=role,
                                         max_response_tokens=8192))
            assert traj.response_ids == d.response_ids and traj.mask == d.mask
            assert traj.answer == d.answer == d.chain[-1].name
            assert [h.query for h in traj.hops] == [tok.decode(t).split("<search>")[-1].split("</search>")[0]
                                                   for t in model_turns[:-1]]
            if role == "examiner":  # a demonstration passes the integrity gate it teaches
                r_f, flags = format_reward(traj.extra["question"], traj.answer, len(d.chain), traj.hops,
                                           d.chain[0].doc(), traj.finish_reason, cfg.examiner.answer_max_words)
                assert all(flags.values()) and r_f == 1.0, flags
            else:
                assert traj.finish_reason == "answer" and exact_match(traj.answer, d.answer) == 1.0


def test_no_held_out_question_or_document_in_demonstrations(setup, corpus_path):
    cfg, tok, held, search, built = setup
    eval_set = builtin_eval_set(corpus_path, cfg.eval.rule_size, cfg.run.seed) + natural_set(corpus_path)
    assert held == {s for ex in eval_set for s in ex.supports} and len(held) > 200
    eval_questions = {ex.question for ex in eval_set}
    for d in (d for ds in built.values() for d in ds):
        assert not {a.id for a in d.chain} & held
        text = tok.decode(d.prompt_ids + d.response_ids)
        assert not any(q in text for q in eval_questions)
        queries = [d.chain[0].name] if d.role == "student" else []
        for docs, _ in search(queries + [a.name for a in d.chain[1:]]):
            assert not {doc.id for doc in docs} & held


def test_held_out_articles_are_refused_as_links(setup, corpus_path):
    cfg, tok, held, search, _ = setup
    articles = demos.load_articles(corpus_path)
    everything = {a.id for a in articles}
    # holding out every article leaves nothing to demonstrate
    assert demos.build_demos(articles, search, tok, "student", 4, (1,), everything, 0, 64) == []


def test_chain_question_reads_outward_from_the_first_article():
    a = demos.Article("1", "Oxytocin", "", "Peptide hormone")
    b = demos.Article("2", "Childbirth", "", "Conclusion of the human pregnancy")
    c = demos.Article("3", "Mother", "", "Female parent")
    assert demos.chain_question("What is X?", [a]) == "What is X?"
    assert demos.chain_question("What is X?", [a, b, c]) == (
        "Which female parent is mentioned in the article on the conclusion of the human pregnancy mentioned in "
        "the article that answers: What is X?")


def test_recipe_specs_and_fingerprint(corpus_path):
    cfg = load_config("configs/local.yaml")
    assert warmup.recipe_name("builtin:smollm2-search") == "smollm2-search"
    assert warmup.recipe_name("builtin:smollm2") is None and warmup.recipe_name("/some/dir") is None
    held = warmup.held_out_ids(cfg, corpus_path)
    fp = warmup.fingerprint("smollm2-search", cfg, corpus_path, held)
    assert fp == warmup.fingerprint("smollm2-search", cfg, corpus_path, list(held))
    other = load_config("configs/local.yaml", ["eval.rule_size=50"])
    assert fp != warmup.fingerprint("smollm2-search", other, corpus_path, warmup.held_out_ids(other, corpus_path))
    with pytest.raises(ValueError, match="piplay warmup"):
        from piplay_ray import assets

        assets.resolve_model("builtin:smollm2-search")
