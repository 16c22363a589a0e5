"""Evaluation: QA file formats, the built-in set, scoring with exactly known answers."""

from __future__ import annotations

import asyncio
import json

import pytest

from piplay_ray.evolution import evaluation as E
from piplay_ray.fault import RolloutFailed
from piplay_ray.method import qa as Q
from piplay_ray.method import scores as S
from piplay_ray.monitor import heldout
from piplay_ray.records import Hop, Trajectory


def test_load_qa_jsonl_and_parquet(tmp_path):
    rows = [{"id": "a", "question": "Who?", "golden_answers": ["X", "Y"], "data_source": "nq"},
            {"question": " Where? ", "golden_answers": "Z"}]
    p = tmp_path / "dev.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    exs = Q.load_qa(p)
    assert [(e.id, e.question, e.golden_answers, e.data_source) for e in exs] == [
        ("a", "Who?", ["X", "Y"], "nq"), ("1", "Where?", ["Z"], "dev")]

    import pyarrow as pa
    import pyarrow.parquet as pq

    # FlashRAG-style columns, and Search-R1's processed layout (answers under reward_model.ground_truth)
    pq.write_table(pa.table({"question": ["Q1"], "golden_answers": [["A1", "A2"]], "data_source": ["hotpotqa"]}),
                   tmp_path / "h.parquet")
    pq.write_table(pa.table({"question": ["Q2"], "data_source": ["nq"],
                             "reward_model": [{"ground_truth": {"target": ["T"]}, "style": "rule"}]}),
                   tmp_path / "s.parquet")
    assert [(e.question, e.golden_answers, e.data_source) for e in Q.load_qa(tmp_path / "h.parquet")] == [
        ("Q1", ["A1", "A2"], "hotpotqa")]
    assert Q.load_qa(tmp_path / "s.parquet")[0].golden_answers == ["T"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no answers"}) + "\n")
    with pytest.raises(ValueError, match="golden_answers"):
        Q.load_qa(bad)
    with pytest.raises(Q.DataError, match="not found"):
        Q.load_qa(tmp_path / "nope.jsonl")


GOOD = json.dumps({"question": "Who?", "golden_answers": ["X"]})


@pytest.mark.parametrize("lines,where,message", [
    ([GOOD, "", "{broken"], 3, "not JSON"),  # the blank line counts: file lines, not rows
    ([GOOD, "[1, 2]"], 2, "expected a JSON object"),
    (["", GOOD, "", json.dumps({"question": "Q", "golden_answers": {"a": "X"}})], 4,
     "`golden_answers` must be a list of strings (or one string), got dict"),
    ([GOOD, json.dumps({"question": "Q", "golden_answers": [["nested"]]})], 2, "must hold strings"),
    ([GOOD, json.dumps({"golden_answers": ["X"]})], 2, "needs a non-empty `question`"),
    ([GOOD, "[" * 100_000], 2, "not JSON"),
])
def test_data_errors_name_file_and_line(tmp_path, lines, where, message):
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(Q.DataError) as e:
        Q.load_qa(p)
    assert str(e.value).startswith(f"{p}:{where}: ") and message in str(e.value)


def test_parquet_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["Q1", ""], "golden_answers": [["A"], ["B"]]}), tmp_path / "q.parquet")
    with pytest.raises(Q.DataError, match=r"q\.parquet: row 1: needs a non-empty"):
        Q.load_qa(tmp_path / "q.parquet")
    (tmp_path / "not.parquet").write_text("plain text")
    with pytest.raises(Q.DataError, match="cannot read Parquet"):
        Q.load_qa(tmp_path / "not.parquet")


