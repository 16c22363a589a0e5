"""Evaluation of a student search agent and its baselines through a rollout pool; the results' files.

Evaluation runs through the same rollout workers and search environment as training, greedy; the scores are
`method.scores`, a pure function of the per-example records. The questions come from `method.qa` (QA files,
or the built-in natural and rule-built sets); `piplay eval` is `commands/eval.py`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from piplay_ray import assets
from piplay_ray.fault import partial
from piplay_ray.method.qa import QAExample, builtin_eval_set, golden_for_title, load_qa, natural_set
from piplay_ray.method.scores import flat_metrics, record, summarize
from piplay_ray.records import Trajectory

# the agent, and the baselines `piplay eval` puts beside it: the model without search, BM25 without a model
METHODS = ("agent", "closed_book", "retrieval")


def example_record(ex: QAExample, traj: Trajectory) -> dict:
    """One example the model answered (as the agent or closed-book): the scores and the agent's behaviour."""
    return record(ex, traj.answer, searches=traj.num_searches, turns=traj.turns, finish_reason=traj.finish_reason,
                  queries=[h.query for h in traj.hops], text=traj.text)


async def evaluate(pool, examples: Sequence[QAExample], temperature: float | None = 0.0,
                   closed_book: bool = False) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Run every question once through a student rollout pool (greedy by default), as the search agent or,
    `closed_book`, as the model alone; returns (summary, per-example records). A question the pool lost after
    its retries is asked once more, then scored as unanswered with the reason in its record (`finish_reason`
    "lost: ..."): an evaluation never fails a run."""
    def ask(questions):
        return partial(pool.student_rollouts(questions, 1, temperature=temperature, closed_book=closed_book))

    trajs, reason = await ask([ex.question for ex in examples])
    lost = [i for i, group in enumerate(trajs) if group is None]
    if lost:
        again, reason = await ask([examples[i].question for i in lost])
        for i, group in zip(lost, again, strict=True):
            trajs[i] = group
    records = [example_record(ex, group[0]) if group is not None else lost_record(ex, reason)
               for ex, group in zip(examples, trajs, strict=True)]
    return summarize(records), records


def lost_record(ex: QAExample, reason: str | None) -> dict:
    """An example whose rollout was lost: scored as an empty trajectory (no prediction), the reason kept."""
    return example_record(ex, Trajectory(prompt_ids=[])) | {"finish_reason": f"lost: {reason}"}


def retrieval_records(search, examples: Sequence[QAExample]) -> list[dict]:
    """BM25 alone: the top-1 article's title (without a disambiguation suffix) as the answer."""
    results = search.search([ex.question for ex in examples], topk=1)
    return [record(ex, golden_for_title(r.docs[0].title)[-1] if r.docs else None, searches=1,
                   finish_reason="answer" if r.docs else "no document", queries=[r.query])
            for ex, r in zip(examples, results, strict=True)]


async def evaluate_pool(pool, cfg, out: str | os.PathLike | None = None, meta: dict | None = None) -> dict[str, float]:
    """The driver's evaluation on the configured sets: flat scores (natural/em, overall/em, ...), per-example
    outputs and metrics.json (with `meta`, e.g. the student step) written under `out` when given."""
    examples = load_eval_examples(cfg)
    t0 = time.time()
    summary, records = await evaluate(pool, examples)
    lost = sum(r["finish_reason"].startswith("lost") for r in records)
    if out is not None:
        write_results(out, summary, records, {"examples": len(examples), "lost": lost,
                                              "seconds": round(time.time() - t0, 1), **(meta or {})})
    return flat_metrics(summary, prefix="") | ({"overall/lost": lost} if lost else {})


def write_results(out: str | os.PathLike, summary: dict, records: Sequence[dict], meta: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "examples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps({"summary": summary, **(meta or {})}, indent=1))
    return out


def load_eval_examples(cfg, data: Sequence[str] | None = None) -> list[QAExample]:
    """The QA files named by `data` (else `cfg.eval.data`), else the built-in sets: the natural questions
    (those written on the configured corpus; `eval.natural_size` of them) and the rule-built ones; capped by
    max_examples."""
    files = list(data or cfg.eval.data)
    if files:
        examples = [ex for path in files for ex in load_qa(path)]
    else:
        corpus, e = assets.resolve_corpus(cfg.search.corpus), cfg.eval
        natural = natural_set(corpus, e.natural_size, cfg.run.seed) if e.natural_size != 0 else []
        examples = natural + builtin_eval_set(corpus, e.rule_size, cfg.run.seed)
    return examples[: cfg.eval.max_examples] if cfg.eval.max_examples else examples


def eval_config(cfg):
    """Evaluation decodes greedily; everything else (turns, budgets, search) is the training setup."""
    cfg = cfg.model_copy(deep=True)
    cfg.rollout.temperature = 0.0
    return cfg
