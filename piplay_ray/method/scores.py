"""Scores of an evaluation (pure: no Ray, no model): per-example records, groups, tables.

An evaluation's records are one dict per question; every score below is a function of them alone, so a
scripted engine gives exactly known numbers. Groups are the question's set (its `data_source`) and, where the
set says, its shape: a single-article question or a two-article one (bridge or comparison).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from piplay_ray.method.qa import QAExample
from piplay_ray.method.rewards import exact_match, f1

METRICS = ("em", "f1", "searches", "turns", "answer_words", "invalid")
SHOWN = ("em", "f1", "searches")  # the columns of a comparison of methods


def record(ex: QAExample, pred: str | None, *, searches: int = 0, turns: int = 0, finish_reason: str = "answer",
           **extra) -> dict:
    """One evaluated example: the prediction, its scores and the behaviour that produced it."""
    return {"id": ex.id, "data_source": ex.data_source, "kind": ex.kind, "question": ex.question,
            "golden_answers": ex.golden_answers, "prediction": pred, "em": exact_match(pred, ex.golden_answers),
            "f1": f1(pred, ex.golden_answers), "searches": searches, "turns": turns,
            "answer_words": len(pred.split()) if pred else 0,
            "invalid": float(pred is None or finish_reason != "answer"), "finish_reason": finish_reason, **extra}


def group_names(r: dict) -> list[str]:
    """The groups a record counts in: its set, and its set's single / two-article part when it has a kind."""
    src, kind = r["data_source"], r.get("kind") or ""
    return [src] + ([f"{src}/{'single' if kind == 'single' else 'two-article'}"] if kind else [])


def summarize(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean of every metric per group and over all examples (`overall`), with the example count `n`.

    `answer_words` is averaged over the examples that gave an answer; the rest over all examples.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        for g in group_names(r):
            groups[g].append(r)
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
    """`{group: {metric: v}}` as flat metrics.jsonl keys: eval/overall/em, eval/natural/single/f1, ..."""
    head = f"{prefix}/" if prefix else ""
    return {f"{head}{group}/{k}": float(v) for group, m in summary.items() for k, v in m.items()}


def format_table(summaries: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per group, and EM, F1 and searches per method: `summaries` is {method: summary}."""
    cols = [(m, c, len(m) + 11) for m in summaries for c in SHOWN]  # wide enough for "METHOD searches"
    groups = list(dict.fromkeys(g for s in summaries.values() for g in s))
    lines = [f"{'group':<22}{'n':>6}" + "".join(f"{f'{m} {c}':>{w}}" for m, c, w in cols)]
    for g in groups:
        n = next(int(s[g]["n"]) for s in summaries.values() if g in s)
        cells = [f"{summaries[m][g][c]:.3f}" if g in summaries[m] else "-" for m, c, _ in cols]
        lines.append(f"{g:<22}{n:>6}" + "".join(f"{v:>{w}}" for v, (_, _, w) in zip(cells, cols, strict=True)))
    return "\n".join(lines)
