"""Evaluation of a student search agent: scoring, the run's evaluation through a rollout pool, results.

Evaluation runs through the same rollout workers and search environment as training, greedy, and scoring is a
pure function of the per-example records, so a scripted engine gives exactly known numbers. The questions come
from `method.qa` (QA files, or the rule-built set); `piplay eval` is `commands/eval.py`.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from piplay_ray import assets
from piplay_ray.fault import partial
from piplay_ray.method.qa import QAExample, builtin_eval_set, load_qa
from piplay_ray.method.rewards import exact_match, f1
from piplay_ray.records import Trajectory

METRICS = ("em", "f1", "searches", "turns", "answer_words", "invalid")


def example_record(ex: QAExample, traj: Trajectory) -> dict:
    """One evaluated example: the prediction, its scores and the agent's behaviour."""
    pred = traj.answer
    invalid = pred is None or traj.finish_reason != "answer"
    return {
        "id": ex.id, "data_source": ex.data_source, "question": ex.question, "golden_answers": ex.golden_answers,
        "prediction": pred, "em": exact_match(pred, ex.golden_answers), "f1": f1(pred, ex.golden_answers),
        "searches": traj.num_searches, "turns": traj.turns,
        "answer_words": len(pred.split()) if pred else 0, "invalid": float(invalid),
        "finish_reason": traj.finish_reason, "queries": [h.query for h in traj.hops], "text": traj.text,
    }


def summarize(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean of every metric per data source and over all examples (`overall`), with the example count.

    `answer_words` is averaged over the examples that gave an answer; the rest over all examples.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["data_source"]].append(r)
    out = {}
    for name, rows in [*sorted(groups.items()), ("overall", list(records))]:
        if not rows:
            continue
        m = {k: sum(r[k] for r in rows) / len(rows) for k in METRICS if k != "answer_words"}
        answered = [r["answer_words"] for r in rows if r["prediction"] is not None]
        m["answer_words"] = sum(answered) / len(answered) if answered else 0.0
        m["n"] = len(rows)
        out[name] = m
    return out


def flat_metrics(summary: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """`{source: {metric: v}}` as flat metrics.jsonl keys: eval/overall/em, eval/<source>/f1, ..."""
    head = f"{prefix}/" if prefix else ""
    return {f"{head}{src}/{k}": float(v) for src, m in summary.items() for k, v in m.items()}


async def evaluate(pool, examples: Sequence[QAExample],
                   temperature: float | None = 0.0) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Run every question once through a student rollout pool (greedy by default); returns (summary,
    per-example records). A question the pool lost after its retries is asked once more, then scored as
    unanswered with the reason in its record (`finish_reason` "lost: ..."): an evaluation never fails a run."""
    trajs, reason = await partial(pool.student_rollouts([ex.question for ex in examples], 1, temperature=temperature))
    lost = [i for i, group in enumerate(trajs) if group is None]
    if lost:
        again, reason = await partial(pool.student_rollouts([examples[i].question for i in lost], 1,
                                                            temperature=temperature))
        for i, group in zip(lost, again, strict=True):
            trajs[i] = group
    records = [example_record(ex, group[0]) if group is not None else lost_record(ex, reason)
               for ex, group in zip(examples, trajs, strict=True)]
    return summarize(records), records


def lost_record(ex: QAExample, reason: str | None) -> dict:
    """An example whose rollout was lost: scored as an empty trajectory (no prediction), the reason kept."""
    return example_record(ex, Trajectory(prompt_ids=[])) | {"finish_reason": f"lost: {reason}"}


async def evaluate_pool(pool, cfg, out: str | os.PathLike | None = None) -> dict[str, float]:
    """The driver's end-of-iteration evaluation on the configured set: flat scores (overall/em, ...),
    per-example outputs and metrics.json written under `out` when given."""
    examples = load_eval_examples(cfg)
    t0 = time.time()
    summary, records = await evaluate(pool, examples)
    lost = sum(r["finish_reason"].startswith("lost") for r in records)
    if out is not None:
        write_results(out, summary, records, {"examples": len(examples), "lost": lost,
                                              "seconds": round(time.time() - t0, 1)})
    return flat_metrics(summary, prefix="") | ({"overall/lost": lost} if lost else {})


def format_table(summary: dict[str, dict[str, float]]) -> str:
    cols = ("n", *METRICS)
    lines = [f"{'source':<24}" + "".join(f"{c:>13}" for c in cols)]
    for src, m in summary.items():
        lines.append(f"{src:<24}" + "".join(f"{m[c]:>13d}" if c == "n" else f"{m[c]:>13.4f}" for c in cols))
    return "\n".join(lines)


def write_results(out: str | os.PathLike, summary: dict, records: Sequence[dict], meta: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "examples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps({"summary": summary, **(meta or {})}, indent=1))
    return out


def load_eval_examples(cfg, data: Sequence[str] | None = None) -> list[QAExample]:
    """The QA files named by `data` (else `cfg.eval.data`), else the built-in set; capped by max_examples."""
    files = list(data or cfg.eval.data)
    if files:
        examples = [ex for path in files for ex in load_qa(path)]
    else:
        examples = builtin_eval_set(assets.resolve_corpus(cfg.search.corpus), cfg.eval.builtin_size, cfg.run.seed)
    return examples[: cfg.eval.max_examples] if cfg.eval.max_examples else examples


def eval_config(cfg):
    """Evaluation decodes greedily; everything else (turns, budgets, search) is the training setup."""
    cfg = cfg.model_copy(deep=True)
    cfg.rollout.temperature = 0.0
    return cfg
