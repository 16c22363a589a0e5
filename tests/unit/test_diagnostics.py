"""Step diagnostics against values worked out by hand: the segment split of the teacher–student KL, top-1
agreement, answers before any search, and answers only the teacher could read."""

from __future__ import annotations

import math

import pytest

from piplay_ray.method import diagnostics as D
from piplay_ray.method import protocol as P
from piplay_ray.records import Doc, Hop, Trajectory

# tokens of a student response: reasoning, a search, an inserted information block (mask 0), an answer
TOKENS = ["I need", "</think>", "<search>", "Bach", " birth", "</search>",
          "\n<information>Bach was born in Eisenach.</information>\n",
          "<think>", "found", "</think>", "<answer>", "Eisenach", "</answer>"]
MASK = [1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
SEGS = ["reasoning", "reasoning", "search", "search", "search", "search", None,
        "reasoning", "reasoning", "reasoning", "answer", "answer", "answer"]


def test_segments_by_hand():
    assert D.segments(TOKENS, MASK) == SEGS
    # an unclosed answer runs to the end; text before any tag is reasoning
    assert D.segments(["x", "<answer>", "Paris"], [1, 1, 1]) == ["reasoning", "answer", "answer"]
    with pytest.raises(ValueError):
        D.segments(["a"], [1, 1])


def _traj(hops, finish="answer"):
    ids = list(range(100, 100 + len(TOKENS)))
    lps = [math.log(0.5) if m else 0.0 for m in MASK]
    return Trajectory(prompt_ids=[1], response_ids=ids, mask=list(MASK), logprobs=lps, hops=hops,
                      answer="Eisenach", finish_reason=finish)


def test_kl_split_by_segment_by_hand():
    traj = _traj([Hop("Bach birth", [Doc("1", "Bach", "Bach was born in Eisenach.")])])
    n = len(TOKENS)
    # teacher rows: the sampled token at p = 0.25 (top-1) on reasoning tokens, at p = 0.125 (second) on
    # search tokens, outside the top-2 on answer tokens (tail mass 0.2); empty where mask is 0
    t_ids, t_lps, tails = [], [], []
    for i, seg in enumerate(SEGS):
        tok = traj.response_ids[i]
        if seg is None:
            t_ids.append([]), t_lps.append([]), tails.append(0.0)
        elif seg == "reasoning":
            t_ids.append([tok, 7]), t_lps.append([math.log(0.25), math.log(0.2)]), tails.append(math.log(0.55))
        elif seg == "search":
            t_ids.append([7, tok]), t_lps.append([math.log(0.5), math.log(0.125)]), tails.append(math.log(0.375))
        else:
            t_ids.append([7, 8]), t_lps.append([math.log(0.6), math.log(0.2)]), tails.append(math.log(0.2))
    assert len(t_ids) == n
    diag = D.StepDiagnostics()
    diag.add(traj, TOKENS, "Eisenach", "Where was Bach born?", "Step 1: searched ... Eisenach", t_ids, t_lps, tails)
    m = diag.metrics()
    # per token log p_S - log p_T with p_S = 0.5: reasoning log(0.5/0.25) = log 2, search log 4, answer log 2.5
    assert m["diag/kl_reasoning"] == pytest.approx(math.log(2))
    assert m["diag/kl_search"] == pytest.approx(math.log(4))
    assert m["diag/kl_answer"] == pytest.approx(math.log(2.5))
    # top-1 agreement: the 5 reasoning tokens of 12 generated ones
    assert m["diag/teacher_top1_agreement"] == pytest.approx(5 / 12)
    assert m["diag/answer_before_search"] == 0.0
    # the student's own search found "Eisenach": not privileged
    assert m["diag/answer_only_in_teacher"] == 0.0


def test_answer_before_search_and_only_in_teacher():
    diag = D.StepDiagnostics()
    no_search = _traj([])
    searched_elsewhere = _traj([Hop("Bach", [Doc("2", "Bach", "Bach was a composer.")])])
    teacher_text = "Source document: Bach was born in Eisenach."
    diag.add(no_search, TOKENS, "Eisenach", "Where was Bach born?", teacher_text)
    diag.add(searched_elsewhere, TOKENS, "Eisenach", "Where was Bach born?", teacher_text)
    diag.add(_traj([], finish="max_turns"), TOKENS, "Eisenach", "Where was Bach born?", "nothing useful")
    m = diag.metrics()
    assert m["diag/answer_before_search"] == pytest.approx(1 / 3)  # the third did not answer at all
    assert m["diag/answer_only_in_teacher"] == pytest.approx(2 / 3)
    assert "diag/kl_reasoning" not in m and "diag/teacher_top1_agreement" not in m  # no teacher rows given
    # without a teacher (privileged = none) only the search share is reported
    bare = D.StepDiagnostics()
    bare.add(no_search, TOKENS, "Eisenach", "q", None)
    assert bare.metrics() == {"diag/answer_before_search": 1.0}


def test_think_share_by_turn():
    text = ("plan</think><search>a</search>\n\n<information>\nx <search>y</search>\n</information>\n\n"
            "<search>b</search>\n\n<information>\nz\n</information>\n\n<think>ok</think><answer>c</answer>")
    assert P.model_turns(text)[0] == "plan</think><search>a"
    assert len(P.model_turns(text)) == 3
    assert P.think_share(text) == pytest.approx(2 / 3)  # the middle turn acts without thinking
    assert P.think_share("") == 0.0 and P.think_share("<answer>x</answer>") == 0.0