def test_cli_eval_reports_data_errors_without_traceback(tmp_path, capsys):
    from piplay_ray.cli import main

    p = tmp_path / "qa.jsonl"
    p.write_text(GOOD + "\n" + json.dumps({"question": "Q", "golden_answers": {"a": 1}}) + "\n")
    for data in (p, tmp_path / "missing.jsonl"):
        rc = main(["eval", "-c", "configs/tiny.yaml", "--model", "builtin:tiny", "--data", str(data)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"piplay: {p}:2: `golden_answers`" if data == p else "piplay: QA file")
    p.write_text(GOOD + "\n")
    rc = main(["eval", "-c", "configs/tiny.yaml", "--model", "builtin:nope", "--data", str(p)])
    assert rc == 2 and capsys.readouterr().err == ("piplay: unknown built-in model 'builtin:nope'; "
                                                  "allowed: builtin:smollm2, builtin:tiny\n")


def test_rule_question():
    q = Q.rule_question("Jupiter", '"Jupiter"\nJupiter is the fifth planet from the Sun and the largest in the '
                        "Solar System. It is a gas giant.", "Fifth planet from the Sun")
    assert q == "What is the fifth planet from the Sun and the largest in the Solar System? (Fifth planet from the Sun)"
    # the answer must not leak: a title word in the predicate or description rejects the document
    assert Q.rule_question("Jupiter", "Jupiter is the largest planet, named after Jupiter the god.", "Planet") is None
    assert Q.rule_question("Gas", "Gas is a state of matter of gas.", "x") is None
    assert Q.rule_question("X", "No copula here at all in this line.", "d") is None
    assert Q.rule_question("Tom", "Tom is short.", "Cat") is None  # predicate under four words
    assert Q.golden_for_title("Protein (nutrient)") == ["Protein (nutrient)", "Protein"]
    assert Q.golden_for_title("Jupiter") == ["Jupiter"]


def test_builtin_set_deterministic_and_clean(corpus_path):
    a = Q.builtin_eval_set(corpus_path, 50, seed=0)
    assert a == Q.builtin_eval_set(corpus_path, 50, seed=0)
    assert a != Q.builtin_eval_set(corpus_path, 50, seed=1)
    assert len(a) == 50 and len({e.id for e in a}) == 50
    from piplay_ray.method.rewards import normalize_answer as norm

    # no gold answer in its question as whole words (the rule keeps out every title word; the examiner's
    # gate is stricter, a substring: "Iran" in "Iranian")
    assert all(f" {norm(g)} " not in f" {norm(e.question)} " for e in a for g in e.golden_answers)
    assert all(e.data_source == Q.RULE_SOURCE for e in a)


def test_builtin_set_bm25_finds_answer_article(corpus_path):
    from piplay_ray.config import SearchConfig
    from piplay_ray.retrieval import make_retriever

    examples = Q.builtin_eval_set(corpus_path, 100, seed=0)
    rate = Q.answer_article_rate(examples, make_retriever(SearchConfig(corpus=corpus_path)), k=5)
    print(json.dumps({"metric": "builtin_bm25_top5_answer_article_rate", "seed": 0, "n": 100, "value": rate}))
    assert rate >= 0.8


# ------------------------------------------------------------------------------------------ scoring

EXAMPLES = [
    Q.QAExample("1", "q1", ["Paris"], "a"),
    Q.QAExample("2", "q2", ["Barack Obama"], "a"),
    Q.QAExample("3", "q3", ["York City", "New York"], "b"),
    Q.QAExample("4", "q4", ["Tokyo"], "b"),
]


class ScriptedPool:
    """Answers each question with a fixed trajectory, the way a rollout pool would return it."""

    def __init__(self, script: dict[str, Trajectory]):
        self.script, self.calls = script, []

    async def student_rollouts(self, questions, n, temperature=None, closed_book=False):
        self.calls.append((list(questions), n) + (("closed_book",) if closed_book else ()))
        assert temperature == 0.0  # evaluation decodes greedily
        return [[self.script[q]] for q in questions]


def _traj(answer, searches, finish="answer"):
    return Trajectory(prompt_ids=[0], hops=[Hop(f"s{i}") for i in range(searches)], answer=answer,
                      finish_reason=finish, turns=searches + 1)


def test_scores_exactly_known():
    pool = ScriptedPool({"q1": _traj("the Paris.", 1), "q2": _traj("Barack Obama Jr", 2),
                         "q3": _traj("New York", 0), "q4": _traj(None, 3, finish="max_turns")})
    summary, records = asyncio.run(E.evaluate(pool, EXAMPLES))
    assert pool.calls == [(["q1", "q2", "q3", "q4"], 1)]
    assert [r["em"] for r in records] == [1.0, 0.0, 1.0, 0.0]
    # by hand: q1 EM/F1 1; q2 F1 = 2*(2/3*1)/(2/3+1) = .8; q3 1 (best gold); q4 no answer: 0
    assert [r["f1"] for r in records] == pytest.approx([1.0, 0.8, 1.0, 0.0])
    assert summary["a"] == pytest.approx({"em": 0.5, "f1": 0.9, "searches": 1.5, "turns": 2.5,
                                          "answer_words": 2.5, "invalid": 0.0, "n": 2})
    # answer_words over answered examples only (q3: 2 words); invalid: q4
    assert summary["b"] == pytest.approx({"em": 0.5, "f1": 0.5, "searches": 1.5, "turns": 2.5,
                                          "answer_words": 2.0, "invalid": 0.5, "n": 2})
    assert summary["overall"] == pytest.approx({"em": 0.5, "f1": 0.7, "searches": 1.5, "turns": 2.5,
                                                "answer_words": 7 / 3, "invalid": 0.25, "n": 4})
    flat = S.flat_metrics(summary)
    assert flat["eval/overall/em"] == 0.5 and flat["eval/b/invalid"] == 0.5
    table = S.format_table({"agent": summary}).splitlines()
    assert table[0].split() == ["group", "n", "agent", "em", "agent", "f1", "agent", "searches"]
    assert table[-1].split() == ["overall", "4", "0.500", "0.700", "1.500"]


class LosingPool(ScriptedPool):
    """Loses `lose` questions after its retries (RolloutFailed with the rest), `times` requests in a row."""

    def __init__(self, script, lose, times):
        super().__init__(script)
        self.lose, self.times = set(lose), times

    async def student_rollouts(self, questions, n, temperature=None, closed_book=False):
        out = await super().student_rollouts(questions, n, temperature, closed_book)
        if self.times:
            self.times -= 1
            out = [None if q in self.lose else g for q, g in zip(questions, out, strict=True)]
            raise RolloutFailed("worker died", out)
        return out


@pytest.mark.parametrize("times", [1, 2])
def test_a_lost_question_is_asked_again_then_scored_unanswered(tmp_path, monkeypatch, times):
    from piplay_ray.config import load_config

    pool = LosingPool({q: _traj("Paris", 0) for q in ("q1", "q2", "q3", "q4")}, lose={"q1", "q3"}, times=times)
    summary, records = asyncio.run(E.evaluate(pool, EXAMPLES))
    assert pool.calls[1] == (["q1", "q3"], 1)  # once more, only those
    if times == 1:
        assert records[0]["em"] == 1.0 and records[0]["finish_reason"] == "answer"
    else:
        assert [r["finish_reason"] for r in records] == ["lost: worker died", "answer", "lost: worker died", "answer"]
        assert [r["em"] for r in records] == [0.0, 0.0, 0.0, 0.0] and summary["overall"]["invalid"] == 0.5
        pool.times = 2
        cfg = load_config("configs/tiny.yaml")
        monkeypatch.setattr(E, "load_eval_examples", lambda cfg: EXAMPLES)
        scores = asyncio.run(E.evaluate_pool(pool, cfg, tmp_path))
        assert scores["overall/lost"] == 2 and json.loads((tmp_path / "metrics.json").read_text())["lost"] == 2


def test_write_results(tmp_path):
    pool = ScriptedPool({q: _traj("Paris", 0) for q in ("q1", "q2", "q3", "q4")})
    summary, records = asyncio.run(E.evaluate(pool, EXAMPLES))
    out = E.write_results(tmp_path / "ev", summary, records, {"model": "m"})
    lines = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["1", "2", "3", "4"] and lines[0]["prediction"] == "Paris"
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["model"] == "m" and meta["summary"]["overall"]["em"] == 0.25


def test_load_eval_examples_uses_config(tmp_path, corpus_path):
    from piplay_ray.config import Config

    cfg = Config()
    cfg.search.corpus = corpus_path
    cfg.eval.rule_size, cfg.eval.natural_size = 7, 5
    got = E.load_eval_examples(cfg)
    assert [e.data_source for e in got] == [Q.NATURAL_SOURCE] * 5 + [Q.RULE_SOURCE] * 7
    cfg.eval.natural_size = None  # all of them
    assert len(E.load_eval_examples(cfg)) == len(Q.natural_set(corpus_path)) + 7
    cfg.eval.natural_size = 0
    assert len(E.load_eval_examples(cfg)) == 7
    p = tmp_path / "x.jsonl"
    p.write_text("".join(json.dumps({"question": f"q{i}", "golden_answers": ["a"]}) + "\n" for i in range(5)))
    cfg.eval.max_examples = 3
    assert [e.question for e in E.load_eval_examples(cfg, [str(p)])] == ["q0", "q1", "q2"]
    assert E.eval_config(cfg).rollout.temperature == 0.0 and cfg.rollout.temperature == 1.0


def test_evaluate_pool_for_the_driver(tmp_path):
    from piplay_ray.config import Config

    p = tmp_path / "qa.jsonl"
    p.write_text("".join(json.dumps({"question": e.question, "golden_answers": e.golden_answers,
                                     "data_source": e.data_source}) + "\n" for e in EXAMPLES))
    cfg = Config()
    cfg.eval.data = [str(p)]
    pool = ScriptedPool({"q1": _traj("Paris", 1), "q2": _traj("Obama", 1), "q3": _traj("Kyoto", 1),
                         "q4": _traj("Tokyo", 1)})
    scores = asyncio.run(E.evaluate_pool(pool, cfg, tmp_path / "out"))
    # EM 1, 0, 0, 1; F1: q2 "obama" vs "barack obama" = 2*(1*.5)/1.5 = 2/3
    assert scores["overall/em"] == 0.5 and scores["a/f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert scores["overall/n"] == 4 and (tmp_path / "out" / "examples.jsonl").is_file()


KINDS = [Q.QAExample("n1", "q1", ["Paris"], "natural", "single"), Q.QAExample("n2", "q2", ["Obama"], "natural", "bridge"),
         Q.QAExample("n3", "q3", ["Rome"], "natural", "comparison"), Q.QAExample("r1", "q4", ["Tokyo"], "rule", "")]


def test_groups_per_set_and_single_or_two_article_question():
    pool = ScriptedPool({"q1": _traj("Paris", 1), "q2": _traj("Obama", 2), "q3": _traj("Milan", 3),
                         "q4": _traj("Tokyo", 0)})
    summary, _ = asyncio.run(E.evaluate(pool, KINDS))
    assert {g: (m["n"], m["em"], m["searches"]) for g, m in summary.items()} == {
        "natural": (3, 2 / 3, 2.0), "natural/single": (1, 1.0, 1.0), "natural/two-article": (2, 0.5, 2.5),
        "rule": (1, 1.0, 0.0), "overall": (4, 0.75, 1.5)}


def test_file_kinds(tmp_path):
    """A file's kind: `kind`, else FlashRAG's metadata.type (HotpotQA's bridge / comparison); others ignored."""
    p = tmp_path / "hotpot.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "a", "golden_answers": ["x"], "metadata": {"type": "comparison"}},
        {"question": "b", "golden_answers": ["x"], "kind": "single"},
        {"question": "c", "golden_answers": ["x"], "metadata": {"type": "multihop"}}]))
    assert [e.kind for e in Q.load_qa(p)] == ["comparison", "single", ""]


