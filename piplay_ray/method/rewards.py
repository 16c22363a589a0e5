"""Rewards: answer matching, the examiner's integrity gate and format reward, the difficulty reward and
hop-grouped advantages.

Pure functions over plain values and records, so every number here can be checked by hand. Nothing in
this module raises on a malformed model output: bad output simply earns zero. Bad *arguments* from the
caller (k > n, mismatched lengths) are programming errors and raise ``ValueError``.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from piplay_ray.method.protocol import EXAMPLE_QUESTIONS
from piplay_ray.records import Doc, Hop

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)

# ------------------------------------------------------------------------------------------ answer match


def normalize_answer(text: str | None) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    if not text:
        return ""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(golds: str | Iterable[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else [g for g in golds if isinstance(g, str)]


def exact_match(pred: str | None, golds: str | Iterable[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    p = normalize_answer(pred)
    return float(bool(p) and any(p == normalize_answer(g) for g in _golds(golds)))


def _token_f1(pred: list[str], gold: list[str]) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(pred: str | None, golds: str | Iterable[str]) -> float:
    """Best bag-of-words F1 between the normalised prediction and any gold answer."""
    p = normalize_answer(pred).split()
    if not p:
        return 0.0
    return max((_token_f1(p, normalize_answer(g).split()) for g in _golds(golds)), default=0.0)


def _contains(haystack: str, needle: str) -> bool:
    """Whole-word containment of normalised `needle` in normalised `haystack` (both already normalised)."""
    return bool(needle) and f" {needle} " in f" {haystack} "


# ------------------------------------------------------------------------------------------ gate rules
# Each rule is one named check; `format_reward` runs them all and reports every flag, so a dashboard can
# show why a task was rejected.


def has_question(question: str | None) -> bool:
    return bool(question and question.strip())


def has_answer(answer: str | None) -> bool:
    return bool(answer and answer.strip())


def answer_is_short(answer: str | None, max_words: int) -> bool:
    """A short factoid answer (at most `max_words` words) keeps exact match meaningful."""
    return has_answer(answer) and len(answer.split()) <= max_words


def answer_not_in_question(question: str | None, answer: str | None) -> bool:
    """The question must not give its answer away: the normalised answer is not a substring of the normalised
    question (Dr. Zero's rule: "Paris" is given away by "Parisian" too)."""
    a = normalize_answer(answer)
    return bool(a) and a not in normalize_answer(question)


def not_an_example(question: str | None) -> bool:
    """The question is not a copy of a prompt's one-shot example (small models copy it verbatim)."""
    return normalize_answer(question) not in {normalize_answer(q) for q in EXAMPLE_QUESTIONS}


def well_formed(finish_reason: str, invalid_turns: int = 0) -> bool:
    """The examiner ended by writing its question and answer, with no malformed turn on the way."""
    return finish_reason == "question" and invalid_turns == 0


def count_valid_searches(hops: Sequence[Hop]) -> int:
    """Searches that worked and returned documents; a repeated query counts once."""
    seen = {normalize_answer(h.query) for h in hops if h.ok and h.docs and normalize_answer(h.query)}
    return len(seen)


def search_score(valid_searches: int, hop_target: int) -> float:
    """min((1 + valid searches) / h, 1): a 1-hop task needs no search, an h-hop task needs h-1."""
    if hop_target < 1:
        raise ValueError(f"hop_target must be >= 1, got {hop_target}")
    return min((1 + max(valid_searches, 0)) / hop_target, 1.0)


def answer_supported(answer: str | None, docs: Iterable[Doc]) -> bool:
    """The answer appears (whole words, normalised) in the title or text of one of `docs`."""
    a = normalize_answer(answer)
    return bool(a) and any(_contains(normalize_answer(f"{d.title}\n{d.contents}"), a) for d in docs)


def tool_score(hops: Sequence[Hop], hop_target: int) -> float:
    """Dr. Zero's tool-use credit: a 1-hop task needs no search (1); an h-hop task earns
    min((1 + searches) / h, 1) when it searched and every search was answered by the tool (a repeated query
    counts again, as Dr. Zero counts calls against tool responses), else 0."""
    if hop_target < 1:
        raise ValueError(f"hop_target must be >= 1, got {hop_target}")
    if hop_target == 1:
        return 1.0
    return search_score(len(hops), hop_target) if hops and all(h.ok for h in hops) else 0.0


def answer_score(answer: str | None, docs: Iterable[Doc], max_words: int) -> float:
    """Dr. Zero's answer credit: an answer found in the documents (normalised substring, as Dr. Zero matches)
    or yes/no earns 1 with at most `max_words` words, 0.5 with at most 2 * `max_words`; anything else 0."""
    a = normalize_answer(answer)
    found = any(a in normalize_answer(f"{d.title}\n{d.contents}") for d in docs)
    if not a or not (a in ("yes", "no") or found):
        return 0.0
    words = len(a.split())
    return 1.0 if words <= max_words else 0.5 if words <= 2 * max_words else 0.0


INTEGRITY = ("has_question", "has_answer", "answer_not_in_question", "not_an_example")


def format_reward(question: str | None, answer: str | None, hop_target: int, hops: Sequence[Hop],
                  source: Doc, finish_reason: str, answer_max_words: int, invalid_turns: int = 0,
                  think_share: float = 1.0, mode: str = "partial") -> tuple[float, dict[str, bool]]:
    """The examiner's format reward r_f and the gate flags (all must hold for a task to reach the student).

    ``partial`` (Dr. Zero): 0 unless the integrity flags hold (question and answer present, the answer not
    in the question, not a prompt example); then the mean of 1, `think_share` (turns that think before they
    act), :func:`tool_score` and :func:`answer_score`, so a nearly-right task still earns some credit.
    ``search``: search_score(valid searches, h) when every gate flag holds, else 0.
    """
    qcp_docs = [d for h in hops for d in h.docs]
    flags = {
        "has_question": has_question(question),
        "has_answer": has_answer(answer),
        "answer_short": answer_is_short(answer, answer_max_words),
        "answer_not_in_question": answer_not_in_question(question, answer),
        "not_an_example": not_an_example(question),
        "well_formed": well_formed(finish_reason, invalid_turns),
        "answer_supported": answer_supported(answer, [source, *qcp_docs]),
    }
    if mode == "search":
        r_f = search_score(count_valid_searches(hops), hop_target) if all(flags.values()) else 0.0
    elif mode == "partial":
        parts = (1.0, min(max(think_share, 0.0), 1.0), tool_score(hops, hop_target),
                 answer_score(answer, [source, *qcp_docs], answer_max_words))
        r_f = sum(parts) / 4 if all(flags[k] for k in INTEGRITY) else 0.0
    else:
        raise ValueError(f"examiner.format_reward: got {mode!r}; allowed values: partial, search")
    return r_f, flags


# ------------------------------------------------------------------------------------------ examiner RL


def difficulty_reward(k: int, n: int, r_f: float, w_f: float) -> float:
    """r_d = 1(0 < k < n) (n - k)/(n - 1) + w_f r_f, from k exactly-correct answers out of n attempts.

    A task every attempt solves, or none does, teaches the student nothing and earns no difficulty bonus;
    among solvable-but-hard tasks, fewer correct answers pay more.
    """
    if n < 2 or not 0 <= k <= n:
        raise ValueError(f"need n >= 2 and 0 <= k <= n, got k={k}, n={n}")
    hard = (n - k) / (n - 1) if 0 < k < n else 0.0
    return hard + w_f * r_f


def group_advantages(rewards: Sequence[float], group_size: int, std_normalize: bool = True,
                     eps: float = 1e-6) -> list[float]:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std (+eps) if asked.

    `rewards` holds consecutive groups of `group_size` samples (the G answers to one question). The std is
    the unbiased sample std; a group whose rewards are all equal gets advantage 0 everywhere.
    """
    r = [float(x) for x in rewards]
    if group_size < 1 or len(r) % group_size:
        raise ValueError(f"group_advantages: {len(r)} rewards do not split into groups of {group_size}")
    out = []
    for i in range(0, len(r), group_size):
        g = r[i: i + group_size]
        mu = sum(g) / group_size
        adv = [x - mu for x in g]
        if std_normalize and group_size > 1:
            std = math.sqrt(sum(a * a for a in adv) / (group_size - 1))
            adv = [a / (std + eps) if std > 0 else 0.0 for a in adv]
        out += adv
    return out


def hop_group_advantages(rewards: Sequence[float], hops: Sequence[int], eps: float = 1e-6,
                         std_normalize: bool = True) -> list[float]:
    """GRPO advantages normalised within each hop group: (r - mean_g) / (std_g + eps).

    Hop targets differ in how hard they are to satisfy, so each h competes only with tasks of the same h.
    Each group goes through :func:`group_advantages`, the student's formula, so both roles
    share one convention (sample std, `learner.loss.std_normalize`). A group of one, or one whose rewards are
    all equal, gets advantage 0 (never NaN).
    """

    if len(rewards) != len(hops):
        raise ValueError(f"rewards and hops differ in length: {len(rewards)} vs {len(hops)}")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, h in enumerate(hops):
        groups[h].append(i)
    adv = [0.0] * len(rewards)
    for idx in groups.values():
        vals = [float(rewards[i]) for i in idx]
        if len(idx) < 2 or max(vals) == min(vals):
            continue
        for i, a in zip(idx, group_advantages(vals, len(vals), std_normalize, eps), strict=True):
            adv[i] = a
    return adv
