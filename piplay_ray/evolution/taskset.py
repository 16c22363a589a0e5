"""The student's task set of one iteration: written by the final examiner, topped up by rule (no Ray, no
logging; the loop saves, logs and accounts for it)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from piplay_ray.config import Config
from piplay_ray.method.examiner import ExaminerSampler, compose_task_set, select_tasks, write_tasks
from piplay_ray.method.qa import builtin_eval_set, held_out_articles
from piplay_ray.records import Hop, Task


@dataclass
class TaskSet:
    tasks: list[Task]
    attempts: list[Task]  # every task the examiner wrote for it, passing the gate or not
    pass_rate: float  # share of those attempts that passed the integrity gate
    examiner_written: int  # by the final examiner
    training_candidates: int  # gate-passing tasks kept from the examiner phase (examiner.task_set_fallback)
    rule_built: int  # topped up by rule_tasks


def rule_tasks(corpus, n: int, iteration: int, seed: int, eval_size: int) -> list[Task]:
    """Up to `n` corpus tasks built by the evaluation set's rule, none of them on a held-out evaluation article.

    They top up a task set when the examiner wrote too few gate-passing tasks (a small base model often
    writes none early on); the QCP is the one search that leads from the clue to the answer's article.
    Every such task is counted as `tasks/rule_built`. A corpus without titles and descriptions (e.g.
    wiki-18) has no such rule: then the task set holds only what the examiner wrote.
    """
    try:
        held_out = held_out_articles(corpus.path, eval_size, seed)
        pool = builtin_eval_set(corpus.path, n + len(held_out), seed=seed * 1000 + iteration + 1)
    except ValueError:
        return []
    picked = [ex for ex in pool if ex.supports[0] not in held_out][:n]
    wanted = {ex.supports[0] for ex in picked}
    docs = {d.id: d for d in (corpus[i] for i in range(len(corpus))) if d.id in wanted}
    return [Task(id=f"it{iteration}-rule-{doc.id}", question=ex.question, answer=ex.golden_answers[0], hops=1,
                 source=doc, qcp=[Hop(query=ex.question, docs=[doc])], flags={"rule_built": True},
                 iteration=iteration)
            for ex in picked if (doc := docs.get(ex.supports[0]))]


async def write_task_set(cfg: Config, iteration: int, examiner_pool, sampler: ExaminerSampler,
                         candidates: Sequence[Task], corpus, rng: random.Random, top_up=None) -> TaskSet:
    """The examiner (its pool already at the final version) writes in up to `examiner.task_set_rounds`
    rounds until `cfg.task_set_size` tasks pass; training-time `candidates` fill in only with
    `examiner.task_set_fallback`; `top_up` (rule-built tasks) fills what is left. Shuffled with `rng`."""
    ecfg = cfg.examiner
    size = cfg.task_set_size
    written: list[Task] = []
    for _ in range(ecfg.task_set_rounds):  # the examiner writes until the set is full (bounded)
        written += await write_tasks(examiner_pool, sampler, size, ecfg, iteration)
        if len(select_tasks(written, size)) >= size:
            break
    tasks, n_fallback = compose_task_set(written, candidates, size, ecfg.task_set_fallback)
    n_examiner = len(tasks)
    if n_examiner < size:  # top up by rule; counted, never silent
        tasks += (top_up or rule_tasks)(corpus, size - n_examiner, iteration, cfg.run.seed, cfg.eval.rule_size)
    if not tasks:
        raise RuntimeError(f"iteration {iteration}: no student tasks — the examiner wrote none that passed the "
                           "gate and this corpus has no titles/descriptions for rule-built tasks")
    rng.shuffle(tasks)
    pass_rate = sum(t.valid for t in written) / len(written) if written else 0.0
    return TaskSet(tasks, written, pass_rate, n_examiner - n_fallback, n_fallback, len(tasks) - n_examiner)
