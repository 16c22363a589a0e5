"""The built-in natural-question set: answerable from the embedded corpus, apart from the rule-built questions
and the warm start's demonstrations, and only used on the corpus it was written on."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from piplay_ray.config import load_config
from piplay_ray.evolution.warmup import held_out_ids
from piplay_ray.method import qa as Q
from piplay_ray.method.rewards import normalize_answer


@pytest.fixture(scope="module")
def corpus(corpus_path):
    return {d["id"]: d for d in map(json.loads, open(corpus_path, encoding="utf-8"))}


@pytest.fixture(scope="module")
def rows():
    return json.loads(Q.NATURAL_FILE.read_text(encoding="utf-8"))


def _words(text: str) -> str:
    return f" {normalize_answer(text)} "


def test_size_shape_and_how_it_was_written(rows):
    qs = rows["questions"]
    assert len(qs) >= 300 and len(rows["about"]) > 200
    kinds = Counter(q["kind"] for q in qs)
    assert set(kinds) == set(Q.KINDS)
    assert 0.55 <= kinds["single"] / len(qs) <= 0.75  # about two thirds single-article
    assert len({q["id"] for q in qs}) == len(qs)
    assert len({normalize_answer(q["question"]) for q in qs}) == len(qs)
    for q in qs:
        assert len(q["supports"]) == (1 if q["kind"] == "single" else 2) == len(set(q["supports"])), q["id"]
        assert all(len(g.split()) <= 5 for g in q["golden_answers"]) and q["question"].endswith("?"), q["id"]


def test_every_answer_is_in_a_supporting_article_and_not_in_its_question(rows, corpus):
    for q in rows["questions"]:
        assert [corpus[s]["title"] for s in q["supports"]] == q["titles"], q["id"]
        text = "".join(_words(corpus[s]["contents"]) for s in q["supports"])
        for gold in q["golden_answers"]:
            assert normalize_answer(gold) and _words(gold) in text, (q["id"], gold)
            if q["kind"] != "comparison":  # a comparison names both candidates: the answer is one of them
                assert _words(gold) not in _words(q["question"]), (q["id"], gold)


def _content(text: str) -> set[str]:
    return {w for w in normalize_answer(text).split() if len(w) > 3}


def test_no_question_overlaps_the_rule_built_questions(rows, corpus):
    """Against every rule-built question the corpus yields (the evaluation set and the demonstrations'
    clues come from these): no same question, and none sharing half its content words with one of the
    same answer."""
    rule = {}
    for d in corpus.values():
        if q := Q.rule_question(d["title"], d["contents"], d.get("description") or ""):
            rule.setdefault(normalize_answer(d["title"]), []).append(q)
    every = {normalize_answer(q) for qs in rule.values() for q in qs}
    for q in rows["questions"]:
        assert normalize_answer(q["question"]) not in every, q["id"]
        mine = _content(q["question"])
        for gold in q["golden_answers"]:
            for other in rule.get(normalize_answer(gold), []):
                theirs = _content(other)
                assert len(mine & theirs) / max(1, len(mine | theirs)) < 0.5, (q["id"], other)


def test_the_demonstrations_never_touch_a_natural_question_article(rows, corpus_path):
    """The warm start drops every demonstration whose chain or search results touch a held-out article."""
    cfg = load_config("configs/local.yaml")
    held = set(held_out_ids(cfg, corpus_path))
    assert {s for q in rows["questions"] for s in q["supports"]} <= held


def test_natural_set_loads_samples_and_refuses_another_corpus(rows, corpus_path, tmp_path):
    full = Q.natural_set(corpus_path)
    assert [ex.id for ex in full] == [q["id"] for q in rows["questions"]]
    assert all(ex.data_source == Q.NATURAL_SOURCE and ex.kind in Q.KINDS and ex.supports for ex in full)
    part = Q.natural_set(corpus_path, 40, seed=3)
    assert len(part) == 40 and part == Q.natural_set(corpus_path, 40, seed=3) != Q.natural_set(corpus_path, 40, 4)
    assert [ex.id for ex in part] == sorted(ex.id for ex in part)  # file order kept
    other = tmp_path / "corpus.jsonl"
    other.write_text(json.dumps({"id": "0", "title": "Somewhere", "contents": "\"Somewhere\"\nA place."}) + "\n")
    assert Q.natural_set(other) == []
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert Q.natural_set(tmp_path / "bad.jsonl") == []
