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
    # partial_qcp: path [source, hop 1, hop 2] has L = 3 links, half = max(1, 3 // 2) = 1, seeded per task
    src, hops = PV.partial_path(THREE_HOP, seed=0)
    assert (src is not None) + len(hops) == 1
    assert PV.partial_path(THREE_HOP, seed=0) == (src, hops)  # the same half every time
    seen = {(PV.partial_path(THREE_HOP, seed=s)[0] is not None, len(PV.partial_path(THREE_HOP, seed=s)[1]))
            for s in range(20)}
    assert seen == {(True, 0), (False, 1)}  # the seed picks which link
    four = Task(id="four", question="Q?", answer="x", hops=4, source=SRC,
                qcp=[Hop("1", [B]), Hop("2", [C]), Hop("3", [D])])
    s4, h4 = PV.partial_path(four, seed=1)
    assert (s4 is not None) + len(h4) == 2
    assert PV.partial_path(ONE_HOP, seed=5) == (SRC, [])  # one link cannot be halved: it is kept
    assert PV.render(ONE_HOP, "partial_qcp") == PV.render(ONE_HOP, "qcp")
    with pytest.raises(ValueError, match="teacher.privileged"):
        PV.render(ONE_HOP, "everything")
