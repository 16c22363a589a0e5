"""Leakage and disagreement diagnostics of a student step (pure; the loop logs them as `diag/*`), and the
dashboard's sampled-trajectory rows with their per-token disagreement (:func:`sample_row`).

- teacher–student KL split by the segment of each generated token: reasoning (think and free text),
  search query (inside `<search>…</search>`), answer (inside `<answer>…</answer>`). Per token the value is
  the one-sample estimate log π^S(y_t) − log π^T(y_t) at the sampled token (its mean over tokens sampled
  from π^S estimates KL(π^S ‖ π^T)); the teacher's tail mass stands in for π^T(y_t) outside its top-K.
- teacher top-1 agreement: share of sampled tokens that are the teacher's most likely token.
- share of trajectories that answer before any search.
- share of trajectories whose task answer appears in the teacher's privileged text but not in what the
  student saw (its question and the documents its own searches returned): how often distillation carries
  an answer the student could not have read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from piplay_ray.method import protocol
from piplay_ray.method.rewards import normalize_answer
from piplay_ray.records import Hop, Task, Trajectory, to_dict

SEGMENTS = ("reasoning", "search", "answer")
_BLOCKS = {"search": (protocol.SEARCH_OPEN, protocol.SEARCH_CLOSE),
           "answer": (protocol.ANSWER_OPEN, protocol.ANSWER_CLOSE)}


def segments(token_texts: Sequence[str], mask: Sequence[int]) -> list[str | None]:
    """The segment of each response token (None where mask is 0: inserted text is nobody's segment).

    A token belongs to the block its first character falls in; a block runs from its opening tag through
    its closing tag (or to the end of the text when unclosed); everything else is reasoning.
    """
    if len(token_texts) != len(mask):
        raise ValueError(f"segments: {len(token_texts)} token texts for {len(mask)} mask entries")
    text = "".join(token_texts)
    spans: list[tuple[int, int, str]] = []
    for kind, (open_tag, close_tag) in _BLOCKS.items():
        for m in re.finditer(re.escape(open_tag), text):
            end = text.find(close_tag, m.end())
            spans.append((m.start(), len(text) if end < 0 else end + len(close_tag), kind))
    out: list[str | None] = []
    pos = 0
    for tok, m in zip(token_texts, mask, strict=True):
        if m:
            out.append(next((k for a, b, k in spans if a <= pos < b), "reasoning"))
        else:
            out.append(None)
        pos += len(tok)
    return out


def token_disagreement(traj: Trajectory, teacher_ids: list[list[int]] | None,
                       teacher_logprobs: list[list[float]] | None,
                       teacher_tail: list[float] | None) -> list[float | None]:
    """log π^S(y_t) − log π^T(y_t) per response token (None where mask is 0 or the teacher gave no row)."""
    out: list[float | None] = []
    for i, (tok, m) in enumerate(zip(traj.response_ids, traj.mask, strict=True)):
        if not m or not teacher_ids or not teacher_ids[i]:
            out.append(None)
            continue
        ids, lps = teacher_ids[i], teacher_logprobs[i]
        if tok in ids:
            lp_t = lps[ids.index(tok)]
        elif teacher_tail:
            lp_t = teacher_tail[i]
        else:
            lp_t = min(lps)
        value = traj.logprobs[i] - lp_t
        out.append(value if math.isfinite(value) else None)
    return out


def answer_in(text: str, answer: str) -> bool:
    """Whether the normalised answer occurs (whole words) in the normalised text."""
    a = normalize_answer(answer)
    return bool(a) and f" {a} " in f" {normalize_answer(text)} "


def student_context(question: str, hops: Sequence[Hop]) -> str:
    """What the student saw: its question and the documents its own searches returned."""
    return "\n".join([question, *(f"{d.title}\n{d.contents}" for h in hops for d in h.docs)])


class StepDiagnostics:
    """Accumulates one student step, trajectory by trajectory; `metrics()` gives the `diag/*` means."""

    def __init__(self):
        self.kl = {s: [0.0, 0] for s in SEGMENTS}
        self.top1 = [0, 0]
        self.before_search = [0, 0]
        self.only_teacher = [0, 0]

    def add(self, traj: Trajectory, token_texts: Sequence[str], answer: str, question: str,
            teacher_text: str | None, teacher_ids=None, teacher_logprobs=None, teacher_tail=None) -> None:
        self.before_search[0] += traj.finish_reason == "answer" and not traj.hops
        self.before_search[1] += 1
        if teacher_text is None:  # no teacher (teacher.privileged = none)
            return
        self.only_teacher[0] += answer_in(teacher_text, answer) and not answer_in(
            student_context(question, traj.hops), answer)
        self.only_teacher[1] += 1
        values = token_disagreement(traj, teacher_ids, teacher_logprobs, teacher_tail)
        for v, seg in zip(values, segments(token_texts, traj.mask), strict=True):
            if v is not None and seg is not None:
                self.kl[seg][0] += v
                self.kl[seg][1] += 1
        for i, tok in enumerate(traj.response_ids):
            if traj.mask[i] and teacher_ids and teacher_ids[i]:
                self.top1[0] += teacher_ids[i][0] == tok
                self.top1[1] += 1

    def metrics(self) -> dict[str, float]:
        out = {f"diag/kl_{s}": total / n for s, (total, n) in self.kl.items() if n}
        for name, (hit, n) in (("teacher_top1_agreement", self.top1), ("answer_before_search", self.before_search),
                               ("answer_only_in_teacher", self.only_teacher)):
            if n:
                out[f"diag/{name}"] = hit / n
        return out


def sample_row(task: Task, traj: Trajectory, reward: float, tokens: list[str],
               teacher_ids: list[list[int]] | None, teacher_logprobs: list[list[float]] | None,
               teacher_tail: list[float] | None) -> dict:
    """A dashboard row: the task, the trajectory and a per-token teacher–student disagreement.

    The per-token value is the one-sample estimate of KL(student ‖ teacher) at that position,
    log p_student(y_t) − log p_teacher(y_t), with the teacher's tail mass standing in for log p_teacher
    when y_t is outside its top-K. It is what colours the dashboard's tokens; the training loss uses the
    full top-K form.
    """

    token_kl = [None if v is None else round(v, 4)
                for v in token_disagreement(traj, teacher_ids, teacher_logprobs, teacher_tail)]
    task_d = to_dict(task)
    task_d["trajectory"] = None  # the examiner's own trajectory is not needed to browse the student's
    return {"task": task_d, "trajectory": to_dict(traj), "reward": reward, "tokens": tokens, "token_kl": token_kl}
