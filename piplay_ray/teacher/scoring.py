"""Teacher scoring, whatever serves the teacher: which sequences to score, and their rows from an engine or a model.

`plan` turns (trajectories, tasks) into scoring jobs: each task's privileged context, fitted to its longest
response, followed by the student's response ids. Two ways answer a job with the same rows: an engine's
`prompt_topk` (prompt logprobs; the tail from the K logprobs, `rows_from_topk`), used by the teacher's vLLM
backend and by the student's engines under `teacher.backend: shared`, and a batched forward of a transformers
model (`score_batched`, the exact tail; a context shared by several responses computed once). `fill` puts the
answers back in trajectory order.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from piplay_ray.cluster import heap
from piplay_ray.engines.base import TopK
from piplay_ray.method import privileged
from piplay_ray.records import Task, Trajectory
from piplay_ray.teacher import context as T


@dataclass
class Job:
    index: int  # the trajectory's position in the request
    ids: list[int]  # teacher context + the student's response
    start: int  # first response token
    mask: Sequence[int]

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.start


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
            stats["unscored"] += contexts[task.id] is None and privileged.arm(tcfg.privileged).teaches
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
    """The rows of `jobs` from a transformers model, each shared context computed once: the G responses of a
    task share its privileged context, so the context runs once, its key/value cache is repeated for the
    responses, and those run side by side, right-padded (causal attention: no response sees the padding
    after it), at most `max_batch_tokens` response tokens a forward. Response token j is predicted by the
    position before it: the context's last position for j = 0, the response's own j - 1 after that."""
    results: list[T.Scores | None] = [None] * len(jobs)
    shared: dict[tuple[int, ...], list[int]] = {}
    for i, job in enumerate(jobs):
        shared.setdefault(tuple(job.ids[:job.start]), []).append(i)

    def run(context_out, chunk: list[int]) -> None:
        ids = torch.full((len(chunk), max(jobs[i].response_len for i in chunk)), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : jobs[i].response_len] = torch.tensor(jobs[i].ids[jobs[i].start:])
        cache = copy.deepcopy(context_out.past_key_values)
        cache.batch_repeat_interleave(len(chunk))
        logits = model(input_ids=ids.to(device), past_key_values=cache).logits
        for row, i in enumerate(chunk):
            rows = torch.cat([context_out.logits[0, -1:], logits[row, : jobs[i].response_len - 1]])
            results[i] = T.topk_from_logits(rows, jobs[i].mask, k, tail)

    for context, members in shared.items():
        out = model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
        chunk: list[int] = []
        for i in sorted(members, key=lambda i: jobs[i].response_len):
            if chunk and (len(chunk) + 1) * jobs[i].response_len > max_batch_tokens:
                run(out, chunk)
                chunk = []
            chunk.append(i)
        run(out, chunk)
    heap.release()  # the forwards' activations, while the learner works
    return results  # type: ignore[return-value]
