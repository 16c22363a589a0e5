"""What the teacher is told that the student is not: the privileged-information arms and their fitting.

`teacher.privileged` names the arm in `registry.ARMS` (the paper's ablations): ``qcp`` the whole question
construction path (the source document, then each search with its documents), ``partial_qcp`` about half of
it (half the source's sentences and half the searches, seeded), ``answer`` only the ground-truth answer,
``none`` no teacher at all. A new arm is an :class:`Arm` (here or in a module of your own) and one line in
`registry.ARMS`. When the teacher's context plus the
student's response would pass the engine's model length, every QCP document is cut to one common word cap
(the longest documents lose most; the student's tokens are never touched), the largest cap that fits.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from piplay_ray.method import protocol
from piplay_ray.method.evidence import body_of
from piplay_ray.records import Doc, Hop, Task
from piplay_ray.registry import ARMS

# text(task, budget, cap, seed): the privileged text, documents cut to `budget` words (then to `cap`)
ArmText = Callable[[Task, "int | None", "int | None", int], "str | None"]


@dataclass(frozen=True)
class Arm:
    """One privileged-information arm: what the teacher is told beside the question."""

    name: str
    text: ArmText
    teaches: bool = True  # False: no teacher at all (nothing is scored, λ is ignored)
    shortens: bool = True  # its documents may be cut to fit the engine's length (else: unscored when too long)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _half(n: int, rng: random.Random) -> list[int]:
    """A seeded half of range(n), in order: n // 2 items, one more on a coin flip when n is odd."""
    return sorted(rng.sample(range(n), n // 2 + (n % 2 and rng.random() < 0.5)))


def partial_path(task: Task, seed: int, source_words: int = protocol.SOURCE_DOC_WORDS) -> tuple[Doc, list[Hop | None]]:
    """About half of the QCP, withheld on every task: half the sentences of the source document as the examiner
    saw it (its first `source_words` words; a single sentence is halved by words) and half the searches (None
    where withheld). The halves depend only on (seed, task id): the teacher sees the same ones every time."""
    rng = random.Random(f"{seed}/{task.id}")
    words = body_of(task.source).split()[:source_words]
    parts = _SENTENCE_END.split(" ".join(words))
    if len(parts) < 2:
        parts = [" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])]
    kept = " … ".join(parts[i] for i in _half(len(parts), rng))
    searches = set(_half(len(task.qcp), rng))
    return (Doc(task.source.id, task.source.title, kept),
            [hop if i in searches else None for i, hop in enumerate(task.qcp)])


def _partial_text(task: Task, budget: int | None, cap: int | None, seed: int) -> str:
    source, hops = partial_path(task, seed, budget or protocol.SOURCE_DOC_WORDS)
    return protocol.render_qcp(source, hops, budget=budget, cap=cap, note=protocol.PARTIAL_NOTE)


QCP = Arm("qcp", lambda task, budget, cap, seed: protocol.render_qcp(task.source, list(task.qcp), budget=budget,
                                                                     cap=cap))
PARTIAL_QCP = Arm("partial_qcp", _partial_text)
ANSWER = Arm("answer", lambda task, budget, cap, seed: protocol.render_qcp(None, [], answer=task.answer),
             shortens=False)
NONE = Arm("none", lambda task, budget, cap, seed: None, teaches=False)


def arm(name: str) -> Arm:
    """The arm `teacher.privileged` names (a registered name or a plug-in's ``module:attribute``)."""
    found = ARMS.load(name)
    if not isinstance(found, Arm):
        raise TypeError(f"teacher.privileged={name!r} names a {type(found).__name__}, not a privileged.Arm")
    return found


def render(task: Task, name: str, budget: int | None = None, cap: int | None = None, seed: int = 0) -> str | None:
    """The privileged text of `task` for arm `name` (None for an arm that does not teach)."""
    return arm(name).text(task, budget, cap, seed)


def longest_doc_words(task: Task) -> int:
    """Words of the longest document on the task's path (the cap above which nothing is shortened)."""
    docs = [task.source, *(d for h in task.qcp for d in h.docs)]
    return max(len(d.contents.split()) for d in docs)


def fit_cap(length_at: Callable[[int | None], int], limit: int, longest: int) -> tuple[int | None, bool]:
    """The document cap that fits: (None, True) when the uncapped context fits, (cap, True) for the largest
    cap in [0, longest) whose length is within `limit`, (None, False) when even cap 0 does not fit.

    `length_at(cap)` is the teacher's whole sequence length (context + response) rendered at `cap`; it must
    not decrease as the cap grows.
    """
    if length_at(None) <= limit:
        return None, True
    if length_at(0) > limit:
        return None, False
    lo, hi = 0, max(longest - 1, 0)  # invariant: length_at(lo) <= limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length_at(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo, True


def context_ids(tokenizer, task: Task, name: str, budget: int | None, room: int | None,
                seed: int = 0) -> tuple[list[int] | None, bool]:
    """The teacher's prompt ids for `task` with at most `room` tokens, and whether documents were shortened.

    None when the arm does not teach or nothing fits in `room` (the response alone is too long).
    """
    chosen = arm(name)

    def ids_at(cap: int | None) -> list[int]:
        text = chosen.text(task, budget, cap, seed) or ""
        return protocol.teacher_prompt_ids(tokenizer, task.question, text)

    if not chosen.teaches:
        return None, False
    full = ids_at(None)
    if room is None or len(full) <= room:
        return full, False
    if not chosen.shortens:
        return None, False
    cache: dict[int | None, int] = {None: len(full)}

    def length_at(cap: int | None) -> int:
        if cap not in cache:
            cache[cap] = len(ids_at(cap))
        return cache[cap]

    cap, ok = fit_cap(length_at, room, longest_doc_words(task))
    return (ids_at(cap), True) if ok else (None, False)
