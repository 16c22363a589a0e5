"""Rewards against hand-computed values."""

from __future__ import annotations

import math

import pytest

from piplay_ray.method import rewards as R
from piplay_ray.records import Doc, Hop

# ------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an  Apple, a day! ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theatre", "theatre"),  # 'the' only as a whole word
    ("A", ""),
    ("", ""),
    (None, ""),
    ("Paris\n\tFrance", "paris france"),
])
def test_normalize_answer(raw, norm):
    assert R.normalize_answer(raw) == norm


def test_exact_match_cases():
    assert R.exact_match("the Eiffel Tower.", ["Eiffel tower"]) == 1.0
    assert R.exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert R.exact_match("NYC", ["New York City", "nyc"]) == 1.0  # any gold
    assert R.exact_match("Paris", "paris") == 1.0  # a single gold string
    assert R.exact_match(None, ["x"]) == 0.0
    assert R.exact_match("", [""]) == 0.0  # an empty answer never matches
    assert R.exact_match("the", ["a"]) == 0.0  # both normalise to empty


def test_f1_hand_computed():
    # pred "barack obama jr" vs gold "barack obama": common 2, P=2/3, R=1, F1=2*(2/3)/(5/3)=0.8
    assert R.f1("Barack Obama Jr.", ["Barack Obama"]) == pytest.approx(0.8)
    # pred "new york" vs golds "york city" (common 1: P=1/2,R=1/2,F1=.5) and "new york" (1.0): best wins
    assert R.f1("New York", ["York City", "the New York"]) == pytest.approx(1.0)
    assert R.f1("New York", ["York City"]) == pytest.approx(0.5)
    # repeated tokens count by multiplicity: pred "a b b" -> "b b", gold "b c": common 1, P=1/2, R=1/2
    assert R.f1("a b b", ["b c"]) == pytest.approx(0.5)
    assert R.f1("cat", ["dog"]) == 0.0
    assert R.f1(None, ["dog"]) == 0.0
    assert R.f1("dog", []) == 0.0


# ------------------------------------------------------------------------------------------ gate rules

SOURCE = Doc("1", "Marie Curie", '"Marie Curie"\nMarie Curie was a physicist born in Warsaw.')
HOP_DOC = Doc("2", "Warsaw", '"Warsaw"\nWarsaw is the capital of Poland, on the Vistula river.')


def test_gate_rules_individually():
    assert R.has_question("Who?") and not R.has_question("  ") and not R.has_question(None)
    assert R.has_answer("x") and not R.has_answer("\n")
    assert R.answer_is_short("Vistula river", 2) and not R.answer_is_short("the long Vistula river", 3)
    assert not R.answer_is_short(None, 5)
    assert R.answer_not_in_question("Which river flows through the city?", "Vistula")
    assert not R.answer_not_in_question("Which city is on the Vistula?", "the vistula!")
    assert R.answer_not_in_question("Which theatre?", "the") is False  # empty normalised answer fails
    # Dr. Zero: a substring of the normalised question gives the answer away, whole word or not
    assert not R.answer_not_in_question("Where was Curie's rival Warsawski born?", "Warsaw")
    assert R.answer_not_in_question("Where was Curie's rival born?", "Warsaw")
    assert R.well_formed("question") and not R.well_formed("max_turns")
    assert not R.well_formed("question", invalid_turns=1)
    assert R.answer_supported("Vistula", [SOURCE, HOP_DOC]) and not R.answer_supported("Vistula", [SOURCE])
    assert R.answer_supported("marie curie", [SOURCE])  # the title counts


def test_count_valid_searches_and_score():
    hops = [Hop("Warsaw", [HOP_DOC]), Hop("warsaw!", [HOP_DOC]), Hop("bad", ok=False, error="down"),
            Hop("nothing", [])]
    assert R.count_valid_searches(hops) == 1  # the repeat counts once, failures and empty results not at all
    assert R.search_score(0, 1) == 1.0
    assert R.search_score(0, 3) == pytest.approx(1 / 3)
    assert R.search_score(1, 3) == pytest.approx(2 / 3)
    assert R.search_score(5, 3) == 1.0
    with pytest.raises(ValueError):
        R.search_score(1, 0)


