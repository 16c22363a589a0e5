"""The teacher's privileged information: the rendered QCP of a 1-hop and a 3-hop task, the budget, the even
shortening that fits the engine, and the arms — against text and numbers worked out by hand."""

from __future__ import annotations

import pytest

from piplay_ray.method import privileged as PV
from piplay_ray.method import protocol as P
from piplay_ray.records import Doc, Hop, Task

SRC = Doc("s", "Alpha", "a1 a2 a3 a4 a5 a6 a7 a8 a9 a10")
B = Doc("b", "Beta", "b1 b2 b3 b4 b5 b6")
C = Doc("c", "Gamma", "c1 c2 c3")
D = Doc("d", "Delta", "d1 d2 d3 d4 d5 d6 d7 d8")
ONE_HOP = Task(id="one", question="Q1?", answer="a10", hops=1, source=SRC, qcp=[])
THREE_HOP = Task(id="three", question="Q3?", answer="d8", hops=3, source=SRC,
                 qcp=[Hop("beta query", [B, C]), Hop("delta query", [D])])


def test_one_hop_renders_the_source_document():
    assert PV.render(ONE_HOP, "qcp") == "\n".join([
        P.QCP_NOTE,
        "Source document: (Alpha) a1 a2 a3 a4 a5 a6 a7 a8 a9 a10",
        "(The question was written from the source document without searching.)"])
    # a budget of 4 words per document
    assert PV.render(ONE_HOP, "qcp", budget=4).splitlines()[1] == "Source document: (Alpha) a1 a2 a3 a4 …"


def test_three_hop_renders_source_then_each_search():
    assert PV.render(THREE_HOP, "qcp", budget=5) == "\n".join([
        P.QCP_NOTE,
        "Source document: (Alpha) a1 a2 a3 a4 a5 …",
        "Step 1: searched 'beta query'.",
        "  - (Beta) b1 b2 b3 b4 b5 …",
        "  - (Gamma) c1 c2 c3",
        "Step 2: searched 'delta query'.",
        "  - (Delta) d1 d2 d3 d4 d5 …"])
    # no budget: what the examiner saw (the source at SOURCE_DOC_WORDS, search docs as the search env cut them)
    full = PV.render(THREE_HOP, "qcp")
    assert "a10" in full and "b6" in full and "d8" in full and "…" not in full
    long_src = Doc("l", "Long", " ".join(f"w{i}" for i in range(300)))
    text = P.render_qcp(long_src, [])
    assert f"w{P.SOURCE_DOC_WORDS - 1} …" in text and f"w{P.SOURCE_DOC_WORDS}" not in text
    # a cap shortens every document evenly: each to at most 2 words, short ones untouched
    capped = PV.render(THREE_HOP, "qcp", budget=5, cap=2).splitlines()
    assert capped[1] == "Source document: (Alpha) a1 a2 …"
    assert capped[3:5] == ["  - (Beta) b1 b2 …", "  - (Gamma) c1 c2 …"] and capped[6] == "  - (Delta) d1 d2 …"


def _words(text: str) -> int:
    return len(text.split())


def test_fit_cap_even_shortening_by_hand():
    # a "tokenizer" that counts words; the response holds 10 tokens
    def length_at(cap):
        return _words(PV.render(THREE_HOP, "qcp", cap=cap)) + 10

    base = _words(PV.render(THREE_HOP, "qcp", cap=0))  # every document reduced to "(Title) …"
    # growing the cap from c to c+1 adds one word per document longer than c: 4 docs while c < 3, then 3
    # (Gamma has 3 words; a capped document also gains its "…" once it is cut), so by hand:
    assert length_at(None) == base + 10 + (10 + 6 + 3 + 8) - 4  # full: every word, no "…"
    assert length_at(3) == base + 10 + 3 * 4 - 1  # Gamma is whole at cap 3: no "…"
    assert PV.fit_cap(length_at, length_at(None), 10) == (None, True)  # fits: no shortening
    assert PV.fit_cap(length_at, base + 10 + 12 - 1, 10) == (3, True)
    assert PV.fit_cap(length_at, base + 10 + 12, 10) == (3, True)  # cap 4 needs 3 more: too long
    assert PV.fit_cap(length_at, base + 10 + 12 - 1 + 3, 10) == (4, True)
    assert PV.fit_cap(length_at, base + 9, 10) == (None, False)  # not even cap 0 fits


