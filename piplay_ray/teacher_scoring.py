"""Teacher scoring, whatever serves the teacher: which sequences to score, and their rows from an engine or a model.

`plan` turns (trajectories, tasks) into scoring jobs: each task's privileged context, fitted to its longest
response, followed by the student's response ids. Two ways answer a job with the same rows: an engine's
`prompt_topk` (prompt logprobs; the tail from the K logprobs, `rows_from_topk`), used by the teacher's vLLM
backend and by the student's engines under `teacher.backend: shared`, and a batched forward of a transformers
model (`score_batched`, the exact tail). `fill` puts the answers back in trajectory order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from piplay_ray import privileged
from piplay_ray import teacher as T
from piplay_ray.engines.base import TopK
from piplay_ray.records import Task, Trajectory


@dataclass
class Job:
    index: int  # the trajectory's position in the request
    ids: list[int]  # teacher context + the student's response
    start: int  # first response token
    mask: Sequence[int]


def plan(tokenizer, tcfg, max_len: int, seed: int, trajectories: Sequence[Trajectory],
         tasks: Sequence[Task]) -> tuple[list[Job], list[T.Scores], dict[str, int]]:
    """(jobs, empty rows for every trajectory, counts). A task's context is fitted to the longest of its
    responses: when context + response would pass `max_len`, its QCP documents are shortened evenly
    (`shortened_contexts`); a response that does not fit even then gets no job, so empty rows (no
    distillation for it, `unscored`) rather than an error. `tcfg` is the `teacher` config section."""
    if len(trajectories) != len(tasks):
        raise ValueError(f"score: {len(trajectories)} trajectories but {len(tasks)} tasks")
    longest: dict[str, int] = {}
    for traj, task in zip(trajectories, tasks, strict=True):
        longest[task.id] = max(longest.get(task.id, 0), len(traj.response_ids))
    contexts: dict[str, list[int] | None] = {}
    stats = {"shortened_contexts": 0, "unscored": 0}
    jobs, out = [], [T.empty_scores(len(t.response_ids), tcfg.tail_bucket) for t in trajectories]
    for i, (traj, task) in enumerate(zip(trajectories, tasks, strict=True)):
        if task.id not in contexts:
            ctx, shortened = privileged.context_ids(tokenizer, task, tcfg.privileged, tcfg.doc_token_budget,
                                                    max_len - longest[task.id], seed)
            contexts[task.id] = ctx
            stats["shortened_contexts"] += shortened
        if not any(traj.mask) or contexts[task.id] is None:
            stats["unscored"] += contexts[task.id] is None and tcfg.privileged != "none"
            continue
        ids, start = T.sequence(contexts[task.id], traj)
        jobs.append(Job(i, ids, start, traj.mask))
    return jobs, out, stats


def fill(out: list[T.Scores], jobs: Sequence[Job], results: Sequence[T.Scores]) -> list[T.Scores]:
    for job, res in zip(jobs, results, strict=True):
        out[job.index] = res
    return out


def rows_from_topk(top: TopK, mask: Sequence[int], tail: bool) -> T.Scores:
    """An engine's top-K at every response position as teacher rows (empty where mask 0)."""
    rows_ids = [list(r) if m else [] for r, m in zip(top.ids, mask, strict=True)]
    rows_lps = [list(r) if m else [] for r, m in zip(top.logprobs, mask, strict=True)]
    tails = [T.tail_from_topk(r) if m else 0.0 for r, m in zip(top.logprobs, mask, strict=True)] if tail else None
    return rows_ids, rows_lps, tails


@torch.inference_mode()
def score_batched(model, pad_id: int, device, jobs: Sequence[Job], k: int, tail: bool,
                  max_batch_tokens: int) -> list[T.Scores]:
    """Batched forward over left-padded sequences (at most `max_batch_tokens` per batch), keeping only the
    logits that predict response tokens."""
    results: list[T.Scores | None] = [None] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].ids))
    batch: list[int] = []

    def flush():
        if not batch:
            return
        L = max(len(jobs[i].ids) for i in batch)
        R = max(len(jobs[i].ids) - jobs[i].start for i in batch)
        ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), L), dtype=torch.long)
        for row, i in enumerate(batch):
            s = jobs[i].ids
            ids[row, L - len(s):] = torch.tensor(s)
            attn[row, L - len(s):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                       logits_to_keep=R + 1).logits
        for row, i in enumerate(batch):
            r = len(jobs[i].ids) - jobs[i].start
            # the last kept position predicts past the sequence; response token j is predicted just before it
            results[i] = T.topk_from_logits(logits[row, -(r + 1):-1], jobs[i].mask, k, tail)
        batch.clear()

    for i in order:
        if batch and (len(batch) + 1) * len(jobs[i].ids) > max_batch_tokens:
            flush()
        batch.append(i)
    flush()
    return results  # type: ignore[return-value]