def test_closed_book_asks_the_pool_without_search():
    pool = ScriptedPool({"q1": _traj("Paris", 0), "q2": _traj(None, 0, "max_turns"), "q3": _traj("Rome", 0),
                         "q4": _traj("Tokyo", 0)})
    summary, records = asyncio.run(E.evaluate(pool, KINDS, closed_book=True))
    assert pool.calls == [(["q1", "q2", "q3", "q4"], 1, "closed_book")]
    assert summary["overall"]["em"] == 0.75 and summary["overall"]["invalid"] == 0.25


class TopOne:
    """A search env answering each query with the documents a dict names (none when absent)."""

    def __init__(self, titles):
        self.titles, self.calls = titles, []

    def search(self, queries, topk=None):
        from piplay_ray.actors.search_service import SearchResult
        from piplay_ray.records import Doc

        self.calls.append((list(queries), topk))
        return [SearchResult(query=q, docs=[Doc("0", self.titles[q], "text")] if q in self.titles else [])
                for q in queries]


def test_retrieval_baseline_answers_the_top_article_title():
    search = TopOne({"q1": "Paris", "q2": "Barack Obama", "q3": "Rome (city)"})
    records = E.retrieval_records(search, KINDS)
    assert search.calls == [(["q1", "q2", "q3", "q4"], 1)]
    # the disambiguation suffix is dropped; "Barack Obama" vs "Obama": EM 0, F1 2*(.5*1)/1.5; q4: no document
    assert [r["prediction"] for r in records] == ["Paris", "Barack Obama", "Rome", None]
    assert [r["em"] for r in records] == [1.0, 0.0, 1.0, 0.0]
    assert records[1]["f1"] == pytest.approx(2 / 3) and records[3]["invalid"] == 1.0
    assert all(r["searches"] == 1 for r in records)


def test_paired_change_by_question():
    before = [{"id": i, "em": e} for i, e in zip("abcdef", [0, 0, 1, 1, 0, 1], strict=True)]
    after = [{"id": i, "em": e} for i, e in zip("abcdeg", [1, 0, 1, 0, 1, 1], strict=True)]  # f, g unpaired
    c = heldout.paired(before, after)
    # pairs a..e: diffs +1, 0, 0, -1, +1: mean .2, sample var (.64+.04+.04+1.44+.64)/4 = .7, se sqrt(.7/5)
    assert c == pytest.approx({"n": 5, "before": 0.4, "after": 0.6, "delta": 0.2, "se": (0.7 / 5) ** 0.5,
                               "gained": 2, "lost": 1})
    assert heldout.paired(before, [{"id": "z", "em": 1}]) is None
