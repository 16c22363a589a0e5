"""The teacher's context and its scores: the privileged prompt, top-K (+tail) extraction (pure; EMA: ema.py).

The teacher sees the student's question *and* the examiner's question construction path (QCP), then scores
the student's own response tokens, appended unchanged after that context. Scores exist only where the
student generated the token (mask 1): inserted `<information>` text is not the student's to imitate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from piplay_ray.method import privileged, protocol
from piplay_ray.records import Task, Trajectory

LOG_FLOOR = math.log(1e-12)  # the tail of a top-K that holds (numerically) all the mass

# one response's teacher rows: per response position K ids, K logprobs (empty where mask 0), and the tail
Scores = tuple[list[list[int]], list[list[float]], list[float] | None]


def context_ids(tokenizer, task: Task, arm: str = "qcp", budget: int | None = None, seed: int = 0) -> list[int]:
    """The teacher's prompt for `task`: the student prompt plus the privileged text of `arm`, unshortened
    (the actor fits it to the engine with :func:`piplay_ray.method.privileged.context_ids`)."""
    return protocol.teacher_prompt_ids(tokenizer, task.question, privileged.render(task, arm, budget, seed=seed) or "")


def sequence(context: Sequence[int], trajectory: Trajectory) -> tuple[list[int], int]:
    """(teacher context + the student's response ids, index of the first response token)."""
    if len(trajectory.mask) != len(trajectory.response_ids):
        raise ValueError(f"trajectory mask ({len(trajectory.mask)}) and response ({len(trajectory.response_ids)}) "
                         "lengths differ")
    return list(context) + list(trajectory.response_ids), len(context)


def empty_scores(n: int, tail: bool) -> Scores:
    """Rows for a response the teacher could not score: no distribution anywhere."""
    return [[] for _ in range(n)], [[] for _ in range(n)], ([0.0] * n if tail else None)


def topk_from_logits(logits: Tensor, mask: Sequence[int], k: int, tail: bool) -> Scores:
    """Top-K ids/logprobs (and log tail mass) from logits [R, V] predicting the R response tokens.

    Row i of `logits` is the forward output at the position *before* response token i. Positions with
    mask 0 get empty rows (tail 0.0).
    """
    if logits.shape[0] != len(mask):
        raise ValueError(f"topk_from_logits: {logits.shape[0]} logit rows for {len(mask)} response tokens")
    n = len(mask)
    ids: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    tails = [0.0] * n if tail else None
    sel = [i for i, m in enumerate(mask) if m]
    if not sel:
        return ids, lps, tails
    logp = torch.log_softmax(logits[sel].float(), dim=-1)
    k = min(k, logp.shape[-1])
    top_lp, top_ids = logp.topk(k, dim=-1)  # sorted, best first
    if tail:
        rest = logp.scatter(-1, top_ids, float("-inf"))
        tail_lp = torch.logsumexp(rest, dim=-1).clamp(min=LOG_FLOOR)
    for j, i in enumerate(sel):
        ids[i], lps[i] = top_ids[j].tolist(), top_lp[j].tolist()
        if tails is not None:
            tails[i] = float(tail_lp[j])
    return ids, lps, tails


def tail_from_topk(logprobs: Sequence[float]) -> float:
    """log(1 - sum exp(logprobs)): the mass outside a top-K that only reports its K logprobs."""
    if not logprobs:
        return 0.0
    s = float(torch.logsumexp(torch.tensor(logprobs, dtype=torch.float64), dim=0))
    if s >= -1e-12:
        return LOG_FLOOR
    return max(math.log(-math.expm1(s)), LOG_FLOOR)