def test_format_reward_pass_and_fail():
    hops = [Hop("Marie Curie birthplace", [HOP_DOC])]
    q = "Which river flows through Marie Curie's birth city?"
    r_f, flags = R.format_reward(q, "Vistula", 3, hops, SOURCE, "question", answer_max_words=6, mode="search")
    assert all(flags.values()) and r_f == pytest.approx(2 / 3)
    # partial (the default): (1 + think 1 + tool min(2/3, 1) + answer 1) / 4
    r_f, _ = R.format_reward(q, "Vistula", 3, hops, SOURCE, "question", answer_max_words=6)
    assert r_f == pytest.approx((1 + 1 + 2 / 3 + 1) / 4)
    # leak: answer in question -> integrity fails, r_f = 0 in both modes, the flag says why
    for mode in ("search", "partial"):
        r_f, flags = R.format_reward("Is the Vistula in Warsaw?", "Vistula", 2, hops, SOURCE, "question", 6, mode=mode)
        assert r_f == 0.0 and flags["answer_not_in_question"] is False and flags["answer_supported"] is True
    # unsupported answer (not in any seen doc): no task, but partial credit for the rest: (1 + 1 + 1 + 0) / 4
    r_f, flags = R.format_reward("Which river?", "Danube", 2, hops, SOURCE, "question", 6, mode="search")
    assert r_f == 0.0 and not flags["answer_supported"]
    assert R.format_reward("Which river?", "Danube", 2, hops, SOURCE, "question", 6)[0] == pytest.approx(0.75)
    # malformed ending, empty question
    r_f, flags = R.format_reward("", None, 1, [], SOURCE, "length", 6)
    assert r_f == 0.0 and not any(v for k, v in flags.items() if k != "not_an_example")
    with pytest.raises(ValueError, match="examiner.format_reward"):
        R.format_reward(q, "Vistula", 3, hops, SOURCE, "question", 6, mode="nope")


LONG = Doc("99", "Long", "the river of the seven bridges of the old town flows north")
# (hop target, hops, answer, think share) -> Dr. Zero's r_f = (1 + think + tool + answer) / 4, worked by hand
DRZERO_TABLE = [
    # 1 hop, no search: tool 1; supported 1-word answer: 1; thinks every turn: 1 -> 1
    (1, [], "Curie", 1.0, 1.0),
    # 1 hop with a failed search: tool still 1 (a 1-hop task needs none); half the turns think -> (1+.5+1+1)/4
    (1, [Hop("x", ok=False, error="down")], "Curie", 0.5, 3.5 / 4),
    # 2 hops, no search: tool 0 -> (1+1+0+1)/4
    (2, [], "Curie", 1.0, 0.75),
    # 3 hops, 1 valid search: tool 2/3 -> (1+1+2/3+1)/4
    (3, [Hop("q", [HOP_DOC])], "Vistula", 1.0, (3 + 2 / 3) / 4),
    # 3 hops, 2 searches of which one failed: tool 0 (every call needs its tool response)
    (3, [Hop("q", [HOP_DOC]), Hop("r", ok=False, error="down")], "Vistula", 1.0, 0.75),
    # 3 hops, 2 answered searches, one of them empty: tool min(3/3, 1) = 1 (an answer without documents is one)
    (3, [Hop("q", [HOP_DOC]), Hop("r", [])], "Vistula", 1.0, 1.0),
    # 4 hops, 5 valid searches: tool capped at 1
    (4, [Hop(f"q{i}", [HOP_DOC]) for i in range(5)], "Vistula", 1.0, 1.0),
    # a repeated query counts again (Dr. Zero counts calls against responses): 3 hops, 2 calls -> tool 1
    (3, [Hop("q", [HOP_DOC]), Hop("Q!", [HOP_DOC])], "Vistula", 1.0, 1.0),
    # a 6-word supported answer (5 < 6 <= 10): answer 0.5 -> (1+1+1+.5)/4
    (2, [Hop("q", [LONG])], "river of seven bridges of old", 1.0, 3.5 / 4),
    # a 5-word answer: answer 1
    (2, [Hop("q", [LONG])], "river of seven bridges of", 1.0, 1.0),
    # a 10-word answer: 0.5; an 11-word one (> 10): answer 0; no think at all: 0 -> (1+0+1+0)/4
    (1, [Hop("q", [Doc("1", "t", "b c d e f g h i j k l m")])], "b c d e f g h i j k", 1.0, 3.5 / 4),
    (1, [Hop("q", [Doc("1", "t", "b c d e f g h i j k l m n")])], "b c d e f g h i j k l", 0.0, 0.5),
    # the answer is found as a substring of a document (Dr. Zero), not only as whole words: "Wars" in "Warsaw"
    (2, [Hop("q", [HOP_DOC])], "Wars", 1.0, 1.0),
    # unsupported answer, but yes/no always counts as supported -> 1
    (1, [], "yes", 1.0, 1.0),
    (1, [], "Lisbon", 1.0, 0.75),
]


@pytest.mark.parametrize("h, hops, answer, think, want", DRZERO_TABLE)
def test_drzero_partial_format_reward_table(h, hops, answer, think, want):
    r_f, _ = R.format_reward("Where is it?", answer, h, hops, SOURCE, "question", answer_max_words=5,
                             think_share=think, mode="partial")
    assert r_f == pytest.approx(want)


