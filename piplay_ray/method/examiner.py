"""The examiner's side of self-play: what to write about, turning its rollouts into tasks, and the task set.

The examiner is what makes the method data-free. A seeded :class:`ExaminerSampler` draws source documents
(without replacement within an iteration) and hop targets (weights 4:3:2:1 for h = 1..4 by default);
:func:`build_task` turns one examiner trajectory into a :class:`~piplay_ray.records.Task` whose QCP is the
trajectory's hops exactly as the examiner saw them (the teacher's privileged information); the task set the
student trains on keeps only gate-passing tasks, one per normalised question.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from piplay_ray.config import ExaminerConfig
from piplay_ray.fault import partial
from piplay_ray.method import protocol
from piplay_ray.method.rewards import difficulty_reward, format_reward, hop_group_advantages, normalize_answer
from piplay_ray.records import Doc, Task, Trajectory, to_json
from piplay_ray.rundir import write_atomic


class DocSource(Protocol):
    """Anything indexable by row that yields Docs: `retrieval.corpus.Corpus`, or a plain list of Docs."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Doc: ...


class ExaminerSampler:
    """Seeded draws of (source document, hop target).

    Documents come from a fresh permutation per iteration, so no document is used twice in one iteration
    (when an iteration asks for more documents than the corpus has, a new permutation starts). The draws
    of iteration i depend only on (seed, i), so a resumed run writes the same prompts.
    """

    def __init__(self, docs: DocSource, hop_weights: Sequence[float] = (4, 3, 2, 1), seed: int = 0):
        if len(docs) == 0:
            raise ValueError("the examiner needs a non-empty corpus")
        if not hop_weights or min(hop_weights) < 0 or sum(hop_weights) <= 0:
            raise ValueError(f"hop_weights need a positive weight and no negative one, got {list(hop_weights)}")
        self.docs, self.hop_weights, self.seed = docs, list(hop_weights), seed
        self.start_iteration(0)

    def start_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        self._rng = random.Random(f"{self.seed}/{iteration}")
        self._order: list[int] = []

    def _next_index(self) -> int:
        if not self._order:
            self._order = list(range(len(self.docs)))
            self._rng.shuffle(self._order)
            self._order.reverse()  # pop() from the end walks the permutation in order
        return self._order.pop()

    def sample_hops(self, n: int) -> list[int]:
        return self._rng.choices(range(1, len(self.hop_weights) + 1), weights=self.hop_weights, k=n)

    def sample(self, n: int) -> tuple[list[Doc], list[int]]:
        """`n` source documents (distinct within the iteration) and their hop targets."""
        docs = [self.docs[self._next_index()] for _ in range(n)]
        return docs, self.sample_hops(n)


def task_id(iteration: int, source: Doc, hop_target: int, question: str, answer: str, version: int) -> str:
    key = json.dumps([iteration, source.id, hop_target, question, answer, version])
    return f"it{iteration}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def build_task(traj: Trajectory, source: Doc, hop_target: int, cfg: ExaminerConfig,
               iteration: int = 0) -> Task:
    """The task an examiner trajectory wrote, with its QCP, gate flags and format reward.

    Never raises for a malformed trajectory: it becomes a task with empty fields, failing flags and r_f = 0.
    """
    question = traj.extra.get("question") or protocol.extract_question(traj.text) or ""
    answer = traj.answer if traj.answer is not None else (protocol.extract_answer(traj.text) or "")
    qcp = list(traj.hops)
    r_f, flags = format_reward(question, answer, hop_target, qcp, source, traj.finish_reason,
                               cfg.answer_max_words, invalid_turns=int(traj.extra.get("invalid_turns", 0)),
                               think_share=protocol.think_share(traj.text), mode=cfg.format_reward)
    return Task(id=task_id(iteration, source, hop_target, question, answer, traj.version),
                question=question.strip(), answer=answer.strip(), hops=hop_target, source=source, qcp=qcp,
                trajectory=traj, flags=flags, format_reward=r_f, iteration=iteration, version=traj.version)


async def write_tasks(pool, sampler: ExaminerSampler, n: int, cfg: ExaminerConfig,
                      iteration: int = 0) -> list[Task]:
    """Run `n` examiner attempts on the rollout pool and build their tasks (valid or not, in order). An
    attempt the pool lost after its retries is no attempt: the caller writes more rounds or tops up."""
    docs, hops = sampler.sample(n)
    trajs, _ = await partial(pool.examiner_rollouts(docs, hops))
    return [build_task(t, d, h, cfg, iteration) for t, d, h in zip(trajs, docs, hops, strict=True) if t is not None]


def gate_failures(tasks: Sequence[Task]) -> dict[str, float]:
    """Per gate flag, the share of `tasks` failing it (a task may fail several): why the gate pass rate is low."""
    flags = sorted({k for t in tasks for k in t.flags})
    return {k: sum(not t.flags.get(k, False) for t in tasks) / len(tasks) for k in flags} if tasks else {}


def examiner_rewards(tasks: Sequence[Task], correct: Sequence[int | None], n: int, w_f: float,
                     eps: float = 1e-6, std_normalize: bool = True) -> tuple[list[float], list[float]]:
    """Difficulty rewards and hop-grouped advantages for a batch of examiner tasks.

    `correct[i]` is how many of the `n` student attempts on task i were exactly right; None (no attempts,
    e.g. a task that failed the gate) counts as 0, so such a task earns only w_f r_f = 0.
    """
    if len(tasks) != len(correct):
        raise ValueError(f"tasks and correct counts differ in length: {len(tasks)} vs {len(correct)}")
    rewards = [difficulty_reward(k or 0, n, t.format_reward, w_f) for t, k in zip(tasks, correct, strict=True)]
    return rewards, hop_group_advantages(rewards, [t.hops for t in tasks], eps, std_normalize)


# ------------------------------------------------------------------------------------------ task set


def select_tasks(tasks: Iterable[Task], size: int | None = None) -> list[Task]:
    """The student's task set: gate-passing tasks, first of each normalised question, at most `size`."""
    out, seen = [], set()
    for t in tasks:
        key = normalize_answer(t.question)
        if not t.valid or not key or key in seen:
            continue
        seen.add(key)
        out.append(t)
        if size is not None and len(out) >= size:
            break
    return out


def compose_task_set(written: Sequence[Task], candidates: Sequence[Task], size: int,
                     fallback: bool = False) -> tuple[list[Task], int]:
    """The student's task set from what the final examiner `written` (gate-passing, deduplicated); with
    `fallback`, the examiner's training-time `candidates` fill what is left. Returns the set and how many
    came from the candidates (the caller tops up by rule, counted, after both)."""
    tasks = select_tasks(written, size)
    n_written = len(tasks)
    if fallback and n_written < size:
        tasks = select_tasks([*tasks, *candidates], size)
    return tasks, len(tasks) - n_written


def save_tasks(path: str | os.PathLike, tasks: Iterable[Task]) -> Path:
    """Write tasks as JSONL atomically (a reader never sees half a task set)."""
    return write_atomic(path, "".join(to_json(t) + "\n" for t in tasks))


def load_tasks(path: str | os.PathLike) -> list[Task]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task set not found: {path}")
    tasks = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tasks.append(Task.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a task record: {e}") from None
    return tasks
