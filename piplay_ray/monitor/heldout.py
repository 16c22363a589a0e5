"""A run's held-out evaluations (pure, from `eval/*/`): each set's EM before and after training.

The headline is the natural-question set when the run evaluated it (else all questions together); every set
evaluated is reported, the rule-built one as the protocol check. Before → after is the before-training
evaluation and the newest one; each EM has its standard error sqrt(p(1-p)/n), and the change is also paired
by question (`paired`: its SE is smaller, and it counts the questions gained and lost).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from piplay_ray.records import NATURAL_SOURCE
from piplay_ray.rundir import eval_dir

OVERALL = "overall"


def finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def within(run: Path, path: Path) -> bool:
    return run in path.resolve().parents


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (metrics.jsonl, examples.jsonl); a damaged line, or the half-written last one
    of a live run, is skipped; a missing file has none."""
    rows = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict):
                    rows.append(r)
    except OSError:
        pass
    return rows


def evaluations(run: Path) -> list[tuple[str, dict, int | None]]:
    """(name, summary by group, student step where recorded) of the evaluations under eval/: before-training
    first, then iter-N by N."""
    out = []
    for f in eval_dir(run).glob("*/metrics.json"):
        if not within(run, f):
            continue
        try:
            data = json.loads(f.read_text())
            s, step, mtime = data["summary"], data.get("student_step"), f.stat().st_mtime
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            continue
        if isinstance(s, dict) and isinstance(s.get(OVERALL), dict) and finite(s[OVERALL].get("em")):
            it = f.parent.name.removeprefix("iter-")
            out.append(((f.parent.name != "before-training", int(it) if it.isdigit() else -1, mtime),
                        f.parent.name, s, step if finite(step) else None))
    return [(name, s, step) for _, name, s, step in sorted(out, key=lambda e: e[0])]


def _records(run: Path, name: str) -> list[dict]:
    """The per-question records of one evaluation (those with an id and a score)."""
    path = eval_dir(run) / name / "examples.jsonl"
    return [r | {"data_source": r.get("data_source", "")} for r in (read_jsonl(path) if within(run, path) else [])
            if "id" in r and finite(r.get("em"))]


def paired(before: Sequence[dict], after: Sequence[dict], metric: str = "em") -> dict | None:
    """The change of `metric` on the questions evaluated both times, paired by question id.

    Returns n, before, after, delta, its standard error sd(after - before) / sqrt(n) (the paired differences'
    sample standard deviation), and the questions gained (wrong before, right after) and lost; None when no
    question was evaluated both times.
    """
    old = {r["id"]: float(r[metric]) for r in before}
    pairs = [(old[r["id"]], float(r[metric])) for r in after if r["id"] in old]
    n = len(pairs)
    if not n:
        return None
    diffs = [a - b for b, a in pairs]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return {"n": n, "before": sum(b for b, _ in pairs) / n, "after": sum(a for _, a in pairs) / n, "delta": mean,
            "se": math.sqrt(var / n), "gained": sum(b < 0.5 <= a for b, a in pairs),
            "lost": sum(a < 0.5 <= b for b, a in pairs)}


def headline(summary: dict) -> str:
    return NATURAL_SOURCE if NATURAL_SOURCE in summary else OVERALL


def sets(summary: dict) -> list[str]:
    """The headline group, then every other question set evaluated (not its single/two-article parts)."""
    first = headline(summary)
    return [first] + [g for g in summary if "/" not in g and g not in (first, OVERALL)]


def _em(m: dict) -> dict:
    p, n = float(m["em"]), int(m.get("n") or 0)
    return {"em": p, "se": math.sqrt(p * (1 - p) / n) if n else None, "n": n}


def report(run: Path) -> dict:
    """{"before": name, "after": name, "sets": {group: {"before", "after": {em, se, n}, "change": paired}}}
    for the evaluations so far (each part only where measured); the first set is the headline."""
    evals = evaluations(run)
    before = evals[0] if evals and evals[0][0] == "before-training" else None
    after = evals[-1] if evals and evals[-1] is not before else None
    out: dict = {"sets": {}}
    if not evals:
        return out
    newest = evals[-1][1]
    old = _records(run, before[0]) if before and after else []
    new = _records(run, after[0]) if before and after else []
    for group in sets(newest):
        entry = {}
        for label, ev in (("before", before), ("after", after)):
            if ev is not None and finite((ev[1].get(group) or {}).get("em")):
                entry[label] = _em(ev[1][group])
                out[label] = ev[0]
        if old and new:
            keep = (lambda r: True) if group == OVERALL else (lambda r, g=group: r["data_source"] == g)
            entry["change"] = paired([r for r in old if keep(r)], [r for r in new if keep(r)])
        out["sets"][group] = entry
    out["newest"] = newest[headline(newest)]
    return out


def curve(run: Path) -> list[dict]:
    """Every evaluation in order (before-training, then iter-N): its name, the student step it evaluated
    (where its metrics.json says) and each set's {em, se, n}."""
    out = []
    for name, s, step in evaluations(run):
        out.append({"name": name, "student_step": step,
                    "sets": {g: _em(s[g]) for g in sets(s) if finite((s.get(g) or {}).get("em"))}})
    return out
