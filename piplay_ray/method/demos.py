"""Protocol demonstrations for the warm start, built by rule from the corpus (pure: no Ray, no model).

A small instruct model does not follow the search protocol at all, so RL sees no reward variance; a cold
start on demonstrations of the exact token layout the agent loop produces fixes that. Every demonstration is
an entity *chain* A → E1 → … : A is an article whose lead sentence and description make a rule question (the
evaluation set's rule), each next entity is a corpus title mentioned in the previous article as the agent
sees it. The student searches its way along the chain and answers the last title; the examiner reads A,
searches the entities and writes the chained question with its answer. Search results come from the real
search service (same formatting as training), are inserted as `<information>` blocks with mask 0, and
demonstrations whose results miss the next article, or touch a held-out evaluation article, are dropped.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from piplay_ray.method import protocol
from piplay_ray.method.qa import golden_for_title, rule_question
from piplay_ray.method.rewards import answer_not_in_question, normalize_answer
from piplay_ray.records import Doc, Experience

# search(queries) -> one (documents, formatted text) per query, as the search env returns them
SearchFn = Callable[[list[str]], list[tuple[list[Doc], str]]]


@dataclass(frozen=True)
class Article:
    id: str
    title: str
    contents: str
    description: str

    @property
    def name(self) -> str:
        """The short title (without a disambiguation suffix): what a demonstration answers."""
        return golden_for_title(self.title)[-1]

    @property
    def kind(self) -> str:
        """The description as a noun phrase inside a sentence ("German playwright", not "German Playwright")."""
        d = self.description
        return d[:1].lower() + d[1:] if d[1:2].islower() else d

    def doc(self) -> Doc:
        return Doc(self.id, self.title, self.contents)


def _mentions(articles: Sequence[Article], budget: int) -> Callable[[Article], list[Article]]:
    """For an article, the other articles whose short title appears (whole words) in its first `budget` words."""
    by_name: dict[str, Article] = {}
    for a in articles:
        key = normalize_answer(a.name)
        if len(key) > 3 and a.description and key not in by_name:
            by_name[key] = a
    longest = max((len(k.split()) for k in by_name), default=1)

    def find(a: Article) -> list[Article]:
        words = normalize_answer(" ".join(a.contents.split()[:budget])).split()
        found = {}
        for n in range(1, min(longest, 4) + 1):
            for i in range(len(words) - n + 1):
                hit = by_name.get(" ".join(words[i : i + n]))
                if hit is not None and hit.id != a.id:
                    found[hit.id] = hit
        return list(found.values())

    return find


def chain_question(clue: str, chain: Sequence[Article]) -> str:
    """The question for A → … → last: the last entity's description, reached from A's rule question."""
    where = f"the article that answers: {clue.rstrip('?')}"
    for e in chain[1:-1]:
        where = f"the article on the {e.kind} mentioned in {where}"
    return f"Which {chain[-1].kind} is mentioned in {where}?" if len(chain) > 1 else clue


@dataclass
class Demo:
    role: str
    question: str
    answer: str
    chain: list[Article]
    prompt_ids: list[int]
    response_ids: list[int]
    mask: list[int]

    def experience(self, i: int) -> Experience:
        return Experience(group_id=f"warmup-{self.role}-{i}", role=self.role, prompt_ids=self.prompt_ids,
                          response_ids=self.response_ids, mask=self.mask, logprobs=[0.0] * len(self.mask),
                          reward=1.0, advantage=1.0, version=0, info={"answer": self.answer})


def _encode(tokenizer, prompt_ids: list[int], turns: list[str], infos: list[str]) -> tuple[list[int], list[int]]:
    """Model turns (mask 1) interleaved with information blocks (mask 0), tokenised as the agent loop does."""
    ids, mask = [], []
    for k, turn in enumerate(turns):
        t = list(tokenizer(turn, add_special_tokens=False)["input_ids"])
        ids, mask = ids + t, mask + [1] * len(t)
        if k < len(infos):
            b = list(tokenizer(protocol.information_block(infos[k]), add_special_tokens=False)["input_ids"])
            ids, mask = ids + b, mask + [0] * len(b)
    return ids, mask


def build_demos(articles: Sequence[Article], search: SearchFn, tokenizer, role: str, n: int,
                hop_weights: Sequence[float], held_out: set[str], seed: int, mention_words: int,
                source_words: int = 256) -> list[Demo]:
    """Up to `n` demonstrations for `role` ("student" or "examiner"), hop counts drawn by `hop_weights`.

    `held_out` holds article ids that must never appear: not as a chain link, not in any search result.
    """
    rng = random.Random(seed)
    usable = [a for a in articles if a.id not in held_out]
    mentions = _mentions(usable, mention_words)
    order = list(usable)
    rng.shuffle(order)
    out: list[Demo] = []
    for a in order:
        if len(out) >= n:
            break
        clue = rule_question(a.title, a.contents, a.description)
        if not clue:
            continue
        hops = rng.choices(range(1, len(hop_weights) + 1), weights=hop_weights)[0]
        chain = [a]
        while len(chain) < hops:
            nxt = [e for e in mentions(chain[-1]) if e not in chain]
            if not nxt:
                break
            chain.append(rng.choice(nxt))
        if len(chain) < hops:
            continue
        question, answer = chain_question(clue, chain), chain[-1].name
        if not answer_not_in_question(question, answer) or len(answer.split()) > 6:  # the gate's rule
            continue
        demo = (_student if role == "student" else _examiner)(tokenizer, clue, question, chain, search, held_out,
                                                              source_words)
        if demo is not None:
            out.append(demo)
    return out


def _found(results: list[tuple[list[Doc], str]], wanted: Sequence[Article], held_out: set[str]) -> bool:
    return all(any(d.id == w.id for d in docs) and not any(d.id in held_out for d in docs)
               for (docs, _), w in zip(results, wanted, strict=True))


def _student(tokenizer, clue, question, chain, search, held_out, source_words) -> Demo | None:
    queries = [clue] + [e.name for e in chain[1:]]
    results = search(queries)
    if not _found(results, chain, held_out):
        return None
    turns = ["I need to find the article this question starts from.</think>"
             f"{protocol.SEARCH_OPEN}{clue}{protocol.SEARCH_CLOSE}"]
    for prev, e in zip(chain, chain[1:], strict=False):
        turns.append(f"{protocol.THINK_OPEN}The article is {prev.name}. It mentions {e.name}.{protocol.THINK_CLOSE}"
                     f"{protocol.SEARCH_OPEN}{e.name}{protocol.SEARCH_CLOSE}")
    last = chain[-1]
    turns.append(f"{protocol.THINK_OPEN}{last.name} is the {last.kind}.{protocol.THINK_CLOSE}"
                 f"{protocol.ANSWER_OPEN}{last.name}{protocol.ANSWER_CLOSE}")
    prompt = protocol.student_prompt_ids(tokenizer, question)
    ids, mask = _encode(tokenizer, prompt, turns, [text for _, text in results])
    return Demo("student", question, last.name, list(chain), prompt, ids, mask)


def _examiner(tokenizer, clue, question, chain, search, held_out, source_words) -> Demo | None:
    results = search([e.name for e in chain[1:]]) if len(chain) > 1 else []
    if not _found(results, chain[1:], held_out):
        return None
    a, last = chain[0], chain[-1]
    turns, think = [], f"The document is about {a.name}."
    for e in chain[1:]:
        turns.append(f"{think} It mentions {e.name}; I follow it.{protocol.THINK_CLOSE}"
                     f"{protocol.SEARCH_OPEN}{e.name}{protocol.SEARCH_CLOSE}")
        think = f"{protocol.THINK_OPEN}{e.name} is the {e.kind}."
    turns.append(f"{think} I ask for it without naming it.{protocol.THINK_CLOSE}"
                 f"{protocol.QUESTION_OPEN}{question}{protocol.QUESTION_CLOSE}"
                 f"{protocol.ANSWER_OPEN}{last.name}{protocol.ANSWER_CLOSE}")
    prompt = protocol.examiner_prompt_ids(tokenizer, a.doc(), len(chain), source_words)
    ids, mask = _encode(tokenizer, prompt, turns, [text for _, text in results])
    return Demo("examiner", question, last.name, list(chain), prompt, ids, mask)


_SPACE = re.compile(r"\s+")


def load_articles(corpus_path: str) -> list[Article]:
    """Every corpus row with a title and a description (the built-in corpus has both)."""
    import json

    out = []
    with open(corpus_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                title, desc = str(d.get("title") or ""), _SPACE.sub(" ", str(d.get("description") or "")).strip()
                if title and desc:
                    out.append(Article(str(d.get("id")), title, str(d.get("contents") or ""), desc))
    return out