def test_partial_credit_needs_the_integrity_gate():
    # empty question, answer in question, a prompt example: all 0 whatever else is right
    for q, a in [("", "Curie"), ("Who is Marie Curie?", "Marie Curie"), ("In which city is the Eiffel Tower?", "Curie")]:
        assert R.format_reward(q, a, 1, [], SOURCE, "question", 6, think_share=1.0)[0] == 0.0


# ------------------------------------------------------------------------------------------ difficulty


def test_difficulty_reward_table_n5():
    # by hand, n = 5: k=0 -> 0, k=1 -> 4/4, k=2 -> 3/4, k=3 -> 2/4, k=4 -> 1/4, k=5 -> 0
    hand = {0: 0.0, 1: 1.0, 2: 0.75, 3: 0.5, 4: 0.25, 5: 0.0}
    for k, want in hand.items():
        assert R.difficulty_reward(k, 5, r_f=0.0, w_f=0.5) == pytest.approx(want)
    # with r_f = 0.8, w_f = 0.5 the bonus is 0.4 for every k
    with_rf = {0: 0.4, 1: 1.4, 2: 1.15, 3: 0.9, 4: 0.65, 5: 0.4}
    for k, want in with_rf.items():
        assert R.difficulty_reward(k, 5, r_f=0.8, w_f=0.5) == pytest.approx(want)
    for bad in [(-1, 5), (6, 5), (0, 1)]:
        with pytest.raises(ValueError):
            R.difficulty_reward(*bad, r_f=0.0, w_f=0.5)


def test_hop_group_advantages_mixed_groups():
    rewards = [1.0, 0.0, 0.5, 0.7, 0.3, 0.3, 0.3, 2.0]
    hops = [1, 1, 2, 3, 1, 4, 4, 3]
    adv = R.hop_group_advantages(rewards, hops, eps=1e-6)
    # hop 1: {1.0, 0.0, 0.3}, mean 13/30, sample var (n - 1 = 2, the student's convention)
    m1 = 1.3 / 3
    s1 = math.sqrt(((1 - m1) ** 2 + m1 ** 2 + (0.3 - m1) ** 2) / 2)
    # hop 3: {0.7, 2.0}: mean 1.35, sample std 0.65 * sqrt(2) -> -1/sqrt(2), +1/sqrt(2)
    s3 = 0.65 * math.sqrt(2) + 1e-6
    want = [(1 - m1) / (s1 + 1e-6), (0 - m1) / (s1 + 1e-6), 0.0, -0.65 / s3, (0.3 - m1) / (s1 + 1e-6),
            0.0, 0.0, 0.65 / s3]
    assert adv == pytest.approx(want, rel=1e-6)
    assert adv[2] == 0.0  # size-one group
    assert adv[5] == 0.0 and adv[6] == 0.0  # identical rewards
    assert not any(math.isnan(a) for a in adv)
    # group sums are zero
    assert sum(adv[i] for i in (0, 1, 4)) == pytest.approx(0.0, abs=1e-6)
    assert R.hop_group_advantages([0.1] * 3, [2] * 3) == [0.0, 0.0, 0.0]
    assert R.hop_group_advantages([1.0, 0.0], [1, 1], std_normalize=False) == [0.5, -0.5]
    assert R.hop_group_advantages([], []) == []
    with pytest.raises(ValueError):
        R.hop_group_advantages([1.0], [1, 2])


def test_gate_refuses_a_copy_of_the_prompt_example():
    from piplay_ray.method.protocol import EXAMPLE_QUESTIONS
    from piplay_ray.method.rewards import not_an_example

    assert not not_an_example(EXAMPLE_QUESTIONS[1]) and not not_an_example("in which CITY is the eiffel tower")
    assert not_an_example("In which city was the author of Hamlet born?")
    src = Doc(id="1", title="Barcelona", contents="Barcelona is a city in Spain, a rival of Paris.")
    r_f, flags = R.format_reward(EXAMPLE_QUESTIONS[1], "Paris", 1, [], src, "question", 6)
    assert r_f == 0.0 and flags["not_an_example"] is False and all(v for k, v in flags.items() if k != "not_an_example")


def test_group_advantages_hand_values():
    r = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    a = R.group_advantages(r, 3, std_normalize=False)
    assert a == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])
    a = R.group_advantages(r, 3, std_normalize=True, eps=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert a[:3] == pytest.approx([2 / 3 / std, -1 / 3 / std, -1 / 3 / std])
    assert a[3:] == [0.0, 0.0, 0.0]  # all-equal group: zero, not NaN
    with pytest.raises(ValueError):
        R.group_advantages([1.0, 2.0, 3.0], 2)
