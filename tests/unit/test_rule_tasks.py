"""The task-set top-up by rule: held-out eval questions excluded, QCP leads to the answer's article."""

from __future__ import annotations

import json

from piplay_ray.evolution.taskset import rule_tasks
from piplay_ray.method.qa import builtin_eval_set, golden_for_title
from piplay_ray.retrieval.corpus import Corpus


def test_rule_tasks_exclude_the_eval_set_and_carry_their_source(corpus_path):
    corpus = Corpus(corpus_path)
    tasks = rule_tasks(corpus, 12, iteration=0, seed=0, eval_size=50)
    held_out = {ex.id.removeprefix("builtin-") for ex in builtin_eval_set(corpus_path, 50, 0)}
    assert len(tasks) == 12 and len({t.id for t in tasks}) == 12
    for t in tasks:
        assert t.source.id not in held_out
        assert t.answer in golden_for_title(t.source.title)
        assert [d.id for d in t.qcp[0].docs] == [t.source.id] and t.flags == {"rule_built": True}
    assert rule_tasks(corpus, 12, iteration=0, seed=0, eval_size=50) == tasks  # seeded


def test_corpus_without_descriptions_gives_no_rule_tasks(tmp_path):
    path = tmp_path / "wiki18.jsonl"
    path.write_text("\n".join(json.dumps({"id": str(i), "contents": f'"T{i}"\nText {i} is a thing.'})
                              for i in range(5)) + "\n")
    assert rule_tasks(Corpus(path), 3, iteration=0, seed=0, eval_size=2) == []
