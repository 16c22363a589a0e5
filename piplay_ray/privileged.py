"""What the teacher is told that the student is not: the privileged-information arms and their fitting.

`teacher.privileged` picks the arm (the paper's ablations): ``qcp`` the whole question construction path
(the source document, then each search with its documents), ``partial_qcp`` a seeded half of that path,
``answer`` only the ground-truth answer, ``none`` no teacher at all. When the teacher's context plus the
student's response would pass the engine's model length, every QCP document is cut to one common word cap
(the longest documents lose most; the student's tokens are never touched), the largest cap that fits.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

from piplay_ray import protocol
from piplay_ray.records import Doc, Hop, Task

Arm = Literal["qcp", "partial_qcp", "answer", "none"]
ARMS: tuple[str, ...] = ("qcp", "partial_qcp", "answer", "none")


def partial_path(task: Task, seed: int) -> tuple[Doc | None, list[Hop]]:
    """A seeded half of the path [source, hop 1, ..., hop n]: max(1, L // 2) of its L links, kept in order.

    The choice depends only on (seed, task id), so the teacher sees the same half every time it scores a task.
    """
    path: list[Doc | Hop] = [task.source, *task.qcp]
    keep = sorted(random.Random(f"{seed}/{task.id}").sample(range(len(path)), max(1, len(path) // 2)))
    source = task.source if 0 in keep else None
    return source, [path[i] for i in keep if i > 0]  # type: ignore[misc]


def render(task: Task, arm: str, budget: int | None = None, cap: int | None = None, seed: int = 0) -> str | None:
    """The privileged text of `task` for `arm` (None for ``none``: the teacher does not score)."""
    if arm == "none":
        return None
    if arm == "answer":
        return protocol.render_qcp(None, [], answer=task.answer)
    if arm == "qcp":
        source, hops = task.source, list(task.qcp)
    elif arm == "partial_qcp":
        source, hops = partial_path(task, seed)
    else:
        raise ValueError(f"teacher.privileged: got {arm!r}; allowed values: {', '.join(ARMS)}")
    return protocol.render_qcp(source, hops, budget=budget, cap=cap)


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


def context_ids(tokenizer, task: Task, arm: str, budget: int | None, room: int | None,
                seed: int = 0) -> tuple[list[int] | None, bool]:
    """The teacher's prompt ids for `task` with at most `room` tokens, and whether documents were shortened.

    None when the arm is ``none`` or nothing fits in `room` (the response alone is too long).
    """
    def ids_at(cap: int | None) -> list[int]:
        return protocol.teacher_prompt_ids(tokenizer, task.question, render(task, arm, budget, cap, seed) or "")

    if arm == "none":
        return None, False
    full = ids_at(None)
    if room is None or len(full) <= room:
        return full, False
    if arm == "answer":
        return None, False
    cache: dict[int | None, int] = {None: len(full)}

    def length_at(cap: int | None) -> int:
        if cap not in cache:
            cache[cap] = len(ids_at(cap))
        return cache[cap]

    cap, ok = fit_cap(length_at, room, longest_doc_words(task))
    return (ids_at(cap), True) if ok else (None, False)