def test_context_ids_shortens_documents_never_the_question(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    full = P.teacher_prompt_ids(tok, THREE_HOP.question, PV.render(THREE_HOP, "qcp"))
    ids, shortened = PV.context_ids(tok, THREE_HOP, "qcp", None, room=len(full))
    assert ids == full and not shortened
    ids, shortened = PV.context_ids(tok, THREE_HOP, "qcp", None, room=len(full) - 5)
    assert shortened and len(ids) <= len(full) - 5
    text = tok.decode(ids)
    assert "Question: Q3?" in text and "a1" in text and "b1" in text and "d1" in text and "d8" not in text
    assert PV.context_ids(tok, THREE_HOP, "qcp", None, room=10) == (None, False)
    assert PV.context_ids(tok, THREE_HOP, "none", None, room=None) == (None, False)


def test_arms():
    answer = PV.render(THREE_HOP, "answer")
    assert answer == f"{P.ANSWER_NOTE}\nThe answer is: d8" and "beta query" not in answer
    assert PV.render(THREE_HOP, "none") is None
    with pytest.raises(ValueError, match="teacher.privileged"):
        PV.render(ONE_HOP, "everything")


SENTENCES = Doc("p", "Pi", "S1 one. S2 two two! S3 three? S4 four.")  # 4 sentences, 9 words


@pytest.mark.parametrize("hops, searches_kept", [(1, {0}), (2, {0, 1}), (3, {1}), (4, {1, 2})])
def test_partial_qcp_withholds_about_half_on_every_task(hops, searches_kept):
    """Half the source's 4 sentences (2, seeded) and half the h - 1 searches on every task: (h - 1) // 2, one
    more on the seed's coin when odd: 1 hop none, 2 hops 0 or 1, 3 hops 1, 4 hops 1 or 2."""
    task = Task(id=f"t{hops}", question="Q?", answer="x", hops=hops, source=SENTENCES,
                qcp=[Hop(f"query {i}", [B]) for i in range(hops - 1)])
    sentence_counts, kept_counts = set(), set()
    for seed in range(24):
        source, path = PV.partial_path(task, seed)
        assert PV.partial_path(task, seed) == (source, path)  # the same half every time
        sentence_counts.add(len(source.contents.split(" … ")))
        assert all(s in SENTENCES.contents for s in source.contents.split(" … "))
        assert len(path) == hops - 1 and all(h is None or h is task.qcp[i] for i, h in enumerate(path))
        kept_counts.add(sum(h is not None for h in path))
    assert sentence_counts == {2} and kept_counts == searches_kept


def test_partial_qcp_halves_a_one_sentence_source_by_words_and_says_what_is_withheld():
    one = Task(id="one", question="Q1?", answer="a10", hops=1, source=SRC, qcp=[])
    source, path = PV.partial_path(one, seed=3)
    assert path == [] and source.contents in ("a1 a2 a3 a4 a5", "a6 a7 a8 a9 a10")  # 10 words, one half
    text = PV.render(one, "partial_qcp", seed=3)
    assert text.splitlines() == [P.PARTIAL_NOTE, f"Source document: (Alpha) {source.contents}",
                                 "(The question was written from the source document without searching.)"]
    assert text != PV.render(one, "qcp") and P.QCP_NOTE not in text
    three = next(PV.render(THREE_HOP, "partial_qcp", seed=s) for s in range(50)
                 if PV.partial_path(THREE_HOP, s)[1][0] is None)  # a seed that withholds the first search
    lines = three.splitlines()
    assert lines[0] == P.PARTIAL_NOTE and lines[2] == "Step 1: withheld." and "beta query" not in three
    assert lines[3] == "Step 2: searched 'delta query'." and lines[4] == "  - (Delta) d1 d2 d3 d4 d5 d6 d7 d8"
